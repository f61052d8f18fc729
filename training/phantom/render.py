"""Rasterising analytic shapes onto the phantom's anatomy grid (world RAS mm, isotropic spacing).

Each primitive is evaluated only inside its bounding box, which keeps a whole child at 2 mm to a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# tissue classes of the anatomy label map
AIR, FAT, MUSCLE, CORTEX, RED, YELLOW, PHYSIS, CSF, BRAIN, CORD, LUNG, BLOOD, LIVER, SPLEEN, KIDNEY, BLADDER, \
    BOWEL, JOINT_FLUID, DISC, CARTILAGE, SKIN = range(21)
TISSUES = ("air", "fat", "muscle", "cortex", "red_marrow", "yellow_marrow", "physis", "csf", "brain", "cord", "lung",
           "blood", "liver", "spleen", "kidney", "bladder", "bowel", "joint_fluid", "disc", "cartilage", "skin")
MARROW = (RED, YELLOW)


@dataclass
class Box:
    """A bounding box on the canvas: the slices and broadcastable world coordinate arrays (mm)."""
    sl: tuple[slice, slice, slice]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray


@dataclass
class Canvas:
    shape: tuple[int, int, int]
    origin: np.ndarray            # world mm of voxel (0,0,0)
    spacing: float
    tissue: np.ndarray = field(init=False)
    sites: np.ndarray = field(init=False)
    marrow_w: np.ndarray = field(init=False)   # red-marrow weight 0..1 inside marrow

    def __post_init__(self) -> None:
        self.tissue = np.zeros(self.shape, np.uint8)
        self.sites = np.zeros(self.shape, np.uint8)
        self.marrow_w = np.zeros(self.shape, np.float32)

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([self.spacing] * 3 + [1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Box covering world [lo, hi] clipped to the canvas; None when empty."""
        i0 = np.floor((np.asarray(lo) - self.origin) / self.spacing).astype(int)
        i1 = np.ceil((np.asarray(hi) - self.origin) / self.spacing).astype(int) + 1
        i0 = np.clip(i0, 0, self.shape)
        i1 = np.clip(i1, 0, self.shape)
        if np.any(i1 <= i0):
            return None
        ax = [self.origin[k] + self.spacing * np.arange(i0[k], i1[k], dtype=np.float32) for k in range(3)]
        return Box((slice(i0[0], i1[0]), slice(i0[1], i1[1]), slice(i0[2], i1[2])),
                   ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :])


def capsule(cv: Canvas, p0, p1, r0: float, r1: float):
    """Tapered capsule from p0 (radius r0) to p1 (radius r1): (box, inside mask, t along axis, radial dist, r(t))."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    rmax = max(r0, r1)
    b = cv.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if b is None:
        return None
    d = p1 - p0
    L2 = float(d @ d) or 1e-6
    dx, dy, dz = b.x - p0[0], b.y - p0[1], b.z - p0[2]
    t_raw = (dx * d[0] + dy * d[1] + dz * d[2]) / L2
    t = np.clip(t_raw, 0.0, 1.0)
    rho = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
    r = r0 + (r1 - r0) * t
    return b, rho <= r, t_raw, rho, r


def ellipsoid(cv: Canvas, c, radii, rot: np.ndarray | None = None):
    """Ellipsoid centre c, semi-axes radii, optional 3x3 rotation (columns = axes): (box, mask, q) with q<=1 inside."""
    c = np.asarray(c, np.float32)
    radii = np.asarray(radii, np.float32)
    ext = np.abs(rot) @ radii if rot is not None else radii
    b = cv.box(c - ext, c + ext)
    if b is None:
        return None
    dx, dy, dz = b.x - c[0], b.y - c[1], b.z - c[2]
    if rot is None:
        q = (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2
    else:
        u = (dx * rot[0, 0] + dy * rot[1, 0] + dz * rot[2, 0]) / radii[0]
        v = (dx * rot[0, 1] + dy * rot[1, 1] + dz * rot[2, 1]) / radii[1]
        w = (dx * rot[0, 2] + dy * rot[1, 2] + dz * rot[2, 2]) / radii[2]
        q = u * u + v * v + w * w
    return b, q <= 1.0, q


def paint(cv: Canvas, b: Box, mask: np.ndarray, tissue: int | None = None, site: int | None = None,
          where: np.ndarray | None = None, marrow_w: float | np.ndarray | None = None) -> None:
    """Write tissue/site labels into the canvas where ``mask`` (and optional ``where``) hold."""
    m = mask if where is None else (mask & where)
    m = np.broadcast_to(m, tuple(s.stop - s.start for s in b.sl))
    if tissue is not None:
        cv.tissue[b.sl][m] = tissue
    if site is not None:
        cv.sites[b.sl][m] = site
    if marrow_w is not None:
        w = np.broadcast_to(np.asarray(marrow_w, np.float32), m.shape)
        cv.marrow_w[b.sl][m] = w[m]


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of ``weights`` drawn in proportion to its weight (one draw from ``rng``, whatever the number of keys)."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def drawn_or_only(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """The only key of ``weights`` without a random draw, else ``weighted_choice``: a setting given one value
    leaves the stream as it was before the setting existed."""
    return next(iter(weights)) if len(weights) == 1 else weighted_choice(rng, weights)


def rotation(axis, angle_rad: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * K @ K


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 8, lo: float = -1.0,
                 hi: float = 1.0) -> np.ndarray:
    """Low-frequency random field over ``shape`` (trilinear upsampling of a coarse random grid)."""
    import torch
    import torch.nn.functional as F
    coarse_shape = tuple(max(2, int(np.ceil(s / max(shape) * cells)) + 1) for s in shape)
    coarse = rng.uniform(lo, hi, coarse_shape).astype(np.float32)
    t = torch.from_numpy(coarse)[None, None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()


def field_at(mask: np.ndarray, rng: np.random.Generator, cells: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Values of a low-frequency random field at the True voxels of ``mask`` only (cheap for sparse masks)."""
    from scipy.ndimage import map_coordinates
    shape = mask.shape
    coarse_shape = tuple(max(2, int(np.ceil(s / max(shape) * cells)) + 1) for s in shape)
    coarse = rng.uniform(lo, hi, coarse_shape).astype(np.float32)
    idx = np.nonzero(mask)
    coords = [i.astype(np.float32) * ((c - 1) / max(1, s - 1)) for i, c, s in zip(idx, coarse_shape, shape)]
    return map_coordinates(coarse, coords, order=1, mode="nearest")


def tissue_in(tissue: np.ndarray, classes) -> np.ndarray:
    """Boolean mask of voxels whose tissue class is in ``classes`` (a lookup table: faster than np.isin)."""
    lut = np.zeros(256, bool)
    lut[list(classes)] = True
    return lut[tissue]
