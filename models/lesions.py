"""What counts as one lesion: the single definition used by inference and by validation during training."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected: voxels touching at an edge or a corner are one lesion
# Edema is bright on STIR: a lesion whose median signal is below this share of both its bone's normal marrow and the
# nearby soft tissue is dropped (card threshold ``min_signal_ratio``; models.measure.not_hyperintense): 0.9 =
# clearly darker than either. Chosen on the generator-1.4 development phantoms (models/default/HISTORY.md). Bundles
# exported before wbmri 0.2.8 have no such threshold and keep every lesion.
MIN_SIGNAL_RATIO = 0.9


def voxel_volume_ml(affine: np.ndarray) -> float:
    """One voxel's volume in mL: |det| of the affine's 3x3 (mm^3; a sheared grid's too) / 1000."""
    return abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0


def volume_ml(n_voxels, voxel_ml: float):
    """Volume of ``n_voxels`` voxels in mL, rounded to 1e-9 mL: so that a lesion of exactly a size cut-off (100
    voxels of 1 x 1 x 5 mm, 0.5 mL) is not put below it by the float error of the voxel volume (0.004999...)."""
    return np.round(np.asarray(n_voxels) * voxel_ml, 9)


def near_bone(bone: np.ndarray) -> np.ndarray:
    """Voxels in bone or touching it (one 26-connected step): where a marrow lesion may lie."""
    return ndimage.binary_dilation(bone, structure=CONNECTIVITY)


@dataclass
class Components:
    """The 26-connected components of a thresholded edema map and what the lesion rules ask of each (index = id)."""
    labels: np.ndarray           # int32, 0 = background
    sizes: np.ndarray            # voxels
    in_bone: np.ndarray | None   # voxels in or touching bone (when ``near`` was given)
    confidence: np.ndarray | None  # mean edema probability (when ``prob`` was given)

    def keep(self, voxel_ml: float, min_ml: float, min_bone_fraction: float = 0.0,
             min_confidence: float = 0.0) -> np.ndarray:
        """Per component id, whether it passes every rule (index 0, the background, never does)."""
        keep = volume_ml(self.sizes, voxel_ml) >= min_ml
        if self.in_bone is not None and min_bone_fraction > 0:
            keep &= self.in_bone >= min_bone_fraction * self.sizes
        if self.confidence is not None and min_confidence > 0:
            keep &= self.confidence >= min_confidence
        keep[0] = False
        return keep

    def instances(self, keep: np.ndarray) -> np.ndarray:
        """uint16 lesion instances 1..K of the kept components, in component order."""
        remap = np.zeros(len(self.sizes), np.uint16)
        remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint16)
        return remap[self.labels]

    def select(self, voxel_ml: float, min_ml: float, min_bone_fraction: float = 0.0,
               min_confidence: float = 0.0) -> np.ndarray:
        """uint16 lesion instances 1..K (scan order) of the components that pass every rule."""
        return self.instances(self.keep(voxel_ml, min_ml, min_bone_fraction, min_confidence))


def components(mask: np.ndarray, near: np.ndarray | None = None, prob: np.ndarray | None = None) -> Components:
    """Label ``mask`` once; the rules of :meth:`Components.select` can then be tried cheaply (validation grid)."""
    lab, n = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    in_bone = np.bincount(lab[near].ravel(), minlength=n + 1) if near is not None else None
    conf = None
    if prob is not None:
        conf = np.zeros(n + 1)
        if n:
            conf[1:] = ndimage.mean(prob, lab, index=np.arange(1, n + 1))
    return Components(lab, sizes, in_bone, conf)


def lesion_instances(mask: np.ndarray, voxel_ml: float, min_ml: float, near: np.ndarray | None = None,
                     min_bone_fraction: float = 0.0, prob: np.ndarray | None = None,
                     min_confidence: float = 0.0) -> np.ndarray:
    """Label the 26-connected components of ``mask`` (uint16, ids 1..K in scan order); drop those under ``min_ml``;
    when ``near`` (see :func:`near_bone`) is given, those with less than ``min_bone_fraction`` of their voxels in
    or touching bone (CNO edema is a marrow finding: a bright blob away from every bone is fluid, vessel or
    bowel); when ``prob`` is given, those whose mean edema probability (the reported confidence) is under
    ``min_confidence`` (on the validation phantoms false positives had a lower mean probability than most true
    lesions)."""
    return components(mask, near, prob).select(voxel_ml, min_ml, min_bone_fraction, min_confidence)


def lesion_ids(labels: np.ndarray) -> np.ndarray:
    """Lesion ids 1..K (int32) from a label map: its own ids, renumbered in id order, when it has several; else (a
    binary mask, which may hold any number of lesions, as nnU-Net labels and other tools' masks do) its 26-connected
    components in scan order. Values of 0 or below are background."""
    ids, inverse = np.unique(np.where(labels > 0, labels, 0), return_inverse=True)
    compact = (inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)).astype(np.int32)
    if compact.max() <= 1:
        return components(compact > 0).labels.astype(np.int32)
    return compact
