"""Site rules after the network, on the phantom's true site map brought to the model grid: vertebral levels fitted
along the spine and counted from the sacrum, and sides by position."""
import numpy as np
import pytest
from scipy import ndimage

from models.sides import _pairs, body_mask, sides_by_position
from models.spine import LEVELS, disc_bands, level_count_anchors, renumber_vertebrae
from models.site_rules import sites_in_bone
from models.sites import THIN_BONES, by_id, site_id, thin_bone_ids
from training.config import SynthConfig, load_config
from training.data import to_model_case
from training.phantom.generate import generate_case

IDS = np.array([site_id(c) for c in LEVELS])
GRID = (3.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def model_case():
    cfg = load_config(SynthConfig, None, ["anatomy_mm=3", "acquisition.oblique_p=0"])
    case = generate_case(11, cfg, fov="whole_body")
    return to_model_case(case.image.astype(np.float32), case.affine, GRID, case.lesions, case.sites, case.physis)


@pytest.fixture(scope="module")
def sites(model_case):
    return model_case["sites"]


def level_accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    m = np.isin(ref, IDS)
    return float((pred[m] == ref[m]).mean())


def shifted(s: np.ndarray, k: int) -> np.ndarray:
    out = s.copy()
    for i, sid in enumerate(IDS):
        out[s == sid] = IDS[min(max(i + k, 0), len(IDS) - 1)]
    return out


def test_true_levels_are_kept(sites):
    assert set(IDS) <= set(np.unique(sites)), "the whole-body case shows every vertebra"
    assert np.array_equal(renumber_vertebrae(sites, GRID), sites)


@pytest.mark.parametrize("k", [1, -1, 2])
def test_levels_off_by_k_are_counted_back_from_the_sacrum(sites, k):
    wrong = shifted(sites, k)
    assert level_accuracy(wrong, sites) < 0.2
    assert level_accuracy(renumber_vertebrae(wrong, GRID), sites) > 0.98


def test_a_missed_vertebra_does_not_shift_the_levels_above_it(sites):
    missing = sites.copy()
    missing[sites == site_id("vertebra_T6")] = 0
    fixed = renumber_vertebrae(missing, GRID)
    keep = np.isin(sites, IDS) & (sites != site_id("vertebra_T6"))
    assert (fixed[keep] == sites[keep]).mean() > 0.98


def test_without_the_sacrum_the_network_labels_are_kept_when_they_agree(sites):
    z = np.nonzero((sites == site_id("vertebra_T12")).any(axis=(0, 1)))[0].min()
    upper = sites.copy()
    upper[:, :, :z] = 0                        # field of view from T12 up: no sacrum
    assert np.array_equal(renumber_vertebrae(upper, GRID), upper)
    # one vertebra mislabelled as its neighbour's level: the run's consensus numbers it back
    odd = upper.copy()
    odd[upper == site_id("vertebra_T4")] = site_id("vertebra_T5")
    fixed = renumber_vertebrae(odd, GRID)
    assert (fixed[upper == site_id("vertebra_T4")] == site_id("vertebra_T4")).mean() > 0.95


@pytest.mark.parametrize("room", [1, 3, 6])
def test_a_view_cut_just_above_the_column_is_not_counted_from_c1(sites, room):
    """A pelvis view whose top edge cuts the lumbar spine a few voxels above its highest labelled voxel: the top of
    the column is not C1, and the levels counted up from the sacrum stay (a first version read any room above the
    column as its top and packed C1-L5 into the lumbar spine)."""
    top = np.nonzero((sites == site_id("vertebra_L1")).any(axis=(0, 1)))[0].max()
    view = np.ascontiguousarray(sites[:, :, :top + 1 + room])
    view[:, :, top + 1:] = 0                   # the top slices show no bone (the bone map's edge)
    assert level_accuracy(renumber_vertebrae(view, GRID), view) > 0.95


def test_level_count_anchors_say_which_ends_of_the_spine_are_in_view(sites):
    """Whole body: C1 (room above) and the sacrum; cut through the neck: the sacrum only; cut above the sacrum:
    C1 only; a thoracic view: neither. Each is what the fit above counts from."""
    z = lambda code, end: getattr(np.nonzero((sites == site_id(code)).any(axis=(0, 1)))[0], end)()
    assert level_count_anchors(sites, GRID) == (True, True)
    assert level_count_anchors(sites[:, :, :z("vertebra_C3", "max") + 1], GRID) == (False, True)
    assert level_count_anchors(sites[:, :, z("vertebra_L3", "min"):], GRID) == (True, False)
    assert level_count_anchors(sites[:, :, z("vertebra_T10", "min"):z("vertebra_T2", "max") + 1], GRID) == (False, False)
    assert level_count_anchors(np.zeros_like(sites), GRID) is None


def test_stray_spine_labels_in_the_skull_do_not_move_the_count(sites):
    """A blob called sacrum and L5 near the vertex (seen on network output) is not the spine's anchor."""
    z_top = np.nonzero(np.isin(sites, IDS).any(axis=(0, 1)))[0].max()
    x, y = [int(np.median(a)) for a in np.nonzero(sites == site_id("vertebra_C2"))[:2]]
    stray = sites.copy()
    stray[x - 3:x + 3, y - 3:y + 3, z_top + 20:z_top + 24] = site_id("sacrum")
    stray[x - 3:x + 3, y - 3:y + 3, z_top + 24:z_top + 28] = site_id("vertebra_L5")
    assert level_accuracy(renumber_vertebrae(stray, GRID), sites) > 0.98


def test_neighbouring_levels_mixed_within_each_vertebra_are_resolved(sites):
    """At 3 mm the network often splits one vertebra between two levels: one level per vertebra comes back."""
    mixed = sites.copy()
    m = np.isin(sites, IDS)
    half = m & (np.arange(sites.shape[0])[:, None, None] < np.median(np.nonzero(m)[0]))
    mixed[half] = shifted(sites, 1)[half]                     # the right half of every vertebra one level lower
    assert level_accuracy(mixed, sites) < 0.65
    assert level_accuracy(renumber_vertebrae(mixed, GRID), sites) > 0.9


def grown_up(sites: np.ndarray, n: int) -> np.ndarray:
    """The blur the network shows at 3 mm: each disc gap filled with the level below, and every level reaching ``n``
    slices too far towards the head (the level above loses its lowest slices)."""
    vert = np.isin(sites, IDS)
    out = sites.copy()
    for _ in range(3):                                           # discs: up to 3 slices, filled from below
        below = np.roll(out, 1, axis=2)
        fill = (out == 0) & np.isin(below, IDS) & np.isin(np.roll(sites, -3, axis=2), IDS) & ~vert
        out[fill] = below[fill]
    for _ in range(n):
        below = np.roll(out, 1, axis=2)
        take = np.isin(out, IDS) & np.isin(below, IDS)
        out[take] = below[take]
    return out


def test_level_boundaries_are_drawn_to_the_bright_disc_bands(model_case, sites):
    """With the image, boundaries move from where a blurred site map puts them back to the discs between the
    bodies, and the disc voxels in front leave the bone map; without it the blur stays."""
    img = model_case["image"].astype(np.float32)
    blurred = grown_up(sites, 1)
    ref_vert = np.isin(sites, IDS)
    without, with_img = renumber_vertebrae(blurred, GRID), renumber_vertebrae(blurred, GRID, img)
    acc_without, acc_with = level_accuracy(without, sites), level_accuracy(with_img, sites)
    assert acc_without < 0.85
    assert acc_with > acc_without + 0.1
    extra_without = (np.isin(without, IDS) & ~ref_vert).sum()
    extra_with = (np.isin(with_img, IDS) & ~ref_vert).sum()
    assert extra_with < 0.8 * extra_without                      # filled discs cleared (1.0 without the rule)
    assert (np.isin(with_img, IDS) & ref_vert).sum() > 0.97 * ref_vert.sum()  # no body voxel lost
    filled = np.isin(blurred, IDS) & ~ref_vert                   # edema over every filled disc: none cleared
    protected = renumber_vertebrae(blurred, GRID, img, filled)
    assert np.isin(protected[filled], IDS).all()
    assert level_accuracy(protected, sites) > acc_without + 0.1


@pytest.mark.parametrize("level", ["vertebra_T8", "vertebra_L3"])
def test_a_bright_vertebral_body_does_not_pull_the_boundaries_when_its_edema_is_given(model_case, sites, level):
    """Edema filling a body is as bright as a disc band; passed as edema, it is left out of the brightness profile."""
    img = model_case["image"].astype(np.float32).copy()
    body = sites == site_id(level)
    img[body] *= 3.0
    blurred = grown_up(sites, 1)
    fooled = renumber_vertebrae(blurred, GRID, img)
    told = renumber_vertebrae(blurred, GRID, img, body)
    assert (fooled[body] == sites[body]).mean() < 0.95
    assert (told[body] == sites[body]).mean() > 0.98


def test_disc_bands_peak_between_the_bodies(model_case, sites):
    col = np.isin(sites, IDS)
    band = disc_bands(model_case["image"].astype(np.float32), col, GRID[2])
    has = col.any(axis=(0, 1))
    z0, z1 = np.nonzero(has)[0][[0, -1]]
    gaps, n = ndimage.label(~has[z0:z1 + 1])                    # the discs between two bodies
    inside = band[z0:z1 + 1]
    assert n >= 20
    discs = (np.nonzero(gaps == g)[0] for g in range(1, n + 1))
    peaked = [inside[max(0, d[0] - 1):d[-1] + 2].max() > 0.5 for d in discs]      # a peak within a slice
    assert np.mean(peaked) >= 0.6
    assert np.median(inside[gaps > 0]) > np.median(inside[gaps == 0]) + 0.5


def test_sides_follow_position(model_case):
    sites, body = model_case["sites"], body_mask(model_case["image"].astype(np.float32))
    paired, left, right = _pairs()
    m = paired[sites]
    assert m.sum() > 1000
    assert np.array_equal(sides_by_position(sites, body, GRID), sites)
    swapped = np.where(m, np.where(left[sites] == sites, right[sites], left[sites]), sites).astype(np.uint8)
    assert (swapped[m] == sites[m]).mean() == 0
    assert (sides_by_position(swapped, body, GRID)[m] == sites[m]).mean() > 0.99
    # knees only (no spine in view): the midline comes from the two legs
    z = np.nonzero((sites == site_id("tibia_left")).any(axis=(0, 1)))[0]
    knees = (slice(None), slice(None), slice(int(z.mean()) - 20, int(z.mean()) + 20))
    sk, bk, mk = swapped[knees], body[knees], m[knees]
    assert (sides_by_position(sk, bk, GRID)[mk] == sites[knees][mk]).mean() > 0.99


def test_a_vertebra_mistaken_in_a_leg_does_not_move_the_midline(model_case):
    """The midline comes from the body, not from predicted spine labels that may sit in a leg."""
    sites, body = model_case["sites"].copy(), body_mask(model_case["image"].astype(np.float32))
    tib = sites == site_id("tibia_left")
    z = int(np.nonzero(tib.any(axis=(0, 1)))[0].mean())
    sites[:, :, z - 3:z + 3][tib[:, :, z - 3:z + 3]] = site_id("vertebra_L3")   # a "vertebra" in the left shin
    fixed = sides_by_position(sites, body, GRID)
    others = model_case["sites"] == site_id("tibia_right")
    assert (fixed[others] == site_id("tibia_right")).mean() > 0.99


def test_true_sites_keep_every_label_and_voxel_through_the_stray_rule(sites):
    from models.site_rules import relabel_stray_pieces
    assert np.array_equal(relabel_stray_pieces(sites, GRID), sites)


def test_stray_labels_go_to_the_bone_they_sit_in(sites):
    from models.site_rules import relabel_stray_pieces
    femur, humerus, c5 = site_id("femur_left"), site_id("humerus_left"), site_id("vertebra_C5")
    idx = np.argwhere(sites == femur)
    shaft = idx[np.argsort(idx[:, 2])[len(idx) // 2]]  # a voxel halfway up the femur
    noisy = sites.copy()
    x, y, z = shaft
    noisy[x, y, z - 1:z + 2] = c5                        # 3 voxels of "C5" inside the femur: a label too small
    far = idx[np.argsort(idx[:, 2])[len(idx) // 8]]      # low on the femur, well over 20 mm from the humerus
    noisy[far[0], far[1], far[2]] = humerus              # one far-away voxel of a bone that is present elsewhere
    out = relabel_stray_pieces(noisy, GRID)
    assert np.array_equal(out, sites)
    assert np.count_nonzero(noisy != sites) == 4


def test_a_nearby_piece_of_the_same_bone_stays(sites):
    from models.site_rules import relabel_stray_pieces
    femur = site_id("femur_left")
    noisy = sites.copy()
    top = np.argwhere(sites == femur)
    top = top[np.argmax(top[:, 2])]
    x, y, z = top
    assert sites[x, y, z + 3] != femur
    noisy[x, y, z + 3] = femur  # a piece 6-9 mm above the femur's top (an epiphysis beyond a growth plate)
    out = relabel_stray_pieces(noisy, GRID)
    assert out[x, y, z + 3] == femur


def test_only_forearms_and_hands_are_unranked_head_to_feet():
    from models.site_rules import head_to_feet_tier
    from models.sites import all_sites
    unranked = {s.bone for s in all_sites() if head_to_feet_tier(s) is None}
    assert unranked == {"radius", "ulna", "hand"}
    tier = {s.bone: head_to_feet_tier(s) for s in all_sites()}
    assert tier["skull"] < tier["vertebra_L3"] < tier["sacrum"] < tier["femur"] < tier["tibia"] < tier["talus"]


@pytest.mark.parametrize("view", [(0.0, 1.0), (0.0, 0.3), (0.2, 0.45), (0.4, 0.65), (0.85, 1.0), (0.2, 0.35),
                                  (0.25, 0.5), (0.3, 0.55), (0.35, 0.6), (0.45, 0.7), (0.5, 0.8), (0.6, 0.9),
                                  (0.55, 0.75), (0.7, 1.0), (0.1, 0.4)])
def test_true_sites_keep_every_voxel_through_the_order_rule(sites, view):
    """Whole body and head-feet windows of it (feet, legs, knees and thighs, pelvis, head and neck)."""
    from models.site_rules import drop_out_of_order_pieces
    lo, hi = (int(f * sites.shape[2]) for f in view)
    part = np.ascontiguousarray(sites[:, :, lo:hi])
    assert np.array_equal(drop_out_of_order_pieces(part, GRID), part)


def test_pieces_out_of_head_to_feet_order_are_dropped_or_renamed(model_case, sites):
    """A "scapula" on soft tissue becomes no bone; a "skull" inside a foot bone takes that bone's name."""
    from models.site_rules import drop_out_of_order_pieces
    tibia, scapula, skull = site_id("tibia_left"), site_id("scapula_right"), site_id("skull")
    legs = np.ascontiguousarray(sites[:, :, : sites.shape[2] // 3])
    noisy = legs.copy()
    # a "scapula" of 45 voxels (1.2 mL) in the soft tissue beside a lower leg, touching no bone
    idx = np.argwhere(legs == tibia)
    x, y, z = idx[np.argsort(idx[:, 2])[len(idx) // 2]]
    d = next(d for d in range(4, 40) if not legs[x + d - 2:x + d + 3, y - 2:y + 3, z - 3:z + 4].any())
    noisy[x + d - 1:x + d + 2, y - 1:y + 2, z - 2:z + 3] = scapula
    # the middle of a foot bone named "skull"
    foot = np.argwhere(legs == site_id("metatarsals_left"))
    part = foot[np.abs(foot[:, 1] - np.median(foot[:, 1])) < 3]
    noisy[tuple(part.T)] = skull
    assert np.count_nonzero(noisy == scapula) >= 10 and np.count_nonzero(noisy == skull) >= 10
    out = drop_out_of_order_pieces(noisy, GRID)
    assert not np.isin(out, [scapula, skull]).any()
    assert np.array_equal(out, np.where(noisy == scapula, 0, legs))


def test_a_small_leg_label_in_the_chest_loses_to_the_trunk(sites):
    from models.site_rules import drop_out_of_order_pieces
    rib = np.argwhere(sites == site_id("ribs_left"))
    x, y, z = rib[len(rib) // 2]
    noisy = sites.copy()
    noisy[x, y, z] = site_id("tibia_left")              # one voxel of "tibia" inside a rib
    out = drop_out_of_order_pieces(noisy, GRID)
    # the "tibia" goes; the voxel becomes rib when it lies within the height of the largest rib piece, else no bone
    assert out[x, y, z] in (0, site_id("ribs_left"))
    rest = np.ones(sites.shape, bool)
    rest[x, y, z] = False
    assert np.array_equal(out[rest], sites[rest])


def test_a_dropped_piece_beyond_its_neighbours_height_becomes_no_bone(sites):
    """A 36 mm "femur" hanging from the skull into the neck (above the pelvis: dropped) is not handed to the skull,
    whose largest piece ends above its centre."""
    from models.site_rules import drop_out_of_order_pieces
    idx = np.argwhere(sites == site_id("skull"))
    x, y, z = idx[np.argmin(idx[:, 2])]                  # the skull's lowest voxel
    noisy = sites.copy()
    free = sites[x, y, z - 12:z] == 0
    assert free.all()
    noisy[x, y, z - 12:z] = site_id("femur_left")
    out = drop_out_of_order_pieces(noisy, GRID)
    assert (out[x, y, z - 12:z] == 0).all()
    assert np.array_equal(out, sites)


def test_a_skull_at_the_top_of_a_pelvis_view_is_dropped(sites):
    """A "skull" a few centimetres above the iliac crests (ranked above the pelvis, so in order) cannot be one: the
    whole spine lies between the head and the pelvis. The same skull far enough above is kept."""
    from models.site_rules import HEAD_GAP_MM, drop_out_of_order_pieces
    skull = site_id("skull")
    ilium = np.argwhere(np.isin(sites, [site_id("ilium_left"), site_id("ilium_right")]))
    top, centre = ilium[:, 2].max(), ilium[:, 2].mean()
    view = np.ascontiguousarray(sites[:, :, int(centre) - 40:top + 40])   # pelvis and lower lumbar spine
    noisy = view.copy()
    x0, y0 = (int(v) for v in np.argwhere(view == site_id("vertebra_L5"))[:, :2].mean(0))
    z0 = view.shape[2] - 8                                                  # a 2.7 mL block at the view's top
    noisy[x0 + 8:x0 + 13, y0:y0 + 4, z0:z0 + 5] = skull
    assert (z0 + 2 - 40) * GRID[2] < HEAD_GAP_MM
    out = drop_out_of_order_pieces(noisy, GRID)
    assert not (out == skull).any()
    assert np.array_equal(out[noisy != skull], view[noisy != skull])
    # raised out of reach of the rule (a view reaching up to the head): kept
    tall = np.zeros(view.shape[:2] + (view.shape[2] + 80,), view.dtype)
    tall[:, :, :view.shape[2]] = view
    tall[x0 + 8:x0 + 13, y0:y0 + 4, -5:] = skull
    assert (tall.shape[2] - 3 - 40) * GRID[2] > HEAD_GAP_MM
    assert np.array_equal(drop_out_of_order_pieces(tall, GRID), tall)


def test_thin_bones_are_the_few_millimetre_ones_on_both_sides():
    thin = {by_id()[i].code for i in thin_bone_ids()}
    assert {"sternum", "ribs_left", "ribs_right", "fibula_left", "fibula_right", "toes_left", "toes_right"} <= thin
    assert not thin & {"femur_left", "tibia_right", "skull", "vertebra_L1", "humerus_left", "metatarsals_left"}
    assert {by_id()[i].bone for i in thin_bone_ids()} == set(THIN_BONES)


def test_thin_bones_grow_from_a_confident_core_down_to_the_thin_threshold():
    femur, rib = site_id("femur_left"), site_id("ribs_right")
    ids = np.array([[[rib, rib, rib, 0, rib, femur, femur]]], np.uint8)
    prob = np.array([[[0.7, 0.3, 0.25, 0.9, 0.3, 0.6, 0.3]]], np.float32)
    assert sites_in_bone(ids, prob).tolist() == [[[rib, 0, 0, 0, 0, femur, 0]]]            # one threshold, 0.5
    # the rib grows from its core through 0.3 and 0.25; the rib voxel past a gap has no core and the femur no
    # thin threshold, so both stay no bone
    assert sites_in_bone(ids, prob, 0.5, 0.2).tolist() == [[[rib, rib, rib, 0, 0, femur, 0]]]
    assert sites_in_bone(ids, prob, 0.5, 0.28).tolist() == [[[rib, rib, 0, 0, 0, femur, 0]]]
    assert sites_in_bone(ids, prob, 0.5, 0.5).tolist() == sites_in_bone(ids, prob).tolist()


def test_one_large_piece_out_of_order_does_not_outvote_the_bones_it_contradicts(sites):
    """A whole humerus named "femur" hangs beside the trunk, above the lumbar spine: it contradicts each lumbar
    vertebra (and the lowest ribs), every one of them smaller than it but together larger. The vertebrae keep their
    names and the arm loses its wrong one (on a validation phantom the network named a humerus "femur" and the
    largest-piece-first order rule took L2-L5 off the map)."""
    from models.site_rules import drop_out_of_order_pieces
    femur, arm = site_id("femur_left"), sites == site_id("humerus_left")
    noisy = sites.copy()
    noisy[arm] = femur
    lumbar = np.isin(sites, [site_id(f"vertebra_L{i}") for i in range(1, 6)])
    assert np.count_nonzero(arm) > max(np.count_nonzero(sites == site_id(f"vertebra_L{i}")) for i in range(1, 6))
    out = drop_out_of_order_pieces(noisy, GRID)
    assert np.array_equal(out[lumbar], sites[lumbar])
    assert not (out[arm] == femur).any()
    assert np.array_equal(out[~arm], sites[~arm])


@pytest.mark.parametrize("view", [(0.0, 1.0), (0.2, 0.45)])
def test_true_sites_keep_every_voxel_through_the_patella_rule(sites, view):
    """Whole body and a knees-and-thighs window: no true tibia or fibula reaches above the patella's middle."""
    from models.site_rules import leg_bones_by_patella
    lo, hi = (int(f * sites.shape[2]) for f in view)
    part = np.ascontiguousarray(sites[:, :, lo:hi])
    assert np.isin(part, [site_id("patella_left"), site_id("patella_right")]).any()
    assert np.array_equal(leg_bones_by_patella(part, GRID), part)


def test_a_distal_femur_named_tibia_beside_the_patella_is_named_femur_again(sites):
    """The network's error on knees with distal femoral edema: the metaphysis above the joint named "tibia"."""
    from models.site_rules import PATELLA_MARGIN_MM, leg_bones_by_patella
    femur, tibia, patella = site_id("femur_right"), site_id("tibia_right"), site_id("patella_right")
    rows = np.nonzero((sites == patella).any(axis=(0, 1)))[0]
    centre = np.nonzero(sites == patella)[2].mean()
    first = int(np.floor(centre + PATELLA_MARGIN_MM / GRID[2])) + 1
    noisy = sites.copy()
    band = noisy[:, :, first:rows[-1] + 8]
    band[band == femur] = tibia                            # 2-3 cm of distal femur named "tibia"
    assert np.count_nonzero(noisy != sites) > 100
    out = leg_bones_by_patella(noisy, GRID)
    assert np.array_equal(out, sites)
    # and the left leg is left alone
    assert np.array_equal(out == site_id("tibia_left"), sites == site_id("tibia_left"))
    # without its own patella (or with too small a one) a knee uses the other knee's, which lies level with it
    no_patella = np.where(noisy == patella, femur, noisy).astype(noisy.dtype)
    assert np.array_equal(leg_bones_by_patella(no_patella, GRID), np.where(sites == patella, femur, sites))
    speck = no_patella.copy()
    speck[tuple(np.argwhere(noisy == patella)[0])] = patella
    assert np.count_nonzero(leg_bones_by_patella(speck, GRID) != speck) == np.count_nonzero(noisy != sites)
    # with neither patella nothing changes
    neither = np.where(np.isin(no_patella, [site_id("patella_left")]), site_id("femur_left"), no_patella)
    neither = neither.astype(noisy.dtype)
    assert np.array_equal(leg_bones_by_patella(neither, GRID), neither)


def _knee_view(sites: np.ndarray) -> tuple[np.ndarray, int]:
    """A knee view of the true map: from the middle of the lower legs up to the femoral shaft, which leaves the view
    at its top edge; and the x of the left femur's centre."""
    femur = np.argwhere(sites == site_id("femur_left"))
    tibia = np.argwhere(sites == site_id("tibia_left"))
    lo, hi = int(tibia[:, 2].mean()), int(np.percentile(femur[:, 2], 60))
    return np.ascontiguousarray(sites[:, :, lo:hi]), int(femur[:, 0].mean())


def test_chest_wall_at_the_top_of_a_knee_view_is_dropped(sites):
    """A "rib" at the top edge of a knee view lies above the femur's centroid (in order by centroids), but the femur
    leaves the view at the top, so no rib can be in view. Seen from a view whose top lies above the femur, the same
    rib is in order and kept."""
    from models.site_rules import drop_out_of_order_pieces
    view, x_femur = _knee_view(sites)
    rib = site_id("ribs_left")
    ys = np.nonzero(view.any(axis=(0, 2)))[0]
    noisy = view.copy()
    x = next(x for x in range(x_femur, view.shape[0]) if not view[x - 2:x + 3, :, -6:].any())  # beside the thigh
    noisy[x:x + 4, ys[0] + 2:ys[0] + 6, -4:] = rib                                               # 64 voxels, 1.7 mL
    assert view[:, :, -1].any(), "the femur leaves the view at the top"
    assert np.argwhere(noisy == rib)[:, 2].mean() > np.argwhere(view == site_id("femur_left"))[:, 2].mean()
    out = drop_out_of_order_pieces(noisy, GRID)
    assert not (out == rib).any()
    assert np.array_equal(out, view)
    # the same view with 20 empty rows above it: the femur ends inside the view and the rib above it is kept
    tall = np.concatenate([noisy, np.zeros(noisy.shape[:2] + (20,), noisy.dtype)], axis=2)
    assert np.array_equal(drop_out_of_order_pieces(tall, GRID), tall)


def test_a_femur_at_the_bottom_of_a_chest_view_is_dropped(sites):
    """The ribs leave a chest view at its bottom edge, so a "femur" there cannot be one; the chest wall stays."""
    from models.site_rules import drop_out_of_order_pieces
    ribs = np.argwhere(np.isin(sites, [site_id("ribs_left"), site_id("ribs_right")]))
    lo, hi = int(np.percentile(ribs[:, 2], 30)), int(np.percentile(ribs[:, 2], 90))
    view = np.ascontiguousarray(sites[:, :, lo:hi])
    assert np.isin(view[:, :, 0], [site_id("ribs_left"), site_id("ribs_right")]).any()
    assert not np.isin(view, [site_id("skull"), site_id("mandible")]).any(), "no head bone (its own gap rule)"
    femur = site_id("femur_right")
    spine = np.argwhere(np.isin(view, IDS))
    x0, y0 = int(spine[:, 0].mean()), int(spine[:, 1].max())
    x = next(x for x in range(x0 + 8, view.shape[0]) if not view[x - 2:x + 5, y0 - 6:y0 + 2, :6].any())
    noisy = view.copy()
    noisy[x:x + 3, y0 - 4:y0, :4] = femur                      # 48 voxels of soft tissue at the bottom edge
    assert np.argwhere(noisy == femur)[:, 2].mean() < np.argwhere(view > 0)[:, 2].mean()
    out = drop_out_of_order_pieces(noisy, GRID)
    assert np.array_equal(out, view)


def test_a_clavicle_at_the_top_of_a_legs_view_is_dropped(sites):
    """The sacrum and iliac wings leave a legs view at its top edge: the shoulder girdle lies far above them, so a
    "clavicle" there cannot be one. With room above the pelvis the same clavicle is in order and kept."""
    from models.site_rules import drop_out_of_order_pieces
    sacrum = np.argwhere(sites == site_id("sacrum"))
    view = np.ascontiguousarray(sites[:, :, :int(sacrum[:, 2].mean())])
    assert (view[:, :, -1] == site_id("sacrum")).any()
    clavicle = site_id("clavicle_right")
    x0, y0 = (int(v) for v in sacrum[:, :2].mean(0))
    x = next(x for x in range(x0 + 10, view.shape[0]) if not view[x - 2:x + 6, y0 - 2:y0 + 6, -6:].any())
    noisy = view.copy()
    noisy[x:x + 4, y0:y0 + 4, -3:] = clavicle                  # 48 voxels of soft tissue at the top edge
    out = drop_out_of_order_pieces(noisy, GRID)
    assert np.array_equal(out, view)
    tall = np.concatenate([noisy, np.zeros(noisy.shape[:2] + (20,), noisy.dtype)], axis=2)
    assert np.array_equal(drop_out_of_order_pieces(tall, GRID), tall)


def test_a_humerus_label_running_down_the_forearm_to_the_edge_keeps_its_humerus(sites):
    """In a view from the head down to the thighs the network can carry "humerus" on down the forearm to the bottom
    edge, beside the femora. The humerus does not leave the view there, so the femora (three tiers below) do not
    contradict it: the whole humerus stays."""
    from models.site_rules import drop_out_of_order_pieces
    humerus = site_id("humerus_left")
    cut = int(np.argwhere(sites == site_id("hand_left"))[:, 2].min()) + 1   # the fingertips at the bottom edge
    view = np.ascontiguousarray(sites[:, :, cut:])
    bone = np.argwhere(view == humerus)
    x, y, z = bone[np.argmin(bone[:, 2])]                                  # the humerus's lowest voxel
    noisy = view.copy()
    noisy[x, y, :z] = humerus                                              # its label run on down to the edge
    assert np.isin(view[:, :, 0], [site_id("femur_left"), site_id("femur_right")]).any()
    assert np.argwhere(noisy == humerus)[:, 2].mean() * GRID[2] > \
        np.argwhere(view == site_id("ilium_left"))[:, 2].mean() * GRID[2] + 10, "in order by centroids"
    out = drop_out_of_order_pieces(noisy, GRID)
    assert (out[view == humerus] == humerus).all()


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6, 0.95])
def test_true_sites_keep_every_voxel_in_views_cut_through_the_sacrum(sites, share):
    """Pelvis and legs views whose top edge cuts the sacrum at a share of its height (from its top): the true map
    holds humeri and forearms beside it but no rib or thoracic vertebra, so the order rule changes nothing."""
    from models.site_rules import drop_out_of_order_pieces
    rows = np.nonzero((sites == site_id("sacrum")).any(axis=(0, 1)))[0]
    view = np.ascontiguousarray(sites[:, :, :int(rows[-1] - share * (rows[-1] - rows[0]))])
    assert (view[:, :, -1] == site_id("sacrum")).any()
    assert np.array_equal(drop_out_of_order_pieces(view, GRID), view)


def test_ribs_at_the_top_of_a_view_cut_through_the_sacrum_are_dropped(sites):
    """The network draws "ribs" in the top corners of pelvis and legs views. Where the sacrum leaves the view at the
    top, the view ends below the S1 end plate, below the lowest ribs: the ribs go. With room above the sacrum they
    are in order and stay, and a "humerus" in the same place stays either way (the elbow can reach the sacrum)."""
    from models.site_rules import drop_out_of_order_pieces
    sacrum = np.argwhere(sites == site_id("sacrum"))
    view = np.ascontiguousarray(sites[:, :, :int(sacrum[:, 2].max()) - 3])
    x0, y0 = (int(v) for v in sacrum[:, :2].mean(0))
    x = next(x for x in range(x0 + 10, view.shape[0]) if not view[x - 2:x + 6, y0 - 2:y0 + 6, -6:].any())
    noisy = view.copy()
    noisy[x:x + 4, y0:y0 + 4, -3:] = site_id("ribs_right")          # 48 voxels of soft tissue at the top edge
    assert np.argwhere(noisy == site_id("ribs_right"))[:, 2].mean() > sacrum[:, 2].mean(), "in order by centroids"
    assert np.array_equal(drop_out_of_order_pieces(noisy, GRID), view)
    tall = np.concatenate([noisy, np.zeros(noisy.shape[:2] + (20,), noisy.dtype)], axis=2)
    assert np.array_equal(drop_out_of_order_pieces(tall, GRID), tall)
    arm = np.where(noisy == site_id("ribs_right"), site_id("humerus_right"), noisy).astype(noisy.dtype)
    assert np.array_equal(drop_out_of_order_pieces(arm, GRID), arm)


def _feet_view(sites: np.ndarray) -> np.ndarray:
    """A feet view of the true map: the feet and the lower half of the lower legs, which leave it at the top."""
    tibia = np.argwhere(sites == site_id("tibia_left"))
    return np.ascontiguousarray(sites[:, :, :int(tibia[:, 2].mean())])


@pytest.mark.parametrize("view", ["whole_body", "feet"])
def test_true_sites_keep_every_voxel_through_the_ankle_rule(sites, view):
    """No true femur lies within ANKLE_GAP_MM of the talus: the whole tibia is between them."""
    from models.site_rules import leg_bones_by_ankle
    part = sites if view == "whole_body" else _feet_view(sites)
    assert np.isin(part, [site_id("talus_left"), site_id("talus_right")]).any()
    assert np.array_equal(leg_bones_by_ankle(part, GRID), part)


def test_a_distal_tibia_named_femur_in_a_feet_view_is_named_tibia(sites):
    """The network's error in feet views: tibia and fibula named "femur" from the top edge down to the ankle. The
    rows within ANKLE_GAP_MM of the talus become tibia; a side without a talus uses the other side's; without either,
    or with the talus a speck, nothing changes."""
    from models.site_rules import ANKLE_GAP_MM, leg_bones_by_ankle
    view = _feet_view(sites)
    talus_l, talus_r = site_id("talus_left"), site_id("talus_right")
    noisy = view.copy()
    for side in ("left", "right"):
        noisy[np.isin(view, [site_id(f"tibia_{side}"), site_id(f"fibula_{side}")])] = site_id(f"femur_{side}")
    top = np.nonzero((view == talus_r).any(axis=(0, 1)))[0][-1] + 1
    cut = int(np.ceil(top + ANKLE_GAP_MM / GRID[2]))
    assert cut < view.shape[2], "the view reaches above the cut"
    expected = noisy.copy()
    for side in ("left", "right"):
        low = expected[:, :, :cut]
        low[low == site_id(f"femur_{side}")] = site_id(f"tibia_{side}")
    out = leg_bones_by_ankle(noisy, GRID)
    assert np.count_nonzero(out != noisy) > 500
    assert np.array_equal(out, expected)
    assert (out[:, :, cut:] == site_id("femur_left")).any(), "above the cut the name stays"
    # a side without its talus uses the other side's
    one_talus = np.where(noisy == talus_l, site_id("calcaneus_left"), noisy).astype(noisy.dtype)
    assert np.array_equal(leg_bones_by_ankle(one_talus, GRID),
                          np.where(expected == talus_l, site_id("calcaneus_left"), expected))
    # neither talus, or a speck of one, or a talus touching no foot bone: nothing changes
    neither = np.where(one_talus == talus_r, site_id("calcaneus_right"), one_talus).astype(noisy.dtype)
    assert np.array_equal(leg_bones_by_ankle(neither, GRID), neither)
    speck = neither.copy()
    speck[tuple(np.argwhere(noisy == talus_r)[0])] = talus_r
    assert np.array_equal(leg_bones_by_ankle(speck, GRID), speck)
    alone = np.where(np.isin(noisy, [site_id(f"{b}_{s}") for b in ("calcaneus", "midfoot", "metatarsals", "toes")
                                     for s in ("left", "right")]), 0, noisy).astype(noisy.dtype)
    assert np.array_equal(leg_bones_by_ankle(alone, GRID), alone)


@pytest.mark.parametrize("view", ["whole_body", "legs", "feet"])
def test_true_sites_keep_every_voxel_through_the_arm_rule(sites, view):
    """The phantom's fingertips lie above its knees: no true forearm or hand is below the knee line."""
    from models.site_rules import drop_arms_below_the_knee
    hand = np.argwhere(sites == site_id("hand_left"))
    part = {"whole_body": sites, "legs": np.ascontiguousarray(sites[:, :, :int(hand[:, 2].mean())]),
            "feet": _feet_view(sites)}[view]
    assert np.array_equal(drop_arms_below_the_knee(part, GRID), part)


def test_a_hand_on_the_ankle_and_a_radius_on_the_shank_are_dropped(sites):
    """The network's "hand" on a lateral malleolus and "radius" on a shank lie below the knee line, where no forearm
    or hand can be: they take the bone they lie on (or none). A hand beside the thigh stays; without a tibia in
    view nothing changes."""
    from models.site_rules import drop_arms_below_the_knee
    tibia, fibula = site_id("tibia_left"), site_id("fibula_left")
    noisy = sites.copy()
    low_fibula = np.argwhere(sites == fibula)
    low_fibula = low_fibula[low_fibula[:, 2] < np.percentile(low_fibula[:, 2], 15)]
    noisy[tuple(low_fibula.T)] = site_id("hand_left")                       # the lateral malleolus named "hand"
    shank = np.argwhere(sites == tibia)
    mid = shank[np.abs(shank[:, 2] - np.median(shank[:, 2])) < 3]
    noisy[tuple(mid.T)] = site_id("radius_left")                            # a band of the shank named "radius"
    out = drop_arms_below_the_knee(noisy, GRID)
    assert not np.isin(out[:, :, :int(np.argwhere(sites == tibia)[:, 2].max())],
                       [site_id(f"{b}_left") for b in ("hand", "radius")]).any()
    assert (out[tuple(mid.T)] == tibia).all()
    assert np.isin(out[tuple(low_fibula.T)], [fibula, tibia, site_id("talus_left"), 0]).all()
    assert np.array_equal(out[noisy == sites], sites[noisy == sites]), "nothing else changes"
    no_tibia = np.where(np.isin(noisy, [tibia, site_id("tibia_right")]), 0, noisy).astype(noisy.dtype)
    assert np.array_equal(drop_arms_below_the_knee(no_tibia, GRID), no_tibia)


def test_a_stray_tibia_speck_high_in_a_pelvis_view_does_not_set_the_knee_line(sites):
    """A pelvis view down to the thighs has no tibia; a few voxels of "tibia" the network scatters near its top (the
    stray rule removes them later) are no knee, so the hands beside the thighs stay."""
    from models.site_rules import MIN_KNEE_TIBIA_ML, drop_arms_below_the_knee
    sacrum, hand = np.argwhere(sites == site_id("sacrum")), np.argwhere(sites == site_id("hand_left"))
    view = np.ascontiguousarray(sites[:, :, int(hand[:, 2].min()):int(sacrum[:, 2].max())])
    assert not np.isin(view, [site_id("tibia_left"), site_id("tibia_right")]).any()
    assert np.isin(view, [site_id("hand_left"), site_id("hand_right")]).any()
    x0, y0 = (int(v) for v in sacrum[:, :2].mean(0))
    noisy = view.copy()
    noisy[x0:x0 + 3, y0:y0 + 3, -4:] = site_id("tibia_left")                 # 36 voxels, 1 mL, above the hands
    assert 36 * np.prod(GRID) / 1000 < MIN_KNEE_TIBIA_ML
    assert np.array_equal(drop_arms_below_the_knee(noisy, GRID), noisy)
