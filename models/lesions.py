"""What counts as one lesion: the single definition used by inference and by validation during training."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected: voxels touching at an edge or a corner are one lesion


def near_bone(bone: np.ndarray) -> np.ndarray:
    """Voxels in bone or touching it (one 26-connected step): where a marrow lesion may lie."""
    return ndimage.binary_dilation(bone, structure=CONNECTIVITY)


def lesion_instances(mask: np.ndarray, voxel_ml: float, min_ml: float, near: np.ndarray | None = None,
                     min_bone_fraction: float = 0.0) -> np.ndarray:
    """Label the 26-connected components of ``mask`` (uint16, ids 1..K in scan order); drop those under ``min_ml``
    and, when ``near`` (see :func:`near_bone`) is given, those with less than ``min_bone_fraction`` of their
    voxels in or touching bone (CNO edema is a marrow finding: a bright blob away from every bone is fluid,
    vessel or bowel)."""
    lab, n = ndimage.label(mask, structure=CONNECTIVITY)
    if n == 0:
        return lab.astype(np.uint16)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if sizes[i] * voxel_ml >= min_ml]
    if near is not None and min_bone_fraction > 0 and keep:
        in_bone = np.bincount(lab[near].ravel(), minlength=n + 1)
        keep = [i for i in keep if in_bone[i] >= min_bone_fraction * sizes[i]]
    remap = np.zeros(n + 1, np.uint16)
    remap[keep] = np.arange(1, len(keep) + 1, dtype=np.uint16)
    return remap[lab]
