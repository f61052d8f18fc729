"""Where did a candidate's bone-site Dice change come from: the bone mask, or the site labels inside it? For two
evaluations of the same set, the bone-mask Dice of each against the reference (predicted site > 0 against reference
site > 0) and, on the voxels that both models and the reference call bone, the share whose site label each model
has right, averaged over cases, with the number of cases whose bone-mask Dice fell. Session 56 traced stage 31's bone-site loss with it.

    .venv/bin/python tests/benchmarks/bone_mask_change.py eval/dev_wb_g18_19199 eval/dev_wb_g18_s31 data/dev_wb_g18
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np


def _sites(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_a", type=Path)
    ap.add_argument("eval_b", type=Path)
    ap.add_argument("data", type=Path, help="the evaluated set (its sitesTr/ holds the reference sites)")
    args = ap.parse_args()
    rows = []
    for case in sorted(p.name for p in (args.eval_a / "predictions").iterdir() if p.is_dir()):
        ref = _sites(args.data / "sitesTr" / f"{case}.nii.gz")
        a, b = (_sites(ev / "predictions" / case / "sites.nii.gz") for ev in (args.eval_a, args.eval_b))
        common = (a > 0) & (b > 0) & (ref > 0)
        row = [_dice(a > 0, ref > 0), float((a[common] == ref[common]).mean()) if common.any() else np.nan,
               _dice(b > 0, ref > 0), float((b[common] == ref[common]).mean()) if common.any() else np.nan]
        rows.append(row)
    r = np.array(rows)
    a_dice, a_agree, b_dice, b_agree = np.nanmean(r, axis=0)
    print(f"{len(r)} cases; bone-mask Dice {a_dice:.4f} -> {b_dice:.4f}; site label right inside the bone all three "
          f"call bone {a_agree:.4f} -> {b_agree:.4f}; bone-mask Dice lower in {int((r[:, 2] < r[:, 0]).sum())} cases")


if __name__ == "__main__":
    main()
