"""Lesion measurement on hand-built scenes with known answers (world RAS mm, any grid orientation)."""
from __future__ import annotations

import numpy as np
import pytest

from inference.postprocess import (border_lesions, level_warning, site_table, sites_in_view, study_warnings,
                                   summarise)
from models.measure import Study, extension_grade, measure_hyperintense, measure_lesions, not_hyperintense
from models.sites import by_code

SPACING = {"x": 2.0, "y": 3.0, "z": 2.5}
EXTENT = {"x": (-100.0, 100.0), "y": (-36.0, 36.0), "z": (-20.0, 220.0)}


def grid_affine(oriented: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape covering EXTENT. ``oriented``: voxel axes (I, L, P) -- S->I, R->L, A->P -- instead of RAS."""
    n = {k: int(round((EXTENT[k][1] - EXTENT[k][0]) / SPACING[k])) + 1 for k in "xyz"}
    aff = np.eye(4)
    if not oriented:
        aff[:3, :3] = np.diag([SPACING["x"], SPACING["y"], SPACING["z"]])
        aff[:3, 3] = [EXTENT["x"][0], EXTENT["y"][0], EXTENT["z"][0]]
        return aff, (n["x"], n["y"], n["z"])
    aff[:3, :3] = np.array([[0, -SPACING["x"], 0], [0, 0, -SPACING["y"]], [-SPACING["z"], 0, 0]])
    aff[:3, 3] = [EXTENT["x"][1], EXTENT["y"][1], EXTENT["z"][1]]
    return aff, (n["z"], n["x"], n["y"])


def world_grid(aff: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ijk = np.indices(shape, dtype=float).reshape(3, -1)
    xyz = aff[:3, :3] @ ijk + aff[:3, 3:4]
    return tuple(np.round(c, 6).reshape(shape) for c in xyz)


def box(X, Y, Z, x, y, z):
    return (X >= x[0]) & (X <= x[1]) & (Y >= y[0]) & (Y <= y[1]) & (Z >= z[0]) & (Z <= z[1])


# lesion boxes (x, y, z ranges in mm) and what they should measure as
LESIONS = {
    1: ((-46, -34), (-6, 6), (25, 40)),        # femur_left distal metaphysis, next to the distal physis
    2: ((34, 46), (-6, 6), (25, 40)),          # its mirror in femur_right
    3: ((40, 60), (-6, 6), (95, 110)),         # femur_right diaphysis, half outside the bone
    4: ((-27, -22), (-4, 4), (120, 130)),      # 4 mm lateral of femur_left, no voxel in bone
    5: ((-88, -82), (-6, 6), (60, 70)),        # 32 mm from femur_left, beyond the 30 mm search: soft tissue
    6: ((-6, 6), (0, 15), (105, 115)),         # vertebra_L3, anterior: vertebral body
    7: ((-6, 6), (-28, -20), (105, 115)),      # vertebra_L3, posterior elements
    8: ((-78, -70), (-6, 6), (140, 150)),      # soft tissue 20 mm from femur_left
    9: ((-27, -22), (16, 24), (205, 215)),     # clavicle_left, medial part: metaphysis_proximal
    10: ((-46, -38), (14, 22), (40, 50)),      # patella_left, most of it
}


def build_scene(oriented: bool = True, noise: float = 0.02, seed: int = 0):
    """Two femora (with physes), L3, left clavicle and patella inside a body of muscle; lesions of LESIONS."""
    aff, shape = grid_affine(oriented)
    X, Y, Z = world_grid(aff, shape)
    sites = np.zeros(shape, np.uint8)
    cortex = np.zeros(shape, bool)
    for code, cx in (("femur_left", -40.0), ("femur_right", 40.0)):
        r2 = (X - cx) ** 2 + Y ** 2
        bone = (r2 <= 100) & (Z >= 0) & (Z <= 200)
        sites[bone] = by_code()[code].id
        cortex |= bone & (r2 > 64)
    sites[box(X, Y, Z, (-12, 12), (-30, 18), (100, 120))] = by_code()["vertebra_L3"].id
    clav = (X >= -75) & (X <= -15) & ((Y - 20) ** 2 + (Z - 210) ** 2 <= 25)
    sites[clav] = by_code()["clavicle_left"].id
    sites[box(X, Y, Z, (-48, -36), (14, 22), (40, 50))] = by_code()["patella_left"].id
    physis = (sites == by_code()["femur_left"].id) | (sites == by_code()["femur_right"].id)
    physis &= ((Z >= 20) & (Z <= 24)) | ((Z >= 176) & (Z <= 180))
    lesions = np.zeros(shape, np.uint16)
    for lid, (x, y, z) in LESIONS.items():
        lesions[box(X, Y, Z, x, y, z)] = lid
    image = np.where(np.abs(X) <= 98, 0.5, 0.0).astype(np.float32)
    image[sites > 0] = 1.0
    image[cortex] = 0.2
    image[physis] = 1.8
    image[lesions > 0] = 2.0
    image += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32) * (image > 0)
    return dict(lesions=lesions, sites=sites, image=image, affine=aff, physis=physis, X=X, Y=Y, Z=Z)


CONF = {lid: 0.5 + lid / 100 for lid in LESIONS}


@pytest.fixture(scope="module")
def scene():
    return build_scene()


@pytest.fixture(scope="module")
def measured(scene):
    out = measure_lesions(scene["lesions"], scene["sites"], scene["image"], scene["affine"], scene["physis"], CONF)
    return {les["id"]: les for les in out}


def test_keys_ids_and_confidence(measured):
    assert sorted(measured) == sorted(LESIONS)
    keys = {"id", "site", "side", "region", "subregion", "subregions", "juxtaphyseal", "physis_fraction", "volume_ml",
            "max_diameter_mm",
            "centroid_ras_mm", "signal_ratio_marrow", "signal_ratio_muscle", "bone_fraction", "extension_grade",
            "soft_tissue_extension", "confidence"}
    for lid, les in measured.items():
        assert set(les) == keys
        assert les["confidence"] == pytest.approx(CONF[lid])


def test_volume_and_centroid_in_world_mm(scene, measured):
    vox_ml = SPACING["x"] * SPACING["y"] * SPACING["z"] / 1000
    for lid in LESIONS:
        m = scene["lesions"] == lid
        assert measured[lid]["volume_ml"] == pytest.approx(m.sum() * vox_ml, abs=1e-4)
        expect = [scene[k][m].mean() for k in "XYZ"]
        assert measured[lid]["centroid_ras_mm"] == pytest.approx(expect, abs=0.01)
    # lesion 1 is on the patient's left: negative x in RAS although the grid runs R->L
    assert measured[1]["centroid_ras_mm"][0] == pytest.approx(-40.0, abs=0.01)


def test_max_diameter_is_the_box_diagonal(scene, measured):
    m = scene["lesions"] == 1
    ext = [np.ptp(scene[k][m]) for k in "XYZ"]
    assert measured[1]["max_diameter_mm"] == pytest.approx(float(np.linalg.norm(ext)), abs=0.01)


def test_distal_metaphysis_juxtaphyseal_lesion(measured):
    les = measured[1]
    assert (les["site"], les["side"], les["region"]) == ("femur_left", "left", "lower_limb")
    assert les["subregion"] == "metaphysis_distal"
    assert les["juxtaphyseal"] is True
    assert les["soft_tissue_extension"] is False
    assert les["signal_ratio_marrow"] == pytest.approx(2.0, rel=0.05)
    assert les["signal_ratio_muscle"] == pytest.approx(4.0, rel=0.05)


def test_bone_fraction_and_grade(scene, measured):
    sid = by_code()["femur_left"].id
    frac = np.count_nonzero((scene["lesions"] == 1) & (scene["sites"] == sid)) / np.count_nonzero(scene["sites"] == sid)
    assert measured[1]["bone_fraction"] == pytest.approx(frac, abs=1e-4)
    assert measured[1]["extension_grade"] == "<25%"
    pat = by_code()["patella_left"].id
    frac = np.count_nonzero((scene["lesions"] == 10) & (scene["sites"] == pat)) / np.count_nonzero(scene["sites"] == pat)
    assert frac > 0.5
    assert (measured[10]["site"], measured[10]["subregion"]) == ("patella_left", None)
    assert measured[10]["juxtaphyseal"] is None
    assert measured[10]["bone_fraction"] == pytest.approx(frac, abs=1e-4)
    assert measured[10]["extension_grade"] == ">50%"


def test_extension_grade_bounds():
    assert [extension_grade(f) for f in (0.0, 0.2499, 0.25, 0.5, 0.5001, 1.0, None)] == \
        ["<25%", "<25%", "25-50%", "25-50%", ">50%", ">50%", None]


def test_soft_tissue_extension_and_diaphysis(measured):
    les = measured[3]
    assert (les["site"], les["side"], les["subregion"]) == ("femur_right", "right", "diaphysis")
    assert les["soft_tissue_extension"] is True
    assert les["juxtaphyseal"] is False


def test_lesion_next_to_bone_is_assigned_to_it(measured):
    les = measured[4]
    assert (les["site"], les["side"], les["region"]) == ("femur_left", "left", "lower_limb")
    assert les["bone_fraction"] == 0.0
    assert les["soft_tissue_extension"] is True


def test_far_lesion_is_soft_tissue(measured):
    far, near = measured[5], measured[8]
    assert (far["site"], far["side"], far["region"]) == ("soft_tissue", "left", "soft_tissue")
    assert (near["site"], near["side"], near["region"]) == ("soft_tissue", "left", "lower_limb")
    for les in (far, near):
        assert les["subregion"] is None and les["bone_fraction"] is None and les["extension_grade"] is None
    assert far["signal_ratio_marrow"] is None
    assert near["signal_ratio_marrow"] == pytest.approx(2.0, rel=0.05)   # against the nearest bone, femur_left
    assert far["signal_ratio_muscle"] == pytest.approx(4.0, rel=0.05)


def test_vertebra_body_and_posterior_elements(measured):
    les = measured[6]
    assert (les["site"], les["side"], les["region"]) == ("vertebra_L3", "midline", "spine_lumbar")
    assert measured[6]["subregion"] == "vertebral_body"
    assert measured[7]["subregion"] == "posterior_elements"
    assert measured[6]["juxtaphyseal"] is None


def test_clavicle_medial_end_is_proximal(measured):
    les = measured[9]
    assert (les["site"], les["subregion"]) == ("clavicle_left", "metaphysis_proximal")
    assert les["juxtaphyseal"] is None        # no physis found in the clavicle


def test_same_answers_on_a_ras_grid(measured):
    ras = build_scene(oriented=False)
    out = {les["id"]: les for les in measure_lesions(ras["lesions"], ras["sites"], ras["image"], ras["affine"],
                                                      ras["physis"], CONF)}
    for lid, les in measured.items():
        for key in ("site", "side", "region", "subregion", "juxtaphyseal", "extension_grade", "soft_tissue_extension"):
            assert out[lid][key] == les[key], (lid, key)
        assert out[lid]["volume_ml"] == pytest.approx(les["volume_ml"])
        assert out[lid]["centroid_ras_mm"] == pytest.approx(les["centroid_ras_mm"], abs=0.01)
        assert out[lid]["max_diameter_mm"] == pytest.approx(les["max_diameter_mm"], abs=0.01)


def test_without_physis_fractions_place_subregions(scene):
    out = measure_lesions(scene["lesions"], scene["sites"], scene["image"], scene["affine"], None, CONF)
    les = {x["id"]: x for x in out}
    assert les[1]["subregion"] == "metaphysis_distal"
    assert les[3]["subregion"] == "diaphysis"
    assert all(x["juxtaphyseal"] is None for x in out)


def test_proximal_epiphysis_and_juxtaphyseal_distance(scene):
    lesions = np.zeros_like(scene["lesions"])
    X, Y, Z = scene["X"], scene["Y"], scene["Z"]
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (185, 195))] = 1     # 5 mm above the proximal physis
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (30, 40))] = 2       # 7.5 mm above the distal physis
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (45, 50))] = 3       # 23-25 % of the femur from its distal end
    conf = {1: 0.9, 2: 0.9, 3: 0.9}
    out = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], scene["physis"], conf)
    assert (out[0]["site"], out[0]["subregion"], out[0]["juxtaphyseal"]) == ("femur_left", "epiphysis_proximal", True)
    assert (out[1]["subregion"], out[1]["juxtaphyseal"]) == ("metaphysis_distal", False)
    # the metaphysis reaches 15 % of the length beyond the physis (which is 11 % from the distal end), so to 26 %;
    # the fixed fractions used without physis (metaphysis 8 to 22 % from the end) call this lesion diaphysis
    assert out[2]["subregion"] == "metaphysis_distal"
    out = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], None, conf)
    assert out[2]["subregion"] == "diaphysis"


def test_a_lesion_across_the_growth_plate_lists_epiphysis_and_metaphysis(scene):
    """One subregion per lesion lost the epiphysis of a lesion that crosses the physis; ``subregions`` keeps it."""
    X, Y, Z = scene["X"], scene["Y"], scene["Z"]
    lesions = np.zeros_like(scene["lesions"])
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (12, 34))] = 1     # from the distal epiphysis across the physis (20-24)
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (30, 40))] = 2     # above the physis only
    out = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], scene["physis"], {1: 0.9, 2: 0.9})
    assert sorted(out[0]["subregions"]) == ["epiphysis_distal", "metaphysis_distal"]
    assert out[0]["subregion"] == out[0]["subregions"][0]
    assert out[1]["subregions"] == [out[1]["subregion"]] == ["metaphysis_distal"]


def test_max_diameter_of_a_large_lesion():
    """Over 2000 boundary voxels: the convex-hull path must still find the exact diagonal."""
    lesions = np.zeros((40, 40, 40), np.uint16)
    lesions[4:36, 4:36, 4:36] = 1
    aff = np.diag([0.8, 1.0, 1.5, 1.0])
    les = measure_lesions(lesions, np.zeros(lesions.shape, np.uint8), np.ones(lesions.shape, np.float32), aff,
                          None, {1: 1.0})[0]
    assert les["max_diameter_mm"] == pytest.approx(float(np.linalg.norm([31 * 0.8, 31 * 1.0, 31 * 1.5])), abs=0.01)
    assert les["site"] == "soft_tissue" and les["side"] == "midline" and les["region"] == "soft_tissue"


def test_missing_confidence_is_refused(scene):
    with pytest.raises(ValueError, match="confidence"):
        measure_lesions(scene["lesions"], scene["sites"], scene["image"], scene["affine"], None, {1: 0.5})


def test_summary_and_site_table(measured):
    lesions = [measured[k] for k in sorted(measured)]
    s = summarise(lesions, [])
    assert s["lesion_count"] == 10
    assert s["affected_sites"] == 5           # femur L/R, L3, clavicle L, patella L
    assert s["affected_regions"] == ["spine_lumbar", "chest_wall", "lower_limb"]
    assert s["total_volume_ml"] == pytest.approx(sum(x["volume_ml"] for x in lesions), abs=1e-3)
    assert s["largest_lesion_ml"] == pytest.approx(max(x["volume_ml"] for x in lesions), abs=1e-4)
    assert s["spine_involved"] is True and s["soft_tissue_involved"] is True
    assert s["spine_in_view"] is False and summarise(lesions, ["femur_left", "vertebra_L3"])["spine_in_view"] is True
    assert s["symmetric_pairs"] == [[1, 2], [3, 4]]
    table = {row["site"]: row for row in site_table(lesions)}
    assert table["femur_left"]["lesion_count"] == 2 and table["femur_left"]["lesion_ids"] == [1, 4]
    assert table["soft_tissue"]["lesion_count"] == 2
    assert list(table)[-1] == "soft_tissue"
    assert table["femur_left"]["volume_ml"] == pytest.approx(measured[1]["volume_ml"] + measured[4]["volume_ml"])


def test_each_lesion_in_at_most_one_pair():
    def les(i, site, z):
        return {"id": i, "site": site, "region": "lower_limb", "subregion": "metaphysis_distal", "volume_ml": 1.0,
                "centroid_ras_mm": [0.0, 0.0, z], "soft_tissue_extension": False}
    lesions = [les(1, "tibia_left", 10.0), les(2, "tibia_right", 12.0), les(3, "tibia_right", 50.0),
               les(4, "tibia_left", 49.0), les(5, "tibia_left", 90.0)]
    assert summarise(lesions, [])["symmetric_pairs"] == [[1, 2], [3, 4]]
    assert summarise([], [])["largest_lesion_ml"] is None


def test_sites_in_view(scene):
    vox_ml = SPACING["x"] * SPACING["y"] * SPACING["z"] / 1000
    codes = sites_in_view(scene["sites"], vox_ml)
    assert codes == ["vertebra_L3", "clavicle_left", "femur_left", "femur_right", "patella_left"]
    assert "patella_left" not in sites_in_view(scene["sites"], vox_ml, min_ml=5.0)


@pytest.mark.parametrize("fov", ["knees", "pelvis"])
def test_noise_warning_only_beyond_the_phantoms_noise(fov):
    """A phantom drawn at the least SNR the model was trained on (12) is not called noisy; one at 4 is."""
    from inference.postprocess import MIN_SNR, estimate_snr
    from training.config import SynthConfig, load_config
    from training.phantom.generate import generate_case
    estimates = {}
    for snr in (12, 4):
        cfg = load_config(SynthConfig, None, ["anatomy_mm=4", "acquisition.oblique_p=0", f"acquisition.snr=[{snr}, {snr}]",
                                              "acquisition.sequence_p={stir: 1}"])
        case = generate_case(3, cfg, fov=fov)
        spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
        estimates[snr] = estimate_snr(case.image.astype(np.float32), spacing)
    assert estimates[12] > MIN_SNR > estimates[4], estimates


def test_study_warnings(scene):
    sp = (2.0, 3.0, 2.5)
    assert study_warnings(scene["image"], scene["sites"], scene["lesions"], sp) == []
    rng = np.random.default_rng(1)

    def magnitude(sigma: float) -> np.ndarray:
        """The scene as a magnitude image with complex Gaussian noise (Rician, as MRI gives)."""
        real, imag = (rng.normal(0, sigma, scene["image"].shape) for _ in range(2))
        return np.hypot(scene["image"] + real, imag).astype(np.float32)

    # muscle 0.5: SNR as the phantom draws it (2 x muscle / sigma) 25 (in its range 12-40) and 4 (far below)
    assert study_warnings(magnitude(0.04), scene["sites"], scene["lesions"], sp) == []
    warn = study_warnings(magnitude(0.25), scene["sites"], scene["lesions"], sp)
    assert len(warn) == 1 and "noisy" in warn[0]
    edge = scene["lesions"].copy()
    edge[0, 5:8, 5:8] = 11
    warn = study_warnings(scene["image"], np.zeros_like(scene["sites"]), edge, (1.0, 3.0, 8.0))
    text = " ".join(warn)
    assert "No bone" in text and "Lesion(s) 11" in text and "8.0 mm" in text and "In-plane" in text
    assert border_lesions(edge) == [11]
    offset = study_warnings(scene["image"] + 50.0, scene["sites"], scene["lesions"], sp)
    assert len(offset) == 1 and "background is not dark" in offset[0]  # and the SNR is judged without the offset


def test_signal_ratios_ignore_cortex_and_air():
    """A thin bone whose dark cortex is most of its voxels, just under the skin: the references must still be
    marrow (1.0) and muscle (0.5), not cortex (0.2) or air (0)."""
    shape = (41, 41, 41)
    X, Y, Z = np.indices(shape, dtype=float)        # 1 mm voxels, RAS, origin 0
    r2 = (X - 20) ** 2 + (Y - 20) ** 2
    sites = np.where(r2 <= 36, by_code()["fibula_left"].id, 0).astype(np.uint8)
    assert np.count_nonzero((r2 > 12.25) & (r2 <= 36)) > 0.5 * np.count_nonzero(sites)
    image = np.where((np.abs(X - 20) <= 9) & (np.abs(Y - 20) <= 9), 0.5, 0.0).astype(np.float32)
    image[sites > 0] = 0.2
    image[r2 <= 12.25] = 1.0
    lesions = np.zeros(shape, np.uint16)
    lesions[(r2 <= 6) & (Z >= 15) & (Z <= 25)] = 1
    image[lesions > 0] = 2.0
    les = measure_lesions(lesions, sites, image, np.eye(4), None, {1: 0.8})[0]
    assert les["site"] == "fibula_left"
    assert les["signal_ratio_marrow"] == pytest.approx(2.0, rel=0.01)
    assert les["signal_ratio_muscle"] == pytest.approx(4.0, rel=0.01)


def test_lesions_darker_than_marrow_and_muscle_are_not_hyperintense(fibula):
    """Three lesions in a fibula (marrow 1.0, muscle 0.5): bright (2.0), between the references (0.7) and dark
    (0.4). Only the dark one is below both references; a lesion far out in air has no muscle reference and is kept."""
    lesions, sites, image = fibula
    measured = measure_lesions(lesions, sites, image, np.eye(4), None, {1: 0.9, 2: 0.9, 3: 0.9})
    assert [round(les["signal_ratio_marrow"], 2) for les in measured] == [2.0, 0.7, 0.4]
    assert not_hyperintense(measured, 1.0) == [3]
    assert not_hyperintense(measured, 0.0) == []
    assert not_hyperintense(measured, 5.0) == [1, 2, 3]  # lesion 1: 2.0x marrow, 4.0x muscle
    assert not_hyperintense([{"id": 7, "signal_ratio_marrow": 0.2, "signal_ratio_muscle": None}], 1.0) == []


def test_measure_hyperintense_drops_the_dark_lesion_and_renumbers_the_rest(fibula):
    lesions, sites, image = fibula
    lesions[lesions == 2] = 5  # ids need not be 1..K
    kept, conf, items = measure_hyperintense(lesions, sites, image, np.eye(4), None, {1: 0.91, 3: 0.93, 5: 0.95},
                                             1.0)
    assert np.array_equal(kept > 0, (lesions == 1) | (lesions == 5))
    assert [les["id"] for les in items] == [1, 2] and conf == {1: 0.91, 2: 0.95}
    assert np.array_equal(kept[lesions == 5], np.full(np.count_nonzero(lesions == 5), 2))
    every, _, items = measure_hyperintense(lesions, sites, image, np.eye(4), None, {1: 0.9, 3: 0.9, 5: 0.9}, 0.0)
    assert len(items) == 3 and np.array_equal(np.unique(every), [0, 1, 2, 3])


def test_a_study_measures_each_lesion_map_as_if_alone(scene, fibula):
    """One Study serves several lesion maps (validation measures many selections of one case): each is measured as
    measure_lesions measures it alone, whatever was measured before (marrow medians leave out that map's lesions)."""
    args = scene["sites"], scene["image"], scene["affine"], scene["physis"]
    few = np.where(scene["lesions"] <= 3, scene["lesions"], 0).astype(scene["lesions"].dtype)
    study = Study(*args)
    for lesions in (scene["lesions"], few, scene["lesions"]):
        conf = {int(i): CONF[int(i)] for i in np.unique(lesions) if i}
        assert study.measure(lesions, conf) == measure_lesions(lesions, *args[:3], args[3], conf)
    # a lesion ringed by another has no local marrow, so its bone's whole clean marrow is the reference: the
    # upper marrow (1.6) when the ring lesion covers the lower bone, the lower (1.0) when it covers the upper
    lesions, sites, image = fibula
    image = image.copy()
    Z = np.indices(lesions.shape)[2]
    image[(sites > 0) & (Z >= 30)] = 1.6
    inner = lesions == 2
    below, above = (sites > 0) & (Z < 56), (sites > 0) & (Z >= 3)  # beyond the 20 mm ring: no local marrow
    maps = [np.where(inner, 2, np.where(ring, 1, 0)).astype(np.uint16) for ring in (below, above, below)]
    study = Study(sites, image, np.eye(4), None)
    ratios = []
    for lesion_map in maps:
        alone = measure_lesions(lesion_map, sites, image, np.eye(4), None, {1: 0.9, 2: 0.9})
        assert study.measure(lesion_map, {1: 0.9, 2: 0.9}) == alone
        ratios.append(alone[1]["signal_ratio_marrow"])
    assert ratios == [pytest.approx(0.7 / 1.6, abs=1e-3), pytest.approx(0.7, abs=1e-3), ratios[0]]
    with pytest.raises(ValueError, match="the study's shape"):
        study.measure(lesions[:-1], {})


def test_lesion_across_two_bones_goes_to_the_majority(scene):
    X, Y, Z = scene["X"], scene["Y"], scene["Z"]
    lesions = np.zeros_like(scene["lesions"])
    lesions[box(X, Y, Z, (-44, -36), (5, 16), (42, 48))] = 1     # two rows in the femur, one in the patella
    sv = scene["sites"][lesions == 1]
    assert np.count_nonzero(sv == by_code()["femur_left"].id) > np.count_nonzero(sv == by_code()["patella_left"].id) > 0
    out = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], scene["physis"], {1: 0.9})
    assert out[0]["site"] == "femur_left"


def _limb(shape, code, z0, z1, lesion_z, extra=None):
    """A 1 mm RAS grid with one long bone along S-I (x = y = 15, radius 4), an optional extra bone box and a lesion."""
    X, Y, Z = np.indices(shape, dtype=float)
    sites = np.zeros(shape, np.uint8)
    sites[((X - 15) ** 2 + (Y - 15) ** 2 <= 16) & (Z >= z0) & (Z <= z1)] = by_code()[code].id
    if extra:
        sites[box(X, Y, Z, *extra[1])] = by_code()[extra[0]].id
    lesions = np.zeros(shape, np.uint16)
    lesions[((X - 15) ** 2 + (Y - 15) ** 2 <= 9) & (Z >= lesion_z[0]) & (Z <= lesion_z[1])] = 1
    image = np.where(sites > 0, 1.0, 0.5).astype(np.float32)
    image[lesions > 0] = 2.0
    return measure_lesions(lesions, sites, image, np.eye(4), None, {1: 0.9})[0]


def test_proximal_end_follows_the_neighbouring_bone():
    """Arm raised above the head: the shoulder (scapula) is below the humerus, so its upper end is distal."""
    shape = (30, 30, 60)
    assert _limb(shape, "humerus_left", 10, 55, (46, 49))["subregion"] == "metaphysis_proximal"
    raised = _limb(shape, "humerus_left", 10, 55, (46, 49), ("scapula_left", ((5, 25), (5, 25), (2, 6))))
    assert raised["subregion"] == "metaphysis_distal"


def test_bone_cut_by_the_field_of_view():
    """A knee study: the femur leaves the image at the top, so fractions come from twice its visible length."""
    les = _limb((30, 30, 60), "femur_left", 5, 59, (20, 24))
    assert les["subregion"] == "metaphysis_distal"
    assert _limb((30, 30, 80), "femur_left", 5, 64, (20, 24))["subregion"] == "diaphysis"   # whole bone seen


def test_marrow_reference_is_the_marrow_next_to_the_lesion():
    """Red (bright) marrow around the lesion, yellow (dark) marrow in the rest of the bone: the reference is the
    adjacent marrow, as a reader's ROI would be, not the whole bone's median."""
    shape = (30, 30, 120)
    X, Y, Z = np.indices(shape, dtype=float)
    r2 = (X - 15) ** 2 + (Y - 15) ** 2
    sites = np.where((r2 <= 64) & (Z >= 5) & (Z <= 114), by_code()["tibia_right"].id, 0).astype(np.uint8)
    image = np.where(sites > 0, 0.4, 0.5).astype(np.float32)
    image[(sites > 0) & (Z >= 80)] = 1.0                    # red marrow in the upper (proximal) third
    lesions = np.zeros(shape, np.uint16)
    lesions[(r2 <= 16) & (Z >= 95) & (Z <= 100)] = 1
    image[lesions > 0] = 2.0
    les = measure_lesions(lesions, sites, image, np.eye(4), None, {1: 0.8})[0]
    assert les["signal_ratio_marrow"] == pytest.approx(2.0, rel=0.01)      # not 2.0 / 0.4 = 5


def test_apophysis_counts_as_epiphysis():
    """A greater-trochanter-like bump beside the shaft, cut off by its own physis running along the bone: a
    lesion in it lies beyond that physis (epiphysis_proximal), though its level along the bone is metaphyseal."""
    shape = (40, 30, 120)
    X, Y, Z = np.indices(shape, dtype=float)
    shaft = ((X - 15) ** 2 + (Y - 15) ** 2 <= 16) & (Z >= 5) & (Z <= 114)
    bump = (np.abs(X - 15) >= 5) & (np.abs(X - 15) <= 11) & (np.abs(Y - 15) <= 3) & (Z >= 85) & (Z <= 97)
    sites = np.where(shaft | bump, by_code()["femur_left"].id, 0).astype(np.uint8)   # two bumps: axis stays on z
    physis = (shaft & (Z >= 104) & (Z <= 105)) | (bump & (np.abs(X - 15) == 5))
    lesions = np.zeros(shape, np.uint16)
    lesions[(X >= 22) & (X <= 25) & (np.abs(Y - 15) <= 2) & (Z >= 88) & (Z <= 94)] = 1
    lesions[((X - 15) ** 2 + (Y - 15) ** 2 <= 9) & (Z >= 88) & (Z <= 94)] = 2     # same level, in the shaft
    image = np.where(sites > 0, 1.0, 0.5).astype(np.float32)
    out = measure_lesions(lesions, sites, image, np.eye(4), physis, {1: 0.9, 2: 0.9})
    assert (out[0]["subregion"], out[0]["juxtaphyseal"]) == ("epiphysis_proximal", True)
    assert out[1]["subregion"] == "metaphysis_proximal"


@pytest.mark.parametrize("stray", [((0, 29), (0, 29), (0, 1)), ((0, 3), (0, 3), (0, 59)), ((25, 29), (25, 29), (0, 8))])
def test_stray_site_voxels_do_not_move_the_bone_axis(stray):
    """Pieces the network labelled femur far from the femur (noisy partial views) must not tilt or stretch its axis:
    each of these strays changed the subregion before the axis came from the largest piece only."""
    clean = _limb((30, 30, 60), "femur_left", 10, 55, (46, 49))
    assert clean["subregion"] == "metaphysis_proximal"
    assert _limb((30, 30, 60), "femur_left", 10, 55, (46, 49), ("femur_left", stray))["subregion"] == clean["subregion"]


def _lower_leg(lesion_centre: tuple[float, float], lesion_r: float, oriented: bool) -> dict:
    """A 1.5 mm lower leg along S-I: tibia (radius 10 mm) and fibula (radius 5 mm, 25 mm lateral), a lesion of
    radius ``lesion_r`` at (x, y) ``lesion_centre`` over z 60-80 mm whose voxels the site map calls tibia, as the
    network does when edema in the fibula pulls the label to its thick neighbour."""
    n = (60, 44, 100)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    if oriented:  # voxel axes S->I, P->A, L->R
        aff = np.array([[0, 0, 1.5, 0], [0, 1.5, 0, 0], [-1.5, 0, 0, 148.5], [0, 0, 0, 1]])
        n = (n[2], n[1], n[0])
    X, Y, Z = world_grid(aff, n)
    tibia, fibula = by_code()["tibia_left"].id, by_code()["fibula_left"].id
    sites = np.zeros(n, np.uint8)
    sites[((X - 30) ** 2 + (Y - 33) ** 2 <= 100) & (Z >= 10) & (Z <= 140)] = tibia
    sites[((X - 55) ** 2 + (Y - 30) ** 2 <= 25) & (Z >= 15) & (Z <= 140)] = fibula
    lesions = np.zeros(n, np.uint16)
    lesion = ((X - lesion_centre[0]) ** 2 + (Y - lesion_centre[1]) ** 2 <= lesion_r ** 2) & (Z >= 60) & (Z <= 80)
    lesions[lesion & (sites > 0)] = 1
    sites[lesion & (sites > 0)] = tibia
    image = np.where(sites > 0, 0.4, 0.5).astype(np.float32)
    image[lesions > 0] = 1.5
    return measure_lesions(lesions, sites, image, aff, None, {1: 0.9})[0]


@pytest.mark.parametrize("oriented", [False, True])
def test_fibula_lesion_labelled_tibia_goes_to_the_fibula(oriented):
    les = _lower_leg((55, 30), 5.0, oriented)
    assert les["site"] == "fibula_left"
    assert 0 < les["bone_fraction"] <= 1


@pytest.mark.parametrize("centre", [(30, 33), (38, 33)])   # the middle and the lateral edge of the tibia
def test_tibia_lesion_stays_in_the_tibia(centre):
    assert _lower_leg(centre, 4.0, False)["site"] == "tibia_left"



def _arm_and_thigh(humerus_x: float, humerus_left_under: bool, oriented: bool = False,
                   whole_humerus_femur: bool = False) -> dict:
    """A 2 mm scene: a femur (radius 8 mm at x = 30) and a humerus (radius 6 mm at x = ``humerus_x``), both along
    S-I, and a lesion filling the humerus over z 90-110 mm whose voxels the site map calls femur, but for a
    rim of humerus when ``humerus_left_under``: edema pulling the site map to a bone elsewhere. With
    ``whole_humerus_femur`` the site map calls all of the humerus femur."""
    n = (70, 30, 80)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    if oriented:  # voxel axes S->I, R->L, A->P
        aff = np.array([[0, -2.0, 0, 138.0], [0, 0, -2.0, 58.0], [-2.0, 0, 0, 158.0], [0, 0, 0, 1]])
        n = (n[2], n[0], n[1])
    X, Y, Z = world_grid(aff, n)
    femur, humerus = by_code()["femur_left"].id, by_code()["humerus_left"].id
    sites = np.zeros(n, np.uint8)
    sites[((X - 30) ** 2 + (Y - 30) ** 2 <= 64) & (Z >= 10) & (Z <= 150)] = femur
    r2 = (X - humerus_x) ** 2 + (Y - 30) ** 2
    sites[(r2 <= 36) & (Z >= 40) & (Z <= 150)] = humerus
    lesion = (sites == humerus) & (Z >= 90) & (Z <= 110)
    sites[lesion & (r2 <= 25 if humerus_left_under else True)] = femur
    if whole_humerus_femur:
        sites[sites == humerus] = femur
    image = np.where(sites > 0, 0.4, 0.2).astype(np.float32)
    image[lesion] = 1.2
    return measure_lesions(lesion.astype(np.uint16), sites, image, aff, None, {1: 0.9})[0]


@pytest.mark.parametrize("oriented", [False, True])
def test_lesion_in_a_far_stray_label_goes_to_its_own_bone(oriented):
    """A humerus lesion mostly labelled femur, 70 mm from the femur, is the humerus's."""
    assert _arm_and_thigh(110.0, True, oriented)["site"] == "humerus_left"


def test_lesion_with_only_stray_labels_goes_to_the_bone_around_it():
    """All of the lesion's voxels labelled femur, 70 mm from the femur: the humerus above and below it names it."""
    assert _arm_and_thigh(110.0, False)["site"] == "humerus_left"


def test_stray_rule_keeps_the_majority_without_another_bone():
    """The whole humerus labelled femur: no bone of another label within reach, so the majority stands."""
    assert _arm_and_thigh(110.0, False, whole_humerus_femur=True)["site"] == "femur_left"


def test_a_piece_near_its_bone_is_not_a_stray_label():
    """The same lesion with the humerus 12 mm from the femur: a femur piece that close may be the femur's own
    (an epiphysis beyond its physis), so the majority stands."""
    assert _arm_and_thigh(52.0, True)["site"] == "femur_left"


def _chest(lesion_xy: tuple[float, float], label: str, levels: str = "T") -> dict:
    """A 3 mm scene: a column of vertebrae (``levels`` T4-T9 or L1-L5 stacked along S-I, 30 mm blocks at x = 0,
    y = 0) and a lesion (a 12 mm cube at ``lesion_xy``, z 80-92 mm) whose voxels the site map calls ``label``,
    with no sternum in the map: the bone channel's blind spot."""
    n = (41, 51, 61)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-60.0, -30.0, 0.0]
    X, Y, Z = world_grid(aff, n)
    sites = np.zeros(n, np.uint8)
    names = [f"vertebra_T{i}" for i in range(4, 10)] if levels == "T" else [f"vertebra_L{i}" for i in range(1, 6)]
    for k, code in enumerate(reversed(names)):
        sites[(np.abs(X) <= 12) & (np.abs(Y) <= 12) & (Z >= 30 * k) & (Z < 30 * k + 27)] = by_code()[code].id
    lesion = (np.abs(X - lesion_xy[0]) <= 6) & (np.abs(Y - lesion_xy[1]) <= 6) & (Z >= 80) & (Z <= 92)
    sites[lesion] = by_code()[label].id
    image = np.where(sites > 0, 0.4, 0.2).astype(np.float32)
    image[lesion] = 1.2
    return measure_lesions(lesion.astype(np.uint16), sites, image, aff, None, {1: 0.9})[0]


@pytest.mark.parametrize("label", ["clavicle_right", "vertebra_T6", "ribs_left"])
def test_midline_lesion_in_front_of_the_thoracic_spine_is_sternal(label):
    les = _chest((3.0, 90.0), label)
    assert (les["site"], les["side"], les["region"]) == ("sternum", "midline", "chest_wall")
    assert les["bone_fraction"] is None and les["extension_grade"] is None  # no sternum in the map to measure against


@pytest.mark.parametrize("xy, label, levels", [((30.0, 90.0), "clavicle_right", "T"),   # beside the midline
                                               ((3.0, 20.0), "vertebra_T6", "T"),       # at the spine
                                               ((3.0, 90.0), "vertebra_L3", "L")])      # not the chest
def test_other_lesions_are_not_sternal(xy, label, levels):
    assert _chest(xy, label, levels)["site"] == label


@pytest.mark.parametrize("medial_lesion", [True, False])
def test_a_lesion_on_a_piece_of_a_broken_clavicle_keeps_the_clavicle(medial_lesion):
    """The bone channel breaks a thin bone into pieces on the 3 mm grid: a clavicle mapped as a medial piece and a
    larger lateral one 45 mm apart, a rib 12 mm below the medial piece. A lesion on either piece is the
    clavicle's (as a one-piece bone, the medial piece was a stray label and the lesion went to the rib)."""
    n = (61, 21, 31)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-150.0, -30.0, 0.0]
    X, Y, Z = world_grid(aff, n)
    clavicle, rib = by_code()["clavicle_left"].id, by_code()["ribs_left"].id
    sites = np.zeros(n, np.uint8)
    rod = (np.abs(Y) <= 4) & (np.abs(Z - 60) <= 4)
    sites[rod & (X >= -30) & (X <= -6)] = clavicle          # medial piece
    sites[rod & (X >= -135) & (X <= -75)] = clavicle        # lateral piece, the largest
    sites[(np.abs(Y) <= 4) & (np.abs(Z - 45) <= 3) & (X >= -40) & (X <= 0)] = rib
    lesion = rod & ((X >= -27) & (X <= -15) if medial_lesion else (X >= -120) & (X <= -100))
    image = np.where(sites > 0, 0.4, 0.2).astype(np.float32)
    image[lesion] = 1.2
    les = measure_lesions(lesion.astype(np.uint16), sites, image, aff, None, {1: 0.9})[0]
    assert les["site"] == "clavicle_left"


def test_level_warning_names_the_vertebral_lesions_and_where_the_count_started():
    lesions = [{"id": 1, "site": "femur_left"}, {"id": 2, "site": "vertebra_T7"}, {"id": 3, "site": "vertebra_L2"}]
    assert level_warning((True, True), lesions) is None            # both ends in view: the count is anchored
    assert level_warning(None, lesions) is None                    # no spine in the map
    assert level_warning((False, False), lesions[:1]) is None      # no vertebral lesion
    up = level_warning((False, True), lesions)
    assert up.startswith("Lesions 2, 3 are named") and "counted up from the sacrum" in up
    down = level_warning((True, False), lesions[1:2])
    assert down.startswith("Lesion 2 is named") and "counted down from C1" in down
    assert "neither C1 nor the sacrum" in level_warning((False, False), lesions)


def test_a_vertebral_lesion_split_evenly_is_named_for_its_body_as_before():
    """The majority subregion on a tie: the vertebral body (wbmri 0.2.16's rule), then the posterior elements."""
    from models.measure import _subregions

    class Cut:  # a vertebra whose body lies in front of y = 0
        def vertebral_body_cut(self, sid):
            return 0.0

    level = by_code()["vertebra_L1"]
    assert _subregions(Cut(), level, np.array([[0, 1.0, 0], [0, -1.0, 0]])) == ["vertebral_body", "posterior_elements"]
    assert _subregions(Cut(), level, np.array([[0, 1.0, 0], [0, -1, 0], [0, -2, 0]]))[0] == "posterior_elements"


def test_a_lesion_lying_on_the_growth_plate_has_a_high_physis_fraction(scene):
    X, Y, Z = scene["X"], scene["Y"], scene["Z"]
    lesions = np.zeros_like(scene["lesions"])
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (19, 26))] = 1     # on the distal physis (20-24)
    lesions[box(X, Y, Z, (-44, -36), (-4, 4), (32, 42))] = 2     # above it
    out = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], scene["physis"], {1: 0.9, 2: 0.9})
    assert out[0]["physis_fraction"] > 0.5 and out[1]["physis_fraction"] == 0.0
    alone = measure_lesions(lesions, scene["sites"], scene["image"], scene["affine"], None, {1: 0.9, 2: 0.9})
    assert alone[0]["physis_fraction"] is None  # no physis mask: unknown


def test_a_sheared_grid_reports_each_lesion_volume_as_its_voxel_count_times_the_voxel_volume(scene):
    """A sheared affine's voxel is smaller than the product of its edge lengths: volume_ml is count x |det|, as
    wbmri evaluate and the predictor count it (it was the edges' product: +4% at a shear of 0.3)."""
    shear = np.eye(4)
    shear[0, 2] = 0.3
    affine = shear @ scene["affine"]
    out = measure_lesions(scene["lesions"], scene["sites"], scene["image"], affine, scene["physis"], CONF)
    det_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    for les in out:
        n = int((scene["lesions"] == les["id"]).sum())
        assert les["volume_ml"] == pytest.approx(n * det_ml, abs=1e-4)


def test_a_stray_neighbour_label_inside_a_bone_does_not_swap_its_ends():
    """The end of a femur nearer its pelvis is proximal. A small stray "ischium" label inside the lower shaft (as the
    network leaves in knee views) says nothing of that: the distal metaphyseal lesion stays distal. An ischium
    beyond the lower end, though, still makes that end proximal (the rule is still used)."""
    scene = build_scene(oriented=False)
    X, Y, Z = scene["X"], scene["Y"], scene["Z"]

    def subregion(sites):
        out = measure_lesions(scene["lesions"], sites, scene["image"], scene["affine"], scene["physis"], CONF)
        return {les["id"]: les["subregion"] for les in out}[1]

    assert subregion(scene["sites"]) == "metaphysis_distal"
    stray = scene["sites"].copy()
    stray[box(X, Y, Z, (-44, -36), (-4, 4), (60, 75)) & (stray == by_code()["femur_left"].id)] = \
        by_code()["ischium_left"].id
    assert subregion(stray) == "metaphysis_distal"
    below = scene["sites"].copy()
    below[box(X, Y, Z, (-60, -50), (-6, 6), (-20, -10))] = by_code()["ischium_left"].id
    assert subregion(below) == "metaphysis_proximal"
