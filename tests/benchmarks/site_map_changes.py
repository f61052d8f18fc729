"""How two evaluations' site maps differ, scan by scan, and what the order rule does to true maps: the checks behind
the site-rule changes of sessions 49-50 (models/default/HISTORY.md).

    .venv/bin/python tests/benchmarks/site_map_changes.py compare data/dev_partial_g16 eval/A eval/B
    .venv/bin/python tests/benchmarks/site_map_changes.py true-maps data/dev_wb_g16 data/dev_partial_g16 ...
    .venv/bin/python tests/benchmarks/site_map_changes.py true-maps --rule ankle data/dev_wb_g16 ...

``compare``: for evaluations A and B of one data set (``wbmri evaluate --out``), the scans whose mean bone-site Dice
changed (better, worse, the worst change), the pooled vertebral-level accuracy of each computed from the saved maps
(evaluations before wbmri 0.2.11 do not report it), and per evaluation the views with site labels the reference
lacks (each such label counts as a site with Dice 0), with the labels and their volumes.
``true-maps``: the reference site maps of wbmri synth folders through one site rule (``--rule``: ``order``, the
head-to-feet order, ``models.site_rules.drop_out_of_order_pieces``, the default; ``patella`` or ``ankle``, the leg-bone
rules; ``arms``, forearms and hands below the knee); a map the rule changes is printed with its changed voxels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from models.site_rules import (drop_arms_below_the_knee, drop_out_of_order_pieces, leg_bones_by_ankle,
                               leg_bones_by_patella)
from models.sites import by_id
from training.evaluate import read_per_case
from training.metrics import level_agreement, site_histogram


def _labels(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj).astype(np.uint8)


def _per_case(evaluation: Path) -> dict[str, float]:
    rows, _ = read_per_case(evaluation)
    return {r["case"]: float(r["mean_site_dice"]) for r in rows if r["mean_site_dice"]}


def read_maps(data: Path, evaluation: Path) -> tuple[int, int, dict[str, list[str]]]:
    """One pass over an evaluation's saved site maps against the references: pooled (voxels whose vertebral level
    agrees, voxels vertebra in both maps), and per case the labels the reference lacks, with their volumes."""
    sites, extra_by_case = by_id(), {}
    right = total = 0
    for case in sorted((evaluation / "predictions").iterdir()):
        img = nib.load(str(case / "sites.nii.gz"))
        pred, ref = _labels(img), _labels(nib.load(str(data / "cases" / case.name / "sites.nii.gz")))
        r, n = level_agreement(site_histogram(pred, ref))
        right, total = right + r, total + n
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        extra = sorted(set(np.unique(pred)) - set(np.unique(ref)) - {0})
        if extra:
            extra_by_case[case.name] = [f"{sites[int(s)].code} {np.count_nonzero(pred == s) * voxel_ml:.1f} mL"
                                        for s in extra]
    return right, total, extra_by_case


def compare(data: Path, a: Path, b: Path) -> None:
    dice_a, dice_b = _per_case(a), _per_case(b)
    change = {c: dice_b[c] - dice_a[c] for c in dice_a if c in dice_b}
    moved = {c: d for c, d in change.items() if abs(d) > 1e-9}
    worst = min(change, key=change.get)
    print(f"mean bone-site Dice, {len(change)} scans: {len(moved)} changed, {sum(d > 0 for d in moved.values())} "
          f"better, {sum(d < 0 for d in moved.values())} worse; worst {worst} {change[worst]:+.4f}")
    for evaluation in (a, b):
        right, total, extra = read_maps(data, evaluation)
        print(f"{evaluation}: vertebral-level accuracy {right}/{total} = {right / max(total, 1):.4f}; "
              f"{len(extra)} views with labels the reference lacks")
        for case, labels in extra.items():
            print(f"  {case}: {', '.join(labels)}")


RULES = {"order": drop_out_of_order_pieces, "patella": leg_bones_by_patella, "ankle": leg_bones_by_ankle,
         "arms": drop_arms_below_the_knee}


def true_maps(folders: list[Path], rule: str = "order") -> None:
    changed = n = 0
    for folder in folders:
        for path in sorted((folder / "cases").glob("*/sites.nii.gz")):
            img = nib.as_closest_canonical(nib.load(str(path)))
            labels = np.asarray(img.dataobj).astype(np.uint8)
            out = RULES[rule](labels, img.header.get_zooms()[:3])
            n += 1
            if not np.array_equal(out, labels):
                changed += 1
                print(f"changed: {path} ({np.count_nonzero(out != labels)} voxels)")
    print(f"{changed} of {n} true maps changed by the {rule} rule")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="two evaluations of one data set, scan by scan")
    c.add_argument("data", type=Path)
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    t = sub.add_parser("true-maps", help="reference site maps through one site rule")
    t.add_argument("--rule", choices=sorted(RULES), default="order")
    t.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    if args.command == "compare":
        compare(args.data, args.a, args.b)
    else:
        true_maps(args.folders, args.rule)


if __name__ == "__main__":
    main()
