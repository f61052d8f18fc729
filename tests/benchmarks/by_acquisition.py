"""Lesion detection of evaluated phantom sets split by a setting of each case's acquisition (its case.json):
whether fat suppression failed in patches, the sequence, the field of view, ...

    .venv/bin/python tests/benchmarks/by_acquisition.py eval/t_wb_g14_028 eval/t_partial_g14_028 \
        [--key fat_sat_failure]

Each argument is a `wbmri evaluate` folder; its ``summary.json`` names the phantom cases it scored
(``reference.path``) and its ``per_case.csv`` holds each scan's counts. Sensitivity is for reference lesions
>= 0.5 mL; false positives per scan count every prediction that matches no reference lesion, as ``wbmri
evaluate`` does. One table per evaluation, one row per value of the key.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.metrics import DetectionCounts  # noqa: E402


def split(folder: Path, key: str) -> dict[str, tuple[DetectionCounts, DetectionCounts]]:
    """For each value of ``key``: counts over all its scans and over its lesion-free scans."""
    cases = ROOT / json.loads((folder / "summary.json").read_text())["reference"]["path"]
    out: dict[str, tuple[DetectionCounts, DetectionCounts]] = {}
    for row in csv.DictReader(open(folder / "per_case.csv")):
        if row["status"] != "ok":
            continue
        value = str(json.loads((cases / row["case"] / "case.json").read_text())["acquisition"].get(key))
        scan = DetectionCounts(1, int(row["n_ref_ge_0p5ml"]), int(row["detected_ge_0p5ml"]), int(row["tp"]),
                               int(row["fp"]))
        free = scan if int(row["n_ref"]) == 0 else DetectionCounts()
        every, lesion_free = out.get(value, (DetectionCounts(), DetectionCounts()))
        out[value] = (every + scan, lesion_free + free)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluations", nargs="+", type=Path)
    ap.add_argument("--key", default="fat_sat_failure", help="a key of case.json's acquisition")
    args = ap.parse_args()
    for folder in args.evaluations:
        print(f"{folder}, by {args.key}")
        print(f"  {'value':<14}{'scans':>6}{'sens >= 0.5 mL':>18}{'FP':>5}{'FP/scan':>9}{'lesion-free FP':>20}")
        for value, (every, free) in sorted(split(folder, args.key).items()):
            sens = f"{every.n_detected}/{every.n_ref} {every.sensitivity:.3f}" if every.n_ref else "-"
            lf = f"{free.n_fp} on {free.n_scans} ({free.fp_per_scan:.2f})" if free.n_scans else "-"
            print(f"  {value:<14}{every.n_scans:>6}{sens:>18}{every.n_fp:>5}{every.fp_per_scan:>9.2f}{lf:>20}")


if __name__ == "__main__":
    main()
