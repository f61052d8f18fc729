"""Lesion naming and measurement: site, side, subregion, size, signal and extension per lesion, and the rule that
drops lesions that are not hyperintense. Shared by inference (on the input's own grid) and by validation during
training (on the model grid), so that validation scores the lesions inference would report.

All arrays share one 3D grid of any orientation; ``affine`` maps voxel indices to RAS+ world millimetres
(+x = patient's right, +y = anterior, +z = superior). Work is done in bounding-box crops
(``scipy.ndimage.find_objects``), so a whole-body grid costs a few passes over the volume, not one per lesion.

Rules (documented here because the report's meaning depends on them):

* **site**: the majority site among the lesion's voxels that lie in bone; if none does, the nearest bone
  within ``NEAR_BONE_MM`` (periosteal / juxta-cortical edema); else ``soft_tissue``.
* **paired long bones** (tibia and fibula, radius and ulna): bright edema in the thin bone of a pair tends to be
  labelled as its thick partner, so when the majority is one of a pair, the lesion goes to the bone whose centre
  line (of its voxels outside the lesion, within ``PAIR_SLAB_MM`` along the pair's common axis beyond the
  lesion's ends) passes nearest to the lesion's centroid, the distance in units of that bone's mean radius.
* **stray labels**: bright edema can pull the site map to a bone that lies elsewhere (a humerus lesion labelled
  femur, a wrist lesion labelled clavicle and tibia). A label among the lesion's voxels is stray when, for a bone
  that is one piece, none of those voxels touch the label's largest 26-connected piece, which lies more than
  ``STRAY_LABEL_MM`` away (a physis gap is a few millimetres); for a bone of several pieces (ribs, sternum, hand,
  foot rays, skull), when no voxel of that label outside the lesion lies within ``STRAY_PIECE_MM`` (a bone
  continues beyond its lesion; the next rib lies closer than the next bone elsewhere); vertebrae never are. The
  lesion goes to its most frequent label that is not stray; when every label is, to the bone nearest the lesion
  outside it (stray labels left out) within ``REGION_SEARCH_MM``; with none, the majority stands. The pair rule
  then applies to the result.
* **sternum**: the network's bone channel misses much of the sternum, so its lesions borrow a neighbour's label
  (clavicle, rib or thoracic vertebra). A lesion so labelled whose centroid lies within ``MIDLINE_MM`` of the
  spine's midline and over ``STERNUM_ANTERIOR_MM`` in front of the spine's centre at its level, where that spine
  is thoracic, is in the sternum: no clavicle, rib or vertebra lies there. Its bone share is not measured
  (None) when the site map holds fewer sternum voxels than the lesion has in bone.
* **soft-tissue lesions**: ``region`` is the region of the nearest bone within ``REGION_SEARCH_MM``, else
  ``soft_tissue``; ``side`` comes from the centroid's x against the body midline (within ``MIDLINE_MM`` =
  midline); signal ratios use that nearest bone's marrow when there is one; subregion, juxtaphyseal,
  bone_fraction, extension_grade and soft_tissue_extension are None (no bone to refer to).
* **long bones**: proximal = nearer the trunk. The proximal end is the end of the bone's principal axis
  nearer its proximal neighbour (scapula for the humerus, humerus for radius/ulna, pelvis for the femur,
  femur for tibia/fibula, sternum for the clavicle, midfoot for the metatarsals); without that neighbour:
  the superior end, the medial end for the clavicle, the posterior end for the metatarsals. Subregions
  follow the physes when the physis mask has voxels at that end of the bone: epiphysis where the nearest
  physis voxel lies between the point and the middle of the bone (apophyses such as the greater trochanter
  included), metaphysis on the shaft side within ``METAPHYSIS_SPAN`` of the bone length from the physis;
  else fixed fractions (epiphysis 0-8 %, metaphysis 8-22 % from each end). A bone cut by the field of view at one end is given
  twice its visible length, measured from its intact end; cut at both ends, only physes place subregions.
* **vertebrae**: vertebral body = the anterior ``VERTEBRAL_BODY_SHARE`` of the vertebra's A-P extent.
* the subregion is the majority subregion of the lesion's voxels in that bone; ``subregions`` lists it first, then
  every other part holding at least ``SUBREGION_MIN_SHARE`` of them (epiphysis and metaphysis of a lesion across
  a growth plate).
* **juxtaphyseal**: a lesion voxel within ``JUXTA_MM`` of a physis voxel of the same bone; None when the
  physis mask is missing, the bone is not long, or no physis was found in that bone.
* **physis_fraction**: the share of the lesion's voxels on the physis mask (None without one), for a reader
  weighing a lesion against the plate's normal bright signal. Not a warning: on the generator-1.7 test sets, of
  the predicted lesions with >= 25% on the network's physis output 11 of 36 were false positives, against 27 of
  123 below it (on the reference physes 13 of 22: the network's physis output does not tell them apart).
* **signal ratios**: median lesion signal (its voxels in bone when it has any) over the median of the same
  bone's normal marrow next to the lesion (``LOCAL_MARROW_MM``, a ring from 2 mm to that distance around
  it, as a reader places a reference ROI; the whole bone when the ring is too small), counting only voxels
  deeper than ``MARROW_DEPTH_MM`` below the bone surface (no cortex) and no lesion or physis voxels; and over
  the median of a body soft-tissue shell ``SHELL_MM`` outside the bone near the lesion (a muscle proxy;
  other bones, lesions, physes and air excluded). None when fewer than ``MIN_REF_VOXELS`` reference voxels.
* **soft_tissue_extension**: at least ``SOFT_EXT_MIN_ML`` of the lesion lies outside bone and that part is at
  least ``SOFT_EXT_FRACTION`` of the lesion or ``SOFT_EXT_ML`` in volume.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist

from models.lesions import voxel_volume_ml, volume_ml
from models.preprocessing import body_mask_threshold
from models.site_rules import MULTI_PIECE_BONES
from models.sites import SOFT_TISSUE, THIN_BONES, Site, by_code, by_id

NEAR_BONE_MM = 5.0
REGION_SEARCH_MM = 30.0
MIDLINE_MM = 15.0
JUXTA_MM = 5.0
SHELL_MM = (2.0, 8.0)
MIN_REF_VOXELS = 20
SOFT_EXT_FRACTION = 0.2
SOFT_EXT_ML = 1.0
SOFT_EXT_MIN_ML = 0.1
METAPHYSIS_SPAN = 0.15
MIN_PHYSIS_VOXELS = 5
FALLBACK_EPIPHYSIS, FALLBACK_METAPHYSIS = 0.08, 0.22
VERTEBRAL_BODY_SHARE = 0.55
MAX_DIAMETER_POINTS = 2000
MAX_AXIS_POINTS = 200_000
MARROW_DEPTH_MM = 2.0
LOCAL_MARROW_MM = 20.0
LESION_RIM_MM = 2.0
PAIR_SEARCH_MM = 40.0
PAIR_SLAB_MM = 20.0
STRAY_LABEL_MM = 40.0
STRAY_PIECE_MM = 10.0
STERNUM_ANTERIOR_MM = 40.0
SPINE_LEVEL_MM = 20.0

LESION_KEYS = ("id", "site", "side", "region", "subregion", "subregions", "juxtaphyseal", "physis_fraction",
               "volume_ml", "max_diameter_mm", "centroid_ras_mm", "signal_ratio_marrow", "signal_ratio_muscle",
               "bone_fraction", "extension_grade", "soft_tissue_extension", "confidence")
SUBREGION_MIN_SHARE = 0.2  # a part of the bone holding this share of a lesion's voxels is listed in its subregions

# proximal neighbours of long bones: the end nearer their centroid is the proximal end
_PROXIMAL_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "humerus": ("scapula",), "radius": ("humerus",), "ulna": ("humerus",),
    "femur": ("ilium", "ischium", "pubis"), "tibia": ("femur",), "fibula": ("femur",),
    "metatarsals": ("midfoot",), "clavicle": ("sternum",),
}
# the two bones of the forearm and of the lower leg, which run side by side
_PAIRED_BONES: dict[str, str] = {"tibia": "fibula", "fibula": "tibia", "radius": "ulna", "ulna": "radius"}
# bones whose label is drawn in several pieces (ribs, rays, ossification centres): a far piece is not a stray label
_MIDLINE_REFERENCE = ("sternum", "sacrum") + tuple(f"vertebra_{c}{i}" for c, n in (("C", 7), ("T", 12), ("L", 5))
                                                    for i in range(1, n + 1))


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm along the three array axes."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def extension_grade(fraction: float | None) -> str | None:
    """CROMRIS-style extension class of a bone fraction: '<25%', '25-50%', '>50%' (None for None)."""
    if fraction is None:
        return None
    if fraction < 0.25:
        return "<25%"
    return "25-50%" if fraction <= 0.5 else ">50%"


def _labels(arr: np.ndarray) -> np.ndarray:
    """A label array that ``find_objects`` accepts (unsigned stays as is)."""
    return arr if arr.dtype.kind == "u" else arr.astype(np.int32, copy=False)


def _margin(mm: float, spacing: np.ndarray) -> np.ndarray:
    return np.ceil(mm / spacing).astype(int) + 1


def _expand(sl: tuple[slice, ...], margin: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - int(m)), min(int(n), s.stop + int(m))) for s, m, n in zip(sl, margin, shape))


def _offset(sl: tuple[slice, ...]) -> np.ndarray:
    return np.array([s.start for s in sl])


@dataclass
class _Physis:
    """The physis voxels at one end of a long bone (world mm) and a tree to find the nearest one."""
    points: np.ndarray
    tree: cKDTree


@dataclass
class _BoneAxis:
    """A long bone's principal axis, oriented proximal -> distal, and its physes at either end."""
    centre: np.ndarray
    axis: np.ndarray
    start: float          # projection (mm) of the proximal end of the normalised length
    length: float         # normalised length (mm), doubled when one end is cut by the field of view
    both_cut: bool
    physes: dict[str, _Physis]   # 'proximal' / 'distal', where found

    def fraction(self, pts: np.ndarray) -> np.ndarray:
        """Position along the bone, 0 = proximal end, 1 = distal end."""
        return ((pts - self.centre) @ self.axis - self.start) / max(self.length, 1e-6)

    def _by_physis(self, end: str, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epiphysis, metaphysis) masks from the nearest physis voxel at ``end``: a point is epiphyseal when
        that physis lies between it and the middle of the bone (so apophyses such as the greater trochanter
        count too), metaphyseal when on the shaft side within METAPHYSIS_SPAN of the bone length."""
        ph = self.physes[end]
        dist, j = ph.tree.query(pts)
        near = ph.points[j]
        middle = self.centre + self.axis * (self.start + 0.5 * self.length)
        beyond = np.einsum("ij,ij->i", near - pts, middle - near) > 0
        return beyond, ~beyond & (dist <= METAPHYSIS_SPAN * self.length)

    def subregion(self, pts: np.ndarray) -> np.ndarray:
        """Subregion name per point (world mm): physis-aware at an end with a physis, else fixed fractions."""
        f = self.fraction(pts)
        out = np.full(len(pts), "diaphysis", dtype=object)
        for end, sign in (("proximal", 1), ("distal", -1)):
            if end in self.physes:
                epi, meta = self._by_physis(end, pts)
            elif not self.both_cut:
                g = f if sign > 0 else 1 - f
                epi, meta = g < FALLBACK_EPIPHYSIS, g < FALLBACK_METAPHYSIS
            else:
                continue
            free = out == "diaphysis"
            out[meta & free] = f"metaphysis_{end}"
            out[epi & (free | (out == f"metaphysis_{end}"))] = f"epiphysis_{end}"
        return out


class _Scene:
    """The arrays of one study plus per-site caches (bounding boxes, axes, marrow medians). Only the marrow medians
    depend on the lesions (they leave lesion voxels out): :meth:`with_lesions` keeps the rest."""

    def __init__(self, lesions: np.ndarray, sites: np.ndarray, image: np.ndarray, affine: np.ndarray,
                 physis: np.ndarray | None):
        shapes = {a.shape for a in (lesions, sites, image) + ((physis,) if physis is not None else ())}
        if len(shapes) != 1 or lesions.ndim != 3:
            raise ValueError(f"lesions, sites, image (and physis) must share one 3D shape, got {sorted(shapes)}")
        self.lesions, self.sites, self.image, self.physis = lesions, sites, image, physis
        self.affine = np.asarray(affine, float)
        self.spacing = voxel_spacing(self.affine)
        self.voxel_ml = voxel_volume_ml(self.affine)  # a sheared grid's voxels are smaller than their edges' product
        self.site_boxes = ndimage.find_objects(_labels(sites))
        self.site_counts = np.bincount(sites.ravel(), minlength=len(by_id()) + 1)
        self.body_thr = body_mask_threshold(image)
        self._axes: dict[int, _BoneAxis | None] = {}
        self._marrow: dict[int, float | None] = {}
        self._centroids: dict[int, np.ndarray] = {}
        self._physis_voxels: dict[int, np.ndarray] = {}
        self._pieces: dict[int, tuple[tuple[slice, ...], np.ndarray] | None] = {}
        self._spine: tuple[np.ndarray, np.ndarray] | None = None
        self._midline: float | None = None

    def with_lesions(self, lesions: np.ndarray) -> _Scene:
        """The same study with another lesion map; the site caches are shared, the marrow medians start afresh."""
        if lesions.shape != self.lesions.shape:
            raise ValueError(f"lesions must have the study's shape {self.lesions.shape}, got {lesions.shape}")
        scene = copy.copy(self)
        scene.lesions, scene._marrow = lesions, {}
        return scene

    # geometry helpers
    def world(self, idx: np.ndarray) -> np.ndarray:
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def site_box(self, sid: int) -> tuple[slice, ...] | None:
        return self.site_boxes[sid - 1] if 0 < sid <= len(self.site_boxes) else None

    def site_points(self, sid: int) -> tuple[np.ndarray, np.ndarray]:
        """Voxel indices and world points of a site (subsampled evenly above MAX_AXIS_POINTS)."""
        sl = self.site_box(sid)
        if sl is None:
            return np.zeros((0, 3), int), np.zeros((0, 3))
        return self._subsampled(np.argwhere(self.sites[sl] == sid) + _offset(sl))

    def _subsampled(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel indices thinned evenly to at most MAX_AXIS_POINTS, and their world points."""
        if len(idx) > MAX_AXIS_POINTS:
            idx = idx[:: int(np.ceil(len(idx) / MAX_AXIS_POINTS))]
        return idx, self.world(idx)

    def centroid(self, sid: int) -> np.ndarray | None:
        if sid not in self._centroids:
            _, pts = self.site_points(sid)
            if len(pts) == 0:
                return None
            self._centroids[sid] = pts.mean(axis=0)
        return self._centroids[sid]

    def midline_x(self) -> float:
        """Body midline x (mm): midline bones if present, else all bones, else the field of view's centre."""
        if self._midline is None:
            mids = [c for code in _MIDLINE_REFERENCE if (c := self.centroid(by_code()[code].id)) is not None]
            if mids:
                self._midline = float(np.median([c[0] for c in mids]))
            else:
                xs, ws = [], []
                for sid, sl in enumerate(self.site_boxes, start=1):
                    if sl is not None:
                        xs.append(self.world(np.array([(s.start + s.stop - 1) / 2 for s in sl]))[0])
                        ws.append(self.site_counts[sid])
                if xs:
                    self._midline = float(np.average(xs, weights=ws))
                else:
                    self._midline = float(self.world((np.array(self.image.shape) - 1) / 2.0)[0])
        return self._midline

    def spine_near(self, z: float) -> tuple[np.ndarray, float] | None:
        """Median world point of the vertebra voxels within SPINE_LEVEL_MM of height ``z`` (mm) and the share of
        them that are thoracic; None with fewer than MIN_REF_VOXELS such voxels."""
        if self._spine is None:
            vertebrae = [s.id for s in by_id().values() if s.kind == "vertebra"]
            thoracic = [s.id for s in by_id().values() if s.region == "spine_thoracic"]
            idx, pts = self._subsampled(np.argwhere(np.isin(self.sites, vertebrae)))
            self._spine = (pts, np.isin(self.sites[tuple(idx.T)], thoracic))
        pts, thoracic = self._spine
        near = np.abs(pts[:, 2] - z) <= SPINE_LEVEL_MM
        if np.count_nonzero(near) < MIN_REF_VOXELS:
            return None
        return np.median(pts[near], axis=0), float(np.mean(thoracic[near]))

    def physis_points(self, sid: int) -> np.ndarray:
        """World points of physis voxels that belong to a site (in it or within two voxels of it)."""
        if sid not in self._physis_voxels:
            pts = np.zeros((0, 3))
            sl = self.site_box(sid)
            if self.physis is not None and sl is not None:
                sl = _expand(sl, np.full(3, 2), self.sites.shape)
                near = ndimage.binary_dilation(self.sites[sl] == sid, iterations=2)
                idx = np.argwhere(self.physis[sl] & near) + _offset(sl)
                pts = self.world(idx)
            self._physis_voxels[sid] = pts
        return self._physis_voxels[sid]

    def bone_axis(self, site: Site) -> _BoneAxis | None:
        if site.id not in self._axes:
            self._axes[site.id] = self._compute_axis(site)
        return self._axes[site.id]

    def main_piece_points(self, sid: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`site_points`, but only the site's largest 26-connected piece: a few stray voxels the network
        gave this label far away (noisy or partial views) must not tilt or stretch a long bone's axis."""
        piece = self.main_piece(sid)
        if piece is None:
            return np.zeros((0, 3), int), np.zeros((0, 3))
        sl, mask = piece
        return self._subsampled(np.argwhere(mask) + _offset(sl))

    def main_piece(self, sid: int) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The site's bounding box and, within it, the mask of its largest 26-connected piece (None if absent)."""
        if sid not in self._pieces:
            sl = self.site_box(sid)
            piece = None
            if sl is not None:
                lab, n = ndimage.label(self.sites[sl] == sid, structure=np.ones((3, 3, 3), bool))
                largest = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1 if n > 1 else 1
                piece = (sl, lab == largest)
            self._pieces[sid] = piece
        return self._pieces[sid]

    def _compute_axis(self, site: Site) -> _BoneAxis | None:
        idx, pts = self.main_piece_points(site.id)
        if len(pts) < 4:
            return None
        centre = pts.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov((pts - centre).T))
        axis = evecs[:, int(np.argmax(evals))]
        t = (pts - centre) @ axis
        lo, hi = np.percentile(t, [0.5, 99.5])
        if self._first_end_is_distal(site, centre + lo * axis, centre + hi * axis):
            axis, t, lo, hi = -axis, -t, -hi, -lo
        on_border = np.any((idx == 0) | (idx == np.array(self.sites.shape) - 1), axis=1)
        span = max(hi - lo, 1e-6)
        cut_prox = bool(np.any(on_border & (t < lo + 0.05 * span)))
        cut_dist = bool(np.any(on_border & (t > hi - 0.05 * span)))
        start, length = lo, span
        if cut_prox and not cut_dist:
            start, length = hi - 2 * span, 2 * span
        elif cut_dist and not cut_prox:
            length = 2 * span
        bone = _BoneAxis(centre, axis, float(start), float(length), cut_prox and cut_dist, {})
        ph = self.physis_points(site.id)
        if len(ph):
            f = bone.fraction(ph)
            for end, sel in (("proximal", f < 0.35), ("distal", f > 0.65)):
                if np.count_nonzero(sel) >= MIN_PHYSIS_VOXELS:
                    bone.physes[end] = _Physis(ph[sel], cKDTree(ph[sel]))
        return bone

    def _first_end_is_distal(self, site: Site, end_a: np.ndarray, end_b: np.ndarray) -> bool:
        """True when ``end_a`` (the low end of the principal axis) is the distal end: the end nearer the bone's
        proximal neighbours (the centre of each one's largest piece), where one lies beyond the middle half of the
        bone's length (a stray piece of "ischium" inside a femoral shaft says nothing of which end is which); else
        by the bone's usual position (the lower end is distal)."""
        refs = []
        along = end_b - end_a
        for bone in _PROXIMAL_NEIGHBOURS.get(site.bone, ()):
            for code in (f"{bone}_{site.side}", bone):
                if code in by_code() and len(pts := self.main_piece_points(by_code()[code].id)[1]):
                    c = pts.mean(axis=0)
                    t = float((c - end_a) @ along / max(float(along @ along), 1e-6))
                    if not 0.25 < t < 0.75:
                        refs.append(c)
                    break
        if refs:
            ref = np.mean(refs, axis=0)
            return bool(np.linalg.norm(end_a - ref) > np.linalg.norm(end_b - ref))
        if site.bone == "clavicle":
            mid = self.midline_x()
            return bool(abs(end_a[0] - mid) > abs(end_b[0] - mid))
        if site.bone == "metatarsals":
            return bool(end_a[1] > end_b[1])
        return bool(end_a[2] < end_b[2])

    def vertebral_body_cut(self, sid: int) -> float | None:
        """y (mm) above which a vertebra's voxels count as vertebral body."""
        _, pts = self.site_points(sid)
        if len(pts) == 0:
            return None
        lo, hi = np.percentile(pts[:, 1], [2, 98])
        return float(hi - VERTEBRAL_BODY_SHARE * (hi - lo))

    def marrow_median(self, sid: int) -> float | None:
        """Median signal of normal marrow of a site (cached)."""
        if sid not in self._marrow:
            self._marrow[sid] = self._compute_marrow(sid)
        return self._marrow[sid]

    def _compute_marrow(self, sid: int) -> float | None:
        sl = self.site_box(sid)
        if sl is None:
            return None
        return self.clean_marrow_median(_expand(sl, np.ones(3, int), self.sites.shape), sid)

    def clean_marrow_median(self, sl: tuple[slice, ...], sid: int, keep: np.ndarray | None = None) -> float | None:
        """Median of a site's marrow in crop ``sl``: voxels deeper than MARROW_DEPTH_MM (no cortex), without
        lesions or physes, optionally only where ``keep``; all clean voxels when the bone is too thin."""
        bone = self.sites[sl] == sid
        clean = bone & (self.lesions[sl] == 0)
        if self.physis is not None:
            clean &= ~self.physis[sl]
        if keep is not None:
            clean &= keep
        if np.count_nonzero(clean) < MIN_REF_VOXELS:
            return None
        deep = clean & (ndimage.distance_transform_edt(bone, sampling=self.spacing) > MARROW_DEPTH_MM)
        vals = self.image[sl][deep if np.count_nonzero(deep) >= MIN_REF_VOXELS else clean]
        return float(np.median(vals))

    def local_marrow_median(self, lid: int, lesion_box: tuple[slice, ...], sid: int) -> float | None:
        """Median normal marrow of site ``sid`` in a ring LESION_RIM_MM..LOCAL_MARROW_MM around lesion ``lid``;
        the whole bone's when the ring holds too few voxels."""
        sl = _expand(lesion_box, _margin(LOCAL_MARROW_MM, self.spacing), self.sites.shape)
        dist = ndimage.distance_transform_edt(self.lesions[sl] != lid, sampling=self.spacing)
        ring = (dist > LESION_RIM_MM) & (dist <= LOCAL_MARROW_MM)
        local = self.clean_marrow_median(sl, sid, ring)
        return local if local is not None else self.marrow_median(sid)

    def shell_median(self, sl: tuple[slice, ...], inner: np.ndarray) -> float | None:
        """Median body soft-tissue signal SHELL_MM outside ``inner`` (a mask on crop ``sl``)."""
        if not inner.any():
            return None
        dist = ndimage.distance_transform_edt(~inner, sampling=self.spacing)
        shell = (dist >= SHELL_MM[0]) & (dist <= SHELL_MM[1]) & (self.sites[sl] == 0) & (self.lesions[sl] == 0)
        img = self.image[sl]
        shell &= img > self.body_thr
        if self.physis is not None:
            shell &= ~self.physis[sl]
        vals = img[shell]
        return float(np.median(vals)) if vals.size >= MIN_REF_VOXELS else None


def _max_diameter(mask: np.ndarray, offset: np.ndarray, scene: _Scene) -> float:
    """Largest distance (mm) between voxel centres of a lesion, from its boundary voxels' convex hull."""
    edge = mask & ~ndimage.binary_erosion(mask)
    pts = scene.world(np.argwhere(edge) + offset)
    if len(pts) < 2:
        return 0.0
    if len(pts) > MAX_DIAMETER_POINTS:
        try:
            pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
        except (QhullError, ValueError):
            pass
        if len(pts) > MAX_DIAMETER_POINTS:
            pts = pts[:: int(np.ceil(len(pts) / MAX_DIAMETER_POINTS))]
    return float(pdist(pts).max())


def _nearest_bone(scene: _Scene, lid: int, sl: tuple[slice, ...], exclude: Sequence[int] = ()) -> tuple[int, float]:
    """Site id and distance (mm) of the bone nearest to a lesion within REGION_SEARCH_MM, not counting the lesion's
    own voxels nor the sites in ``exclude``; (0, inf) if none."""
    big = _expand(sl, _margin(REGION_SEARCH_MM, scene.spacing), scene.sites.shape)
    sites_c = scene.sites[big]
    lm = scene.lesions[big] == lid
    bone = (sites_c > 0) & ~lm & ~np.isin(sites_c, list(exclude))
    if not bone.any():
        return 0, float("inf")
    dist, inds = ndimage.distance_transform_edt(~bone, sampling=scene.spacing, return_indices=True)
    d = dist[lm]
    k = int(np.argmin(d))
    if d[k] > REGION_SEARCH_MM:
        return 0, float("inf")
    nearest = tuple(inds[ax][lm][k] for ax in range(3))
    return int(sites_c[nearest]), float(d[k])


def _is_stray(scene: _Scene, sid: int, idx: np.ndarray, lid: int, sl: tuple[slice, ...]) -> bool:
    """Whether the voxels of lesion ``lid`` (bounding box ``sl``) labelled ``sid`` (indices ``idx``) are a stray
    label: for a one-piece bone, they lie apart from, and over STRAY_LABEL_MM from, its largest piece; for a bone
    of several pieces, or a thin bone (:data:`models.sites.THIN_BONES`, whose map breaks into pieces on the model
    grid), no voxel of that label outside the lesion lies within STRAY_PIECE_MM of them. Vertebrae (levels are
    fitted) never are."""
    site = by_id()[sid]
    if site.kind == "vertebra":
        return False
    if site.bone in MULTI_PIECE_BONES or site.bone in THIN_BONES:  # a thin bone's map breaks into pieces at 3 mm
        near = _expand(sl, _margin(STRAY_PIECE_MM, scene.spacing), scene.sites.shape)
        own = np.argwhere((scene.sites[near] == sid) & (scene.lesions[near] != lid)) + _offset(near)
        if len(own) == 0:
            return True
        return float(cKDTree(scene.world(own)).query(scene.world(idx), k=1)[0].min()) > STRAY_PIECE_MM
    box, mask = scene.main_piece(sid)  # the lesion's own voxels carry sid, so the site is present
    local = idx - _offset(box)
    inside = np.all((local >= 0) & (local < mask.shape), axis=1)
    if mask[tuple(local[inside].T)].any():
        return False
    _, main_pts = scene.main_piece_points(sid)
    return float(cKDTree(main_pts).query(scene.world(idx), k=1)[0].min()) > STRAY_LABEL_MM


def _unless_stray(scene: _Scene, lid: int, sl: tuple[slice, ...], counts: np.ndarray, site_vals: np.ndarray,
                  idx: np.ndarray) -> int:
    """The most frequent bone label (``counts``: voxels per site id) among the lesion's voxels (``site_vals`` at
    indices ``idx``) that is not a stray label (:func:`_is_stray`); when all are, the bone nearest the lesion
    outside it (:func:`_nearest_bone`, stray labels left out); when there is none, the majority."""
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    strays = []
    for sid in order:
        if not _is_stray(scene, sid, idx[site_vals == sid], lid, sl):
            return sid
        strays.append(sid)
    near, _ = _nearest_bone(scene, lid, sl, exclude=strays)
    return near or order[0]


def _sternum_if_there(scene: _Scene, sid: int, centroid: np.ndarray) -> int:
    """The sternum's id for a lesion labelled clavicle, rib or vertebra that lies in the midline well in front of a
    thoracic spine (see the module's rules); ``sid`` otherwise."""
    site = by_id()[sid]
    if site.bone not in ("clavicle", "ribs") and site.kind != "vertebra":
        return sid
    spine = scene.spine_near(float(centroid[2]))
    if spine is None or spine[1] < 0.5:
        return sid
    centre = spine[0]
    if abs(centroid[0] - centre[0]) <= MIDLINE_MM and centroid[1] - centre[1] > STERNUM_ANTERIOR_MM:
        return by_code()["sternum"].id
    return sid


def _paired_bone(scene: _Scene, sid: int, lid: int, sl: tuple[slice, ...], centroid: np.ndarray) -> int:
    """The bone of a tibia/fibula or radius/ulna pair whose centre line passes nearest (in bone radii) to the
    lesion's centroid; ``sid`` itself for other bones or when either bone has too few voxels near the lesion."""
    site = by_id()[sid]
    partner = by_code().get(f"{_PAIRED_BONES.get(site.bone)}_{site.side}")
    if partner is None:
        return sid
    big = _expand(sl, _margin(PAIR_SEARCH_MM, scene.spacing), scene.sites.shape)
    outside = scene.lesions[big] != lid
    pts = {i: scene.world(np.argwhere((scene.sites[big] == i) & outside) + _offset(big)) for i in (sid, partner.id)}
    if min(len(p) for p in pts.values()) < MIN_REF_VOXELS:
        return sid
    union = np.concatenate(list(pts.values()))
    axis = np.linalg.svd(union - union.mean(axis=0), full_matrices=False)[2][0]
    lesion_t = scene.world(np.argwhere(scene.lesions[sl] == lid) + _offset(sl)) @ axis
    lo, hi = lesion_t.min() - PAIR_SLAB_MM, lesion_t.max() + PAIR_SLAB_MM
    best, best_score = sid, np.inf
    for i, p in pts.items():
        t = p @ axis
        near = (t >= lo) & (t <= hi)
        p, t = p[near], t[near]
        if len(p) < MIN_REF_VOXELS:
            return sid
        radius = np.sqrt(len(p) * scene.voxel_ml * 1000.0 / max(float(np.ptp(t)), 1.0) / np.pi)
        off = centroid - p.mean(axis=0)
        score = np.linalg.norm(off - (off @ axis) * axis) / max(radius, 1e-3)
        if score < best_score:
            best, best_score = i, score
    return best


def _subregions(scene: _Scene, site: Site, pts: np.ndarray) -> list[str]:
    """The subregions of a long bone or vertebra that hold lesion points (world mm): the majority first (ties: the
    vertebral body; in a long bone the name first in alphabetical order), then every other with at least
    :data:`SUBREGION_MIN_SHARE` of them (a lesion across a growth plate involves the epiphysis too); empty for other
    kinds of bone or when unknown."""
    if len(pts) == 0:
        return []
    if site.kind == "vertebra":
        cut = scene.vertebral_body_cut(site.id)
        if cut is None:
            return []
        labels = np.where(pts[:, 1] >= cut, "vertebral_body", "posterior_elements")
    elif site.kind == "long":
        bone = scene.bone_axis(site)
        if bone is None:
            return []
        labels = bone.subregion(pts)
    else:
        return []
    names, counts = np.unique(labels, return_counts=True)
    order = sorted(range(len(names)), key=lambda i: -counts[i])
    first = int(np.argmax(counts))  # the lowest name among equal counts, as before
    body = [i for i, n in enumerate(names) if n == "vertebral_body"]
    if body and counts[body[0]] * 2 >= len(pts):  # a tie between body and posterior elements is the body's
        first = body[0]
    rest = [str(names[i]) for i in order if i != first and counts[i] >= SUBREGION_MIN_SHARE * len(pts)]
    return [str(names[first]), *rest]


def _juxtaphyseal(scene: _Scene, site: Site, lid: int, sl: tuple[slice, ...]) -> bool | None:
    """Whether a lesion lies within JUXTA_MM of a physis of its own (long) bone; None when unknown."""
    if scene.physis is None or site.kind != "long" or len(scene.physis_points(site.id)) == 0:
        return None
    big = _expand(sl, _margin(JUXTA_MM, scene.spacing), scene.sites.shape)
    own = ndimage.binary_dilation(scene.sites[big] == site.id, iterations=2)
    ph = scene.physis[big] & own
    if not ph.any():
        return False
    dist = ndimage.distance_transform_edt(~ph, sampling=scene.spacing)
    return bool(dist[scene.lesions[big] == lid].min() <= JUXTA_MM)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 3)


def _soft_tissue_side(scene: _Scene, centroid: np.ndarray) -> str:
    dx = float(centroid[0]) - scene.midline_x()
    if abs(dx) <= MIDLINE_MM:
        return "midline"
    return "right" if dx > 0 else "left"


def _measure_one(scene: _Scene, lid: int, sl: tuple[slice, ...], confidence: float) -> dict:
    mask = scene.lesions[sl] == lid
    off = _offset(sl)
    idx = np.argwhere(mask) + off
    pts = scene.world(idx)
    n = len(idx)
    centroid = pts.mean(axis=0)
    site_vals = scene.sites[sl][mask]
    in_bone = site_vals > 0
    signal_all = scene.image[sl][mask]
    repaired = False
    if in_bone.any():
        counts = np.bincount(site_vals[in_bone])
        majority, dist = int(np.argmax(counts)), 0.0
        sid = _unless_stray(scene, lid, sl, counts, site_vals, idx)
        sid = _paired_bone(scene, sid, lid, sl, centroid)
        sid = _sternum_if_there(scene, sid, centroid)
        repaired = sid != majority
    else:
        sid, dist = _nearest_bone(scene, lid, sl)
    ref = by_id().get(sid)
    is_bone = ref is not None and dist <= NEAR_BONE_MM
    # a lesion moved to another bone (pair, stray label, sternum): its voxels in bone are that bone's
    own = in_bone if repaired else site_vals == sid if ref is not None else np.zeros(n, bool)
    lesion_signal = float(np.median(signal_all[own] if own.any() else signal_all))
    marrow = scene.local_marrow_median(lid, sl, sid) if ref is not None else None
    near = _expand(sl, _margin(SHELL_MM[1] + 4.0, scene.spacing), scene.sites.shape)
    inner = scene.sites[near] == sid if is_bone else scene.lesions[near] == lid
    muscle = scene.shell_median(near, inner)
    out = {
        "id": int(lid),
        "physis_fraction": None if scene.physis is None else round(float(scene.physis[sl][mask].mean()), 4),
        "volume_ml": round(float(volume_ml(n, scene.voxel_ml)), 4),
        "max_diameter_mm": round(_max_diameter(mask, off, scene), 2),
        "centroid_ras_mm": [round(float(v), 2) for v in centroid],
        "signal_ratio_marrow": _ratio(lesion_signal, marrow),
        "signal_ratio_muscle": _ratio(lesion_signal, muscle),
        "confidence": round(float(min(1.0, max(0.0, confidence))), 4),
    }
    if is_bone:
        in_map = int(scene.site_counts[sid])
        fraction = np.count_nonzero(own) / in_map if in_map >= max(np.count_nonzero(own), 1) else None
        vol_out = np.count_nonzero(~in_bone) * scene.voxel_ml
        extends = vol_out >= SOFT_EXT_MIN_ML and (vol_out >= SOFT_EXT_FRACTION * n * scene.voxel_ml or vol_out >= SOFT_EXT_ML)
        parts = _subregions(scene, ref, pts[own] if own.any() else pts)
        out.update(site=ref.code, side=ref.side, region=ref.region, subregion=parts[0] if parts else None,
                   subregions=parts,
                   juxtaphyseal=_juxtaphyseal(scene, ref, lid, sl),
                   bone_fraction=None if fraction is None else round(float(fraction), 4),
                   extension_grade=extension_grade(fraction),
                   soft_tissue_extension=bool(extends))
    else:
        out.update(site=SOFT_TISSUE, side=_soft_tissue_side(scene, centroid),
                   region=ref.region if ref is not None else SOFT_TISSUE, subregion=None, subregions=[],
                   juxtaphyseal=None,
                   bone_fraction=None, extension_grade=None, soft_tissue_extension=None)
    return {k: out[k] for k in LESION_KEYS}


class Study:
    """One study's site map, image, affine and physis mask, measured with any number of lesion maps on that grid
    (the input's at inference, the model grid in validation): the per-site work (bone axes, midline, spine) is
    done once for all of them."""

    def __init__(self, sites: np.ndarray, image: np.ndarray, affine: np.ndarray, physis: np.ndarray | None = None):
        physis = None if physis is None else np.asarray(physis, bool)
        no_lesions = np.broadcast_to(np.uint16(0), np.shape(sites))  # a placeholder of the study's shape, no memory
        self._scene = _Scene(no_lesions, sites, np.asarray(image, np.float32), affine, physis)

    def measure(self, lesions: np.ndarray, confidence: Mapping[int, float]) -> list[dict]:
        """Measure every lesion (instance labels 1..N); one dict per lesion in id order, with exactly the report
        schema's lesion keys. ``confidence`` must hold every lesion id."""
        scene = self._scene.with_lesions(lesions)
        boxes = ndimage.find_objects(_labels(lesions))
        present = [lid for lid, sl in enumerate(boxes, start=1) if sl is not None]
        missing = [lid for lid in present if lid not in confidence]
        if missing:
            raise ValueError(f"no confidence given for lesion ids {missing}")
        return [_measure_one(scene, lid, boxes[lid - 1], float(confidence[lid])) for lid in present]

    def hyperintense(self, lesions: np.ndarray, confidence: Mapping[int, float],
                     min_ratio: float) -> tuple[np.ndarray, dict[int, float], list[dict]]:
        """:meth:`measure` after dropping the lesions that are not hyperintense (:func:`not_hyperintense`): those
        are dropped, the rest measured again (their references may now use those voxels), until none is left to
        drop. Returns the lesions renumbered 1..K, their confidences and their measurements."""
        lesions, confidence = renumber(lesions, confidence)
        items = self.measure(lesions, confidence)
        while dark := not_hyperintense(items, min_ratio):
            lesions, confidence = renumber(np.where(np.isin(lesions, dark), 0, lesions).astype(np.uint16),
                                           confidence)
            items = self.measure(lesions, confidence)
        return lesions, confidence, items


def measure_lesions(lesions: np.ndarray, sites: np.ndarray, image: np.ndarray, affine: np.ndarray,
                    physis: np.ndarray | None, confidence: Mapping[int, float]) -> list[dict]:
    """:meth:`Study.measure` of one lesion map."""
    return Study(sites, image, affine, physis).measure(lesions, confidence)


def not_hyperintense(lesions: Sequence[Mapping], min_ratio: float) -> list[int]:
    """Ids of lesions whose median signal is below ``min_ratio`` times both references: the normal marrow of
    their bone and the nearby soft tissue. Edema is bright on STIR; a candidate darker than the marrow around
    it and than the soft tissue beside it is not marrow hyperintensity (the shipped network's false positives
    in failed fat suppression, for example). The ratios are compared as reported (3 decimals); a lesion with a
    reference that could not be measured is kept."""
    if min_ratio <= 0:
        return []
    return [int(les["id"]) for les in lesions
            if all(r is not None and r < min_ratio
                   for r in (les.get("signal_ratio_marrow"), les.get("signal_ratio_muscle")))]


def renumber(lesions: np.ndarray, confidence: Mapping[int, float]) -> tuple[np.ndarray, dict[int, float]]:
    """Lesion ids 1..K in order of their old ids, dropping ids that are absent (vanished on resampling, or
    dropped); the confidences follow their lesions."""
    present = np.unique(lesions)
    present = present[present > 0]
    if len(present) == len(confidence) and (len(present) == 0 or present[-1] == len(present)):
        return lesions, dict(confidence)
    remap = np.zeros(int(lesions.max()) + 1, np.uint16)
    new_conf = {}
    for new, old in enumerate(present, start=1):
        remap[old] = new
        new_conf[new] = confidence.get(int(old), 0.0)
    return remap[lesions], new_conf


def measure_hyperintense(lesions: np.ndarray, sites: np.ndarray, image: np.ndarray, affine: np.ndarray,
                         physis: np.ndarray | None, confidence: Mapping[int, float],
                         min_ratio: float) -> tuple[np.ndarray, dict[int, float], list[dict]]:
    """:meth:`Study.hyperintense` of one lesion map."""
    return Study(sites, image, affine, physis).hyperintense(lesions, confidence, min_ratio)
