"""False positives inside a fat-water swap: an evaluation of Dixon phantoms with a swap in every scan, and the same
phantoms made without one (the two images differ only where the swap is).

    .venv/bin/python tests/benchmarks/swap_false_positives.py eval/dixon1_wb_g15_028 \
        data/dixon0_wb_g15 data/dixon1_wb_g15

A false positive is inside when over half of its voxels lie where the two images differ (dilated by two voxels
for the slice profile). Prints the count and, per case, each false positive's site, volume and share inside.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_dilation


def swapped(without: Path, with_swap: Path) -> np.ndarray:
    """Voxels where the image with the swap differs from the one without (dilated by two voxels)."""
    a, b = (np.asarray(nib.load(str(p)).dataobj, np.float32) for p in (without, with_swap))
    return binary_dilation(np.abs(a - b) > 1e-3 * np.percentile(a, 99), iterations=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluation", type=Path, help="`wbmri evaluate` folder of the swapped set")
    ap.add_argument("without", type=Path, help="synth folder of the set without swaps")
    ap.add_argument("with_swap", type=Path, help="synth folder of the set with swaps")
    args = ap.parse_args()
    fps = [r for r in csv.DictReader(open(args.evaluation / "lesions.csv")) if r["kind"] == "false_positive"]
    inside, by_case = 0, {}
    for case in sorted({r["case"] for r in fps}):
        swap = swapped(args.without / "cases" / case / "image.nii.gz", args.with_swap / "cases" / case / "image.nii.gz")
        pred = np.asarray(nib.load(str(args.evaluation / "predictions" / case / "lesions.nii.gz")).dataobj)
        for r in (r for r in fps if r["case"] == case):
            mask = pred == int(r["pred_ids"] or r["id"])
            share = float(swap[mask].mean()) if mask.any() else float("nan")
            inside += share > 0.5
            by_case.setdefault(case, []).append((r["pred_site"], round(float(r["pred_volume_ml"]), 2), round(share, 2)))
    print(f"false positives {len(fps)}, with over half their voxels in the swap {inside}")
    for case, items in by_case.items():
        print(f"  {case}: " + "; ".join(f"{site} {ml} mL, {share:.0%} inside" for site, ml, share in items))


if __name__ == "__main__":
    main()
