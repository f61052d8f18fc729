"""Left or right from where a bone lies, not from what the network guessed.

On the model grid (RAS axes: x grows towards the patient's right) the right side is +x. The midline at each
height is the median left-right position of the body's voxels (the trunk with both arms, or the two legs, is
near-symmetric); the predicted spine is not used, because a network that mistakes a knee for a vertebra would
move the midline into one leg. Each paired site's voxels take the side their position says; which bone it is
stays the network's call.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from models.sites import all_sites, mirror_ids

MIN_OFFSET_MM = 6.0   # voxels this close to the midline keep the predicted side (sternum, symphysis)


@lru_cache(maxsize=1)
def _pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over site ids: is paired, id of the left twin, id of the right twin."""
    mirror = np.array(mirror_ids())
    ids = np.arange(len(mirror))
    is_left = np.array([False] + [s.side == "left" for s in all_sites()])
    return mirror != ids, np.where(is_left, ids, mirror), np.where(is_left, mirror, ids)


def body_mask(img: np.ndarray, level: float = 0.08, min_share: float = 0.05) -> np.ndarray:
    """The body on a normalised image: regions above ``level`` at least ``min_share`` of the largest one (so two
    separate legs both count, noise specks do not)."""
    lab, n = ndimage.label(img > level)
    if n <= 1:
        return lab > 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= min_share * sizes.max()
    keep[0] = False
    return keep[lab]


def midline_x(body: np.ndarray) -> np.ndarray:
    """Midline x (voxel units) for each z slice: the median x of the body's voxels (trunk and arms, or the two
    legs, are near-symmetric), smoothed along z; NaN where a slice has no body."""
    counts = body.sum(axis=1)                          # (x, z)
    cum = np.cumsum(counts, axis=0)
    total = cum[-1]
    out = np.full(body.shape[2], np.nan)
    has = total > 0
    out[has] = np.argmax(cum[:, has] >= total[has] / 2, axis=0).astype(float)
    if has.sum() >= 3:
        out[has] = ndimage.median_filter(out[has], size=9, mode="nearest")
    return out


def sides_by_position(sites: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Return ``sites`` with each paired site's side set by its voxels' position (a copy when changed)."""
    paired, left, right = _pairs()
    lab = sites.astype(np.intp)
    is_paired = paired[lab]
    if not is_paired.any():
        return sites
    mid = midline_x(body)
    xs, ys, zs = np.nonzero(is_paired)
    m = mid[zs]
    offset_mm = (xs - m) * float(spacing_mm[0])
    ok = ~np.isnan(m) & (np.abs(offset_mm) >= MIN_OFFSET_MM)
    out = sites.copy()
    ids = lab[xs[ok], ys[ok], zs[ok]]
    out[xs[ok], ys[ok], zs[ok]] = np.where(offset_mm[ok] > 0, right[ids], left[ids]).astype(sites.dtype)
    return out
