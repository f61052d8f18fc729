"""What counts as one lesion: the single definition used by inference and by validation during training."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected: voxels touching at an edge or a corner are one lesion


def lesion_instances(mask: np.ndarray, voxel_ml: float, min_ml: float) -> tuple[np.ndarray, list[int]]:
    """Label the 26-connected components of ``mask`` and drop those under ``min_ml``.

    Returns the label map (uint16, ids 1..K in scan order) and, per kept id, the original component id
    (so callers can look up per-component statistics computed on the unfiltered labelling).
    """
    lab, n = ndimage.label(mask, structure=CONNECTIVITY)
    if n == 0:
        return lab.astype(np.uint16), []
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if sizes[i] * voxel_ml >= min_ml]
    remap = np.zeros(n + 1, np.uint16)
    remap[keep] = np.arange(1, len(keep) + 1, dtype=np.uint16)
    return remap[lab], keep
