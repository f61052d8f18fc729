"""Choose the site map's bone thresholds (card ``thresholds.bone`` and ``bone_thin``) on labelled phantom folders:
mean bone-site Dice on the input grid, as `wbmri evaluate` scores it, for every pair on a grid.

    .venv/bin/python tests/benchmarks/bone_thresholds.py --data data/dev_partial --data data/dev_wb \
        [--model models/default] [--bone 0.5] [--thin 0.1 0.2 0.3 0.5] [--cache /tmp/wbmri_bone_thresholds]

The network runs once per case (its bone probability and site ids are cached as .npz under --cache); every pair
then goes through the site rules of inference and back to the input grid. Prints one row per pair with the mean
per set and the mean of the set means (the pick). Never run on the frozen test sets: they judge the pick.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def network_cache(model: str, cases: list[Path], cache: Path) -> list[Path]:
    """One .npz per case: bone probability, site ids (every voxel) and the normalised image on the model grid."""
    from inference.predictor import Predictor
    from models.nifti import load_volume
    predictor = None
    out = []
    for case in cases:
        path = cache / f"{case.parent.name}_{case.name}.npz"
        out.append(path)
        if path.is_file():
            continue
        predictor = predictor or Predictor.load(model)
        _, img = predictor.model_input(load_volume(case / "image.nii.gz"))
        net = predictor.network_outputs(img)
        np.savez_compressed(path, bone=net.bone.astype(np.float16), site_ids=net.site_ids, img=img.astype(np.float16),
                            case=str(case))
        print(f"network: {case.parent.parent.name}/{case.name}", flush=True)
    return out


def score(args: tuple[Path, list[tuple[float, float]], tuple[float, float, float]]) -> list[float]:
    """Mean bone-site Dice of one case for each (bone, thin) pair."""
    import nibabel as nib
    from models.preprocessing import plan_grid, to_input_grid
    from models.site_rules import apply_site_rules, sites_in_bone
    from training.metrics import per_site_dice
    path, pairs, spacing = args
    z = np.load(path)
    ref_img = nib.load(Path(str(z["case"])) / "sites.nii.gz")
    ref = np.asarray(ref_img.dataobj).astype(np.uint8)
    grid = plan_grid(ref.shape, ref_img.affine, spacing)
    bone, img = z["bone"].astype(np.float32), z["img"].astype(np.float32)
    out = []
    for b, t in pairs:
        site_map = apply_site_rules(sites_in_bone(z["site_ids"], bone, b, t), img, grid.model_spacing)
        dices = per_site_dice(to_input_grid(site_map, grid), ref)
        out.append(float(np.mean(list(dices.values()))) if dices else 1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--data", action="append", required=True, help="a wbmri synth folder (cases/*/sites.nii.gz)")
    ap.add_argument("--bone", type=float, nargs="+", default=[0.5])
    ap.add_argument("--thin", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/wbmri_bone_thresholds"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from models.card import load_bundle
    spacing = tuple(load_bundle(args.model, verify=False).config.spacing_mm)
    args.cache.mkdir(parents=True, exist_ok=True)
    pairs = [(b, t) for b in args.bone for t in args.thin]
    per_set = {}
    for folder in args.data:
        cases = sorted(p.parent for p in Path(folder).glob("cases/*/sites.nii.gz"))
        if not cases:
            sys.exit(f"{folder}: no cases/*/sites.nii.gz (a wbmri synth folder is needed)")
        files = network_cache(args.model, cases, args.cache)
        # spawn: a forked child of a process whose torch threads have run can hang in OpenMP
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            per_set[folder] = np.array(list(ex.map(score, [(f, pairs, spacing) for f in files])))
    print(f"\nmean bone-site Dice ({', '.join(f'{k}: {len(v)} cases' for k, v in per_set.items())})")
    print(f"{'bone':>5} {'thin':>5} " + " ".join(f"{Path(k).name:>12}" for k in per_set) + f" {'mean':>7}")
    for i, (b, t) in enumerate(pairs):
        means = [float(v[:, i].mean()) for v in per_set.values()]
        print(f"{b:5.2f} {t:5.2f} " + " ".join(f"{m:12.4f}" for m in means) + f" {np.mean(means):7.4f}")


if __name__ == "__main__":
    main()
