"""Vertebral level naming on the validation phantoms: the network's own level labels against the levels fitted
along the spine (models/spine.py) from the site map alone and with the image's disc bands, as mean Dice over the
levels in view and voxel accuracy.

    .venv/bin/python tests/benchmarks/bench_spine_levels.py [--model models/default] [--cases 24] [--glob val_g1.5_*]

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


def lesion_levels(pred: np.ndarray, ref: np.ndarray, instances: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
    """(right, all) over the reference lesions on a vertebra: the majority level of ``pred`` under each lesion."""
    from training.metrics import majority_labels
    truth, named = majority_labels(instances, ref), majority_labels(instances, pred)
    on_vertebra = [k for k, sid in truth.items() if sid in set(ids.tolist())]
    return sum(named[k] == truth[k] for k in on_vertebra), len(on_vertebra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--glob", default="val_*", help="which cached phantom sets under data/cache")
    args = ap.parse_args()
    from inference.predictor import Predictor
    from models.spine import LEVELS, renumber_vertebrae
    from models.sites import site_id
    ids = np.array([site_id(c) for c in LEVELS])
    files = sorted(glob.glob(str(ROOT / "data/cache" / args.glob / "*.npz")))[:args.cases]
    if not files:
        sys.exit(f"no phantoms in data/cache/{args.glob}: run `wbmri validate` once first")
    predictor = Predictor.load(args.model)
    rows, lesions = [], np.zeros((3, 2), int)
    for f in files:
        case = np.load(f)
        if not np.isin(case["sites"], ids).any():
            continue
        img = case["image"].astype(np.float32)
        raw = predictor.network_outputs(img).sites
        spacing = predictor.bundle.config.spacing_mm
        fitted, discs = renumber_vertebrae(raw, spacing), renumber_vertebrae(raw, spacing, img)
        rows.append([x for m in (raw, fitted, discs) for x in level_scores(m, case["sites"], ids)])
        lesions += [lesion_levels(m, case["sites"], case["instances"], ids) for m in (raw, fitted, discs)]
        print(f"{Path(f).stem} {str(case['fov']):11s} raw Dice {rows[-1][0]:.2f} acc {rows[-1][1]:.2f}  "
              f"fitted Dice {rows[-1][2]:.2f} acc {rows[-1][3]:.2f}  with discs Dice {rows[-1][4]:.2f} "
              f"acc {rows[-1][5]:.2f}", flush=True)
    r = np.mean(rows, axis=0)
    print(f"\n{len(rows)} cases with vertebrae in view: mean level Dice {r[0]:.3f} (network) -> {r[2]:.3f} (fitted) "
          f"-> {r[4]:.3f} (with the disc bands); voxel level accuracy {r[1]:.3f} -> {r[3]:.3f} -> {r[5]:.3f}; "
          f"reference vertebral lesions on the right level {' -> '.join(f'{a} of {b}' for a, b in lesions)}")


if __name__ == "__main__":
    main()
