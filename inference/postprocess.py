"""Study-level summaries of the measured lesions (:mod:`models.measure`) for the report: the per-site table, the
summary block, the sites in view and the study warnings."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from models.measure import extension_grade
from models.preprocessing import background_offset, body_mask_threshold
from models.sites import REGIONS, SOFT_TISSUE, VERTEBRAL_LEVELS, by_code, by_id


# ------------------------------------------------------------------ study-level summaries

def _site_sort_key(code: str) -> tuple[int, str]:
    site = by_code().get(code)
    return (site.id if site else 10_000, code)


def site_table(lesions: Sequence[Mapping]) -> list[dict]:
    """The report's ``sites`` array: one entry per affected site (bones by id, ``soft_tissue`` last), with the
    lesion ids, the summed volume and, for bones, the summed bone fraction and its extension grade."""
    groups: dict[str, list[Mapping]] = {}
    for les in lesions:
        groups.setdefault(str(les["site"]), []).append(les)
    table = []
    for code in sorted(groups, key=_site_sort_key):
        items = groups[code]
        site = by_code().get(code)
        fractions = [les.get("bone_fraction") for les in items if les.get("bone_fraction") is not None]
        fraction = round(min(1.0, float(sum(fractions))), 4) if site and fractions else None
        table.append({
            "site": code,
            "name": site.name if site else "soft tissue (no bone involved)",
            "region": site.region if site else SOFT_TISSUE,
            "side": site.side if site else None,
            "lesion_count": len(items),
            "lesion_ids": sorted(int(les["id"]) for les in items),
            "volume_ml": round(float(sum(les["volume_ml"] for les in items)), 4),
            "bone_fraction": fraction,
            "extension_grade": extension_grade(fraction),
        })
    return table


def symmetric_pairs(lesions: Sequence[Mapping]) -> list[list[int]]:
    """Pairs of lesion ids at mirror sites with the same subregion; each lesion in at most one pair.
    Candidates are matched greedily by how close they sit in the S-I and A-P directions."""
    cands = []
    for a in lesions:
        site = by_code().get(str(a["site"]))
        if site is None or site.mirror_code is None or site.side != "left":
            continue
        for b in lesions:
            if b["site"] == site.mirror_code and b.get("subregion") == a.get("subregion"):
                ca, cb = a["centroid_ras_mm"], b["centroid_ras_mm"]
                cands.append((abs(ca[2] - cb[2]) + abs(ca[1] - cb[1]), int(a["id"]), int(b["id"])))
    used: set[int] = set()
    pairs = []
    for _, ia, ib in sorted(cands):
        if ia not in used and ib not in used:
            used.update((ia, ib))
            pairs.append(sorted((ia, ib)))
    return sorted(pairs)


def summarise(lesions: Sequence[Mapping], in_view: Sequence[str]) -> dict:
    """The report's ``summary``. ``affected_sites`` counts bones (soft-tissue-only lesions are not a site);
    ``affected_regions`` lists the regions of bone lesions in sites.tsv order; ``spine_in_view``: whether any
    vertebra is among the sites in view (``in_view``: :func:`sites_in_view`), so that a spine not imaged is not
    read as a spine without lesions."""
    bone = [les for les in lesions if les["site"] != SOFT_TISSUE]
    spine = {s.code for s in by_id().values() if s.region.startswith("spine_")}
    regions = {str(les["region"]) for les in bone}
    volumes = [float(les["volume_ml"]) for les in lesions]
    return {
        "lesion_count": len(lesions),
        "affected_sites": len({les["site"] for les in bone}),
        "affected_regions": [r for r in REGIONS if r in regions],
        "total_volume_ml": round(sum(volumes), 4),
        "largest_lesion_ml": round(max(volumes), 4) if volumes else None,
        "spine_involved": any(str(les["region"]).startswith("spine_") for les in bone),
        "spine_in_view": bool(spine.intersection(in_view)),
        "soft_tissue_involved": any(les["site"] == SOFT_TISSUE or les.get("soft_tissue_extension") is True
                                    for les in lesions),
        "symmetric_pairs": symmetric_pairs(lesions),
    }


def sites_in_view(sites: np.ndarray, voxel_volume_ml: float, min_ml: float = 0.5) -> list[str]:
    """Codes of the sites with at least ``min_ml`` of bone in the image, in sites.tsv order."""
    counts = np.bincount(np.asarray(sites).ravel(), minlength=len(by_id()) + 1)
    return [by_id()[sid].code for sid in range(1, len(by_id()) + 1)
            if sid < len(counts) and counts[sid] * voxel_volume_ml >= min_ml]


# ------------------------------------------------------------------ warnings

MAX_SLICE_MM = 7.0
MAX_INPLANE_MM = 2.5
# estimate_snr under which a study is far noisier than the phantoms the model learned from (drawn at 12-40, as
# 2 x muscle / noise sigma): on 60 development phantoms (data/dev_partial_g16, data/dev_wb_g16) the estimate was
# 0.24-0.55 x the drawn value (5-95%) and never under 4.1; with magnitude (Rician) noise on the test scene of
# tests/test_postprocess.py it falls under 4 from about a third of the least drawn SNR (12 -> 6.7, 8 -> 4.9, 4 -> 3.3)
MIN_SNR = 4.0


def border_lesions(lesions_arr: np.ndarray) -> list[int]:
    """Ids of lesions that touch a face of the array (cut by the field of view)."""
    faces = []
    for ax in range(3):
        for i in (0, lesions_arr.shape[ax] - 1):
            faces.append(np.take(lesions_arr, i, axis=ax).ravel())
    ids = np.unique(np.concatenate(faces))
    return [int(i) for i in ids if i > 0]


def neighbour_noise_sigma(img: np.ndarray, region: np.ndarray, axis: int, min_pairs: int) -> float | None:
    """Noise sigma inside ``region`` from differences of neighbouring voxels along ``axis`` (robust: 1.4826 x their
    median absolute value / sqrt 2); None with fewer than ``min_pairs`` pairs of neighbours both in ``region``."""
    n = img.shape[axis]
    a, b = np.take(img, range(n - 1), axis=axis), np.take(img, range(1, n), axis=axis)
    both = np.take(region, range(n - 1), axis=axis) & np.take(region, range(1, n), axis=axis)
    if np.count_nonzero(both) < min_pairs:
        return None
    return 1.4826 * float(np.median(np.abs(a[both] - b[both]))) / np.sqrt(2.0)


def estimate_snr(image: np.ndarray, spacing: Sequence[float]) -> float | None:
    """Rough signal-to-noise: the 75th percentile of body signal over a robust noise sigma from neighbour
    differences along the finest axis (a subsample of lines keeps it fast), on the image lifted to 0 and without a
    background offset as the network sees it. None when the body is too small to judge. On fat-suppressed images
    the body's median is set by whatever dark tissue fills the view; its 75th percentile tracks the noise the
    phantoms were drawn with more closely (``MIN_SNR``)."""
    img = np.asarray(image, np.float32)
    floor = min(0.0, float(img.min()))
    dark = floor + background_offset(img, floor)  # subtracted from the subsample below, not the whole volume
    ax = int(np.argmin(spacing))
    steps = [1, 1, 1]
    others = [a for a in range(3) if a != ax]
    per_line = img.shape[ax]
    n_lines = img.size // per_line
    stride = max(1, int(np.ceil(np.sqrt(n_lines * per_line / 2_000_000))))
    for a in others:
        steps[a] = stride
    sub = img[:: steps[0], :: steps[1], :: steps[2]] - dark
    thr = body_mask_threshold(sub)
    sigma = neighbour_noise_sigma(sub, sub > thr, ax, min_pairs=1000)
    if sigma is None:
        return None
    signal = float(np.percentile(sub[sub > thr], 75))
    return float("inf") if sigma <= 0 else signal / sigma


def level_warning(anchors: tuple[bool, bool] | None, lesions: Sequence[Mapping]) -> str | None:
    """A warning when lesions are named by vertebral level but the count could not start at both ends of the spine
    (``anchors``: C1 at the column's top, the sacrum right below it; see :func:`models.spine.level_count_anchors`)."""
    ids = [int(les["id"]) for les in lesions if les["site"] in VERTEBRAL_LEVELS]
    if not ids or anchors is None or all(anchors):
        return None
    which = f"Lesion{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"
    top, sacrum = anchors
    if sacrum:
        how = "the spine reaches the top of the image, so the levels were counted up from the sacrum"
    elif top:
        how = "the sacrum is not in the image, so the levels were counted down from C1"
    else:
        how = ("neither C1 nor the sacrum is in the image, so the levels are the model's estimate and may be off by "
               "one or more")
    verb = "are" if len(ids) > 1 else "is"
    return f"{which} {verb} named by vertebral level, but {how}: confirm the levels by counting on the images."


def study_warnings(image: np.ndarray, sites: np.ndarray, lesions_arr: np.ndarray,
                   spacing: Sequence[float]) -> list[str]:
    """Plain-language warnings about the study that limit how far the results can be trusted."""
    out = []
    if not np.any(sites):
        out.append("No bone was recognised in the image: lesions cannot be assigned to sites. "
                   "Check that this is an MRI of the skeleton (coronal STIR or T2 fat-suppressed).")
    cut = border_lesions(lesions_arr)
    if cut:
        out.append(f"Lesion(s) {', '.join(map(str, cut))} touch the edge of the field of view: part of them may lie "
                   "outside the image, so their size and extent may be underestimated.")
    sp = sorted(float(s) for s in spacing)
    if sp[2] > MAX_SLICE_MM:
        out.append(f"Slices are {sp[2]:.1f} mm apart (over {MAX_SLICE_MM:g} mm): small lesions may be missed and "
                   "volumes are coarse.")
    if sp[1] > MAX_INPLANE_MM:
        out.append(f"In-plane pixels are {sp[0]:.1f} x {sp[1]:.1f} mm (over {MAX_INPLANE_MM:g} mm): small lesions "
                   "may be missed.")
    if background_offset(image) > 0:
        out.append("The image's background is not dark (a constant intensity offset from the export?): the offset "
                   "was subtracted before analysis; check that the study was exported as acquired.")
    snr = estimate_snr(image, spacing)
    if snr is not None and snr < MIN_SNR:
        out.append(f"The image is very noisy, noisier than the images the model learned from (estimated "
                   f"signal-to-noise about {snr:.1f}): faint edema may be missed and noise may be mistaken for edema.")
    return out
