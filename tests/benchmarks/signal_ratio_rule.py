"""Choose the hyperintensity rule's threshold (card ``thresholds.min_signal_ratio``) on evaluated development sets:
lesion detection, pooled over the evaluations, when predictions below t x both report signal ratios (normal marrow
of the bone, nearby soft tissue) are dropped, for each t.

    .venv/bin/python tests/benchmarks/signal_ratio_rule.py eval/dev_partial_g14_027 eval/dev_wb_g14_027 \
        [--ratios 0 0.7 0.8 0.9 1.0 1.1 1.2]

Each argument is a `wbmri evaluate --model ... --out DIR` folder made by a version whose rule was off (the card's
``min_signal_ratio`` 0 or absent): its ``lesions.csv``, ``per_case.csv`` and each case's ``report.json``. Dropping
is applied after the fact from the reported ratios (the survivors' measurements are taken as they were), so the
figures are those `wbmri evaluate` would print up to that. Never run on the frozen test sets to choose: they judge
the pick.
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

Key = tuple[str, str, int]  # evaluation, case, predicted lesion id


def read_evaluation(folder: Path, preds: dict[Key, dict], refs: list[tuple[float, list[Key]]]) -> int:
    """Add ``folder``'s predictions (with their ratios and whether they hit) and reference lesions; its scan count."""
    reports: dict[str, dict] = {}
    for row in csv.DictReader(open(folder / "lesions.csv")):
        case = row["case"]
        if case not in reports:
            reports[case] = json.loads((folder / "predictions" / case / "report.json").read_text())
            for les in reports[case]["lesions"]:
                preds[(str(folder), case, les["id"])] = {"ratios": (les["signal_ratio_marrow"],
                                                                   les["signal_ratio_muscle"]), "hit": False}
        if row["kind"] == "reference":
            ids = [(str(folder), case, int(i)) for i in row["pred_ids"].split(";") if i]
            refs.append((float(row["volume_ml"]), ids))
            for key in ids:
                preds[key]["hit"] = True
    return sum(1 for _ in csv.DictReader(open(folder / "per_case.csv")))


def dropped(preds: dict[Key, dict], t: float) -> set[Key]:
    """The predictions the rule removes at threshold ``t`` (a ratio that could not be measured keeps a lesion)."""
    return {k for k, p in preds.items() if t > 0 and all(r is not None and r < t for r in p["ratios"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluations", nargs="+", type=Path)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    args = ap.parse_args()
    preds: dict[Key, dict] = {}
    refs: list[tuple[float, list[Key]]] = []
    scans = sum(read_evaluation(f, preds, refs) for f in args.evaluations)
    print(f"{len(args.evaluations)} evaluations: {scans} scans, {len(refs)} reference lesions, {len(preds)} predictions")
    print("t      dropped TP  dropped FP  refs lost  sensitivity  sens>=0.5mL  precision  F1      FP/scan")
    for t in args.ratios:
        gone = dropped(preds, t)
        tp = sum(p["hit"] and k not in gone for k, p in preds.items())
        fp = sum(not p["hit"] and k not in gone for k, p in preds.items())
        found = [any(k not in gone for k in ids) for _, ids in refs]
        big = [f for f, (ml, _) in zip(found, refs) if ml >= 0.5]
        lost = sum(bool(ids) and not f for f, (_, ids) in zip(found, refs))
        pooled = DetectionCounts(n_scans=scans, n_ref=len(refs), n_detected=sum(found), n_tp=tp, n_fp=fp)
        large = DetectionCounts(n_scans=scans, n_ref=len(big), n_detected=sum(big))
        print(f"{t:<6} {sum(preds[k]['hit'] for k in gone):>11} {sum(not preds[k]['hit'] for k in gone):>11} "
              f"{lost:>10} {pooled.sensitivity or 0.0:>12.3f} {large.sensitivity or 0.0:>12.3f} "
              f"{pooled.precision or 0.0:>10.3f} {pooled.f1 or 0.0:>7.4f} {pooled.fp_per_scan or 0.0:>8.3f}")


if __name__ == "__main__":
    main()
