"""Vertebral level naming on the validation phantoms: the network's own level labels against the levels fitted
along the spine (models/spine.py), as mean Dice over the levels in view and voxel accuracy.

    .venv/bin/python tests/benchmarks/bench_spine_levels.py [--model models/default] [--cases 24]

Needs the validation phantoms on the model grid (made by `wbmri train` / `wbmri validate` in data/cache/val_*).
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def level_scores(pred: np.ndarray, ref: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
    """Mean Dice over the levels present in ``ref`` and the share of reference vertebra voxels named right."""
    from training.metrics import dice
    dices = [dice(pred == i, ref == i) for i in ids if (ref == i).any()]
    m = np.isin(ref, ids)
    return float(np.mean(dices)), float((pred[m] == ref[m]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--cases", type=int, default=24)
    args = ap.parse_args()
    from inference.predictor import Predictor
    from models.spine import LEVELS, renumber_vertebrae
    from models.sites import site_id
    ids = np.array([site_id(c) for c in LEVELS])
    files = sorted(glob.glob(str(ROOT / "data/cache/val_*/*.npz")))[:args.cases]
    if not files:
        sys.exit("no validation phantoms in data/cache/val_*: run `wbmri validate` once first")
    predictor = Predictor.load(args.model)
    rows = []
    for f in files:
        case = np.load(f)
        if not np.isin(case["sites"], ids).any():
            continue
        raw = predictor.network_outputs(case["image"].astype(np.float32)).sites
        fitted = renumber_vertebrae(raw, predictor.bundle.config.spacing_mm)
        rows.append((*level_scores(raw, case["sites"], ids), *level_scores(fitted, case["sites"], ids)))
        print(f"{Path(f).stem} {str(case['fov']):11s} raw Dice {rows[-1][0]:.2f} acc {rows[-1][1]:.2f}  "
              f"fitted Dice {rows[-1][2]:.2f} acc {rows[-1][3]:.2f}", flush=True)
    r = np.mean(rows, axis=0)
    print(f"\n{len(rows)} cases with vertebrae in view: mean level Dice {r[0]:.3f} (network) -> {r[2]:.3f} (fitted); "
          f"voxel level accuracy {r[1]:.3f} -> {r[3]:.3f}")


if __name__ == "__main__":
    main()
