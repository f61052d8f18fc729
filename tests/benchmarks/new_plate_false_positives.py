"""Which false positives of an evaluation touch a growth plate that one phantom generator drew and an older one
did not (the same children made twice, e.g. generator 1.8's apophyses against 1.7)?

    .venv/bin/python tests/benchmarks/new_plate_false_positives.py eval/t_wb_g18 data/test_wb_g18 data/test_wb_g17

EVAL is a `wbmri evaluate --model` folder (its lesions.csv and predictions/); NEW and OLD are the two `wbmri synth`
sets, case for case on the same grids. Prints the number of false positives, those whose voxels touch a plate voxel
(physis.nii.gz) of NEW that OLD lacks, with their case, the site the model named and their volume, and how many cases
hold such plates. Whether a false positive is new is for `wbmri compare` or lesions.csv of an evaluation on OLD.
Without OLD, the false positives that touch any plate of NEW (growth plates and apophyses alike).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import nibabel as nib
import numpy as np


def _physis(case_dir: Path) -> np.ndarray:
    return np.asanyarray(nib.load(case_dir / "physis.nii.gz").dataobj) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path, nargs="?", help="omit: every plate of NEW counts")
    args = ap.parse_args()
    with open(args.eval_dir / "lesions.csv", newline="") as fh:
        false_positives = [r for r in csv.DictReader(fh) if r["kind"] == "false_positive"]
    scored = {p.name for p in (args.eval_dir / "predictions").iterdir()}
    added = {c.name: _physis(c) & ~_physis(args.old / "cases" / c.name) if args.old else _physis(c)
             for c in sorted((args.new / "cases").iterdir())}
    if scored - set(added):
        raise SystemExit(f"{args.eval_dir} scored cases that {args.new} lacks: evaluate on that set")
    touching = []
    for row in false_positives:
        pred = np.asanyarray(nib.load(args.eval_dir / "predictions" / row["case"] / "lesions.nii.gz").dataobj)
        voxels = int((added[row["case"]] & (pred == int(row["id"]))).sum())
        if voxels:
            touching.append((row["case"], row["pred_site"], float(row["volume_ml"]), voxels))
    print(f"{args.eval_dir}: {len(false_positives)} false positives, {len(touching)} touch a plate that "
          f"{args.new} {'adds' if args.old else 'holds'} ({sum(bool(a.any()) for a in added.values())} of {len(added)} cases hold one)")
    for case, site, ml, voxels in touching:
        print(f"  {case} {site} {ml:.2f} mL, {voxels} plate voxels")


if __name__ == "__main__":
    main()
