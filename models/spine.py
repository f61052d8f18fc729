"""Vertebral levels as one ordered sequence along the spine, anchored on the sacrum and drawn to the discs.

The network's level labels are right about *a vertebra* more often than about *which*: at 3 mm they mix
neighbouring levels within one vertebra and drift by one or two along the column. Here the levels of the main
spinal column are re-fitted as one monotone sequence C1..L5 from head to feet (semi-Markov dynamic programme over
head-feet slices): each level is one run of slices, rewarded by the share of that slice's vertebral voxels the
network gave that level, with a soft prior on each level's height relative to its neighbours (cervical < thoracic
< lumbar). The labels are trusted up to a global shift: when the sacrum lies right below the column, the last
vertebra must be L5 and the shift that fits best wins (a reader counts up from the sacrum); without it, the
network's own numbering stands.

With the image, the fit also rewards boundaries on the bright bands between vertebral bodies (:func:`disc_bands`:
on fat-suppressed images a child's intervertebral disc, and the cartilage end plates beside it, is brighter than
the marrow of the bodies), each slice takes its fitted level, and the front half of the column in each disc band
at a boundary leaves the bone map (at 3 mm the bone channel blurs the disc into bone). Without the image, a voxel
keeps its own label when that level's fitted run is within reach of its slice (the network's oblique disc planes
survive), else it takes the fitted level of its slice.
Works on the model grid (RAS axes, so axis 2 points to the head).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.sites import VERTEBRAL_LEVELS as LEVELS
from models.sites import site_id, vertebral_level_ids

# Height of each level (vertebral body plus disc) relative to a thoracic one: an anatomical approximation
# (children and adults alike: cervical segments about 3/4, lumbar about 1.3 times a thoracic one).
RELATIVE_HEIGHT = np.array([0.75] * 7 + [1.0] * 12 + [1.3] * 5)
THORACIC_MM = (9.0, 30.0)     # plausible thoracic segment heights, 3-year-old to adult
HEIGHT_SD = 0.3               # log-normal spread of a level's height around its expectation
HEIGHT_WEIGHT = 3.0           # prior weight, in slices' worth of votes
SHIFTS = (-2, -1, 0, 1, 2)    # global label shifts tried when the sacrum anchors the count
SHIFT_COST = 0.5              # votes' worth a shift must gain over the network's own numbering
KEEP_SLACK = 0.15             # a voxel keeps its own level within this share of a run's height beyond it
COLUMN_MAX_GAP_MM = 45.0      # pieces of the column further apart (head-feet) are not the same spine
COLUMN_MAX_OFFSET_MM = 30.0   # ... nor pieces this far left or right of its largest piece
ANCHOR_GAP_MM = 12.0          # the sacrum must start within this distance below the lowest vertebra
FROM_C1_ROOM_MM = 30.0        # the column's top is C1 only with this much of the view above it (the head); a
                              # view cut a few mm above the column (a pelvis view's lumbar spine) is not its top
DISC_WEIGHT = 2.0             # votes' worth of a level boundary on a disc band one robust SD bright
DISC_CLIP = (-1.0, 2.0)       # disc band scores (robust SDs) are clipped to this range
DISC_SMOOTH_MM = (3.0, 9.0)   # band-pass of the column's head-feet brightness profile (Gaussian sigmas)
DISC_CLEAR_MIN = 0.5          # a disc band this bright (robust SDs) at a boundary leaves the bone map


@dataclass
class _Fit:
    score: float
    levels: np.ndarray        # level index per slice (head first), -1 outside the fitted run
    start: np.ndarray         # first slice (head first) of each level's run, -1 when absent
    stop: np.ndarray          # one past its last slice


def _main_column(spine: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The spinal column: the largest connected piece of the predicted spine (vertebrae and sacrum, 26-connected), plus the
    pieces in line with it (left-right within ``COLUMN_MAX_OFFSET_MM``) across gaps up to ``COLUMN_MAX_GAP_MM``
    (a missed vertebra); stray labels elsewhere (e.g. in the skull) are left alone."""
    lab, n = ndimage.label(spine, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return spine
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    boxes = ndimage.find_objects(lab)
    x_mid = [(b[0].start + b[0].stop) / 2 for b in boxes]                       # left-right middle of each piece
    order = list(np.argsort(-sizes))
    keep = [order.pop(0)]
    z_lo, z_hi = boxes[keep[0]][2].start, boxes[keep[0]][2].stop
    grew = True
    while grew:
        grew = False
        for i in list(order):
            zs = boxes[i][2]
            gap = max(zs.start - z_hi, z_lo - zs.stop, 0) * spacing_mm[2]
            if gap <= COLUMN_MAX_GAP_MM and abs(x_mid[i] - x_mid[keep[0]]) * spacing_mm[0] <= COLUMN_MAX_OFFSET_MM:
                keep.append(i)
                order.remove(i)
                z_lo, z_hi, grew = min(z_lo, zs.start), max(z_hi, zs.stop), True
    return spine & np.isin(lab, np.array(keep) + 1)


def _fit(votes: np.ndarray, sacrum: np.ndarray, heights: np.ndarray, anchored: bool, from_c1: bool,
         cuts: np.ndarray | None = None) -> _Fit:
    """Best monotone run of levels over slices (head first). ``votes[t, k]``: share of slice t's vertebral voxels
    labelled k; ``sacrum[t]``: share labelled sacrum; ``heights``: expected slices per level. ``anchored``: the run
    ends with L5 on the sacrum; ``from_c1``: it starts with C1 (the top of the spine is in view). ``cuts[c]``
    (length n_t + 1): votes' worth of a run starting or ending between slices c - 1 and c (half to each run)."""
    n_t, n_k = votes.shape
    cuts = np.zeros(n_t + 1) if cuts is None else cuts
    cum = np.vstack([np.zeros((1, n_k)), np.cumsum(votes, axis=0)])             # cum[t] = sum of rows < t
    sac_cum = np.concatenate([[0.0], np.cumsum(sacrum)])
    neg = -1e18
    best = np.full((n_k, n_t + 1), neg)      # best[k, t]: score with level k's run ending at slice t (exclusive)
    arg_d = np.zeros((n_k, n_t + 1), np.int32)
    from_prev = np.zeros((n_k, n_t + 1), bool)
    ends = np.arange(n_t + 1)
    for k in range(n_k):
        h = heights[k]
        fresh = 0.0 if k == 0 or not from_c1 else neg                          # start here, or follow level k-1
        entry = np.full(n_t + 1, fresh) if k == 0 else np.maximum(best[k - 1], fresh)
        prev_better = np.zeros(n_t + 1, bool) if k == 0 else best[k - 1] > fresh
        ds = np.arange(1, int(np.ceil(2.5 * h)) + 1)
        starts = ends[None, :] - ds[:, None]                                   # [duration, end]
        ok = starts >= 0
        a = np.where(ok, starts, 0)
        gain = (entry[a] + cum[ends, k][None, :] - cum[a, k] + 0.5 * (cuts[a] + cuts[ends][None, :])
                - (HEIGHT_WEIGHT * (np.log(ds / h) / HEIGHT_SD) ** 2)[:, None])
        gain[~ok] = neg
        i = np.argmax(gain, axis=0)
        best[k] = gain[i, ends]
        arg_d[k] = ds[i]
        from_prev[k] = prev_better[a[i, ends]] & (best[k] > neg)
    tail = best + (sac_cum[-1] - sac_cum[None, :])                              # sacrum below the last level
    if anchored:
        total = np.full_like(best, neg)
        total[n_k - 1] = tail[n_k - 1]
    else:
        total = np.maximum(best, np.where(np.arange(n_k)[:, None] == n_k - 1, tail, neg))
    k, t = np.unravel_index(int(np.argmax(total)), total.shape)
    score = float(total[k, t])
    levels = np.full(n_t, -1, np.int32)
    start, stop = np.full(n_k, -1), np.full(n_k, -1)
    while True:
        d = int(arg_d[k, t])
        levels[t - d:t] = k
        start[k], stop[k] = t - d, t
        if not from_prev[k, t] or k == 0:
            break
        k, t = k - 1, t - d
    return _Fit(score, levels, start, stop)


def _anchored(level_counts: np.ndarray, sacrum_counts: np.ndarray, dz: float) -> bool:
    """Whether the sacrum starts right below the lowest vertebra (slices head first)."""
    has_level, has_sacrum = np.nonzero(level_counts.sum(axis=1) > 0)[0], np.nonzero(sacrum_counts > 0)[0]
    below = has_sacrum[has_sacrum >= has_level.max() - 1]
    return bool(len(below)) and (below.min() - has_level.max() - 1) * dz <= ANCHOR_GAP_MM


def _best_fit(votes: np.ndarray, sacrum: np.ndarray, dz: float, anchored: bool, from_c1: bool,
              cuts: np.ndarray | None = None) -> tuple[_Fit, int]:
    """The fit and the global label shift, over a range of body scales."""
    def fit_with(scale_mm: float, shift: int) -> tuple[float, _Fit]:
        shifted = np.zeros_like(votes)                        # raw label r read as r + shift
        lo, hi = max(0, shift), min(len(LEVELS), len(LEVELS) + shift)
        shifted[:, lo:hi] = votes[:, lo - shift:hi - shift]
        fit = _fit(shifted, sacrum, RELATIVE_HEIGHT * scale_mm / dz, anchored, from_c1, cuts)
        return fit.score - SHIFT_COST * abs(shift), fit

    scored = [(*fit_with(mm, s), s) for mm in np.geomspace(*THORACIC_MM, 8) for s in (SHIFTS if anchored else (0,))]
    _, fit, shift = max(scored, key=lambda x: x[0])
    return fit, shift


def disc_bands(img: np.ndarray, column: np.ndarray, dz: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """Per head-feet slice of ``img`` and ``column`` (the spine's voxels, slices on the last axis): how much brighter
    the front half of the column (the vertebral bodies) is than its surroundings along the spine, in robust standard
    deviations. On fat-suppressed images an intervertebral disc, with a child's cartilage end plates beside it, is
    a bright band between two darker bodies of marrow. Voxels in ``exclude`` (edema, which would make a body look
    like a disc) do not count; a slice left without voxels takes its neighbours' brightness."""
    n_t = column.shape[2]
    prof = np.full(n_t, np.nan)
    for t in np.nonzero(column.any(axis=(0, 1)))[0]:
        xs, ys = np.nonzero(column[:, :, t])
        front = ys >= np.median(ys)
        if exclude is not None:
            front &= ~exclude[xs, ys, t]
        if front.any():
            prof[t] = float(img[xs[front], ys[front], t].mean())
    have = np.nonzero(~np.isnan(prof))[0]
    if len(have) < 3:
        return np.zeros(n_t)
    prof = np.interp(np.arange(n_t), have, prof[have])
    fine, coarse = (ndimage.gaussian_filter1d(prof, mm / dz) for mm in DISC_SMOOTH_MM)
    band = fine - coarse
    inside = band[have.min():have.max() + 1]
    scale = 1.4826 * float(np.median(np.abs(inside - np.median(inside))))
    return band / scale if scale > 0 else np.zeros(n_t)


def _disc_slices(fit: _Fit, band: np.ndarray) -> list[int]:
    """Slices (head first) of the disc bands at the fitted boundaries between consecutive levels: the brighter of
    the two slices beside each boundary, where its band score reaches ``DISC_CLEAR_MIN``."""
    out = []
    for k in range(len(fit.start) - 1):
        c = int(fit.stop[k])
        if fit.start[k] < 0 or fit.start[k + 1] != c or not 0 < c < len(band):
            continue
        q = c - 1 if band[c - 1] >= band[c] else c
        if band[q] >= DISC_CLEAR_MIN:
            out.append(q)
    return out


def _clear_discs(sites: np.ndarray, column: np.ndarray, level_ids: np.ndarray, slices: list[int],
                 protect: np.ndarray | None) -> None:
    """Set the front half (the bodies' side) of the column's vertebral voxels in ``slices`` to no bone, in place:
    the disc between two bodies, which the network's bone channel blurs into bone at the model grid. Voxels in
    ``protect`` stay."""
    for t in slices:
        sl = column[:, :, t] & np.isin(sites[:, :, t], level_ids)
        if sl.any():
            ys = np.nonzero(sl)[1]
            clear = sl & (np.arange(sl.shape[1])[None, :] >= np.median(ys))
            if protect is not None:
                clear &= ~protect[:, :, t]
            sites[:, :, t][clear] = 0


@dataclass
class _Column:
    box: tuple[slice, ...]    # the column's box in the site map
    lab: np.ndarray           # level index (the sacrum: len(LEVELS)) of the column's voxels, -1 elsewhere; slices
                              # head first
    counts: np.ndarray        # [slice (head first), level...] voxel counts; the last column is the sacrum
    from_c1: bool             # room above the column: its top is C1
    anchored: bool            # the sacrum starts right below its lowest vertebra: that one is L5


def _column(sites: np.ndarray, spacing_mm: tuple[float, float, float]) -> _Column | None:
    """The main spinal column of a site map (model grid, RAS) and where its level count can start; None without
    vertebral labels."""
    n_lev = len(LEVELS)
    lut = np.full(256, -1, np.int32)
    lut[list(vertebral_level_ids())] = np.arange(n_lev)
    lut[site_id("sacrum")] = n_lev
    spine = lut[sites] >= 0
    if spine.sum() < 2:
        return None
    outer = ndimage.find_objects(spine.astype(np.int8))[0]                    # work inside the spine labels' box
    column = _main_column(spine[outer], spacing_mm)
    inner = ndimage.find_objects(column.astype(np.int8))[0]
    column = column[inner]
    box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))
    lab = np.where(column, lut[sites[box]], -1)[:, :, ::-1]                   # slices head first
    n_t = lab.shape[2]
    flat = np.where(lab >= 0, lab + (n_lev + 1) * np.arange(n_t)[None, None, :], -1)
    counts = np.bincount(flat[flat >= 0], minlength=n_t * (n_lev + 1)).reshape(n_t, n_lev + 1).astype(float)
    if not counts[:, :n_lev].any():
        return None
    dz = float(spacing_mm[2])
    from_c1 = (sites.shape[2] - box[2].stop) * dz >= FROM_C1_ROOM_MM          # room above the spine: its top is in view
    return _Column(box, lab, counts, from_c1, _anchored(counts[:, :n_lev], counts[:, n_lev], dz))


def level_count_anchors(sites: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[bool, bool] | None:
    """Where the vertebral levels of a site map (model grid, RAS) can be counted from: (C1 at the top of the
    column, the sacrum right below it), read from the column :func:`renumber_vertebrae` fits; None without
    vertebrae."""
    col = _column(np.asarray(sites), spacing_mm)
    return None if col is None else (bool(col.from_c1), bool(col.anchored))


def renumber_vertebrae(sites: np.ndarray, spacing_mm: tuple[float, float, float], img: np.ndarray | None = None,
                       protect: np.ndarray | None = None) -> np.ndarray:
    """Return ``sites`` (model grid, RAS) with vertebral levels re-fitted along the spine (a copy when changed).
    With the normalised image ``img``, level boundaries are drawn to the bright disc bands between bodies and the
    discs leave the bone map, except voxels in ``protect`` (predicted edema: a lesion across an end plate is
    marrow edema of the bodies, not soft tissue in the disc; nor does edema count as disc brightness)."""
    n_lev = len(LEVELS)
    level_ids = np.array(vertebral_level_ids())
    col = _column(sites, spacing_mm)
    if col is None:
        return sites
    box, lab, counts = col.box, col.lab, col.counts
    sub = sites[box]
    n_t = lab.shape[2]
    level_counts, sacrum_counts = counts[:, :n_lev], counts[:, n_lev]
    votes = level_counts / np.maximum(level_counts.sum(axis=1, keepdims=True), 1.0)
    sacrum = sacrum_counts / np.maximum(counts.sum(axis=1), 1.0)
    dz = float(spacing_mm[2])
    cuts = None
    protect = None if protect is None else protect[box]
    if img is not None and DISC_WEIGHT > 0:
        edema = None if protect is None else protect[:, :, ::-1]
        band = np.clip(disc_bands(img[box][:, :, ::-1], lab >= 0, dz, edema), *DISC_CLIP)
        cuts = DISC_WEIGHT * np.maximum(np.concatenate([band[:1], band]), np.concatenate([band, band[-1:]]))
    fit, shift = _best_fit(votes, sacrum, dz, col.anchored, col.from_c1, cuts)
    # a voxel keeps its own (shifted) level if that level's run is within reach of its slice, else the slice's fit
    t_index = np.arange(n_t)[None, None, :]
    own = np.clip(lab + shift, 0, n_lev - 1)
    if cuts is None:    # without the image, the network's own (oblique) boundaries are kept near the fitted ones
        slack = np.maximum(1, (KEEP_SLACK * (fit.stop - fit.start)).astype(int))[own]
    else:               # with it, the boundaries drawn to the disc bands are each slice's level
        slack = np.zeros_like(own)
    start, stop = fit.start[own], fit.stop[own]
    keep = (start >= 0) & (t_index >= start - slack) & (t_index < stop + slack)
    fitted = fit.levels[np.broadcast_to(t_index, lab.shape)]
    new = np.where(keep, own, fitted)[:, :, ::-1]
    change = ((lab >= 0) & (lab < n_lev) & ((fitted >= 0) | keep))[:, :, ::-1]
    out = sub.copy()
    out[change] = level_ids[new[change]]
    if cuts is not None:
        _clear_discs(out, lab[:, :, ::-1] >= 0, level_ids, [n_t - 1 - q for q in _disc_slices(fit, band)], protect)
    if np.array_equal(out, sub):
        return sites
    full = sites.copy()
    full[box] = out
    return full
