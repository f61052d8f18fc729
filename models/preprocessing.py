"""How a volume is brought to the model and back: the one definition shared by training and inference.

Model grid = the input reoriented to the closest RAS axes (a permutation and flips, no interpolation), then
resampled to the model's spacing over the same field of view. Mapping back is the inverse resize, so labels
return to the input's own grid exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GridMap:
    """How the input grid maps to the model grid."""
    input_shape: tuple[int, int, int]
    ornt: np.ndarray              # nibabel orientation transform input -> RAS axes
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray        # affine of the reoriented (not yet resampled) array
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.model_affine[:3, :3] ** 2).sum(axis=0)))


def plan_grid(shape: tuple[int, ...], affine: np.ndarray, spacing_mm: tuple[float, float, float]) -> GridMap:
    """Compute the model grid for an input of this shape and affine."""
    ornt = nib.orientations.io_orientation(affine)
    order = np.empty(3, dtype=int)
    for in_ax, (out_ax, _) in enumerate(ornt):
        order[int(out_ax)] = in_ax
    ras_shape = tuple(int(shape[i]) for i in order)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape[:3])
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    model_shape = tuple(max(2, int(round(n * z / s))) for n, z, s in zip(ras_shape, zooms, spacing_mm))
    scale = np.array(ras_shape, float) / np.array(model_shape, float)
    model_affine = ras_affine.copy()
    model_affine[:3, :3] = ras_affine[:3, :3] * scale
    # voxel centres: keep the field of view edges aligned (align_corners=False semantics)
    model_affine[:3, 3] = ras_affine[:3, :3] @ (0.5 * scale - 0.5) + ras_affine[:3, 3]
    return GridMap(tuple(int(s) for s in shape[:3]), ornt, ras_shape, ras_affine, model_shape, model_affine)


def to_ras(data: np.ndarray, grid: GridMap) -> np.ndarray:
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, grid.ornt))


def from_ras(data: np.ndarray, grid: GridMap) -> np.ndarray:
    inv = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]], float), grid.ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, inv))


def resize(data: np.ndarray, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """Resize a 3D array (trilinear for images, nearest for labels) with torch, fast on several threads."""
    if tuple(data.shape) == tuple(shape):
        return data
    t = torch.from_numpy(np.ascontiguousarray(data))
    is_int = not torch.is_floating_point(t)
    src = t.float() if (is_int or mode != "nearest") else t
    kwargs = {"align_corners": False} if mode in ("trilinear",) else {}
    out = F.interpolate(src[None, None], size=tuple(shape), mode=mode, **kwargs)[0, 0]
    if is_int:
        out = out.round().to(t.dtype)
    return out.numpy()


def to_model_grid(data: np.ndarray, grid: GridMap, mode: str = "trilinear") -> np.ndarray:
    """Input array -> model grid array."""
    return resize(to_ras(data, grid), grid.model_shape, mode)


def to_input_grid(data: np.ndarray, grid: GridMap, mode: str = "nearest-exact") -> np.ndarray:
    """Model grid array -> the input's own grid (nearest for label maps)."""
    return from_ras(resize(data, grid.ras_shape, mode), grid)


def body_mask_threshold(img: np.ndarray) -> float:
    """A threshold that separates the body from air: a fraction of a high percentile above the mean."""
    sample = img[:: 2, :: 2, :: 2] if img.size > 2_000_000 else img
    hi = float(np.percentile(sample, 99.0))
    return 0.08 * hi


# Mean ratio of the 75th to the 99th percentile of body voxels over the 130 whole-body phantoms of the training pool
# (seeds 100000-100220, 3 mm grid): with it, the "p75" reference gives whole-body views about the scale "p99" gave.
P75_TO_P99 = 0.37


def _body_sample(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A subsample of the volume (every second voxel of large ones) and its body voxels."""
    sample = img[:: 2, :: 2, :: 2] if img.size > 2_000_000 else img
    return sample, sample[sample > body_mask_threshold(sample)]


# Air and suppressed fat are near zero on STIR; when even the darkest voxels (0.1th percentile) sit above this share
# of the 99th percentile, the export added a constant offset, which would make the whole field look like body.
OFFSET_FRACTION = 0.1


def background_offset(img: np.ndarray, floor: float = 0.0) -> float:
    """The constant to subtract from ``img - floor`` when its background is not dark (see OFFSET_FRACTION); 0
    otherwise. ``floor`` spares a full-size copy of a volume still to be lifted to 0."""
    sample = img[:: 2, :: 2, :: 2] if img.size > 2_000_000 else img
    lo, hi = (float(v) - floor for v in np.percentile(sample, [0.1, 99.0]))
    return lo if hi > 0 and lo > OFFSET_FRACTION * hi else 0.0


def normalise(img: np.ndarray, reference: str = "p99") -> np.ndarray:
    """Robust intensity scaling, clipped to [0, 4]. ``p99``: 1.0 = the 99th percentile of body voxels. ``p75``: the
    same, then re-referenced by ``rereference`` (the network config's ``intensity_reference`` says which). A
    negative minimum is lifted to 0 and a constant positive background offset removed first."""
    img = np.asarray(img, dtype=np.float32)
    img = img - min(0.0, float(img.min()))
    img = img - background_offset(img)
    sample, body = _body_sample(img)
    scale = float(np.percentile(body, 99.0)) if body.size > 100 else float(sample.max())
    if scale <= 0:
        scale = 1.0
    return rereference(np.clip(img / scale, 0.0, 4.0).astype(np.float32), reference)


def rereference(img: np.ndarray, reference: str) -> np.ndarray:
    """Re-scale a ``p99``-normalised volume (as cached for training) to ``reference``. ``p75`` divides by the 75th
    percentile of body voxels over P75_TO_P99: the 99th percentile is set by fluid-bright organs (CSF, bladder) in a
    whole-body view but by marrow and physes in a knee or foot view, which it scaled about 1.9x brighter; the 75th
    percentile (muscle-level signal) hardly depends on the field of view."""
    if reference == "p99":
        return img
    if reference != "p75":
        raise ValueError(f"unknown intensity reference {reference!r} (p99 or p75)")
    _, body = _body_sample(img)
    p75 = float(np.percentile(body, 75.0)) if body.size > 100 else 0.0
    if p75 <= 0:
        return img
    return np.clip(np.asarray(img, np.float32) * (P75_TO_P99 / p75), 0.0, 4.0).astype(np.float32)
