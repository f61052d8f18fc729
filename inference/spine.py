"""Vertebral levels by counting, as a reader does: up from the sacrum (L5 sits on it), instead of trusting each
vertebra's own level guess.

A network sees a vertebra and its neighbours but not always a landmark, so it is often right about *a vertebra*
and off by one about *which*. Here each vertebra is one instance (a connected component of one predicted level;
one much taller than its neighbours is split in two), instances are ordered along the head-feet axis, and the run
that ends on the sacrum is numbered up from L5. Runs above a gap (a missed vertebra) and spines without the sacrum
in view keep the numbering most of their own labels agree with, made consecutive.
Works on the model grid (RAS axes, so axis 2 points to the head).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.sites import site_id

LEVELS = [f"vertebra_C{i}" for i in range(1, 8)] + [f"vertebra_T{i}" for i in range(1, 13)] + \
         [f"vertebra_L{i}" for i in range(1, 6)]
ANCHOR_GAP_MM = 12.0      # the sacrum must lie within this distance (head-feet) of the lowest vertebra
MIN_INSTANCE_ML = 0.15    # smaller fragments keep their label


@dataclass
class _Instance:
    mask_index: int           # component id in the instance label map
    level: int                # index into LEVELS of the network's label
    z_lo: float
    z_hi: float
    z_mid: float
    voxels: int


def _instances(sites: np.ndarray, level_ids: np.ndarray, min_vox: int) -> tuple[np.ndarray, list[_Instance]]:
    """Connected components of each predicted level (at least ``min_vox``): an id map and their extents."""
    inst = np.zeros(sites.shape, np.int32)
    out: list[_Instance] = []
    n_total = 0
    for level, sid in enumerate(level_ids):
        lab, n = ndimage.label(sites == sid)
        if n == 0:
            continue
        objects = ndimage.find_objects(lab)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if sizes[k] < min_vox:
                continue
            n_total += 1
            inst[lab == k] = n_total
            zs = objects[k - 1][2]
            z_mid = float(ndimage.center_of_mass(lab[objects[k - 1]] == k)[2] + zs.start)
            out.append(_Instance(n_total, level, float(zs.start), float(zs.stop - 1), z_mid, int(sizes[k])))
    return inst, out


def _extent(group: list[_Instance]) -> tuple[float, float]:
    """First and last z slice (inclusive) of a group of fragments."""
    return min(x.z_lo for x in group), max(x.z_hi for x in group)


def _group_fragments(items: list[_Instance]) -> list[list[_Instance]]:
    """Group the fragments of one vertebra: their head-feet extents mostly overlap (head first)."""
    items = sorted(items, key=lambda i: -i.z_mid)          # head first
    groups: list[list[_Instance]] = []
    for it in items:
        if groups:
            g = groups[-1]
            lo, hi = _extent(g)
            overlap = min(hi, it.z_hi) - max(lo, it.z_lo) + 1
            if overlap >= 0.6 * min(hi - lo + 1, it.z_hi - it.z_lo + 1):
                g.append(it)
                continue
        groups.append([it])
    return groups


def _split_tall(groups: list[list[_Instance]]) -> list[tuple[list[_Instance], tuple[float, float] | None]]:
    """One slot per vertebra: (fragments, z range or None for all of them). A group taller than 1.7 times the
    median of its neighbours holds two vertebrae under one label; it becomes two slots split at its middle."""
    extents = [_extent(g) for g in groups]
    heights = np.array([hi - lo + 1 for lo, hi in extents], float)
    out: list[tuple[list[_Instance], tuple[float, float] | None]] = []
    for i, (g, (lo, hi)) in enumerate(zip(groups, extents)):
        neigh = np.concatenate([heights[max(0, i - 3):i], heights[i + 1:i + 4]])
        if len(neigh) >= 3 and heights[i] > 1.7 * float(np.median(neigh)):
            mid = (lo + hi) / 2
            out.append((g, (mid, hi + 1)))
            out.append((g, (lo, mid)))
        else:
            out.append((g, None))
    return out


def _z_range(slot: tuple[list[_Instance], tuple[float, float] | None]) -> tuple[float, float]:
    g, zr = slot
    if zr is not None:
        return zr
    lo, hi = _extent(g)
    return lo, hi + 1


def _mid(slot) -> float:
    lo, hi = _z_range(slot)
    return (lo + hi) / 2


def _segments(slots) -> list[list[int]]:
    """Runs of vertebrae without a gap: a spacing over 1.6 times that of the neighbours means a vertebra the
    network missed, and counting must not run across it."""
    mids = np.array([_mid(sl) for sl in slots])
    gaps = mids[:-1] - mids[1:]
    runs, current = [], [0]
    for i, g in enumerate(gaps):
        neigh = np.concatenate([gaps[max(0, i - 2):i], gaps[i + 1:i + 3]])
        if len(neigh) >= 2 and g > 1.6 * float(np.median(neigh)):
            runs.append(current)
            current = []
        current.append(i + 1)
    return runs + [current]


def _levels_by_counting(slots, sites: np.ndarray, dz: float) -> list[int]:
    """The level index of each slot (head first). The run of vertebrae that ends on the sacrum is counted up from
    L5; every other run keeps the shift that most of its voxels' own labels agree with."""
    n_lev = len(LEVELS)
    sacrum = np.nonzero((sites == site_id("sacrum")).any(axis=(0, 1)))[0]
    on_sacrum = bool(len(sacrum)) and (_z_range(slots[-1])[0] - sacrum.max() - 1) * dz <= ANCHOR_GAP_MM
    levels = [0] * len(slots)
    runs = _segments(slots)
    for k, run in enumerate(runs):
        if k == len(runs) - 1 and on_sacrum:
            shift = n_lev - len(run)
        else:
            votes: dict[int, int] = {}
            for rank, i in enumerate(run):
                for x in slots[i][0]:
                    votes[x.level - rank] = votes.get(x.level - rank, 0) + x.voxels
            shift = max(votes, key=votes.get)
        for rank, i in enumerate(run):
            levels[i] = shift + rank
    return levels


def renumber_vertebrae(sites: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Return ``sites`` (model grid, RAS) with vertebral levels renumbered by counting (a copy when changed)."""
    level_ids = np.array([site_id(c) for c in LEVELS])
    vox_ml = float(np.prod(spacing_mm)) / 1000.0
    spine = np.isin(sites, np.append(level_ids, site_id("sacrum")))
    if not spine.any():
        return sites
    box = ndimage.find_objects(spine.astype(np.int8))[0]       # work inside the spine's bounding box
    sub = sites[box]
    inst, items = _instances(sub, level_ids, max(1, int(MIN_INSTANCE_ML / vox_ml)))
    if len(items) < 2:
        return sites
    slots = _split_tall(_group_fragments(items))
    levels = _levels_by_counting(slots, sub, float(spacing_mm[2]))
    out = sub.copy()
    z_index = np.arange(sub.shape[2])[None, None, :]
    for slot, level in zip(slots, levels):
        if not 0 <= level < len(LEVELS):
            continue                                         # more vertebrae than levels: leave them as predicted
        voxels = np.isin(inst, [x.mask_index for x in slot[0]])
        if slot[1] is not None:
            voxels &= (z_index >= slot[1][0]) & (z_index < slot[1][1])
        out[voxels] = level_ids[level]
    full = sites.copy()
    full[box] = out
    return full
