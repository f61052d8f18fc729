"""The anatomical rules applied to the network's site map, in order (:func:`apply_site_rules`), shared by
validation and inference: vertebral levels fitted along the spine (:mod:`models.spine`), sides by position
(:mod:`models.sides`), then stray labels handed to the bone they sit in (below).

Stray labels: site labels the network scattered where that bone is not.

A U-Net classifies each voxel from what its receptive field shows, so a partial field of view or bright edema can
bring out a few voxels of a bone that is not there: a "C5" in a knee view, a "scapula" at the iliac crest. Each such
label costs a real bone its voxels and, in the mean bone-site Dice, counts as one more site missed entirely.
Two kinds are handed to the bone they sit in (the most frequent other label touching them; none: no bone):

* a whole label under ``MIN_LABEL_ML`` in the volume (too little to be that bone; a child's patella is about 1 mL);
* a piece of a one-piece bone, other than its largest 26-connected piece, under ``MIN_LABEL_ML`` and more than
  ``FAR_MM`` from that piece (an epiphysis beyond its growth plate lies a few millimetres away).

Works on any grid with its voxel spacing (the model grid at inference).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from models.sides import body_mask, sides_by_position
from models.sites import by_id
from models.spine import renumber_vertebrae

MIN_LABEL_ML = 0.5
FAR_MM = 20.0
# bones of several pieces: ribs, rays and segments (also for naming lesions, inference.postprocess)
MULTI_PIECE_BONES = frozenset({"skull", "ribs", "sternum", "hand", "midfoot", "metatarsals", "toes"})
# ... and, for the site map's stray pieces, the hip bones, whose acetabular parts lie beyond the triradiate
# cartilage in a child (the lesion rule keeps them one-piece: merging the two would change lesion naming)
_SEVERAL_PIECES = MULTI_PIECE_BONES | {"ilium", "ischium", "pubis"}
_NEIGHBOURS = np.ones((3, 3, 3), bool)


def relabel_stray_pieces(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """A copy of ``sites`` (site ids, 0 = no bone) with stray labels handed to the bone around them."""
    out = np.asarray(sites).copy()
    spacing = np.asarray(spacing, float)
    min_voxels = MIN_LABEL_ML * 1000.0 / float(np.prod(spacing))
    sites_by_id = by_id()
    for sid, box in enumerate(ndimage.find_objects(out), start=1):
        if box is None or sid not in sites_by_id:
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        crop = out[box]  # a view: relabelling writes through
        pieces, n = ndimage.label(crop == sid, _NEIGHBOURS)
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.sum() < min_voxels:
            stray = list(range(1, n + 1))
        elif n > 1 and sites_by_id[sid].bone not in _SEVERAL_PIECES:
            main = int(np.argmax(sizes)) + 1
            gap = ndimage.distance_transform_edt(pieces != main, sampling=spacing)
            nearest = ndimage.minimum(gap, pieces, index=np.arange(1, n + 1))
            stray = [k for k in range(1, n + 1) if k != main and sizes[k - 1] < min_voxels and nearest[k - 1] > FAR_MM]
        else:
            continue
        for k in stray:
            piece = pieces == k
            around = crop[ndimage.binary_dilation(piece, _NEIGHBOURS) & ~piece]
            around = around[(around > 0) & (around != sid)]
            crop[piece] = np.bincount(around).argmax() if around.size else 0
    return out


def apply_site_rules(site_map: np.ndarray, img: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The site map as inference reports it, from the network's map and the normalised image on the model grid."""
    site_map = renumber_vertebrae(np.asarray(site_map, np.uint8), spacing)
    site_map = sides_by_position(site_map, body_mask(img), spacing)
    return relabel_stray_pieces(site_map, spacing)
