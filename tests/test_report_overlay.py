"""Report assembly and validation, the overlay picture and case previews, on small synthetic studies."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from inference.postprocess import site_table, sites_in_view, study_warnings, summarise
from models.measure import measure_lesions
from inference.report import DISCLAIMER, build_report, validate_report
from models.nifti import save_nifti
from models.sites import REPORT_SCHEMA, by_code
from models.viz import coronal_views, preview_case, render_overlay

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCHEMA = ROOT.parent / "shared" / "contract" / "report.schema.json"
# LPS grid (the DICOM habit): voxel axes run towards the patient's left, posterior and superior
AFFINE = np.array([[-2.0, 0, 0, 60.0], [0, -3.0, 0, 30.0], [0, 0, 2.5, -100.0], [0, 0, 0, 1]])
SHAPE = (60, 20, 80)


def _world() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j, k = np.indices(SHAPE, dtype=float)
    return 60.0 - 2.0 * i, 30.0 - 3.0 * j, -100.0 + 2.5 * k


def make_study(n_lesions: int = 3, seed: int = 0) -> dict:
    """Two tibiae along S-I (x = -/+30 mm: the patient's right and left), muscle around, ``n_lesions`` lesions
    stacked along both bones."""
    X, Y, Z = _world()
    sites = np.zeros(SHAPE, np.uint8)
    for code, cx in (("tibia_right", 30.0), ("tibia_left", -30.0)):
        sites[((X - cx) ** 2 + Y ** 2 <= 64) & (Z >= -80) & (Z <= 80)] = by_code()[code].id
    lesions = np.zeros(SHAPE, np.uint16)
    for lid in range(1, n_lesions + 1):
        cx = 30.0 if lid % 2 else -30.0
        cz = -70.0 + (lid - 1) // 2 * 14.0
        lesions[((X - cx) ** 2 + Y ** 2 <= 36) & (np.abs(Z - cz) <= 4)] = lid
    image = np.where(np.abs(X) <= 55, 0.5, 0.02).astype(np.float32)
    image[sites > 0] = 1.0
    image[lesions > 0] = 2.2
    image += np.random.default_rng(seed).normal(0, 0.02, SHAPE).astype(np.float32)
    return dict(lesions=lesions, sites=sites, image=image)


def make_report(study: dict) -> dict:
    les = measure_lesions(study["lesions"], study["sites"], study["image"], AFFINE, None,
                          {i: 0.75 for i in range(1, int(study["lesions"].max()) + 1)})
    spacing = (2.0, 3.0, 2.5)
    view = sites_in_view(study["sites"], 2.0 * 3.0 * 2.5 / 1000)
    return build_report(
        {"filename": "/data/in/child_01.nii.gz", "sha256": "a" * 64, "shape": list(SHAPE),
         "spacing_mm": list(spacing), "orientation": "LPS"},
        {"name": "wbmri-test", "version": "1.2.3", "sha256": "b" * 64, "device": "cpu"},
        les, summarise(les, view), site_table(les),
        study_warnings(study["image"], study["sites"], study["lesions"], spacing), {"load": 0.1234, "inference": 2.0},
        view, caution="Trained on phantoms only.")


@pytest.fixture(scope="module")
def study() -> dict:
    return make_study()


@pytest.fixture(scope="module")
def report(study) -> dict:
    return make_report(study)


def png_size(payload: bytes) -> tuple[int, int]:
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload[12:16] == b"IHDR"
    return struct.unpack(">II", payload[16:24])


def test_report_is_valid_and_complete(report):
    validate_report(report)
    assert report["schema_version"] == "1.0"
    assert report["study"]["filename"] == "child_01.nii.gz"
    assert report["study"]["sites_in_view"] == ["tibia_left", "tibia_right"]
    assert report["timings_s"] == {"load": 0.123, "inference": 2.0}
    assert [x["id"] for x in report["lesions"]] == [1, 2, 3]
    assert [x["site"] for x in report["lesions"]] == ["tibia_right", "tibia_left", "tibia_right"]
    assert report["summary"]["symmetric_pairs"] == [[1, 2]]
    json.dumps(report, allow_nan=False)


def test_disclaimer_says_support_not_diagnosis(report):
    text = report["disclaimer"].lower()
    assert report["disclaimer"] == DISCLAIMER + " Trained on phantoms only."
    for phrase in ("not a diagnosis", "does not replace clinical judgement", "infection", "leukaemia", "lch"):
        assert phrase in text


def test_validate_report_names_the_problem(report):
    bad = json.loads(json.dumps(report))
    bad["lesions"][1]["volume_ml"] = -1.0
    del bad["model"]["device"]
    with pytest.raises(ValueError) as err:
        validate_report(bad)
    msg = str(err.value)
    assert "report.lesions[1].volume_ml" in msg and "'device' is a required property" in msg
    bad = json.loads(json.dumps(report))
    bad["lesions"][2]["id"] = 1
    bad["summary"]["lesion_count"] = 7
    with pytest.raises(ValueError, match="duplicate ids \\[1\\][\\s\\S]*lesion_count is 7"):
        validate_report(bad)
    bad = json.loads(json.dumps(report))
    bad["lesions"][0]["signal_ratio_marrow"] = float("nan")
    with pytest.raises(ValueError, match="not a finite number"):
        validate_report(bad)


def test_numpy_scalars_are_refused(report):
    bad = json.loads(json.dumps(report))
    bad["summary"]["lesion_count"] = np.int64(3)
    with pytest.raises(ValueError):
        validate_report(bad)


def test_schema_copy_matches_shared():
    if not SHARED_SCHEMA.is_file():
        pytest.skip("../shared is not present")
    assert json.loads(REPORT_SCHEMA.read_text()) == json.loads(SHARED_SCHEMA.read_text())


def test_report_also_valid_against_shared_schema(report):
    if not SHARED_SCHEMA.is_file():
        pytest.skip("../shared is not present")
    from jsonschema import Draft202012Validator
    errors = list(Draft202012Validator(json.loads(SHARED_SCHEMA.read_text())).iter_errors(report))
    assert errors == []


def test_coronal_view_is_radiological_with_true_aspect():
    """Patient's right on the viewer's left, superior at the top, pixel aspect = S spacing / R-L spacing."""
    X, Y, Z = _world()
    img = np.zeros(SHAPE, np.float32)
    img[(X > 40) & (Z > 60)] = 5.0          # the patient's right, high up
    img[(X < -40) & (Z < -60)] = 1.0        # the patient's left, low down
    view = coronal_views(img, AFFINE, kinds=("mip",))[0]
    h, w = view.image.shape
    assert (h, w) == (SHAPE[2], SHAPE[0])
    assert view.image[: h // 4, : w // 4].max() == pytest.approx(5.0)
    assert view.image[-h // 4:, -w // 4:].max() == pytest.approx(1.0)
    assert view.image[: h // 4, -w // 4:].max() == 0.0
    assert view.aspect == pytest.approx(2.5 / 2.0)


def test_mip_keeps_lesions_hidden_behind_each_other():
    lesions = np.zeros(SHAPE, np.uint16)
    lesions[30:34, 2:5, 40:44] = 1
    lesions[30:34, 10, 40:44] = 2        # same x/z, other depth ...
    lesions[34:38, 11, 40:44] = 2        # ... and oblique: its projection is larger than any one slice of it
    view = coronal_views(None, AFFINE, None, lesions, kinds=("mip",))[0]
    assert [m[0] for m in view.lesion_masks] == [1, 2]
    assert [int(m[2].sum()) for m in view.lesion_masks] == [16, 32]
    assert view.lesions.max() == 2


@pytest.mark.parametrize("n", [0, 20])
def test_overlay_png_size_and_content(n, tmp_path):
    study = make_study(n)
    rep = make_report(study)
    assert len(rep["lesions"]) == n
    payload = render_overlay(study["image"], study["lesions"], study["sites"], AFFINE, rep)
    assert png_size(payload) == (1600, 1000)
    (tmp_path / "overlay.png").write_bytes(payload)
    import matplotlib.image as mpimg
    pix = mpimg.imread(tmp_path / "overlay.png")
    bright_red = (pix[..., 0] > 0.9) & (pix[..., 1] < 0.35) & (pix[..., 2] < 0.3)   # lesion 1's colour
    assert bright_red.any() == (n > 0)


def test_overlay_is_deterministic(study, report):
    a = render_overlay(study["image"], study["lesions"], study["sites"], AFFINE, report)
    b = render_overlay(study["image"], study["lesions"], study["sites"], AFFINE, report)
    assert a == b


def _write_case(folder: Path, study: dict, with_image: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if with_image:
        save_nifti(folder / "image.nii.gz", study["image"], AFFINE)
    save_nifti(folder / "sites.nii.gz", study["sites"], AFFINE)
    save_nifti(folder / "lesions.nii.gz", study["lesions"], AFFINE)
    return folder


def test_preview_case_with_image_and_case_json(study, tmp_path):
    case = _write_case(tmp_path / "case_0001", study, with_image=True)
    (case / "case.json").write_text(json.dumps({"age_years": 9.5, "sex": "female", "fov": "lower_limbs"}))
    out = preview_case(case)
    assert out == case / "preview.png"
    w, h = png_size(out.read_bytes())
    assert w > 1000 and h > 600


def test_preview_predict_folder_without_image(study, tmp_path):
    case = _write_case(tmp_path / "pred", study, with_image=False)
    (case / "report.json").write_text("{}")
    out = preview_case(case, tmp_path / "sub" / "p.png")
    assert out.is_file() and png_size(out.read_bytes())[0] > 1000
    img_path = tmp_path / "image.nii.gz"
    save_nifti(img_path, study["image"], AFFINE)
    assert preview_case(case, tmp_path / "p2.png", image=img_path).read_bytes() != out.read_bytes()


def test_preview_refuses_mismatched_shapes(study, tmp_path):
    case = _write_case(tmp_path / "bad", study, with_image=False)
    save_nifti(case / "image.nii.gz", np.zeros((5, 5, 5), np.float32), AFFINE)
    with pytest.raises(ValueError, match="different shapes"):
        preview_case(case)


def test_the_model_caution_says_what_the_card_says_of_its_data_and_targets():
    from inference.report import model_caution
    from models.card import load_card
    shipped = model_caution(load_card())
    assert "synthetic phantoms only" in shipped and "NOT meet" in shipped and "of its 10 targets" in shipped
    assert model_caution({"name": "m", "data": {"synthetic_only": False}, "limitations": ["It is slow."]}) == ""
    report = build_report({"filename": "a.nii.gz"}, {"name": "m", "version": "1", "sha256": "0", "device": "cpu"},
                          [], {"lesion_count": 0}, [], [], {}, [], caution="Mind this.")
    assert report["disclaimer"] == DISCLAIMER + " Mind this." and report["model"]["caution"] == "Mind this."


def test_the_overlay_carries_the_model_caution_in_its_footer(study, report, tmp_path):
    """The picture is read alone: the caution (orange, under the disclaimer) is on it when the report has one."""
    import matplotlib.image as mpimg
    orange = []
    for rep in (report, {**report, "model": {k: v for k, v in report["model"].items() if k != "caution"}}):
        (tmp_path / "o.png").write_bytes(render_overlay(study["image"], study["lesions"], study["sites"], AFFINE, rep))
        foot = mpimg.imread(tmp_path / "o.png")[-40:]  # the bottom 40 of 1000 pixel rows
        orange.append(int(((foot[..., 0] > 0.9) & (np.abs(foot[..., 1] - 0.70) < 0.08) & (foot[..., 2] < 0.4)).sum()))
    assert orange[0] > 50 and orange[1] == 0


def test_overlay_words_do_not_read_an_unimaged_spine_or_an_unknown_growth_plate_as_no():
    from models.viz import _table_lines, spine_finding
    assert spine_finding({"spine_involved": False, "spine_in_view": False}) == "not in view"
    assert spine_finding({"spine_involved": False, "spine_in_view": True}) == "no lesion found"
    assert spine_finding({"spine_involved": True, "spine_in_view": True}) == "yes"
    weak = {"spine_involved": False, "spine_in_view": True, "low_sensitivity_regions": ["pelvis", "spine_thoracic"]}
    assert spine_finding(weak) == "no lesion found (the model finds few spine lesions)"
    les = {"id": 1, "site": "tibia_left", "side": "left", "subregion": "metaphysis_proximal", "juxtaphyseal": None,
           "volume_ml": 1.0}
    flags = {jp: _table_lines([{**les, "juxtaphyseal": jp}], 5)[1][0].split()[-1] for jp in (None, True, False)}
    assert flags[None] == "JP?" and flags[True] == "JP" and "JP" not in flags[False]
    assert "JP" not in _table_lines([{**les, "subregion": "diaphysis"}], 5)[1][0]


def test_the_report_names_the_regions_in_view_where_the_model_missed_most_test_lesions():
    from inference.report import region_caution, region_detection, unreliable_regions
    card = {"metrics": {"frozen_synthetic_test_set": {
        "whole_body": {"by_region": {"spine_thoracic": {"n_ref": 16, "detected": 3}, "foot": {"n_ref": 4, "detected": 0},
                                     "lower_limb": {"n_ref": 90, "detected": 60}, "pelvis": {"n_ref": 6, "detected": 4}}},
        "partial_fov": {"by_region": {"spine_thoracic": {"n_ref": 3, "detected": 0}, "foot": {"n_ref": 4, "detected": 1},
                                      "pelvis": {"n_ref": 4, "detected": 1}}}}}}
    figures = region_detection(card)
    every = region_caution(figures, ["vertebra_T5", "calcaneus_left", "tibia_left", "ilium_left"])
    # pooled over both test sets: thoracic spine 3 of 19, foot 1 of 8 and pelvis 5 of 10 (not under half: kept out),
    # the lower limb 60 of 90
    assert "thoracic spine (3 of 19)" in every and "foot (1 of 8)" in every
    assert "pelvis" not in every and "lower limb" not in every and "review these regions" in every
    assert every.index("thoracic spine") < every.index("foot")  # in sites.tsv's order of regions
    assert region_caution(figures, ["tibia_left", "femur_right"]) == ""  # only what is in view is named
    assert region_caution(region_detection({}), ["vertebra_T5"]) == ""  # a card without figures per region says nothing
    small = {"metrics": {"frozen_synthetic_test_set": {"x": {"by_region": {"foot": {"n_ref": 4, "detected": 0}}}}}}
    assert region_caution(region_detection(small), ["calcaneus_left"]) == (
        "Its test sets held too few lesions to measure it in: foot. No lesion reported there does not mean none is "
        "present: review these regions on the images.")  # not measured
    assert unreliable_regions(figures, ["vertebra_T5", "tibia_left", "hand_left"]) == (["spine_thoracic"], ["hand"])
    odd = {"metrics": {"frozen_synthetic_test_set": {"a": None, "b": "x", "c": {"by_region": {"foot": {"n_ref": None}}},
                                                     "d": {"by_region": {"foot": "x"}}}}}
    assert region_caution(region_detection(odd), ["calcaneus_left"]) == ""  # an odd card is no reason to fail
    listed = region_detection({"metrics": {"frozen_synthetic_test_set": []}})
    assert region_caution(listed, ["calcaneus_left"]) == ""


def test_an_overlay_without_lesions_slices_a_spine_view_through_the_spine():
    from models.viz import _mostly_spine
    spine = np.zeros((10, 10, 30), np.uint8)
    spine[4:6, 4:6, 2:28] = by_code()["vertebra_T5"].id
    spine[0:2, 0:2, 0:5] = by_code()["femur_left"].id
    assert _mostly_spine(spine) and not _mostly_spine(np.where(spine == 0, by_code()["femur_left"].id, spine))
    assert not _mostly_spine(None)


@pytest.mark.parametrize("n_lesions, n_warnings", [(3, 7), (26, 4), (38, 6)])
def test_the_lesion_table_and_its_warnings_stay_above_the_disclaimer(report, n_lesions, n_warnings):
    """However many lesions and warnings, every line of the table's panel lies inside it, above the footer that
    carries the disclaimer and the model's caution (warnings once ran into them); what does not fit is named as
    more in report.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from models.viz import _draw_table
    les = report["lesions"][0]
    rep = {**report, "lesions": [{**les, "id": i} for i in range(1, n_lesions + 1)],
           "warnings": [f"Warning {k}: " + "a long explanation of what the reader should check " * 3
                        for k in range(n_warnings)]}
    fig = plt.figure(figsize=(16, 10))
    ax = fig.add_axes((0.635, 0.065, 0.36, 0.855))  # where render_overlay puts it
    _draw_table(ax, rep)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bottom = ax.get_window_extent(renderer).y0
    lowest = min(t.get_window_extent(renderer).y0 for t in ax.texts)
    texts = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert lowest >= bottom - 1, f"text {bottom - lowest:.0f} px below the panel"
    assert any(t.startswith("• Warning 0") for t in texts)
    listed = sum(1 for t in texts if t.startswith("• Warning"))
    more = [t for t in texts if "more warning" in t]
    assert listed + (int(more[0].split()[2]) if more else 0) == n_warnings and (n_warnings <= 5 or more)
    shown = sum(1 for t in texts if t.strip().split(" ")[0].isdigit())
    assert shown == n_lesions or any(f"{n_lesions - shown} more lesions" in t for t in texts)
