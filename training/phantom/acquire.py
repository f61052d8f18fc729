"""Acquisition: the anatomy-grid image is 'scanned' as a multi-station series, coronal unless
``acquisition.plane_p`` asks for sagittal or axial slices too: STIR, T2 with spectral fat saturation or T2 Dixon
water-only (``acquisition.sequence_p``).

Field of view, anisotropic voxels with a slice profile, station intensity steps, bias field, patchy fat
suppression failure (T2 FS) or a fat-water swap (Dixon), motion blur, Rician noise, arbitrary scale, and header
orientation (RAS, LPS, coronal slice stacks, oblique) — so a model never assumes a whole body in RAS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import affine_transform, gaussian_filter, gaussian_filter1d

from training.config import AcquisitionConfig, DixonConfig, FovConfig

from .body import Body
from .render import (AIR, CORTEX, FAT, MARROW, MUSCLE, PHYSIS, SKIN, YELLOW, Canvas, drawn_or_only, field_at, rotation,
                     smooth_field, tissue_in, weighted_choice)


@dataclass
class Acquired:
    image: np.ndarray
    labels: dict[str, np.ndarray]
    affine: np.ndarray
    params: dict


def choose_fov(body: Body, rng: np.random.Generator, cfg: FovConfig, force: str | None = None) -> tuple[str, float, float]:
    """(name, z_lo, z_hi) world range of the field of view."""
    name = force or weighted_choice(rng, cfg.p)
    Lm, H = body.landmarks, body.H
    zk = float(np.mean([body.landmarks["knee_left"][2], body.landmarks["knee_right"][2]]))
    ranges = {
        "whole_body": (-10.0, H + 10.0),
        "pelvis": (Lm["z_hip"] - 0.13 * H, Lm["z_hip"] + 0.17 * H),
        "knees": (zk - 0.11 * H, zk + 0.11 * H),
        "legs": (-10.0, Lm["z_hip"] + 0.08 * H),
        "spine": (Lm["z_hip"] - 0.06 * H, Lm["z_chin"] + 0.05 * H),
        "feet": (-10.0, Lm["z_ankle"] + 0.12 * H),
    }
    lo, hi = ranges[name]
    jit = rng.uniform(-0.02, 0.02, 2) * H if name != "whole_body" else np.zeros(2)
    return name, float(lo + jit[0]), float(hi + jit[1])


def _orientation_matrix(kind: str, rng) -> np.ndarray:
    """Columns: world direction of each array axis (before spacing)."""
    if kind == "RAS":
        return np.eye(3)
    if kind == "LPS":
        return np.diag([-1.0, -1.0, 1.0])
    # coronal slice stack: axis0 = L->R or R->L, axis1 = S->I, axis2 = slices P->A
    sx = rng.choice([-1.0, 1.0])
    return np.array([[sx, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])


@dataclass
class Dixon:
    """What a Dixon acquisition needs beyond STIR's: the anatomy grid's edema strength (edema displaces fat) and
    the random stream of the Dixon-only draws (the swap), kept apart from the acquisition stream."""
    edema: np.ndarray
    rng: np.random.Generator


# fat fraction by tissue (marrow: yellow 0.8 to red 0.4 by the red-marrow weight; edema displaces fat)
_FAT_FRACTION = {FAT: 0.9, MUSCLE: 0.04, SKIN: 0.1, CORTEX: 0.0, PHYSIS: 0.05}


def fat_fraction(cv: Canvas, edema: np.ndarray, block: tuple[slice, ...]) -> np.ndarray:
    """Share of each anatomy voxel's signal that is fat in ``block`` of the canvas, for Dixon's fat-water swap
    (computed only where a swap is drawn)."""
    lut = np.zeros(256, np.float32)
    for tissue, share in _FAT_FRACTION.items():
        lut[tissue] = share
    tissue = cv.tissue[block]
    out = lut[tissue]
    marrow = tissue_in(tissue, MARROW)
    out[marrow] = 0.8 - 0.4 * cv.marrow_w[block][marrow]
    return out * (1.0 - 0.7 * np.clip(edema[block], 0.0, 1.0))


def swap_region(tissue: np.ndarray, spacing: float, rng: np.random.Generator, cfg: DixonConfig) -> np.ndarray:
    """An irregular ball of body voxels where fat-water separation failed, centred toward the edge of the
    field of view (a body voxel drawn with weight ~ its distance from the block's centre to the fourth power)."""
    body = tissue != AIR
    idx = np.flatnonzero(body)
    pick = idx[rng.integers(0, idx.size, min(idx.size, 20000))]
    coords = np.stack(np.unravel_index(pick, tissue.shape), axis=1).astype(np.float64)
    rel = (coords - (np.array(tissue.shape) - 1) / 2) / (np.array(tissue.shape) / 2)
    w = np.sum(rel ** 2, axis=1) ** 2 + 1e-6
    centre = coords[rng.choice(len(coords), p=w / w.sum())]
    radius = float(rng.uniform(*cfg.swap_radius_mm)) / spacing
    lo = np.maximum(0, np.floor(centre - 1.3 * radius)).astype(int)
    hi = np.minimum(tissue.shape, np.ceil(centre + 1.3 * radius) + 1).astype(int)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.ogrid[sl]
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) / radius
    out = np.zeros(tissue.shape, bool)
    out[sl] = (dist + 0.25 * smooth_field(tuple(hi - lo), rng, cells=4) < 1.0) & body[sl]
    return out


def acquire(cv: Canvas, body: Body, img: np.ndarray, labels: dict[str, np.ndarray], rng: np.random.Generator,
            acq: AcquisitionConfig, fov_cfg: FovConfig, fov: str | None = None, muscle_mean: float = 0.2,
            sequence: str = "t2_fs", dixon: Dixon | None = None) -> Acquired:
    """Resample anatomy onto an acquisition grid (thick slices across the drawn plane) and add the scanner's
    imperfections. Every ``sequence`` makes the same draws from ``rng``, so a seed's three versions pair up:
    ``t2_fs`` fails to suppress fat in patches now and then (generator 1.4's acquisition), ``stir`` does not, and
    ``dixon_water`` (with ``dixon``) does not either, has a higher SNR and, now and then, a fat-water swap."""
    if (sequence == "dixon_water") != (dixon is not None):
        raise ValueError("a Dixon acquisition needs its edema map and swap stream (dixon=...), and only it")
    name, z_lo, z_hi = choose_fov(body, rng, fov_cfg, fov)
    inplane = float(rng.uniform(*acq.inplane_mm))
    thick = float(rng.uniform(*acq.slice_mm))
    # one plane (the default) takes no draw, so generator 1.3 cases are made bit for bit
    plane = drawn_or_only(rng, acq.plane_p)
    across = SLICE_AXIS[plane]   # the canvas axis (x: R-L, y: A-P, z: S-I) the thick slices run along
    # body extent in x/y from the anatomy (non-air voxels) within the z range
    occ = cv.tissue != 0
    zi = np.clip(((np.array([z_lo, z_hi]) - cv.origin[2]) / cv.spacing).astype(int), 0, cv.shape[2] - 1)
    sub = occ[:, :, zi[0]:zi[1] + 1]
    xs = np.where(sub.any(axis=(1, 2)))[0]
    ys = np.where(sub.any(axis=(0, 2)))[0]
    x_lo, x_hi = cv.origin[0] + cv.spacing * (xs[0] - 4), cv.origin[0] + cv.spacing * (xs[-1] + 4)
    y_lo, y_hi = cv.origin[1] + cv.spacing * (ys[0] - 2), cv.origin[1] + cv.spacing * (ys[-1] + 2)
    if name == "spine":  # a narrower coronal block around the spine
        x_lo, x_hi = max(x_lo, -0.16 * body.H), min(x_hi, 0.16 * body.H)
    spacing = np.full(3, inplane)
    spacing[across] = thick
    shape = np.ceil(np.array([x_hi - x_lo, y_hi - y_lo, z_hi - z_lo]) / spacing).astype(int)
    shape = np.maximum(shape, 8)
    # oblique: rotate the grid about its centre
    R = np.eye(3)
    oblique = rng.random() < acq.oblique_p
    if oblique:
        axis = rng.normal(size=3)
        R = rotation(axis, np.radians(rng.uniform(-acq.oblique_max_deg, acq.oblique_max_deg)))
    centre = np.array([(x_lo + x_hi) / 2, (y_lo + y_hi) / 2, (z_lo + z_hi) / 2])
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(spacing)
    A[:3, 3] = centre - A[:3, :3] @ ((shape - 1) / 2)
    # slice profile: blur across the slices before sampling
    sigma_slice = thick / 2.355 / cv.spacing
    y0 = max(0, int((y_lo - cv.origin[1]) / cv.spacing) - 8)
    x0 = max(0, int((x_lo - cv.origin[0]) / cv.spacing) - 8)
    z0 = max(0, int((z_lo - cv.origin[2]) / cv.spacing) - 8)
    crop = (slice(x0, int((x_hi - cv.origin[0]) / cv.spacing) + 9), slice(y0, int((y_hi - cv.origin[1]) / cv.spacing) + 9),
            slice(z0, int((z_hi - cv.origin[2]) / cv.spacing) + 9))
    view = crop   # the block the field of view covers
    if oblique:  # rotated grids can reach a little further: use the whole canvas
        crop = (slice(0, None),) * 3
    src = img[crop]
    # patchy failure of spectral fat saturation (a field-inhomogeneity effect on fat and fatty marrow); STIR and
    # Dixon make the same draws and drop the effect, so their later draws (stations, bias, noise) stay alike
    fs_fail = rng.random() < acq.fat_sat_failure_p
    if fs_fail:
        fatty = tissue_in(cv.tissue[crop], (FAT, YELLOW))
        gain = 1.0 + 3.0 * np.clip(field_at(fatty, rng, cells=6, lo=-2.0, hi=1.0), 0, 1)
        if sequence == "t2_fs":
            src = src.copy()
            src[fatty] *= gain
    fs_fail = fs_fail and sequence == "t2_fs"
    swap = None
    if dixon is not None and dixon.rng.random() < acq.dixon.swap_p:
        # centred inside the field of view's block (the whole canvas of an oblique scan reaches beyond it)
        part = swap_region(cv.tissue[view], cv.spacing, dixon.rng, acq.dixon)
        at = tuple(slice(v.start - (c.start or 0), v.start - (c.start or 0) + n) for v, c, n in zip(view, crop, part.shape))
        swap = np.zeros(src.shape, bool)
        swap[at] = part
        fat = float(dixon.rng.uniform(*acq.dixon.fat_signal))
        src = src.astype(np.float32)  # a copy: img is the anatomy's
        src[at] = np.where(part, fat * fat_fraction(cv, dixon.edema, view), src[at])
    src = gaussian_filter1d(src, sigma_slice, axis=across, mode="nearest", truncate=2.5)
    off = np.array([s.start or 0 for s in crop], float)
    M = np.linalg.inv(cv.affine) @ A
    matrix, offset = M[:3, :3], M[:3, 3] - off
    out = affine_transform(src, matrix, offset, output_shape=tuple(shape), order=1, mode="constant", cval=0.0)
    swapped = 0.0   # mL of the acquired volume
    if swap is not None:
        swap_out = affine_transform(swap.astype(np.uint8), matrix, offset, output_shape=tuple(shape), order=0)
        swapped = float(np.count_nonzero(swap_out)) * float(np.prod(spacing)) / 1000.0
    lab_out = {k: affine_transform(v[crop], matrix, offset, output_shape=tuple(shape), order=0, mode="constant", cval=0)
               for k, v in labels.items()}
    # stations along z with intensity steps, bias field, motion blur
    n_st = int(rng.integers(acq.stations[0], acq.stations[1] + 1)) if name == "whole_body" else int(rng.integers(1, 3))
    gains = rng.uniform(*acq.station_gain, n_st)
    zc = np.linspace(0, 1, shape[2])
    edges = np.linspace(0, 1, n_st + 1)[1:-1] + rng.uniform(-0.03, 0.03, n_st - 1)
    g = np.full(shape[2], gains[0])
    for e, gi, gj in zip(edges, gains[:-1], gains[1:]):
        g = g + (gj - gi) / (1 + np.exp(-(zc - e) / 0.004))
    bias = np.exp(rng.uniform(*acq.bias_amplitude) * smooth_field(tuple(shape), rng, cells=5))
    out = out * bias.astype(np.float32) * g[None, None, :].astype(np.float32)
    motion = rng.random() < acq.motion_blur_p
    if motion:
        out = gaussian_filter(out, sigma=(rng.uniform(0.4, 1.2), 0, rng.uniform(0.4, 1.2)))
    snr = float(rng.uniform(*acq.snr)) * (acq.dixon.snr_gain if dixon is not None else 1.0)
    sigma = 2.0 * muscle_mean / snr
    noise = rng.standard_normal((2,) + tuple(shape), dtype=np.float32) * sigma
    out = np.sqrt((out + noise[0]) ** 2 + noise[1] ** 2)
    scale = float(np.exp(rng.uniform(np.log(acq.intensity_scale[0]), np.log(acq.intensity_scale[1]))))
    out *= scale
    # header orientation: reorder/flip the array axes and the affine to match (exact, no resampling)
    orient = weighted_choice(rng, acq.orientation_p)
    out, lab_out, A = _reorient(out, lab_out, A, orient, rng)
    integer = rng.random() < acq.integer_p
    if integer:
        out = np.clip(np.round(out * min(1.0, 30000.0 / max(1.0, float(out.max())))), 0, 32767).astype(np.int16)
    params = dict(fov=name, plane=plane, sequence=sequence,
                  inplane_mm=round(inplane, 3), slice_mm=round(thick, 3), stations=n_st,
                  oblique=bool(oblique), orientation=orient, snr=round(snr, 2), fat_sat_failure=bool(fs_fail),
                  fat_water_swap_ml=round(swapped, 1), motion_blur=bool(motion), intensity_scale=round(scale, 2),
                  integer=bool(integer),
                  shape=[int(s) for s in out.shape])
    return Acquired(out, lab_out, A, params)


SLICE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _reorient(img, labels, A, kind, rng):
    """Express the same grid with another axis order / direction in the header."""
    if kind == "RAS":
        return img, labels, A
    if kind == "LPS":
        perm, flips = (0, 1, 2), (True, True, False)
    else:  # coronal stack: (x, z, y) with z running S->I, slices P->A, x either way
        perm, flips = (0, 2, 1), (bool(rng.random() < 0.5), True, False)

    def tx(a):
        a = np.transpose(a, perm)
        for ax, f in enumerate(flips):
            if f:
                a = np.flip(a, axis=ax)
        return np.ascontiguousarray(a)

    shape_new = np.array(img.shape)[list(perm)]
    B = np.eye(4)
    # new index j -> old index i: i[perm[k]] = j[k] or (n-1-j[k]) when flipped
    P = np.zeros((4, 4))
    P[3, 3] = 1
    for k, (ax, f) in enumerate(zip(perm, flips)):
        P[ax, k] = -1.0 if f else 1.0
        P[ax, 3] = (shape_new[k] - 1) if f else 0.0
    B = A @ P
    return tx(img), {k: tx(v) for k, v in labels.items()}, B
