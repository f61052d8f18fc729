"""What generator 1.9's knee and pelvic foci changed in a test set, and where the model's false positives moved.
For the same seeds made by 1.8 and 1.9 (and each evaluated): how many cases draw foci, whose image changed (foci in
view), whether every label file is 1.8's, the false positives of the cases with foci in view and of the others in
both evaluations, and the false positives (case, site) that are new or gone. Session 56's figures for the 1.9 test
sets come from it.

    .venv/bin/python tests/benchmarks/foci_set_changes.py data/test_wb_g18 data/test_wb_g19 eval/t_wb_g18 eval/t_wb_g19
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = ("lesions", "sites", "physis")


def _same(a: Path, b: Path) -> bool:
    return bool(np.array_equal(np.asanyarray(nib.load(str(a)).dataobj), np.asanyarray(nib.load(str(b)).dataobj)))


def _rows(eval_dir: Path, name: str) -> list[dict]:
    with open(eval_dir / name, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("old_data", "new_data", "old_eval", "new_eval"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    cases = sorted(p.name for p in (args.new_data / "cases").iterdir() if p.is_dir())
    drawn, in_view, labels_same = Counter(), set(), 0
    for case in cases:
        new, old = args.new_data / "cases" / case, args.old_data / "cases" / case
        meta = json.loads((new / "case.json").read_text())
        drawn.update(k for k in ("knee_foci", "pelvic_foci") if meta[k])
        drawn["any"] += meta["knee_foci"] or meta["pelvic_foci"]
        if not _same(new / "image.nii.gz", old / "image.nii.gz"):
            in_view.add(case)
        labels_same += all(_same(new / f"{k}.nii.gz", old / f"{k}.nii.gz") for k in LABELS)
    print(f"{len(cases)} cases: {drawn['any']} draw foci (knee {drawn['knee_foci']}, pelvic {drawn['pelvic_foci']}); "
          f"images changed in {len(in_view)}; every label file as before in {labels_same}")
    fp = {which: {r["case"]: int(r["fp"]) for r in _rows(ev, "per_case.csv")}
          for which, ev in (("old", args.old_eval), ("new", args.new_eval))}
    for group, members in (("foci in view", in_view), ("the others", set(cases) - in_view)):
        print(f"{group} ({len(members)} cases): false positives {sum(fp['old'][c] for c in members)} -> "
              f"{sum(fp['new'][c] for c in members)}")
    where = {which: Counter((r["case"], r["pred_site"]) for r in _rows(ev, "lesions.csv") if r["kind"] == "false_positive")
             for which, ev in (("old", args.old_eval), ("new", args.new_eval))}
    print("new false positives:", sorted((where["new"] - where["old"]).elements()))
    print("gone:", sorted((where["old"] - where["new"]).elements()))


if __name__ == "__main__":
    main()
