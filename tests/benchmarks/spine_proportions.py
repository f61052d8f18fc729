"""Vertebral levels on spines of either proportion: whole-body phantoms of generator 1.6 drawn with the spine in real
proportions (``body.spine=graded``) and as generators up to 1.5 drew it (``uniform``), the same children; the
network's outputs are saved once, then the level fit (models/spine.py, with the image and the predicted edema as
inference passes them) is scored with its shipped constants and with any others given.

    .venv/bin/python tests/benchmarks/spine_proportions.py --seed 930000 --n 12 --spine graded uniform
    .venv/bin/python tests/benchmarks/spine_proportions.py --seed 940000 --n 16 --spine graded \
        --variant 'prior=graded,height_weight=6,disc_weight=3' --variant prior=graded
    .venv/bin/python tests/benchmarks/spine_proportions.py --val-glob 'val_g1.5_*' --n 96 --variant prior=graded

``--val-glob`` reads cached validation phantoms (data/cache) instead of making new ones. Network outputs are kept
under ``--work``, in a folder per model (the first 12 hex digits of its weights' sha256; one .npz per case), so a
second run with other variants does not run the network again.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

SPINES = ("graded", "uniform")   # training/phantom/body.py, SPINE_SEGMENTS


def priors() -> dict[str, np.ndarray]:
    """Height priors for ``--variant prior=...``: the shipped fit's (uniform thoracic levels) and the real
    proportions the phantom draws since generator 1.6."""
    from models.spine import RELATIVE_HEIGHT
    from training.phantom.body import SPINE_SEGMENTS
    return {"uniform": RELATIVE_HEIGHT, "graded": SPINE_SEGMENTS["graded"][0]}


def outputs(args) -> list[Path]:
    """The saved network outputs of every case asked for, made where missing."""
    from inference.predictor import Predictor
    predictor = Predictor.load(args.model)
    work = Path(args.work) / predictor.bundle.sha256[:12]  # one model's outputs never stand in for another's
    work.mkdir(parents=True, exist_ok=True)
    spacing = predictor.bundle.config.spacing_mm
    jobs = []
    if args.val_glob:
        for f in sorted(glob.glob(str(ROOT / "data/cache" / args.val_glob / "*.npz")))[:args.n]:
            jobs.append((work / f"val_{Path(f).stem}.npz", lambda f=f: dict(np.load(f))))
    else:
        from training.config import SynthConfig, load_config
        from training.data import phantom_model_case
        for spine in args.spine:
            synth = load_config(SynthConfig, None, ["fov.p={whole_body: 1.0}", f"body.spine={spine}"])
            for seed in range(args.seed, args.seed + args.n):
                jobs.append((work / f"{spine}_{seed}.npz", lambda s=seed, c=synth: phantom_model_case(s, c, spacing)))
    for path, make in jobs:
        if path.exists():
            continue
        case = make()
        net = predictor.network_outputs(case["image"].astype(np.float32))
        np.savez_compressed(path, image=case["image"], sites=case["sites"], instances=case["instances"],
                            raw=net.sites, edema=net.edema > predictor.threshold)
        print("network outputs saved:", path.name, flush=True)
    return [p for p, _ in jobs]


def parse_variant(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        out[{"prior": "RELATIVE_HEIGHT", "height_weight": "HEIGHT_WEIGHT", "disc_weight": "DISC_WEIGHT"}[key]] = \
            priors()[value] if key == "prior" else float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/default"))
    ap.add_argument("--seed", type=int, default=930000)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--spine", nargs="+", default=["graded", "uniform"], choices=SPINES)
    ap.add_argument("--val-glob", default="", help="cached validation phantoms instead of new ones")
    ap.add_argument("--variant", action="append", default=[], help="e.g. prior=graded,height_weight=6,disc_weight=3")
    ap.add_argument("--work", default="/tmp/wbmri_spine_proportions")
    args = ap.parse_args()
    import models.spine as spine
    from bench_spine_levels import lesion_levels, level_scores
    from models.sites import site_id
    ids = np.array([site_id(c) for c in spine.LEVELS])
    shipped = {k: getattr(spine, k) for k in ("RELATIVE_HEIGHT", "HEIGHT_WEIGHT", "DISC_WEIGHT")}
    variants = {"network": None, "shipped": {}} | {v: parse_variant(v) for v in args.variant}
    groups: dict[str, list[Path]] = {}
    for path in outputs(args):
        groups.setdefault(path.stem.split("_")[0], []).append(path)
    for group, paths in groups.items():
        scores = {k: [] for k in variants}
        lesions = {k: np.zeros(2, int) for k in variants}
        for path in paths:
            case = np.load(path)
            if not np.isin(case["sites"], ids).any():
                continue
            img = case["image"].astype(np.float32)
            for name, constants in variants.items():
                if constants is None:
                    levels = case["raw"]
                else:
                    for key, value in (shipped | constants).items():
                        setattr(spine, key, value)
                    levels = spine.renumber_vertebrae(case["raw"], (3.0, 3.0, 3.0), img, case["edema"])
                scores[name].append(level_scores(levels, case["sites"], ids))
                lesions[name] += lesion_levels(levels, case["sites"], case["instances"], ids)
        for name, rows in scores.items():
            if rows:
                r = np.array(rows)
                print(f"{group:8s} {name:45s} {len(r):3d} cases: level Dice {r[:, 0].mean():.4f}, voxel level "
                      f"accuracy {r[:, 1].mean():.4f}, vertebral lesions on the right level {lesions[name][0]} of "
                      f"{lesions[name][1]}")
        for key, value in shipped.items():
            setattr(spine, key, value)


if __name__ == "__main__":
    main()
