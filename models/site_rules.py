"""The anatomical rules applied to the network's site map, in order (:func:`apply_site_rules`), shared by
validation and inference: pieces out of head-to-feet order dropped (below), vertebral levels fitted along the spine
(:mod:`models.spine`), sides by position (:mod:`models.sides`), "tibia" above the patella's middle renamed femur
(:func:`leg_bones_by_patella`), "femur" just above the talus renamed tibia (:func:`leg_bones_by_ankle`), forearms
and hands below the knee dropped (:func:`drop_arms_below_the_knee`), then stray labels handed to the bone they sit in
(below).

Head-to-feet order: in a partial field of view the network can name soft tissue or a foot bone after a bone that
lies elsewhere in the body: a "skull" among the metatarsals, "vertebrae" and "scapulae" in the buttocks of a legs
view. A child lies supine with the legs extended, so the bones come in tiers from head to feet: head, cervical
spine, shoulder girdle and sternum; thoracic spine, ribs and humerus; lumbar spine; pelvis; femur; patella; tibia
and fibula; foot. Forearms and hands are not ranked (beside the trunk or thighs, or above the head). Neighbouring
tiers that can share a height (the shoulder girdle and the upper thorax; the lowest ribs or the elbow and the lumbar
spine; the lumbar spine and the pelvis; the pelvis and the femoral head; the patella and the femur or tibia) are
not compared, nor are the first tier and the lumbar spine (vertebral labels are not yet fitted to their levels).
Two 26-connected pieces of ranked labels contradict each other when the centroid of one lies more than
``ORDER_MARGIN_MM`` on the wrong side of the other's (a "scapula" below a femur, a "tibia" above the pelvis).
Pieces are dropped one at a time, the one that contradicts the most voxels of the pieces still kept first, until no
two kept pieces contradict each other. A head bone (skull, mandible) also
contradicts a pelvic or lower piece whose centroid lies less than ``HEAD_GAP_MM`` below its own: the whole spine lies
between them (a "skull" at the upper edge of a pelvis view). A piece that reaches the top or bottom edge of the
view (within ``EDGE_MM``) is a bone that goes on beyond it, so it also contradicts every piece ranked at least
``FAR_TIERS`` tiers beyond that edge (the humerus excepted: its label can run on down the forearm): a "rib" at the
top of a knee view whose femur leaves the view at the top (the network draws chest wall where the view cuts the
thighs), a "clavicle" at the top of a legs view whose sacrum leaves it at the top, a "femur" in a chest view whose
ribs leave it at the bottom. A sacrum that leaves the view at the top also contradicts every piece ``SACRUM_FAR_TIERS``
or more tiers above the pelvis but the humerus: the view ends below the S1 end plate, below the lowest ribs (the
network draws "ribs" in the top corners of such pelvis and legs views). A dropped piece's voxels take
the most frequent label touching them when the piece's centroid lies within the head-feet extent of that label's
largest kept piece, give or take the margin (a "skull" among the metatarsals becomes metatarsals: it is bone), or
any forearm or hand label; else they become no bone, and a lesion there is named after the nearest bone
(:mod:`models.measure`). Without the extent check a "femur" in the neck became "skull" next to a clavicle
lesion; with every dropped voxel made no bone, lesions in real bone were flagged as extending into soft tissue.
A few spurious millilitres never outvote a femur, and one large wrong piece never outvotes the several bones it
contradicts: on a validation phantom the network named a whole humerus "femur", and the rule it replaced (the
larger piece wins) took the lumbar vertebrae beside it off the map.

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

from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from models.sides import body_mask, sides_by_position
from models.sites import Site, by_id, site_id, thin_bone_ids
from models.spine import renumber_vertebrae

BONE_THRESHOLD = 0.5   # bone probability above which a voxel is bone, unless the model card says otherwise
MIN_LABEL_ML = 0.5
FAR_MM = 20.0
# bones of several pieces: ribs, rays and segments (also for naming lesions, models.measure)
MULTI_PIECE_BONES = frozenset({"skull", "ribs", "sternum", "hand", "midfoot", "metatarsals", "toes"})
# ... and, for the site map's stray pieces, the hip bones, whose acetabular parts lie beyond the triradiate
# cartilage in a child (the lesion rule keeps them one-piece: merging the two would change lesion naming). Clavicles,
# fibulae and patellae stay one-piece here though lesion naming treats them as thin bones of several pieces: counted
# as several pieces here, the development sets' mean bone-site Dice fell by 0.0002 (models/default/HISTORY.md)
_SEVERAL_PIECES = MULTI_PIECE_BONES | {"ilium", "ischium", "pubis"}
_NEIGHBOURS = np.ones((3, 3, 3), bool)


def bone_around(labels: np.ndarray, piece: np.ndarray, exclude: int = 0) -> int:
    """The most frequent label touching ``piece`` (26-neighbours), other than 0 and ``exclude``; 0 when none."""
    around = labels[ndimage.binary_dilation(piece, _NEIGHBOURS) & ~piece]
    around = around[(around > 0) & (around != exclude)]
    return int(np.bincount(around).argmax()) if around.size else 0


ORDER_MARGIN_MM = 10.0
# tiers from head to feet (a site's bone or region), and the pairs of tiers that can share a height
_TIERS = (("head", "spine_cervical", "clavicle", "scapula", "sternum"), ("spine_thoracic", "chest_wall", "humerus"),
          ("spine_lumbar",), ("pelvis",), ("femur",), ("patella",), ("tibia", "fibula"), ("foot",))
# neighbours, and the shoulder girdle with the lumbar spine: before the level fit (models.spine) the network's
# vertebral labels can sit levels away from their place, and a cervical or lumbar label compared across the thorax
# took a whole-body spine's levels off (models/default/HISTORY.md, session 49)
_MAY_OVERLAP = frozenset({(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)})
PELVIS_TIER = next(i for i, tier in enumerate(_TIERS) if "pelvis" in tier)
# the least head-feet distance from a head bone's centroid (skull, mandible) down to a pelvic or lower bone's: the
# whole spine lies between them. Mandible to ilium on six 3-year-old phantoms of 94-96 cm: 313-319 mm (about a
# third of the height; tests/benchmarks/head_gap.py); 0.7 of that at -2 SD (86 cm)
HEAD_GAP_MM = 200.0
# a piece within EDGE_MM of the view's top (bottom) edge goes on beyond it: no piece FAR_TIERS or more tiers above
# (below) it can be in view. Three tiers: a femur cut at the top leaves no room for the chest wall, shoulder or
# humerus (the elbow lies above the femoral head); two would not be safe (the elbow and the lowest ribs can reach
# the height of the iliac crest, so a pelvis cut at the top can still show them; the shoulder girdle and sternum
# lie far above it)
EDGE_MM = 6.0
FAR_TIERS = 3
# bones whose label the network carries on into the unranked forearm and hand beside them, so reaching an edge does
# not show that they leave the view there: in a spine view down to the thighs, a "humerus" ran down the forearm to
# the bottom edge and lost to the femora (models/default/HISTORY.md, session 49)
_EDGE_BLIND = frozenset({"humerus"})
# a sacrum cut at the view's top puts the top below the S1 end plate, a vertebra or more below the iliac crest and
# below the lowest ribs' ends (the 12th rib's tip at about L2-L3): nothing SACRUM_FAR_TIERS or more tiers above the
# pelvis is in view but the humerus (the elbow of a child lying with the arms at the sides can reach the sacrum)
SACRUM_FAR_TIERS = 2


def head_to_feet_tier(site: Site) -> int | None:
    """The site's tier from head (0) to feet (7); None for forearms and hands, which are not ranked."""
    for tier, members in enumerate(_TIERS):
        if site.bone in members or site.region in members:
            return tier
    return None


def drop_out_of_order_pieces(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``sites`` (site ids on a RAS grid, +z superior) with the pieces that break the head-to-feet order renamed or
    made no bone (see the module docstring); the input itself when nothing breaks it."""
    sites = np.asarray(sites)
    sites_by_id = by_id()
    pieces = []   # (voxels, centroid z in mm, tier, site id, piece box, the label's pieces in that box, number)
    edge_rows = max(1, int(np.ceil(EDGE_MM / float(spacing[2]))))
    n_rows = sites.shape[2]
    for sid, box in enumerate(ndimage.find_objects(sites), start=1):
        tier = head_to_feet_tier(sites_by_id[sid]) if box is not None and sid in sites_by_id else None
        if tier is None:
            continue
        lab, _ = ndimage.label(sites[box] == sid, _NEIGHBOURS)
        flat = lab.ravel()
        sizes = np.bincount(flat)[1:]
        rows = np.broadcast_to(np.arange(lab.shape[2]), lab.shape).ravel()
        z_mm = (np.bincount(flat, weights=rows)[1:] / sizes + box[2].start) * float(spacing[2])
        for k, piece_box in enumerate(ndimage.find_objects(lab)):
            at = tuple(slice(b.start + p.start, b.start + p.stop) for b, p in zip(box, piece_box))
            pieces.append((int(sizes[k]), float(z_mm[k]), tier, sid, at, lab[piece_box], k + 1))
    pieces.sort(key=lambda p: -p[0])   # the first piece of a label kept is its largest
    edge_seen = [sites_by_id[p[3]].bone not in _EDGE_BLIND for p in pieces]
    at_top = [seen and p[4][2].stop > n_rows - edge_rows for p, seen in zip(pieces, edge_seen)]
    sacrum, humerus = ([sites_by_id[p[3]].bone == bone for p in pieces] for bone in ("sacrum", "humerus"))
    drop = _pieces_to_drop([p[0] for p in pieces], [p[1] for p in pieces], [p[2] for p in pieces],
                           [sites_by_id[p[3]].region == "head" for p in pieces], at_top,
                           [seen and p[4][2].start < edge_rows for p, seen in zip(pieces, edge_seen)],
                           [s and top for s, top in zip(sacrum, at_top)], humerus)
    main_rows: dict[int, tuple[int, int]] = {}   # head-feet rows of each label's largest kept piece
    dropped = []   # (piece box, piece mask within it, centroid z in mm)
    for i, (_, z, tier, sid, box, lab, k) in enumerate(pieces):
        if drop[i]:
            dropped.append((box, lab == k, z))
        else:
            main_rows.setdefault(sid, (box[2].start, box[2].stop - 1))
    if not dropped:
        return sites
    out = sites.copy()
    for box, mask, _ in dropped:
        out[box][mask] = 0
    for box, mask, z in dropped:
        grown, piece = _grown_piece(out, box, mask)
        label = bone_around(out[grown], piece)
        unranked = label not in main_rows          # forearms and hands
        if label and (unranked or _within_height(z, main_rows[label], float(spacing[2]))):
            out[grown][piece] = label
    return out


def _pieces_to_drop(sizes: Sequence[int], z_mm: Sequence[float], tiers: Sequence[int], head: Sequence[bool],
                    at_top: Sequence[bool], at_bottom: Sequence[bool], sacrum_at_top: Sequence[bool],
                    humerus: Sequence[bool]) -> np.ndarray:
    """Which pieces break the head-to-feet order (or put a head bone less than ``HEAD_GAP_MM`` above a pelvis or
    lower bone, or lie ``FAR_TIERS`` or more tiers beyond a piece that leaves the view at its top or bottom edge,
    or ``SACRUM_FAR_TIERS`` or more above a sacrum that leaves it at the top, humeri excepted):
    while any two kept pieces contradict each other, the piece that contradicts the most voxels of the others goes
    first (ties: the earlier piece). Memory grows with the number of pieces, not its square (a noisy map can hold
    thousands)."""
    t, z, w = np.asarray(tiers), np.asarray(z_mm, float), np.asarray(sizes, float)
    h = np.asarray(head, bool)
    top, bottom = np.asarray(at_top, bool), np.asarray(at_bottom, bool)
    cut_sacrum, arm = np.asarray(sacrum_at_top, bool), np.asarray(humerus, bool)
    low = t >= PELVIS_TIER
    share = np.eye(len(_TIERS), dtype=bool)          # tiers that can share a height are never compared
    for a, b in _MAY_OVERLAP:
        share[a, b] = share[b, a] = True

    def contradicted_by(i: int) -> np.ndarray:
        out = ~share[t[i], t] & (((t[i] < t) & (z[i] < z - ORDER_MARGIN_MM))   # i ranks above a piece below it
                                 | ((t[i] > t) & (z < z[i] - ORDER_MARGIN_MM)))  # or below one below it
        out |= (t >= t[i] + FAR_TIERS) & (bottom[i] | top)   # far below i; i leaves the view downwards or it upwards
        out |= (t <= t[i] - FAR_TIERS) & (top[i] | bottom)   # far above i: the same, the other way round
        if cut_sacrum[i]:                                    # i a sacrum leaving the view at the top
            out |= (t <= t[i] - SACRUM_FAR_TIERS) & ~arm
        elif not arm[i]:
            out |= (t >= t[i] + SACRUM_FAR_TIERS) & cut_sacrum
        if h[i]:
            return out | (low & (z[i] - z < HEAD_GAP_MM))   # a head bone too close above the pelvis or legs
        if low[i]:
            return out | (h & (z - z[i] < HEAD_GAP_MM))
        return out

    mass = np.array([w[contradicted_by(i)].sum() for i in range(len(w))])
    drop = np.zeros(len(w), bool)
    while len(w):
        i = int(np.argmax(np.where(drop, -1.0, mass)))
        if drop[i] or mass[i] <= 0:
            break
        drop[i] = True
        mass -= contradicted_by(i) * w[i]
    return drop


def _within_height(z_mm: float, rows: tuple[int, int], spacing_z: float) -> bool:
    """Whether height ``z_mm`` lies within a piece's head-feet rows (first, last), give or take the margin."""
    return rows[0] * spacing_z - ORDER_MARGIN_MM <= z_mm <= rows[1] * spacing_z + ORDER_MARGIN_MM


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
            crop[piece] = bone_around(crop, piece, exclude=sid)
    return out


PATELLA_MARGIN_MM = 5.0
MIN_PATELLA_ML = 0.2


def leg_bones_by_patella(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``sites`` with each side's "tibia" and "fibula" voxels more than ``PATELLA_MARGIN_MM`` above the centroid of
    that side's patella renamed femur (the input itself when none are).

    With the knee extended, as a child lies for whole-body MRI, the patella lies in front of the distal femur, its
    lower pole at or above the joint line, so no part of the tibia or fibula reaches the patella's middle. Bright
    edema in a distal femoral metaphysis can make the network name that metaphysis "tibia"; the patella beside it
    is usually still named right. The patella used is the side's largest 26-connected piece, when it holds at least
    ``MIN_PATELLA_ML`` and touches that side's femur or tibia; a side without one (edema can take the patella off
    the map too) uses the other side's, since a child lies with both knees extended and level; without either (an
    unossified patella in a young child, or none found) nothing changes. The reverse (femur below the patella) is
    not renamed: the femoral condyles reach below the patella's lower pole."""
    sites, spacing = np.asarray(sites), np.asarray(spacing, float)
    boxes = ndimage.find_objects(sites)
    out = sites
    for side, centre_mm in _heights_by_side(sites, boxes, spacing, _patella_centre_mm).items():   # knees lie level
        femur, tibia, fibula = (site_id(f"{bone}_{side}") for bone in ("femur", "tibia", "fibula"))
        first_row = int(np.floor((centre_mm + PATELLA_MARGIN_MM) / spacing[2])) + 1
        for sid in (tibia, fibula):
            out = _renamed_in_rows(out, sites, boxes, sid, femur, first_row, sites.shape[2])
    return out


ANKLE_GAP_MM = 100.0
MIN_TALUS_ML = 1.0


def leg_bones_by_ankle(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``sites`` with each side's "femur" voxels less than ``ANKLE_GAP_MM`` above the top of that side's talus
    renamed tibia (the input itself when none are).

    The whole tibia lies between the femur and the talus: 157 mm or more even in the smallest child the phantom
    draws (174-176 mm in 3-year-olds of 95 cm, scaled to -2 SD height). In a feet view the network can name the
    distal tibia and fibula "femur" from the view's top edge down to the ankle, which the head-to-feet order passes
    (a femur above the foot), and a distal tibial lesion would be reported as femoral. The talus used is the side's
    largest 26-connected piece, when it holds at least ``MIN_TALUS_ML`` (a 3-year-old's is about 4 mL) and touches
    that side's calcaneus, midfoot or metatarsals; a side without one uses the other side's, since both feet lie
    level; without either nothing changes. Rows, not whole pieces: a "femur" that runs on from the tibia into the
    true femur keeps its name above the cut."""
    sites, spacing = np.asarray(sites), np.asarray(spacing, float)
    boxes = ndimage.find_objects(sites)
    out = sites
    for side, top_mm in _heights_by_side(sites, boxes, spacing, _talus_top_mm).items():   # feet lie level
        stop_row = int(np.ceil((top_mm + ANKLE_GAP_MM) / spacing[2]))
        out = _renamed_in_rows(out, sites, boxes, site_id(f"femur_{side}"), site_id(f"tibia_{side}"), 0, stop_row)
    return out


_ARM_BONES = ("radius", "ulna", "hand")
MIN_KNEE_TIBIA_ML = 5.0


def drop_arms_below_the_knee(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``sites`` with every 26-connected radius, ulna or hand piece whose centroid lies below the knee line renamed
    after the most frequent label touching it, or made no bone without one (the input itself when none are).

    Forearms and hands are not ranked head to feet, but a child lies for whole-body MRI with the arms at the sides
    or above the head, the fingertips at mid-thigh at the lowest: the network's "hand" on a lateral malleolus or
    "radius" on a shank cannot be one. The knee line is the lower of the two sides' tops of their largest tibia
    piece, counted only when that piece holds at least ``MIN_KNEE_TIBIA_ML`` (a stray "tibia" of a few voxels high
    in a pelvis view once set it and took the true hands beside the thighs); without one nothing changes."""
    sites, spacing = np.asarray(sites), np.asarray(spacing, float)
    boxes = ndimage.find_objects(sites)
    tibiae = [_landmark(sites, boxes, f"tibia_{side}", None, MIN_KNEE_TIBIA_ML, spacing) for side in ("left", "right")]
    tops = [start + int(rows.max()) + 1 for start, rows in filter(None, tibiae)]
    if not tops:
        return sites
    knee_row = min(tops)
    dropped = []   # (box grown by a voxel, the piece's mask within it)
    for sid in (s.id for s in by_id().values() if s.bone in _ARM_BONES):
        box = _label_box(boxes, sid)
        if box is None or box[2].start >= knee_row:
            continue
        pieces, n = ndimage.label(sites[box] == sid, _NEIGHBOURS)
        rows = np.broadcast_to(np.arange(pieces.shape[2]), pieces.shape)
        centroid = np.asarray(ndimage.mean(rows, pieces, np.arange(1, n + 1))) + box[2].start
        dropped += [_grown_piece(sites, box, pieces == k) for k in np.nonzero(centroid < knee_row)[0] + 1]
    if not dropped:
        return sites
    out = sites.copy()
    for grown, piece in dropped:
        out[grown][piece] = 0
    for grown, piece in dropped:   # named after the bone they lie on, not after each other
        out[grown][piece] = bone_around(out[grown], piece)
    return out


def _grown_piece(labels: np.ndarray, box: tuple[slice, ...], mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """A piece's box grown by a voxel on every side (room for the labels around it, ``bone_around``) and the piece's
    ``mask`` (over ``box``) placed within it."""
    grown = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
    piece = np.zeros(labels[grown].shape, bool)
    piece[tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown))] = mask
    return grown, piece


def _heights_by_side(sites: np.ndarray, boxes: list, spacing: np.ndarray,
                     height_mm: Callable[[np.ndarray, list, str, np.ndarray], float | None]) -> dict[str, float]:
    """Each side's landmark height (``height_mm``: None where the side has none), the other side's where a side has
    none (a child lies with both legs extended, knees and feet level); sides without either are left out."""
    own = {side: height_mm(sites, boxes, side, spacing) for side in ("left", "right")}
    both = {side: own[side] if own[side] is not None else own[other]
            for side, other in (("left", "right"), ("right", "left"))}
    return {side: mm for side, mm in both.items() if mm is not None}


def _renamed_in_rows(out: np.ndarray, sites: np.ndarray, boxes: list, sid: int, new: int, first_row: int,
                     stop_row: int) -> np.ndarray:
    """``out`` with label ``sid`` (its box in ``boxes``, from ``sites``) renamed ``new`` in rows ``first_row`` to
    ``stop_row`` (exclusive) of the third axis; a copy of ``sites`` is made the first time ``out`` is ``sites``."""
    box = _label_box(boxes, sid)
    if box is None:
        return out
    rows = slice(max(box[2].start, first_row), min(box[2].stop, stop_row))
    if rows.start >= rows.stop:
        return out
    part = (box[0], box[1], rows)
    wrong = out[part] == sid
    if wrong.any():
        out = out.copy() if out is sites else out
        out[part][wrong] = new
    return out


def _label_box(boxes: list, sid: int) -> tuple[slice, ...] | None:
    """The bounding box of label ``sid`` from ``ndimage.find_objects`` of a label map; None when it is absent."""
    return boxes[sid - 1] if sid <= len(boxes) else None


def _patella_centre_mm(sites: np.ndarray, boxes: list, side: str, spacing: np.ndarray) -> float | None:
    """Height (mm along the grid's third axis) of the centroid of the side's patella: its largest 26-connected piece,
    when that holds at least ``MIN_PATELLA_ML`` and touches the side's femur or tibia; None without one."""
    found = _landmark(sites, boxes, f"patella_{side}", (f"femur_{side}", f"tibia_{side}"), MIN_PATELLA_ML, spacing)
    return None if found is None else (float(found[1].mean()) + found[0]) * float(spacing[2])


def _talus_top_mm(sites: np.ndarray, boxes: list, side: str, spacing: np.ndarray) -> float | None:
    """Height (mm along the grid's third axis) of the top of the side's talus: its largest 26-connected piece, when
    that holds at least ``MIN_TALUS_ML`` and touches the side's calcaneus, midfoot or metatarsals; None without one."""
    foot = tuple(f"{bone}_{side}" for bone in ("calcaneus", "midfoot", "metatarsals"))
    found = _landmark(sites, boxes, f"talus_{side}", foot, MIN_TALUS_ML, spacing)
    return None if found is None else (float(found[1].max()) + found[0] + 1) * float(spacing[2])


def _landmark(sites: np.ndarray, boxes: list, code: str, touching: Sequence[str] | None, min_ml: float,
              spacing: np.ndarray) -> tuple[int, np.ndarray] | None:
    """The largest 26-connected piece of label ``code`` when it holds at least ``min_ml`` and touches one of the
    labels ``touching`` (a landmark the network placed among its neighbours; None: no neighbour test): the first row
    of its crop along the third axis and the third-axis rows of its voxels; None without one."""
    sid = site_id(code)
    box = _label_box(boxes, sid)
    if box is None:
        return None
    grown = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)  # room for its neighbours
    crop = sites[grown]
    pieces, _ = ndimage.label(crop == sid, _NEIGHBOURS)
    sizes = np.bincount(pieces.ravel())[1:]
    piece = pieces == int(np.argmax(sizes)) + 1
    if sizes.max() < min_ml * 1000.0 / float(np.prod(spacing)):
        return None
    if touching is not None and not np.isin(crop[ndimage.binary_dilation(piece, _NEIGHBOURS)],
                                            [site_id(c) for c in touching]).any():
        return None
    return grown[2].start, np.nonzero(piece)[2]


def bone_thresholds(thresholds: Mapping[str, float]) -> tuple[float, float]:
    """The site map's (``bone``, ``bone_thin``) from a model card's ``thresholds``: :data:`BONE_THRESHOLD` where the
    card has none, and ``bone_thin`` equal to ``bone`` (no growth) where it has no thin one."""
    bone = float(thresholds.get("bone", BONE_THRESHOLD))
    return bone, float(thresholds.get("bone_thin", bone))


def sites_in_bone(site_ids: np.ndarray, bone_prob: np.ndarray, bone: float = BONE_THRESHOLD,
                  bone_thin: float | None = None) -> np.ndarray:
    """The network's site map: each voxel's site id where the bone probability exceeds ``bone``, 0 (no bone)
    elsewhere. With ``bone_thin``, a bone of :data:`models.sites.THIN_BONES` also keeps its voxels above
    ``bone_thin`` that are 26-connected, through such voxels of the same label, to one above ``bone`` (hysteresis:
    a rib or fibula grows to the extent partial volume hid, but no new thin bone appears where none passed
    ``bone``)."""
    site_ids = np.asarray(site_ids, np.uint8)
    site_map = np.where(bone_prob > bone, site_ids, 0).astype(np.uint8)
    if bone_thin is None or bone_thin >= bone:
        return site_map
    thin = np.zeros(256, bool)
    thin[list(thin_bone_ids())] = True
    low = np.where((bone_prob > bone_thin) & thin[site_ids], site_ids, 0)
    for sid, box in enumerate(ndimage.find_objects(low), start=1):
        if box is None:
            continue
        pieces, _ = ndimage.label(low[box] == sid, _NEIGHBOURS)
        cores = np.unique(pieces[site_map[box] == sid])
        grown = np.isin(pieces, cores[cores > 0])
        site_map[box][grown] = sid
    return site_map


def apply_site_rules(site_map: np.ndarray, img: np.ndarray, spacing: Sequence[float],
                     edema: np.ndarray | None = None) -> np.ndarray:
    """The site map as inference reports it, from the network's map and the normalised image on the model grid;
    ``edema``: the predicted edema mask, which stays bone where a disc leaves the map (see :mod:`models.spine`)."""
    site_map = drop_out_of_order_pieces(np.asarray(site_map, np.uint8), spacing)
    site_map = renumber_vertebrae(site_map, spacing, img, edema)
    site_map = sides_by_position(site_map, body_mask(img), spacing)
    site_map = leg_bones_by_ankle(leg_bones_by_patella(site_map, spacing), spacing)
    site_map = drop_arms_below_the_knee(site_map, spacing)
    return relabel_stray_pieces(site_map, spacing)
