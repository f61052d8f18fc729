"""The phantom: determinism, grids, vocabulary, lesions in bone, planner frequencies, nnU-Net layout, FOV/headers."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from models.sites import all_sites, by_code, site_id
from training.config import ConfigError, LesionConfig, SynthConfig, load_config
from training.phantom.generate import GENERATOR_1_6_SETTINGS, generate_case, synth_dataset, write_case
from training.phantom.lesions import PELVIS, plan_lesions


@pytest.fixture(scope="module")
def whole_body(tmp_path_factory):
    cfg = load_config(SynthConfig, None, ["acquisition.oblique_p=0", "lesions.none_p=0", "lesions.count_mean=10"])
    case = generate_case(7, cfg, fov="whole_body")
    folder = write_case(case, tmp_path_factory.mktemp("wb") / case.name)
    return case, folder


def test_same_seed_same_case():
    cfg = load_config(SynthConfig, None, ["anatomy_mm=3"])
    a, b = generate_case(11, cfg, fov="knees"), generate_case(11, cfg, fov="knees")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.sites, b.sites) and np.array_equal(a.lesions, b.lesions)
    assert np.allclose(a.affine, b.affine)
    c = generate_case(12, cfg, fov="knees")
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_files_share_one_grid_and_dtypes(whole_body):
    _, folder = whole_body
    imgs = {k: nib.load(str(folder / f"{k}.nii.gz")) for k in ("image", "sites", "lesions")}
    shapes = {k: v.shape for k, v in imgs.items()}
    assert len(set(shapes.values())) == 1, shapes
    for k in ("sites", "lesions"):
        assert np.allclose(imgs[k].affine, imgs["image"].affine)
    assert imgs["sites"].get_data_dtype() == np.uint8
    assert imgs["lesions"].get_data_dtype() == np.uint16
    meta = json.loads((folder / "case.json").read_text())
    for key in ("age_years", "sex", "height_cm", "acquisition", "lesions"):
        assert key in meta
    assert 3 <= meta["age_years"] <= 17


def test_every_vocabulary_site_in_a_whole_body_case(whole_body):
    case, _ = whole_body
    present = set(np.unique(case.sites).tolist()) - {0}
    vocab = {s.id for s in all_sites()}
    assert present <= vocab
    missing = sorted(by_code()[c].code for c in [s.code for s in all_sites()] if by_code()[c].id not in present)
    assert not missing, f"sites absent from a whole-body case: {missing}"


def test_lesions_lie_in_bone_except_soft_tissue_part(whole_body):
    case, _ = whole_body
    assert case.lesions.max() > 0
    for les in case.meta["lesions"]:
        vox = case.lesions == les["id"]
        if not vox.any():
            continue
        in_bone = (case.sites[vox] > 0).mean()
        if les["soft_tissue"] or les["periosteal"]:
            assert in_bone > 0.2, les
        else:
            assert in_bone == 1.0, les
        # the majority site is the planned one
        ids, counts = np.unique(case.sites[vox & (case.sites > 0)], return_counts=True)
        assert by_code()[les["site"]].id == ids[counts.argmax()], les


def test_planner_frequencies_within_configured_ranges():
    cfg = LesionConfig()
    plans = [plan_lesions(np.random.default_rng([s, 1]), cfg) for s in range(200)]
    lesional = [(p, l) for p, l in plans if l]
    n = len(lesional)
    none_share = 1 - n / len(plans)
    assert abs(none_share - cfg.none_p) < 0.1

    def share(pred):
        return sum(1 for _, l in lesional if any(pred(x) for x in l)) / n

    longs = [x for _, l in lesional for x in l if x.subregion and x.subregion.split("_")[0] in ("metaphysis", "epiphysis", "diaphysis")]
    observed = {
        "tibia": share(lambda x: x.bone == "tibia"), "femur": share(lambda x: x.bone == "femur"),
        "clavicle": share(lambda x: x.bone == "clavicle"), "vertebra": share(lambda x: x.bone == "vertebra"),
        "pelvis": share(lambda x: x.bone in PELVIS),
        "metaphysis_share": sum(x.subregion.startswith("metaphysis") for x in longs) / len(longs),
        "bilateral": sum(1 for _, l in lesional if any(x.mirror_of for x in l)) / n,
        "tibio_appendicular": sum(p == "tibio_appendicular" for p, _ in lesional) / n,
        "claviculo_spinal": sum(p == "claviculo_spinal" for p, _ in lesional) / n,
    }
    for key, (lo, hi) in cfg.expected.items():
        assert lo <= observed[key] <= hi, f"{key}: {observed[key]:.3f} outside [{lo}, {hi}]"
    counts = [len(l) for _, l in lesional]
    assert 1 <= min(counts) and max(counts) <= cfg.count_max


def test_nnunet_layout(tmp_path):
    synth_dataset(2, tmp_path, seed=3, overrides=["fov.p={knees: 1.0}", "anatomy_mm=3"])
    ds = json.loads((tmp_path / "dataset.json").read_text())
    assert ds["numTraining"] == 2 and ds["labels"] == {"background": 0, "edema": 1}
    assert ds["channel_names"] == {"0": "STIR"} and ds["file_ending"] == ".nii.gz"
    for name in ("case_000003", "case_000004"):
        img = nib.load(str(tmp_path / "imagesTr" / f"{name}_0000.nii.gz"))
        lab = nib.load(str(tmp_path / "labelsTr" / f"{name}.nii.gz"))
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1}
        sites = nib.load(str(tmp_path / "sitesTr" / f"{name}.nii.gz"))
        physis = nib.load(str(tmp_path / "physisTr" / f"{name}.nii.gz"))
        assert sites.shape == img.shape and physis.shape == img.shape
    # the folder is a complete training set: every head gets its target (none masked as unknown)
    from training.data import UNKNOWN, load_npz, nnunet_cases
    cached_paths = nnunet_cases(tmp_path, (6.0, 6.0, 6.0), tmp_path / "cache")
    cached = [load_npz(p) for p in cached_paths]
    assert len(cached) == 2
    for case in cached:
        assert (case["sites"] > 0).any() and not (case["sites"] == UNKNOWN).any()
        assert not (case["physis"] == UNKNOWN).any()
    # another grid gets its own cache; an edited label is cached again, an unchanged case is not
    coarse = nnunet_cases(tmp_path, (8.0, 8.0, 8.0), tmp_path / "cache")
    assert coarse[0].parent != cached_paths[0].parent and load_npz(coarse[0])["image"].shape != cached[0]["image"].shape
    parallel = nnunet_cases(tmp_path, (8.0, 8.0, 8.0), tmp_path / "cache2", workers=2)
    assert [p.name for p in parallel] == [p.name for p in coarse]
    for a, b in zip(parallel, coarse):  # two processes cache exactly what one does
        x, y = load_npz(a), load_npz(b)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert cached[0]["edema"].any(), "the test needs a case with edema"
    label = tmp_path / "labelsTr" / "case_000003.nii.gz"
    img = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(label))
    before = {p: p.stat().st_mtime_ns for p in cached_paths}
    again = nnunet_cases(tmp_path, (6.0, 6.0, 6.0), tmp_path / "cache")
    assert again == cached_paths and not load_npz(again[0])["edema"].any()
    assert again[1].stat().st_mtime_ns == before[again[1]]
    # the set is extended by a later run with the same settings (a setting added since, at its default, counts as
    # the same), and refused with other settings
    del ds["config"]["lesions"]["muscle_floor"]
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    synth_dataset(1, tmp_path, seed=5, overrides=["fov.p={knees: 1.0}", "anatomy_mm=3"])
    ds = json.loads((tmp_path / "dataset.json").read_text())
    assert (ds["numTraining"], ds["first_seed"]) == (3, 3)
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == [f"case_00000{i}.nii.gz" for i in (3, 4, 5)]
    with pytest.raises(ValueError, match=r"other settings \(fov.p.feet, fov.p.knees\)"):
        synth_dataset(1, tmp_path, seed=6, overrides=["fov.p={feet: 1.0}", "anatomy_mm=3"])
    assert not (tmp_path / "cases" / "case_000006").exists()


@pytest.mark.parametrize("fov", ["pelvis", "knees", "feet", "spine", "legs"])
def test_partial_fields_of_view(fov):
    cfg = load_config(SynthConfig, None, ["anatomy_mm=3"])
    part = generate_case(21, cfg, fov=fov)
    assert part.meta["acquisition"]["fov"] == fov
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in part.image.shape])).reshape(3, -1)
    z_extent = np.ptp((part.affine[:3, :3] @ corners + part.affine[:3, 3:])[2])
    assert z_extent < 0.75 * part.meta["height_cm"] * 10
    assert part.sites.max() > 0


def test_oblique_and_reoriented_headers():
    cfg = load_config(SynthConfig, None, ["acquisition.oblique_p=1", "acquisition.oblique_max_deg=12", "anatomy_mm=3"])
    codes, oblique = set(), False
    for seed in range(30, 34):
        case = generate_case(seed, cfg, fov="knees")
        R = case.affine[:3, :3] / np.linalg.norm(case.affine[:3, :3], axis=0)
        oblique |= bool(np.abs(R).max(axis=0).min() < 0.9995)
        codes.add("".join(nib.aff2axcodes(case.affine)))
    assert oblique
    assert len(codes) >= 2 and codes != {"RAS"}


def test_bright_physes_and_dark_fat(whole_body):
    """STIR contrast: growth plates brighter than marrow on average; lesions brighter than their bone's marrow."""
    case, _ = whole_body
    img = case.image.astype(np.float32)
    phys = case.physis.astype(bool)
    bone = case.sites > 0
    if case.meta["physis_open"] > 0.3:
        assert np.median(img[phys]) > np.median(img[bone & ~phys & (case.lesions == 0)])
    les = case.lesions > 0
    assert np.median(img[les]) > np.median(img[bone & ~les])


def test_contrast_gamma_bends_the_randomised_tissue_means_and_keeps_their_order():
    from training.config import ContrastRandomisation, StirConfig
    from training.phantom.contrast import tissue_means
    from training.phantom.render import CSF, DISC, MUSCLE, PHYSIS, RED, YELLOW
    stir = StirConfig()
    flat = tissue_means(np.random.default_rng(3), stir, ContrastRandomisation(enabled=True, p=1.0, gamma=(1.0, 1.0)))
    bent = tissue_means(np.random.default_rng(3), stir, ContrastRandomisation(enabled=True, p=1.0, gamma=(2.0, 2.0)))
    for t in (MUSCLE, PHYSIS, DISC, CSF):  # tissues the fat-suppression rules do not clamp
        assert bent[t] == pytest.approx(flat[t] ** 2, rel=1e-5)
    assert bent[YELLOW] < bent[RED] < bent[CSF]
    with pytest.raises(ConfigError, match="gamma must be"):
        load_config(SynthConfig, None, ["contrast.gamma=[0, 1.2]"])


def test_muscle_floor_lifts_faint_edema_in_fatty_marrow_only_when_set():
    from training.phantom.contrast import apply_edema
    from training.phantom.render import CSF, MUSCLE, TISSUES
    lut = np.zeros(len(TISSUES), np.float32)
    lut[MUSCLE], lut[CSF] = 0.2, 1.0
    labels = np.zeros((12, 12, 12), np.uint16)
    labels[3:9, 3:9, 3:9] = 1
    edema = (labels > 0).astype(np.float32)
    inside = labels == 1

    def lesion_median(floor: float) -> float:
        img = np.full(labels.shape, 0.08, np.float32)  # dark fatty marrow
        out = apply_edema(img, edema, {1: 1.3}, labels, lut, np.random.default_rng(0), floor)
        return float(np.median(out[inside]))

    assert lesion_median(0.0) == pytest.approx(0.08 * 1.3, rel=0.03)  # the drawn ratio to marrow alone
    assert lesion_median(1.0) == pytest.approx(0.2 * (0.6 + 0.25 * 1.3), rel=0.03)  # muscle-level floor
    assert SynthConfig().lesions.muscle_floor == 1.0


@pytest.mark.parametrize("region", ["foot", "knee", "pelvis"])
def test_normal_marrow_foci_are_symmetric_left_right(region):
    from training.config import BodyConfig
    from training.phantom.contrast import MARROW_FOCUS_REGIONS, _region_ids, marrow_foci_gain, region_marrow
    from training.phantom.generate import draw_skeleton
    from training.phantom.render import tissue_in
    body, cv = draw_skeleton(4, BodyConfig(), 3.0)
    landmark, reach = MARROW_FOCUS_REGIONS[region].landmark, MARROW_FOCUS_REGIONS[region].reach
    marrow = region_marrow(cv, body, region)
    gain = np.ones(cv.shape, np.float32)
    gain[marrow] = marrow_foci_gain(cv, body, marrow, np.random.default_rng(9), 2.0, region)
    bright = gain > 1.0
    # each left-side voxel against the right-side voxel at the mirrored landmark-centred position
    left = np.argwhere(marrow & tissue_in(cv.sites, _region_ids(region, "left")))
    world = cv.origin + cv.spacing * left
    mirrored = (world - body.landmarks[f"{landmark}_left"]) * [-1, 1, 1] + body.landmarks[f"{landmark}_right"]
    j = np.round((mirrored - cv.origin) / cv.spacing).astype(int)
    inside = np.all((j >= 0) & (j < cv.shape), axis=1)
    left, j = left[inside], j[inside]
    both = marrow[tuple(j.T)]
    agree = bright[tuple(left[both].T)] == bright[tuple(j[both].T)]
    assert both.sum() > 50 and 0.05 < bright[marrow].mean() < 0.95  # there are foci, and normal marrow between them
    assert agree.mean() > 0.85, f"left and right {region} foci agree on only {agree.mean():.0%} of mirrored voxels"
    if reach is not None:  # near the landmark only: the knee's metaphyses, not the whole femur
        pts = cv.origin + cv.spacing * np.argwhere(marrow)
        near = np.minimum(*(np.linalg.norm(pts - body.landmarks[f"{landmark}_{s}"], axis=1) for s in ("left", "right")))
        assert near.max() <= reach * body.H + 1e-3


def test_knee_and_pelvic_foci_are_drawn_in_children_and_are_not_labelled():
    """Generator 1.9's knee and pelvic foci: bright normal marrow (the gain over the same case without them), never
    edema in the labels, recorded in case.json; with GENERATOR_1_8_SETTINGS the case is 1.8's, bit for bit."""
    from scipy.ndimage import binary_dilation
    from training.phantom.generate import GENERATOR_1_8_SETTINGS
    settings = ["mimics.knee_foci_p_under16=1", "mimics.pelvic_foci_p_under16=1", "lesions.none_p=1",
                "body.age_years=[8, 8]", "fov.p={whole_body: 1.0}", "acquisition.sequence_p={stir: 1}"]
    with_foci = generate_case(31, load_config(SynthConfig, None, settings))
    without = generate_case(31, load_config(SynthConfig, None, settings + list(GENERATOR_1_8_SETTINGS)))
    assert with_foci.meta["knee_foci"] and with_foci.meta["pelvic_foci"]
    assert not without.meta["knee_foci"] and not without.meta["pelvic_foci"]
    assert not with_foci.lesions.any() and np.array_equal(with_foci.sites, without.sites)
    ratio = with_foci.image.astype(np.float64) / np.maximum(without.image.astype(np.float64), 1e-3)
    bones = np.isin(with_foci.sites, [site_id(f"{b}_{s}") for b in ("femur", "tibia", "ilium", "ischium", "pubis")
                                      for s in ("left", "right")])
    assert (bones & (ratio > 1.2)).sum() > 20, "the foci brighten knee and pelvic marrow"
    near = binary_dilation(bones, iterations=2)  # the acquisition's blur spreads a focus by a voxel or two
    assert not (ratio[~near] > 1.2).any(), "and nothing else"


def test_cache_names_keep_their_digest_for_a_setting_added_at_its_default():
    import hashlib
    from training.data import phantom_cache_name, synth_digest
    cfg = load_config(SynthConfig, None, ["acquisition.sequence_p={t2_fs: 1}", "body.spine=uniform"])  # 1.4's cases
    before = json.loads(cfg.model_dump_json())
    del before["lesions"]["muscle_floor"]  # the config as written before the settings existed
    del before["body"]["spine"]
    for key in ("plane_p", "sequence_p", "dixon"):
        del before["acquisition"][key]
    assert synth_digest(cfg) == hashlib.sha256(json.dumps(before, separators=(",", ":")).encode()).hexdigest()[:8]
    for changed in ("lesions.muscle_floor=0", "acquisition.plane_p={coronal: 1, sagittal: 1}",
                    "acquisition.sequence_p={dixon_water: 1}", "acquisition.dixon.swap_p=0.5", "body.spine=graded"):
        other = load_config(SynthConfig, None, ["acquisition.sequence_p={t2_fs: 1}", "body.spine=uniform", changed])
        assert phantom_cache_name("pool", other, 1, (3, 3, 3)) != phantom_cache_name("pool", cfg, 1, (3, 3, 3))


def test_sagittal_and_axial_acquisitions_put_their_thick_slices_across_their_plane():
    from training.phantom.generate import generate_case
    thick_axis = {}
    for plane in ("coronal", "sagittal", "axial"):
        cfg = load_config(SynthConfig, None, ["anatomy_mm=4", f"acquisition.plane_p={{{plane}: 1}}",
                                              "acquisition.oblique_p=0", "acquisition.orientation_p={RAS: 1}",
                                              "acquisition.slice_mm=[6, 6]", "acquisition.inplane_mm=[2, 2]"])
        case = generate_case(3, cfg, fov="knees")
        assert case.meta["acquisition"]["plane"] == plane
        spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
        assert sorted(np.round(spacing, 3)) == [2.0, 2.0, 6.0]
        thick_axis[plane] = int(np.argmax(spacing))
    assert thick_axis == {"sagittal": 0, "coronal": 1, "axial": 2}   # R-L, A-P, S-I on a RAS grid
    with pytest.raises(ConfigError, match="plane_p"):
        load_config(SynthConfig, None, ["acquisition.plane_p={oblique: 1}"])
    with pytest.raises(ConfigError, match="plane_p needs"):
        load_config(SynthConfig, None, ["acquisition.plane_p={coronal: 0}"])


def test_t2_fs_alone_makes_generator_1_4_cases():
    """Generator 1.5 with sequence_p {t2_fs: 1} draws what 1.4 drew: twelve voxels, the image sum and the label
    sizes of an oblique knee view with patchy fat-suppression failure, as commit bff2f72 (generator 1.4) made it
    (generator 1.8 needs the settings of GENERATOR_1_6_SETTINGS, which hold 1.7's and 1.6's).
    A draw added to or taken from the acquisition stream changes the noise of every voxel by far more than the
    tolerance."""
    cfg = load_config(SynthConfig, None, ["anatomy_mm=4", "acquisition.oblique_p=0.5", "acquisition.fat_sat_failure_p=1",
                                          "acquisition.sequence_p={t2_fs: 1}", *GENERATOR_1_6_SETTINGS])
    case = generate_case(7, cfg, fov="knees")
    assert case.meta["acquisition"]["oblique"] and case.meta["acquisition"]["fat_sat_failure"]
    rng = np.random.default_rng(0)
    idx = tuple(rng.integers(0, n, 12) for n in case.image.shape)
    assert case.image[idx] == pytest.approx([45.715355, 51.591232, 1.55093, 1.998182, 44.438335, 2.978394, 2.52263,
                                             6.169925, 32.118122, 50.446243, 2.175118, 3.004078], rel=1e-3)
    assert float(np.asarray(case.image, np.float64).sum()) == pytest.approx(44021328.8, rel=1e-4)
    assert np.count_nonzero(case.lesions) == pytest.approx(5757, rel=0.005)
    assert np.count_nonzero(case.sites) == pytest.approx(41033, rel=0.005)


def test_a_fat_water_swap_lies_in_the_image_and_is_measured_there():
    """The swap is centred in the field of view's block, oblique scans too (their canvas crop is the whole
    body), and case.json gives its volume on the acquired grid."""
    base = ["anatomy_mm=4", "acquisition.oblique_p=1", "acquisition.integer_p=0", "acquisition.sequence_p={dixon_water: 1}"]
    for seed, fov in ((11, "feet"), (12, "spine")):
        plain = generate_case(seed, load_config(SynthConfig, None, base + ["acquisition.dixon.swap_p=0"]), fov=fov)
        swap = generate_case(seed, load_config(SynthConfig, None, base + ["acquisition.dixon.swap_p=1"]), fov=fov)
        voxel_ml = float(np.prod(np.linalg.norm(swap.affine[:3, :3], axis=0))) / 1000
        changed_ml = np.count_nonzero(swap.image != plain.image) * voxel_ml
        reported = swap.meta["acquisition"]["fat_water_swap_ml"]
        assert reported > 20 and 0.5 * reported < changed_ml < 3 * reported + 20, (seed, reported, changed_ml)


@pytest.mark.parametrize("mix, single", [("{t2_fs: 0.5, stir: 0.5}", "t2_fs"), ("{stir: 0.5, dixon_water: 0.5}", "dixon_water")])
def test_a_case_drawn_from_a_mix_is_the_case_of_its_sequence_alone(mix, single):
    """The sequence draw and the swap come from streams of their own: a case whose mix drew T2 FS (or Dixon, swap
    included) is the case made with that sequence alone, bit for bit."""
    from training.phantom.generate import _stream
    from training.phantom.render import drawn_or_only
    base = ["anatomy_mm=4", "acquisition.fat_sat_failure_p=1", "acquisition.dixon.swap_p=1", "acquisition.integer_p=0"]
    mixed_cfg = load_config(SynthConfig, None, base + [f"acquisition.sequence_p={mix}"])
    seed = next(s for s in range(100) if drawn_or_only(_stream(s, "sequence"), mixed_cfg.acquisition.sequence_p) == single)
    mixed = generate_case(seed, mixed_cfg, fov="knees")
    alone = generate_case(seed, load_config(SynthConfig, None, base + [f"acquisition.sequence_p={{{single}: 1}}"]), fov="knees")
    assert mixed.meta["acquisition"]["sequence"] == single
    assert np.array_equal(mixed.image, alone.image) and np.array_equal(mixed.lesions, alone.lesions)
    assert mixed.meta["acquisition"] == alone.meta["acquisition"]


def test_the_default_sequences_are_mostly_stir_with_some_t2_fs_and_dixon():
    from training.phantom.generate import _stream
    from training.phantom.render import drawn_or_only
    p = SynthConfig().acquisition.sequence_p
    drawn = [drawn_or_only(_stream(seed, "sequence"), p) for seed in range(2000)]
    share = {k: drawn.count(k) / len(drawn) for k in p}
    assert share == pytest.approx(p, abs=0.03)
    rng = np.random.default_rng(0)
    assert drawn_or_only(rng, {"t2_fs": 1.0}) == "t2_fs" and rng.random() == np.random.default_rng(0).random()


def test_stir_dixon_and_t2_fs_versions_of_a_seed_differ_only_in_fat_suppression_noise_and_swaps():
    """The sequence draws from its own stream: a seed's STIR, T2 FS and Dixon cases share child, lesions,
    acquisition grid and noise field. T2 FS fails to suppress fat in patches (here always); STIR does not and so
    is darker; Dixon has STIR's even suppression and a higher SNR, and a swap makes fat bright in one region."""
    from training.phantom.generate import generate_case
    base = ["anatomy_mm=4", "acquisition.fat_sat_failure_p=1", "acquisition.integer_p=0"]
    fs = generate_case(5, load_config(SynthConfig, None, base + ["acquisition.sequence_p={t2_fs: 1}"]), fov="knees")
    stir = generate_case(5, load_config(SynthConfig, None, base + ["acquisition.sequence_p={stir: 1}"]), fov="knees")
    assert fs.meta["acquisition"]["fat_sat_failure"] and not stir.meta["acquisition"]["fat_sat_failure"]
    assert np.array_equal(fs.lesions, stir.lesions) and np.array_equal(fs.affine, stir.affine)
    assert fs.meta["acquisition"]["snr"] == stir.meta["acquisition"]["snr"]
    brighter = fs.image > stir.image * 1.5 + 0.05 * np.percentile(stir.image, 99)   # the failed patches
    darker = stir.image > fs.image * 1.5 + 0.05 * np.percentile(fs.image, 99)   # Rician noise at low signal only
    assert 0.001 < brighter.mean() < 0.5 and darker.sum() < 0.01 * brighter.sum()
    plain = generate_case(5, load_config(SynthConfig, None, base + ["acquisition.sequence_p={dixon_water: 1}",
                                                                    "acquisition.dixon.swap_p=0"]), fov="knees")
    swap = generate_case(5, load_config(SynthConfig, None, base + ["acquisition.sequence_p={dixon_water: 1}",
                                                                   "acquisition.dixon.swap_p=1"]), fov="knees")
    assert stir.meta["acquisition"]["sequence"] == "stir"
    for case in (plain, swap):
        acq = case.meta["acquisition"]
        assert acq["sequence"] == "dixon_water" and not acq["fat_sat_failure"]
        assert acq["snr"] == pytest.approx(1.5 * stir.meta["acquisition"]["snr"], abs=0.02)
        assert np.array_equal(case.lesions, stir.lesions) and np.array_equal(case.affine, stir.affine)
    assert plain.meta["acquisition"]["fat_water_swap_ml"] == 0 and swap.meta["acquisition"]["fat_water_swap_ml"] > 50
    brighter = swap.image > 2.0 * plain.image + 0.2 * np.percentile(plain.image, 99)
    assert brighter.sum() * np.prod(np.linalg.norm(swap.affine[:3, :3], axis=0)) / 1000 > 20   # mL of bright fat
    assert 0.3 < np.mean(swap.image == plain.image) < 1.0   # the same image, noise included, away from the swap


def test_synth_cli_with_workers_makes_the_serial_cases_and_exits_cleanly(tmp_path):
    """Two worker processes write the same cases as one, and the program ends without a traceback (an executor
    left open printed 'Exception ignored ... Bad file descriptor' at exit, in about one run in three)."""
    import subprocess
    import sys
    args = ["--n", "2", "--seed", "3", "--set", "fov.p={feet: 1.0}", "--set", "anatomy_mm=3"]
    cmd = [sys.executable, "-c", "from service.cli import app; app()", "synth", *args]
    run = subprocess.run(cmd + ["--out", str(tmp_path / "par"), "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    synth_dataset(2, tmp_path / "ser", seed=3, overrides=["fov.p={feet: 1.0}", "anatomy_mm=3"], workers=1)
    for name in ("case_000003", "case_000004"):
        par, ser = (nib.load(str(tmp_path / d / "cases" / name / "image.nii.gz")) for d in ("par", "ser"))
        assert np.array_equal(np.asarray(par.dataobj), np.asarray(ser.dataobj))


@pytest.mark.parametrize("seed", [3, 500013])
def test_knee_and_elbow_bones_meet_at_a_joint_line_and_the_patella_sits_above_it(seed):
    """Generator 1.4: femur and tibia, humerus and radius do not overlap along the limb (a joint space between
    them), the patella's lower pole lies above the knee joint, and the olecranon rises behind the humerus."""
    from models.sites import site_id
    from training.config import BodyConfig
    from training.phantom.generate import draw_skeleton
    body, cv = draw_skeleton(seed, BodyConfig(), 2.0)

    def voxels_mm(code: str) -> np.ndarray:
        return cv.origin + cv.spacing * np.argwhere(cv.sites == site_id(code))

    for side in ("left", "right"):
        femur, tibia, patella = (voxels_mm(f"{b}_{side}") for b in ("femur", "tibia", "patella"))
        joint = body.landmarks[f"knee_{side}"][2]
        assert femur[:, 2].min() > tibia[:, 2].max() + 2.0  # a joint space of at least one voxel
        assert tibia[:, 2].max() < joint < femur[:, 2].min()
        assert patella[:, 2].min() > joint + 5.0 and patella[:, 1].mean() > femur[femur[:, 2] < joint + 40, 1].max()
        humerus, radius, ulna = (voxels_mm(f"{b}_{side}") for b in ("humerus", "radius", "ulna"))
        elbow = np.array(body.landmarks[f"elbow_{side}"])
        assert humerus[:, 2].min() > radius[:, 2].max() + 2.0
        olecranon = ulna[ulna[:, 2] > humerus[:, 2].min()]
        assert len(olecranon) and olecranon[:, 1].mean() < elbow[1] - 5.0  # behind the distal humerus


def test_a_change_to_the_lesions_leaves_the_childs_acquisition_as_it_was():
    """Each stage draws from its own stream of the seed (generator 1.4): other lesions, same child and scan."""
    few = generate_case(21, load_config(SynthConfig, None, ["anatomy_mm=3", "lesions.none_p=0", "lesions.count_mean=2"]))
    many = generate_case(21, load_config(SynthConfig, None, ["anatomy_mm=3", "lesions.none_p=0",
                                                             "lesions.count_mean=12"]))
    assert len(many.meta["lesions"]) > len(few.meta["lesions"])
    for key in ("age_years", "sex", "height_cm", "acquisition"):
        assert few.meta[key] == many.meta[key], key
    assert np.array_equal(few.sites, many.sites)


def _column_heights(spine: str, seed: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Per level, the height in mm of its vertebral body, and of the disc between it and the next level down,
    counted along the head-feet line through the body's centre on the 2 mm anatomy canvas."""
    from models.sites import VERTEBRAL_LEVELS, site_id
    from training.config import BodyConfig
    from training.phantom.generate import draw_skeleton
    from training.phantom.render import DISC
    body, cv = draw_skeleton(seed, BodyConfig(spine=spine), 2.0)
    spans = {}
    for code in VERTEBRAL_LEVELS:
        ix, iy, _ = np.round((body.vertebrae[code].centre - cv.origin) / cv.spacing).astype(int)
        own = np.flatnonzero(cv.sites[ix, iy] == site_id(code))
        spans[code] = (ix, iy, own.min(), own.max())
    bodies = {code: (hi - lo + 1) * cv.spacing for code, (_, _, lo, hi) in spans.items()}
    discs = {}
    for upper, lower in zip(VERTEBRAL_LEVELS, VERTEBRAL_LEVELS[1:]):
        ix, iy, lo, _ = spans[upper]
        between = cv.tissue[ix, iy, spans[lower][3] + 1:lo]
        discs[upper] = int((between == DISC).sum()) * cv.spacing
    return bodies, discs


def test_thoracic_bodies_grow_towards_the_lumbar_spine_whose_discs_are_thicker():
    """Generator 1.6 (body.spine: graded): T12's body is clearly taller than T1's and lumbar discs are thicker
    than thoracic ones, as in real spines; uniform (generators up to 1.5) draws the thoracic levels alike."""
    bodies, discs = _column_heights("graded")
    assert bodies["vertebra_T12"] > 1.3 * bodies["vertebra_T1"]
    lumbar, thoracic = ([discs[f"vertebra_{r}{i}"] for i in (1, 2, 3, 4)] for r in ("L", "T"))
    assert min(lumbar) >= 6.0 and np.mean(lumbar) > 1.5 * np.mean(thoracic)
    flat, _ = _column_heights("uniform")
    thoracic = [flat[f"vertebra_T{i}"] for i in range(1, 13)]
    assert max(thoracic) - min(thoracic) <= 2 * 2.0 + 1e-6   # within a voxel each way of one another


def test_edema_is_never_brighter_than_free_fluid_even_over_a_growth_plate():
    """Generator 1.7: a lesion over a bright physis (the physis' signal times the lesion's ratio) reached 3-4x fluid
    in 1.6; now it is bent toward fluid above 0.8 x fluid, and faint edema is left as it was."""
    from training.phantom.contrast import apply_edema, at_most_fluid
    from training.phantom.render import CSF, MUSCLE, TISSUES
    lut = np.zeros(len(TISSUES), np.float32)
    lut[MUSCLE], lut[CSF] = 0.2, 1.0
    labels = np.zeros((12, 12, 12), np.uint16)
    labels[3:9, 3:9, 3:9] = 1
    edema = (labels > 0).astype(np.float32)
    physis = np.full(labels.shape, 0.8, np.float32)  # a bright open physis under the lesion
    capped = apply_edema(physis.copy(), edema, {1: 4.0}, labels, lut, np.random.default_rng(0), 1.0)
    free = apply_edema(physis.copy(), edema, {1: 4.0}, labels, lut, np.random.default_rng(0), 1.0, fluid_ceiling=False)
    assert capped.max() <= 1.0 < float(np.median(free[labels == 1]))
    assert float(np.median(capped[labels == 1])) > 0.9  # fluid-bright, not dimmer
    faint = np.linspace(0.0, 0.8, 50, dtype=np.float32)
    assert np.array_equal(at_most_fluid(faint, 1.0), faint)  # below the knee: unchanged
    bright = np.linspace(0.8, 10.0, 50, dtype=np.float32)
    bent = at_most_fluid(bright, 1.0)
    assert np.all(np.diff(bent) >= 0) and bent.max() <= 1.0  # monotone, never above fluid
    near = at_most_fluid(np.linspace(0.8, 1.1, 20, dtype=np.float32), 1.0)
    assert np.all(np.diff(near) > 0) and near.max() < 1.0  # just above the knee: still ordered


def test_a_collapsed_vertebral_body_keeps_an_endplate_under_its_disc():
    """Generator 1.7: the body's lost upper part is disc (no bone label) over a new cortical endplate; 1.6 painted a
    slab of muscle into the spinal column."""
    from models.sites import site_id
    from training.config import BodyConfig
    from training.phantom.generate import draw_skeleton
    from training.phantom.lesions import LesionPlan, apply_collapse
    from training.phantom.render import CORTEX, DISC, MUSCLE
    plan = LesionPlan(1, "vertebra_L1", "vertebra", "vertebral_body", None, 2.0, 2.0, False, False, True)
    for fill in ("disc", "muscle"):
        body, cv = draw_skeleton(5, BodyConfig(), 2.0)
        v, sid = body.vertebrae["vertebra_L1"], site_id("vertebra_L1")
        before_tissue, before_sites = cv.tissue.copy(), cv.sites.copy()
        apply_collapse(cv, body, plan, fill)
        lost = (before_sites == sid) & (cv.sites != sid)
        assert lost.sum() > 20
        if fill == "muscle":  # 1.6
            assert np.all(cv.tissue[lost] == MUSCLE)
            continue
        assert np.all(cv.tissue[lost] == DISC) and np.all(cv.sites[lost] == 0)
        assert not np.any((before_sites == sid) & (cv.tissue == MUSCLE))
        ix, iy, _ = np.round((v.centre - cv.origin) / cv.spacing).astype(int)
        column = cv.sites[ix, iy] == sid
        top = np.flatnonzero(column).max()  # the remaining body's highest voxel on its centre line
        assert cv.tissue[ix, iy, top] == CORTEX and before_tissue[ix, iy, top] != CORTEX
        assert cv.tissue[ix, iy, top + 1] == DISC


def test_clavicular_lesions_are_not_epiphyseal_unless_asked():
    """A child's clavicular epiphyses are cartilage: generator 1.7 plans no epiphyseal clavicle lesion (1.6 did)."""
    def clavicle_subregions(cfg: LesionConfig) -> set:
        rng = np.random.default_rng(0)
        return {p.subregion for _ in range(400) for p in plan_lesions(rng, cfg)[1] if p.bone == "clavicle"}
    now = clavicle_subregions(LesionConfig())
    assert now and not any(s.startswith("epiphysis") for s in now)
    assert any(s.startswith("epiphysis") for s in clavicle_subregions(LesionConfig(clavicle_epiphysis=True)))


def _skeletons(age: float, sex: str, spacing: float = 2.0):
    """One child of ``age`` and ``sex`` drawn by generator 1.8 and with GENERATOR_1_7_SETTINGS (the same body)."""
    from training.config import BodyConfig
    from training.phantom.generate import GENERATOR_1_7_SETTINGS, draw_skeleton
    assert GENERATOR_1_7_SETTINGS[-2:] == ("body.apophyses=false", "body.calcaneus_pitch_deg=-15")
    cfg = dict(age_years=(age, age), female_p=1.0 if sex == "F" else 0.0)
    body, cv = draw_skeleton(500008, BodyConfig(**cfg), spacing)
    _, cv17 = draw_skeleton(500008, BodyConfig(**cfg, apophyses=False, calcaneus_pitch_deg=-15), spacing)
    return body, cv, cv17


def _added_plates(cv, cv17) -> dict[str, np.ndarray]:
    """Voxels (indices) of each bone group that are growth plate in 1.8 and not in 1.7."""
    from training.phantom.render import PHYSIS
    codes = {s.id: s.code for s in all_sites()}
    added = (cv.tissue == PHYSIS) & (cv17.tissue != PHYSIS)
    out: dict[str, list] = {}
    for k in np.unique(cv.sites[added]):
        out.setdefault(codes[int(k)].rsplit("_", 1)[0], []).append(np.argwhere(added & (cv.sites == k)))
    return {bone: np.concatenate(v) for bone, v in out.items()}


@pytest.mark.parametrize("age, sex, expected", [
    (4.8, "F", set()), (5.2, "F", {"calcaneus"}), (6.8, "M", set()), (7.2, "M", {"calcaneus"}),
    (8.7, "F", {"calcaneus", "tibia"}), (10.3, "M", {"calcaneus"}), (10.7, "M", {"calcaneus", "tibia"}),
    (12.8, "F", {"calcaneus", "tibia"}), (13.2, "F", {"calcaneus", "tibia", "ischium"}),
    (13.7, "F", {"tibia", "ischium"}), (13.8, "M", {"calcaneus", "tibia"}), (14.2, "M", {"calcaneus", "tibia", "ischium"}),
    (15.2, "F", {"ischium"}), (15.7, "M", {"tibia", "ischium"}), (17.0, "M", {"ischium"})])
def test_apophyses_are_drawn_from_ossification_to_fusion_by_sex(age, sex, expected):
    """Generator 1.8 draws the calcaneal, tibial-tuberosity and ischial apophyseal plates (normal bright findings
    of a child's STIR) between their ossification and fusion ages, which differ by sex; the ischial one outlives
    the long-bone growth plates. Nothing else of the skeleton changes but the calcaneus's pitch."""
    body, cv, cv17 = _skeletons(age, sex, 3.0)
    added = _added_plates(cv, cv17)
    assert set(added) == expected
    foot = {by_code()[f"{b}_{s}"].id for b in ("calcaneus", "talus", "midfoot") for s in ("left", "right")}
    outside_feet = ~np.isin(cv.sites, list(foot)) & ~np.isin(cv17.sites, list(foot))
    assert np.array_equal(cv.sites[outside_feet], cv17.sites[outside_feet])


def test_apophyses_lie_where_a_childs_do():
    """A 14-year-old boy: each calcaneal plate in the back third of the heel bone; each tibial-tuberosity band in
    front of the tibia's axis, below its growth plate (never above the 1.7 plate in its own column) and within
    35 mm of it; each ischial plate a crescent within 8 mm of the bone's surface in its lowest third."""
    from scipy.ndimage import distance_transform_edt
    from training.phantom.render import PHYSIS
    body, cv, cv17 = _skeletons(14.2, "M")
    added = _added_plates(cv, cv17)
    for side in ("left", "right"):
        def mine(bone: str) -> np.ndarray:
            return added[bone][cv.sites[tuple(added[bone].T)] == by_code()[f"{bone}_{side}"].id]
        whole = {b: np.argwhere(cv.sites == by_code()[f"{b}_{side}"].id) for b in ("calcaneus", "tibia", "ischium")}
        calc = mine("calcaneus")
        assert len(calc) >= 30
        assert calc[:, 1].mean() < whole["calcaneus"][:, 1].min() + 0.35 * np.ptp(whole["calcaneus"][:, 1])
        tub = mine("tibia")
        assert len(tub) >= 10 and tub[:, 1].min() > np.median(whole["tibia"][:, 1])
        plate17 = (cv17.tissue == PHYSIS) & (cv17.sites == by_code()[f"tibia_{side}"].id)
        plate17[:, :, : int(np.median(whole["tibia"][:, 2]))] = False  # the proximal growth plate only
        for x, y, z in tub:
            column = np.nonzero(plate17[x, y])[0]
            assert not len(column) or z < column.min()          # below the domed plate, in this column
        assert (np.argwhere(plate17)[:, 2].max() - tub[:, 2].min()) * 2.0 <= 35.0
        isch = mine("ischium")
        lo = whole["ischium"].min(axis=0) - 1
        box = tuple(slice(a, b) for a, b in zip(lo, whole["ischium"].max(axis=0) + 2))
        depth_mm = distance_transform_edt(cv.sites[box] == by_code()[f"ischium_{side}"].id) * 2.0
        assert len(isch) >= 20 and depth_mm[tuple((isch - lo).T)].max() <= 8.0
        assert isch[:, 2].max() <= whole["ischium"][:, 2].min() + np.ptp(whole["ischium"][:, 2]) / 3


def test_the_calcaneus_is_pitched_with_the_heel_lowest():
    """Generator 1.8 pitches the calcaneus's front above its heel (about 20 degrees in a real foot); 1.7 drew it
    the other way round."""
    _, cv, cv17 = _skeletons(11.0, "F")
    for side in ("left", "right"):
        for canvas, heel_lower in ((cv, True), (cv17, False)):
            bone = np.argwhere(canvas.sites == by_code()[f"calcaneus_{side}"].id)
            back = bone[bone[:, 1] <= bone[:, 1].min() + 1, 2].mean()
            front = bone[bone[:, 1] >= bone[:, 1].max() - 1, 2].mean()
            assert (back < front) == heel_lower


def test_case_json_is_the_same_bytes_for_a_seed_and_marks_lesions_out_of_view(tmp_path):
    cfg = load_config(SynthConfig, None, ["anatomy_mm=4", "lesions.none_p=0", "lesions.count_mean=12"])
    a = write_case(generate_case(21, cfg, fov="knees"), tmp_path / "a")
    b = write_case(generate_case(21, cfg, fov="knees"), tmp_path / "b")
    assert (a / "case.json").read_bytes() == (b / "case.json").read_bytes()
    meta = json.loads((a / "case.json").read_text())
    assert "timings_s" not in meta
    ids = set(np.unique(np.asanyarray(nib.load(str(a / "lesions.nii.gz")).dataobj)).tolist()) - {0}
    in_view = {k for k, m in enumerate(meta["lesions"], start=1) if m["in_view"]}
    assert in_view == ids and len(meta["lesions"]) > len(ids)  # a knee view leaves some of 12 lesions out


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n"), (["--n", "-1"], "--n"), (["--workers", "0"], "--workers"), (["--seed", "-1"], "--seed"),
])
def test_synth_refuses_bad_numbers_in_one_line(tmp_path, args, message):
    from typer.testing import CliRunner
    from service.cli import app
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output and not (tmp_path / "o").exists()


def test_synth_refuses_a_file_or_a_folder_of_other_files_as_its_output(tmp_path):
    from typer.testing import CliRunner
    from service.cli import app
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(app, ["synth", "--n", "1", "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "cannot write phantoms" in res.output
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a phantom")
    res = CliRunner().invoke(app, ["synth", "--n", "1", "--out", str(other)])
    assert res.exit_code == 2 and "did not write (notes.txt)" in res.output
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # nothing written beside the user's file


def test_a_synth_run_stopped_before_its_dataset_json_can_be_run_again(tmp_path):
    (tmp_path / "s" / "cases" / "case_000003").mkdir(parents=True)  # what a stopped first run leaves
    names = synth_dataset(1, tmp_path / "s", seed=3, overrides=["fov.p={feet: 1.0}", "anatomy_mm=4"])
    assert names == ["case_000003"] and (tmp_path / "s" / "dataset.json").is_file()


def test_an_existing_set_of_other_settings_is_refused_naming_them(tmp_path):
    synth_dataset(1, tmp_path / "s", seed=3, overrides=["fov.p={feet: 1.0}", "anatomy_mm=4"])
    with pytest.raises(ValueError, match=r"other settings \(anatomy_mm\)"):
        synth_dataset(1, tmp_path / "s", seed=4, overrides=["fov.p={feet: 1.0}", "anatomy_mm=3"])


def _isc_skeletons(age: float, sex: str):
    """One child drawn with and without its ischiopubic synchondroses (generator 1.10 and GENERATOR_1_9_SETTINGS)."""
    from training.config import BodyConfig
    from training.phantom.generate import draw_skeleton
    cfg = dict(age_years=(age, age), female_p=1.0 if sex == "F" else 0.0)
    body, cv = draw_skeleton(500008, BodyConfig(**cfg), 2.0)
    _, cv19 = draw_skeleton(500008, BodyConfig(**cfg, ischiopubic_synchondrosis=False), 2.0)
    return body, cv, cv19


def test_ischiopubic_synchondroses_are_plates_where_the_pubic_ramus_meets_the_ischium_until_they_fuse():
    """A 3-year-old girl's synchondroses are open on both sides: a growth-plate band in her pubis or ischium at the
    junction, mirrored left-right; a 16-year-old's fused years ago, and her skeleton is generator 1.9's bit for bit."""
    from training.phantom.render import PHYSIS
    from training.phantom.body import ISC_FUSION_AGES
    body, cv, cv19 = _isc_skeletons(3.0, "F")
    assert [sc.side for sc in body.synchondroses] == ["right", "left"]
    added = (cv.tissue == PHYSIS) & (cv19.tissue != PHYSIS)
    for sc in body.synchondroses:
        lo, hi = ISC_FUSION_AGES["F"]
        assert sc.open and lo - 0.5 <= sc.fusion_age <= hi + 0.5
        ids = [site_id(f"pubis_{sc.side}"), site_id(f"ischium_{sc.side}")]
        pts = cv.origin + cv.spacing * np.argwhere(added)
        mine = np.linalg.norm(pts - sc.centre, axis=1) <= 2 * sc.radius
        assert mine.sum() >= 5, f"{sc.side}: no plate drawn"
        assert np.isin(cv.sites[tuple(np.argwhere(added)[mine].T)], ids).all()
    right, left = (sc.centre for sc in body.synchondroses)
    assert right[0] > 0 > left[0] and abs(right[0] + left[0]) < 2 and np.allclose(right[1:], left[1:], atol=2)
    assert not (added & ~np.isin(cv.sites, [site_id(f"{b}_{s}") for b in ("pubis", "ischium")
                                            for s in ("left", "right")])).any()
    body16, cv16, cv16_19 = _isc_skeletons(16.0, "F")
    assert not any(sc.open or sc.swollen or sc.bright_marrow for sc in body16.synchondroses)
    assert np.array_equal(cv16.tissue, cv16_19.tissue) and np.array_equal(cv16.sites, cv16_19.sites)


def test_a_fusing_ischiopubic_synchondrosis_is_bright_and_swollen_and_not_a_lesion():
    """Seed 34 at 9 years (a boy) draws his right synchondrosis swollen, its marrow and the muscle beside it bright,
    and his left one an open plate only: on STIR the right fusion zone is brighter than the same voxels without
    synchondroses (generator 1.9), the left one is not, no lesion is labelled, the sites change only on the right
    (the swelling), and case.json only by the synchondroses' own entry."""
    from training.phantom.generate import GENERATOR_1_9_SETTINGS
    settings = ["lesions.none_p=1", "body.age_years=[9, 9]", "acquisition.sequence_p={stir: 1}"]
    now = generate_case(34, load_config(SynthConfig, None, settings), fov="pelvis")
    old = generate_case(34, load_config(SynthConfig, None, settings + list(GENERATOR_1_9_SETTINGS)), fov="pelvis")
    right, left = now.meta["ischiopubic_synchondroses"]
    assert right["swollen"] and right["bright_marrow"] and right["bright_soft_tissue"] and right["open"]
    assert left["open"] and not (left["swollen"] or left["bright_marrow"] or left["bright_soft_tissue"])
    assert "ischiopubic_synchondroses" not in old.meta
    assert (now.meta["generator_version"], old.meta["generator_version"]) == ("1.10", "1.9")  # 1.9's case, as 1.9
    drop = ("ischiopubic_synchondroses", "timings_s", "generator_version")
    assert {k: v for k, v in now.meta.items() if k not in drop} == {k: v for k, v in old.meta.items() if k not in drop}
    assert not now.lesions.any() and not old.lesions.any()
    gain = now.image.astype(np.float64) / np.maximum(old.image.astype(np.float64), 1e-6)
    changed = np.abs(now.image.astype(np.float64) - old.image) > 1e-6 * np.abs(old.image) + 1e-6
    for side, brighter in (("right", True), ("left", False)):
        bone = np.isin(now.sites, [site_id(f"pubis_{side}"), site_id(f"ischium_{side}")])
        bright_bone = changed & bone & (gain > 1.2) & (now.physis == 0)
        assert (bright_bone.sum() > 200) == brighter, f"{side}: {int(bright_bone.sum())} brighter marrow voxels"
    grown = now.sites != old.sites
    assert 0 < grown.sum() < 2000 and set(np.unique(now.sites[grown])) <= {site_id("pubis_right"),
                                                                            site_id("ischium_right")}
    assert (now.physis > old.physis).sum() > 20  # both plates are growth-plate labels (the physis target)


def test_settings_that_reproduce_an_older_generator_are_recorded_as_it():
    """case.json and dataset.json name the generator whose cases the settings make: 1.10's defaults 1.10, with
    GENERATOR_1_9_SETTINGS 1.9 (its cases bit for bit), and so on back to 1.6; a partial set of them, 1.10."""
    from training.phantom.generate import (GENERATOR_1_6_SETTINGS, GENERATOR_1_7_SETTINGS, GENERATOR_1_8_SETTINGS,
                                           GENERATOR_1_9_SETTINGS, GENERATOR_VERSION, generator_version_of)
    made = {name: generator_version_of(load_config(SynthConfig, None, list(settings))) for name, settings in
            (("now", ()), ("1.9", GENERATOR_1_9_SETTINGS), ("1.8", GENERATOR_1_8_SETTINGS),
             ("1.7", GENERATOR_1_7_SETTINGS), ("1.6", GENERATOR_1_6_SETTINGS), ("part", GENERATOR_1_8_SETTINGS[1:]))}
    assert made == {"now": GENERATOR_VERSION, "1.9": "1.9", "1.8": "1.8", "1.7": "1.7", "1.6": "1.6",
                    "part": GENERATOR_VERSION}
