"""How bright are the labelled lesions of a data set, against normal marrow of the same bone?

    .venv/bin/python tests/benchmarks/lesion_contrast.py DIR [--max-cases N]

DIR is a folder in the contract layout (`cases/<case>/image.nii.gz`, `lesions.nii.gz`, `sites.nii.gz`; a phantom
folder from `wbmri synth`, or your own labelled scans with a site map). For every lesion of at least 20 voxels: the
median and 90th percentile of its voxels over the median of the normal marrow around it (same site label, 4-20 mm
from the lesion, one voxel in from the bone's edge, away from other lesions and growth plates), and that marrow's
coefficient of variation. Per case, the same over all its lesions together, which is how the clinical notes'
reference series (adults with sacroiliitis, manual masks on real STIR) reports it: median lesion 1.05-2.27x normal
marrow (median of subjects 1.43), 90th percentile 1.4-3.8x, normal marrow CV 0.10-0.18. The marrow CV is split
into noise (from differences of neighbouring voxels along the finest axis) and the rest (texture, red and yellow
marrow, bias field): sqrt(CV^2 - noise^2).

With ``--detections EVAL/lesions.csv`` (from ``wbmri evaluate`` on the same cases) it also prints which share of the
lesions of at least ``--min-ml`` a model found, by contrast to their marrow and by contrast-to-noise ratio
((lesion median - marrow median) / marrow noise sigma): where the missed lesions sit on the scale of visibility.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from inference.postprocess import neighbour_noise_sigma
from training.evaluate import reference_detections

MIN_LESION_VOXELS = 20
RING_MM = (4.0, 20.0)
REFERENCE = {"median": (1.05, 1.43, 2.27), "p90": (1.4, None, 3.8), "marrow_cv": (0.10, None, 0.18)}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def lesion_contrasts(case: Path) -> tuple[list[dict], dict | None]:
    """Per-lesion contrast rows and the case's pooled row (None without a measurable lesion)."""
    img_nii = nib.load(case / "image.nii.gz")
    img = np.asarray(img_nii.dataobj, dtype=np.float32)
    lesions = _load(case / "lesions.nii.gz").astype(np.int32)
    sites = _load(case / "sites.nii.gz").astype(np.int32)
    physis_path = case / "physis.nii.gz"
    physis = _load(physis_path) > 0 if physis_path.exists() else np.zeros(img.shape, bool)
    zooms = np.asarray(img_nii.header.get_zooms()[:3], float)
    pad = np.ceil(RING_MM[1] / zooms).astype(int) + 2
    rows, pooled_lesion, pooled_marrow = [], [], []
    for lid, box in enumerate(ndi.find_objects(lesions), start=1):
        if box is None:
            continue
        crop = tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(box, pad, img.shape))
        own = lesions[crop] == lid
        if own.sum() < MIN_LESION_VOXELS:
            continue
        site = int(np.bincount(sites[crop][own]).argmax())
        if site == 0:
            continue
        dist = ndi.distance_transform_edt(~own, sampling=zooms)
        near_any = ndi.binary_dilation(lesions[crop] > 0, iterations=3)
        marrow = (ndi.binary_erosion(sites[crop] == site) & ~near_any & ~physis[crop]
                  & (dist >= RING_MM[0]) & (dist <= RING_MM[1]))
        if marrow.sum() < 50:
            continue
        lesion_v, marrow_v = img[crop][own], img[crop][marrow]
        ref = float(np.median(marrow_v))
        if ref <= 0:
            continue
        noise = neighbour_noise_sigma(img[crop], marrow, int(np.argmin(zooms)), min_pairs=30)
        cv = float(marrow_v.std() / marrow_v.mean())
        noise_cv = None if noise is None else noise / float(marrow_v.mean())
        rows.append({"case": case.name, "lesion": lid, "site": site, "voxels": int(own.sum()),
                     "ml": float(own.sum() * np.prod(zooms) / 1000.0),
                     "cnr": None if not noise else float((np.median(lesion_v) - ref) / noise),
                     "median": float(np.median(lesion_v)) / ref, "p90": float(np.percentile(lesion_v, 90)) / ref,
                     "marrow_cv": cv, "noise_cv": noise_cv,
                     "structure_cv": None if noise_cv is None else float(np.sqrt(max(0.0, cv ** 2 - noise_cv ** 2)))})
        pooled_lesion.append(lesion_v / ref)
        pooled_marrow.append(marrow_v / ref)
    if not rows:
        return rows, None
    les = np.concatenate(pooled_lesion)
    return rows, {"case": case.name, "median": float(np.median(les)), "p90": float(np.percentile(les, 90))}


def _quantiles(values: list[float]) -> str:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return " ".join(f"{v:5.2f}" for v in q)


CONTRAST_BINS = (0.0, 1.25, 1.5, 2.0, 3.0, np.inf)
CNR_BINS = (-np.inf, 1.0, 2.0, 4.0, 8.0, np.inf)


def _print_found_by(rows: list[dict], key: str, edges: tuple[float, ...], label: str) -> None:
    print(f"found by {label}:")
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [r for r in rows if r[key] is not None and lo <= r[key] < hi]
        if sel:
            found = sum(r["found"] for r in sel)
            print(f"  {lo:>6.2f} - {hi:<6.2f} {found:4d} of {len(sel):4d} found ({found / len(sel):.0%})")


def detection_table(rows: list[dict], detections: Path, min_ml: float) -> None:
    """Found share of the measured lesions of at least ``min_ml`` by contrast and by contrast-to-noise ratio."""
    found = reference_detections(detections)
    joined = [{**r, "found": found[(r["case"], r["lesion"])]} for r in rows
              if r["ml"] >= min_ml and (r["case"], r["lesion"]) in found]
    if not joined:
        raise SystemExit(f"no lesion of >= {min_ml} mL of these cases is in {detections}")
    n_found = sum(r["found"] for r in joined)
    print(f"\n{len(joined)} measured lesions >= {min_ml} mL, {n_found} found ({n_found / len(joined):.0%}) per {detections}")
    _print_found_by(joined, "median", CONTRAST_BINS, "median lesion / marrow")
    _print_found_by(joined, "cnr", CNR_BINS, "contrast-to-noise ratio")
    missed = [r for r in joined if not r["found"]]
    if missed:
        print(f"missed: median lesion / marrow {_quantiles([r['median'] for r in missed])} (5-95%), "
              f"volume {_quantiles([r['ml'] for r in missed])} mL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with cases/<case>/{image,lesions,sites}.nii.gz")
    ap.add_argument("--max-cases", type=int, default=0, help="only the first N cases (0: all)")
    ap.add_argument("--detections", type=Path, help="an evaluation's lesions.csv: found share by contrast")
    ap.add_argument("--min-ml", type=float, default=0.5, help="lesion size for --detections (mL)")
    args = ap.parse_args()
    cases = sorted(p for p in (args.data / "cases").iterdir() if (p / "lesions.nii.gz").exists())
    cases = cases[: args.max_cases] if args.max_cases else cases
    rows, per_case = [], []
    for i, case in enumerate(cases, 1):
        r, c = lesion_contrasts(case)
        rows += r
        per_case += [c] if c else []
        print(f"\r{i}/{len(cases)} cases, {len(rows)} lesions", end="", flush=True)
    print()
    if not rows:
        raise SystemExit("no measurable lesion (each needs >= 20 voxels on a labelled bone)")
    print(f"{'':34} {'5%':>5} {'25%':>5} {'50%':>5} {'75%':>5} {'95%':>5}   reference (clinical notes)")
    ref = REFERENCE
    print(f"{'per case: median lesion / marrow':34} {_quantiles([c['median'] for c in per_case])}   "
          f"{ref['median'][0]}-{ref['median'][2]}, median {ref['median'][1]}")
    print(f"{'per case: p90 lesion / marrow':34} {_quantiles([c['p90'] for c in per_case])}   "
          f"{ref['p90'][0]}-{ref['p90'][2]}")
    print(f"{'per lesion: median / marrow':34} {_quantiles([r['median'] for r in rows])}")
    print(f"{'per lesion: marrow CV':34} {_quantiles([r['marrow_cv'] for r in rows])}   "
          f"{ref['marrow_cv'][0]}-{ref['marrow_cv'][2]}")
    split = [r for r in rows if r["noise_cv"] is not None]
    if split:
        print(f"{'  of which noise (neighbour diff.)':34} {_quantiles([r['noise_cv'] for r in split])}")
        print(f"{'  of which structure (the rest)':34} {_quantiles([r['structure_cv'] for r in split])}")
    med = np.array([r["median"] for r in rows])
    print(f"{len(per_case)} cases, {len(rows)} lesions; lesions with a median under 1.43x marrow: "
          f"{(med < 1.43).mean():.1%}, under 2x: {(med < 2).mean():.1%}; cases with a median above 2.27x: "
          f"{np.mean([c['median'] > 2.27 for c in per_case]):.0%}")
    if args.detections:
        detection_table(rows, args.detections, args.min_ml)


if __name__ == "__main__":
    main()
