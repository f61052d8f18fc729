"""Left or right from where a bone lies, not from what the network guessed.

On the model grid (RAS axes: x grows towards the patient's right) the right side is +x. The midline at each height is the centre of the spine
(vertebrae, sacrum, sternum) where they are in view, else the centre of the body's left-right extent (legs, knees,
feet are imaged in pairs). Each paired site's voxels take the side their position says; which bone it is stays
the network's call.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from models.sites import all_sites, site_id

MIN_OFFSET_MM = 6.0   # voxels this close to the midline keep the predicted side (sternum, symphysis)


@lru_cache(maxsize=1)
def _pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over site ids: is paired, id of the left twin, id of the right twin."""
    n = len(all_sites()) + 1
    paired = np.zeros(n, bool)
    left, right = np.arange(n), np.arange(n)
    for s in all_sites():
        if s.side in ("left", "right"):
            twin = site_id(s.mirror_code)
            paired[s.id] = True
            left[s.id] = s.id if s.side == "left" else twin
            right[s.id] = s.id if s.side == "right" else twin
    return paired, left, right


def midline_x(sites: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Midline x (voxel units) for each z slice; NaN where the slice has no body."""
    axial = [site_id(c) for c in ("sacrum", "sternum")] + [s.id for s in all_sites() if s.code.startswith("vertebra_")]
    spine = np.isin(sites, axial)
    nx = sites.shape[0]
    x = np.arange(nx, dtype=float)[:, None]
    out = np.full(sites.shape[2], np.nan)
    spine_w = spine.sum(axis=1)                    # (x, z)
    has_spine = spine_w.sum(axis=0) > 0
    out[has_spine] = (x * spine_w[:, has_spine]).sum(axis=0) / spine_w[:, has_spine].sum(axis=0)
    body_x = body.any(axis=1)                      # (x, z)
    for z in np.nonzero(~has_spine & body_x.any(axis=0))[0]:
        xs = np.nonzero(body_x[:, z])[0]
        out[z] = (xs[0] + xs[-1]) / 2
    # spine centres are steadier than body extents: carry the nearest spine midline over small gaps
    if has_spine.any():
        zs = np.nonzero(has_spine)[0]
        smooth = ndimage.median_filter(out[zs], size=5, mode="nearest")
        out[zs] = smooth
    return out


def sides_by_position(sites: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Return ``sites`` with each paired site's side set by its voxels' position (a copy when changed)."""
    paired, left, right = _pairs()
    lab = sites.astype(np.intp)
    is_paired = paired[lab]
    if not is_paired.any():
        return sites
    mid = midline_x(sites, body)
    xs, ys, zs = np.nonzero(is_paired)
    m = mid[zs]
    offset_mm = (xs - m) * float(spacing_mm[0])
    ok = ~np.isnan(m) & (np.abs(offset_mm) >= MIN_OFFSET_MM)
    out = sites.copy()
    ids = lab[xs[ok], ys[ok], zs[ok]]
    out[xs[ok], ys[ok], zs[ok]] = np.where(offset_mm[ok] > 0, right[ids], left[ids]).astype(sites.dtype)
    return out
