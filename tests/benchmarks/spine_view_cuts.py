"""Vertebral levels in spine views cut from whole-body phantoms: how well the shipped model and fit name the levels
when one or both ends of the spine are out of view (the cases the report's level warning is about).

    .venv/bin/python tests/benchmarks/spine_view_cuts.py data/dev_wb_g16 --cases 15

Each whole-body case is cut, head-feet, into views that end 30 mm below the sacrum and start at the top of C1 (plus
0-6 mm: C1 at the edge), at the top of C2, the middle of C2 and the top of C3 (the top of the spine out of view,
counted up from the sacrum), and one thoracic view from the top of T2 to the bottom of T10 (neither end in view).
Per view: the share of voxels that are vertebra in both the reported site map and the reference whose level agrees,
the median level shift, the ends the count could start from (``models.spine.level_count_anchors``), the network's
skull (mL) in the top 24 mm of its column, and the level accuracy had the column's top been taken as C1
(``force_c1``: what a rule reading the skull at the top of the view would give).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

import models.spine as spine
from inference.predictor import Predictor
from models.nifti import load_volume
from models.preprocessing import to_input_grid
from models.site_rules import apply_site_rules, drop_out_of_order_pieces
from models.sites import site_id, vertebral_level_ids
from training.metrics import level_agreement, site_histogram

LEVEL_IDS = np.array(vertebral_level_ids())
RANK = {int(i): k for k, i in enumerate(LEVEL_IDS)}
TOP_MM = 24.0


def z_range(ref: np.ndarray, code: str) -> np.ndarray:
    return np.nonzero((ref == site_id(code)).any(axis=(0, 1)))[0]


def cuts(ref: np.ndarray, dz: float, rng: np.random.Generator) -> dict[str, tuple[int, int]]:
    """View name -> (first, stop) slices of the canonical (RAS) volume."""
    bottom = max(0, int(z_range(ref, "sacrum").min() - 30 / dz))
    c1, c2, c3 = (z_range(ref, f"vertebra_C{k}") for k in (1, 2, 3))
    return {"C1 at the top": (bottom, int(c1.max() + 1 + rng.uniform(0, 6) / dz)),
            "cut at C2 top": (bottom, int(c2.max() + 1)),
            "cut at C2 middle": (bottom, int((c2.min() + c2.max()) // 2 + 1)),
            "cut at C3 top": (bottom, int(c3.max() + 1)),
            "thoracic T2-T10": (int(z_range(ref, "vertebra_T10").min()), int(z_range(ref, "vertebra_T2").max() + 1))}


def level_scores(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Vertebral-level accuracy (as `wbmri evaluate` scores it) and the median level shift, prediction minus
    reference, over a subsample of the voxels that are a vertebra in both."""
    right, scored = level_agreement(site_histogram(pred, ref))
    both = np.isin(pred, LEVEL_IDS) & np.isin(ref, LEVEL_IDS)
    shifts = [RANK[int(a)] - RANK[int(b)] for a, b in zip(pred[both][::50], ref[both][::50])]
    return right / scored, float(np.median(shifts))


def measure(predictor: Predictor, image: nib.Nifti1Image, ref: np.ndarray) -> dict:
    vol = load_volume(nib.Nifti1Image(np.asarray(image.dataobj, np.float32), image.affine), predictor.max_voxels)
    grid, img = predictor.model_input(vol)
    out = predictor.network_outputs(img)
    edema = out.edema > predictor.threshold
    first = drop_out_of_order_pieces(out.sites.astype(np.uint8), grid.model_spacing)
    zv = np.nonzero(np.isin(first, LEVEL_IDS).any(axis=(0, 1)))[0]
    n = int(round(TOP_MM / grid.model_spacing[2]))
    skull_ml = float((first[:, :, zv.max() - n + 1:zv.max() + 1] == site_id("skull")).sum()
                     * np.prod(grid.model_spacing) / 1000) if len(zv) else 0.0
    row: dict = {"skull_top_ml": round(skull_ml, 1)}
    for name, room in (("shipped", spine.FROM_C1_ROOM_MM), ("force_c1", -1e9)):
        saved, spine.FROM_C1_ROOM_MM = spine.FROM_C1_ROOM_MM, room
        try:
            sites = apply_site_rules(out.sites, img, grid.model_spacing, edema)
        finally:
            spine.FROM_C1_ROOM_MM = saved
        acc, shift = level_scores(to_input_grid(sites, grid), ref)
        row[name] = round(acc, 3)
        if name == "shipped":
            row["median_shift"] = shift
            row["anchors"] = spine.level_count_anchors(sites, grid.model_spacing)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a synth folder of whole-body phantoms (cases/*/image.nii.gz)")
    ap.add_argument("--cases", type=int, default=15)
    ap.add_argument("--model", default="models/default")
    args = ap.parse_args()
    predictor = Predictor.load(args.model, device="cpu")
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict]] = defaultdict(list)
    for case in sorted((args.data / "cases").iterdir())[:args.cases]:
        image = nib.as_closest_canonical(nib.load(case / "image.nii.gz"))
        ref = np.asarray(nib.as_closest_canonical(nib.load(case / "sites.nii.gz")).dataobj)
        for view, (lo, hi) in cuts(ref, float(image.header.get_zooms()[2]), rng).items():
            row = measure(predictor, image.slicer[:, :, lo:hi], ref[:, :, lo:hi])
            rows[view].append(row)
            print(json.dumps({"case": case.name, "view": view, **row}), flush=True)
    print(f"\n{'view':18s} {'n':>3s} {'level accuracy':>22s} {'< 0.95':>6s} {'top C1 forced':>13s} {'skull mL':>11s}")
    for view, rs in rows.items():
        acc = [r["shipped"] for r in rs]
        print(f"{view:18s} {len(rs):3d} {statistics.mean(acc):6.3f} ({min(acc):.2f}-{max(acc):.2f}) "
              f"{sum(a < 0.95 for a in acc):6d} {statistics.mean(r['force_c1'] for r in rs):13.3f} "
              f"{min(r['skull_top_ml'] for r in rs):5.1f}-{max(r['skull_top_ml'] for r in rs):.1f}")


if __name__ == "__main__":
    main()
