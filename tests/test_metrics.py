"""Evaluation metrics and folder evaluation on hand-made masks with answers worked out by hand."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.nifti import save_nifti
from models.sites import site_id
from training.evaluate import (GridMismatchError, check_same_grid, compare_evaluations, evaluate_folders, load_case,
                               site_confusion_rows)
from training.metrics import (FrocCase, bootstrap_ci, detection_counts, dice, froc, level_agreement,
                              majority_labels, match_lesions, per_site_dice, sensitivity_at_fp, site_agreement,
                              site_confusion, site_histogram, subregion_agreement)


def box(shape, *slices, value=1, out=None):
    arr = np.zeros(shape, dtype=np.uint16) if out is None else out
    arr[tuple(slices)] = value
    return arr


# ---------------------------------------------------------------- Dice

def test_dice_by_hand():
    a = np.array([1, 1, 1, 0], dtype=bool)
    b = np.array([0, 1, 1, 1], dtype=bool)
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros(4, bool)) == 0.0
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros(5, bool))


def test_per_site_dice_only_present_sites():
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0:2] = 49  # 32 voxels
    pred[0:1] = 49  # 16 voxels, all inside
    ref[3, 0] = 50  # 4 voxels, not predicted
    pred[3, 3] = 51  # 4 voxels, not in the reference
    got = per_site_dice(pred, ref)
    assert set(got) == {49, 50, 51}
    assert got[49] == pytest.approx(2 * 16 / 48)
    assert got[50] == 0.0 and got[51] == 0.0
    assert per_site_dice(pred, ref, ids=[49, 7]) == {49: pytest.approx(2 / 3)}


def test_site_confusion_counts_each_disagreeing_pair():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0:2] = 49  # 32 voxels of femur
    ref[3] = 53    # 16 voxels of tibia
    pred = ref.copy()
    pred[1] = 53      # the femur's lower half named tibia: 16 voxels
    pred[3, 0] = 0    # 4 tibia voxels left out
    pred[2, 0, 0] = 7  # a bone where there is none
    assert site_confusion(pred, ref) == {(49, 53): 16, (53, 0): 4, (0, 7): 1}
    assert site_confusion(ref, ref) == {}
    with pytest.raises(ValueError, match="shapes differ"):
        site_confusion(ref[:2], ref)
    # a foreign map's large label (counted by another route than the contract's uint8 ids) gives the same answers
    big_ref, big_pred = (np.where(a == 49, 5000, a.astype(np.int32)) for a in (ref, pred))
    assert site_confusion(big_pred, big_ref) == {(5000, 53): 16, (53, 0): 4, (0, 7): 1}
    small = per_site_dice(pred, ref)
    assert per_site_dice(big_pred, big_ref) == {5000 if k == 49 else k: v for k, v in small.items()}
    rows = site_confusion_rows({(49, 53): 1.0, (0, 7): 3.0, (53, 0): 0.5}, {49: 4.0, 53: 2.0}, n_cases=2)
    assert [(r["reference_site"], r["predicted_site"], r["kind"], r["ml_per_case"], r["share_of_reference"])
            for r in rows] == [("none", "vertebra_C5", "extra", 1.5, None),
                               ("femur_left", "tibia_left", "named_wrong", 0.5, 0.25),
                               ("tibia_left", "none", "missed", 0.25, 0.25)]


def test_level_agreement_counts_voxels_that_are_vertebra_in_both_maps():
    t5, t6, t7, l1, femur = (site_id(c) for c in ("vertebra_T5", "vertebra_T6", "vertebra_T7", "vertebra_L1",
                                                  "femur_left"))
    ref = np.zeros((3, 8), np.uint8)
    ref[0], ref[1], ref[2] = t5, t6, femur
    pred = ref.copy()
    pred[0, 6:] = t6             # 6 of T5 right, 2 named T6
    pred[1, 4:6] = t7            # 4 of T6 right, 2 named T7 ...
    pred[1, 6:] = 0              # ... and 2 left out (not scored: no vertebra in the prediction)
    pred[2, :4] = l1             # a femur named L1 is not scored either (no vertebra in the reference)
    assert level_agreement(site_histogram(pred, ref)) == (10, 14)
    assert level_agreement(site_histogram(ref, ref)) == (16, 16)
    assert level_agreement(site_histogram(np.zeros_like(ref), ref)) == (0, 0)


def test_majority_labels_prefers_bone_over_background():
    inst = box((6, 6, 6), slice(0, 4), slice(0, 1), slice(0, 1))  # 4 voxels
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0, 0, 0] = 49
    labels[1:3, 0, 0] = 50
    inst[5, 5, 5] = 2  # no bone at all
    assert majority_labels(inst, labels) == {1: 50, 2: 0}


# ---------------------------------------------------------------- matching

SHAPE = (20, 20, 20)


def two_refs_three_preds():
    ref = box(SHAPE, slice(2, 6), slice(2, 6), slice(2, 6), value=1)  # 64
    box(SHAPE, slice(10, 14), slice(10, 14), slice(10, 14), value=2, out=ref)  # 64
    pred = box(SHAPE, slice(3, 7), slice(2, 6), slice(2, 6), value=1)  # 64, 48 inside ref 1
    box(SHAPE, slice(10, 12), slice(10, 14), slice(10, 14), value=2, out=pred)  # 32, all inside ref 2
    box(SHAPE, slice(16, 18), slice(16, 18), slice(16, 18), value=3, out=pred)  # 8, false positive
    return pred, ref


def test_two_references_three_predictions_one_false_positive():
    pred, ref = two_refs_three_preds()
    m = match_lesions(pred, ref)
    assert m.pred_to_ref == {1: 1, 2: 2, 3: None}
    assert m.ref_detected == {1: True, 2: True}
    assert m.fp_preds == [3] and m.missed_refs == []
    assert m.ref_volume_ml == {1: pytest.approx(0.064), 2: pytest.approx(0.064)}
    assert m.pred_volume_ml[3] == pytest.approx(0.008)
    c = detection_counts(m)
    assert (c.n_ref, c.n_detected, c.n_tp, c.n_fp, c.n_ignored) == (2, 2, 2, 1, 0)
    assert c.sensitivity == 1.0
    assert c.precision == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(0.8)
    assert c.fp_per_scan == 1.0
    assert dice(pred > 0, ref > 0) == pytest.approx(2 * 80 / (128 + 104))


def test_split_lesion_is_one_detection_two_true_positives():
    ref = box(SHAPE, slice(2, 10), slice(2, 6), slice(2, 6))
    pred = box(SHAPE, slice(2, 6), slice(2, 6), slice(2, 6), value=1)
    box(SHAPE, slice(6, 10), slice(2, 6), slice(2, 6), value=2, out=pred)
    m = match_lesions(pred, ref)
    assert m.pred_to_ref == {1: 1, 2: 1}
    c = detection_counts(m)
    assert (c.n_ref, c.n_detected, c.n_tp, c.n_fp, c.n_credited) == (1, 1, 2, 0, 1)
    assert c.sensitivity == 1.0 and c.precision == 1.0 and c.selection_f1 == 1.0


def test_one_prediction_spanning_two_references_detects_both_and_maps_to_larger_overlap():
    ref = box(SHAPE, slice(2, 4), slice(2, 6), slice(2, 6), value=1)  # 32
    box(SHAPE, slice(4, 8), slice(2, 6), slice(2, 6), value=2, out=ref)  # 64
    pred = box(SHAPE, slice(3, 8), slice(2, 6), slice(2, 6))  # 16 in ref 1, 64 in ref 2
    m = match_lesions(pred, ref)
    assert m.pred_hits == {1: (1, 2)}
    assert m.pred_to_ref == {1: 2}
    assert m.ref_detected == {1: True, 2: True}
    c = detection_counts(m)  # the evaluation counts both; checkpoint selection lets the prediction detect one
    assert (c.n_detected, c.n_credited, c.f1) == (2, 1, 1.0)
    assert c.selection_f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_credited_detections_are_the_largest_one_to_one_matching():
    """Prediction 1 matches both references (most of it in reference 1), prediction 2 only reference 1: each
    detecting one, they detect both (1 -> 2, 2 -> 1), which crediting each its best overlap (1 and 1) would miss."""
    ref = box(SHAPE, slice(2, 8), slice(2, 6), slice(2, 6), value=1)
    box(SHAPE, slice(8, 12), slice(2, 6), slice(2, 6), value=2, out=ref)
    pred = box(SHAPE, slice(3, 9), slice(2, 6), slice(2, 6), value=1)  # 80 voxels in reference 1, 16 in 2
    box(SHAPE, slice(2, 3), slice(2, 6), slice(2, 6), value=2, out=pred)  # 16 voxels, in reference 1
    m = match_lesions(pred, ref)
    assert m.pred_hits == {1: (1, 2), 2: (1,)} and m.pred_to_ref == {1: 1, 2: 1}
    assert detection_counts(m).n_credited == 2


def test_one_prediction_over_the_whole_volume_scores_f1_one_but_not_for_checkpoint_selection():
    """What an untrained network does: one lesion covering everything matches all references, no false positive."""
    ref = np.zeros(SHAPE, np.int32)
    for i in range(4):
        box(SHAPE, slice(2 + 4 * i, 4 + 4 * i), slice(2, 4), slice(2, 4), value=i + 1, out=ref)
    c = detection_counts(match_lesions(np.ones(SHAPE, np.int32), ref))
    assert (c.sensitivity, c.precision, c.f1) == (1.0, 1.0, 1.0)
    assert c.n_credited == 1 and c.selection_f1 == pytest.approx(2 * 0.25 / 1.25)
    pooled = c + detection_counts(match_lesions(ref, ref))  # sums like the other counts; exact outlines: all credited
    assert (pooled.n_ref, pooled.n_credited) == (8, 5)
    pred, ref = two_refs_three_preds()  # no prediction spans two lesions: the same F1
    c = detection_counts(match_lesions(pred, ref))
    assert c.n_credited == c.n_detected and c.selection_f1 == c.f1


def test_overlap_must_reach_ten_percent_of_smaller_lesion():
    ref = box(SHAPE, slice(0, 10), slice(0, 10), slice(0, 10))  # 1000
    pred = box(SHAPE, slice(9, 19), slice(0, 10), slice(0, 1))  # 100 voxels, 10 inside the reference
    assert match_lesions(pred, ref).pred_to_ref == {1: 1}
    pred[9, 9, 0] = 0  # 99 voxels, 9 inside: 9 < 9.9
    m = match_lesions(pred, ref)
    assert m.pred_to_ref == {1: None} and m.ref_detected == {1: False}
    touching = box(SHAPE, slice(9, 11), slice(0, 1), slice(0, 1))  # 2 voxels, 1 inside: 50% of the smaller
    assert match_lesions(touching, ref).pred_to_ref == {1: 1}
    assert match_lesions(touching, ref, min_overlap_voxels=2).pred_to_ref == {1: None}


def test_size_restricted_counts_below_half_millilitre():
    vox = 0.01  # mL per voxel
    ref = box(SHAPE, slice(0, 4), slice(0, 4), slice(0, 4), value=1)  # 64 -> 0.64 mL
    box(SHAPE, slice(10, 13), slice(10, 13), slice(10, 13), value=2, out=ref)  # 27 -> 0.27 mL
    box(SHAPE, slice(15, 20), slice(0, 5), slice(0, 6), value=3, out=ref)  # 150 -> 1.5 mL, missed
    pred = box(SHAPE, slice(0, 4), slice(0, 4), slice(0, 4), value=1)
    box(SHAPE, slice(10, 13), slice(10, 13), slice(10, 13), value=2, out=pred)
    box(SHAPE, slice(6, 8), slice(15, 17), slice(15, 17), value=3, out=pred)  # false positive
    m = match_lesions(pred, ref, voxel_ml=vox)
    assert m.ref_volume_ml == {1: pytest.approx(0.64), 2: pytest.approx(0.27), 3: pytest.approx(1.5)}
    ge = detection_counts(m, min_ml=0.5)
    assert (ge.n_ref, ge.n_detected, ge.n_tp, ge.n_fp, ge.n_ignored) == (2, 1, 1, 1, 1)
    assert ge.sensitivity == 0.5 and ge.precision == 0.5 and ge.f1 == 0.5
    small = detection_counts(m, max_ml=1.0)
    assert (small.n_ref, small.n_detected, small.n_tp, small.n_fp, small.n_ignored) == (2, 2, 2, 1, 0)
    large = detection_counts(m, min_ml=1.0)
    assert (large.n_ref, large.n_detected, large.sensitivity, large.precision) == (1, 0, 0.0, 0.0)
    pooled = ge + small
    assert (pooled.n_scans, pooled.n_ref, pooled.n_fp) == (2, 4, 2)
    assert pooled.fp_per_scan == 1.0


# ---------------------------------------------------------------- FROC and sites

def test_froc_points_by_hand_and_monotonic():
    cases = [FrocCase([(0.9, {1}), (0.8, set()), (0.3, {2})], 2),
             ([(0.7, ()), (0.6, (1,)), (0.5, (1,))], 1)]  # a split lesion: counted once
    pts = froc(cases)
    assert [t for _, _, t in pts] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    assert [fp for fp, _, _ in pts] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert [s for _, s, _ in pts] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0])
    for (fp0, s0, _), (fp1, s1, _) in zip(pts, pts[1:]):
        assert fp1 >= fp0 and s1 >= s0
    assert sensitivity_at_fp(pts, 0.5) == pytest.approx(1 / 3)
    assert sensitivity_at_fp(pts, 1.0) == 1.0
    assert froc(cases, thresholds=[0.95]) == [(0.0, 0.0, 0.95)]


def test_subregion_agreement_counts_only_right_sites_with_a_reference_subregion():
    ref = np.zeros((12, 4, 4), np.uint16)
    for i in range(4):
        ref[3 * i:3 * i + 2] = i + 1
    m = match_lesions(ref.copy(), ref)
    ref_sites = {1: "tibia_left", 2: "tibia_left", 3: "femur_left", 4: "vertebra_L1"}
    pred_sites = {1: "tibia_left", 2: "tibia_left", 3: "tibia_left", 4: "vertebra_L1"}
    ref_sub = {1: "metaphysis_distal", 2: "metaphysis_distal", 3: "diaphysis", 4: None}
    pred_sub = {1: "metaphysis_distal", 2: "epiphysis_distal", 3: "diaphysis", 4: "vertebral_body"}
    a = subregion_agreement(m, pred_sites, ref_sites, pred_sub, ref_sub)
    assert (a.n, a.n_right, a.accuracy) == (2, 1, 0.5), "lesion 3: wrong bone; lesion 4: no reference subregion"
    assert (a + a).n == 4 and subregion_agreement(m, {}, {}, {}, {}).accuracy is None


def test_site_and_side_agreement():
    a = site_agreement([("femur_left", "femur_left"), ("femur_right", "femur_left"), ("tibia_left", "femur_left"),
                        ("sacrum", "vertebra_L5"), ("soft_tissue", "soft_tissue")])
    assert (a.n, a.n_site, a.n_side) == (5, 2, 4)
    assert a.site_accuracy == pytest.approx(0.4) and a.side_accuracy == pytest.approx(0.8)
    assert site_agreement([]).site_accuracy is None
    # a soft-tissue lesion has its side only in the report: both soft tissue, sides told apart (they were not)
    b = site_agreement([("soft_tissue", "soft_tissue", "right", "left"), ("soft_tissue", "femur_left", "right", None),
                        ("soft_tissue", "femur_left", "left", None), ("femur_left", "femur_left", "right", "right")])
    assert (b.n, b.n_site, b.n_side) == (4, 2, 2), "the code's side wins over a contradicting report side"


# ---------------------------------------------------------------- folders

N = 16
AFF = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 = 0.008 mL per voxel
FEMUR_L, TIBIA_R = site_id("femur_left"), site_id("tibia_right")


def write_case(folder: Path, lesions: np.ndarray, sites: np.ndarray | None, json_name: str | None,
               entries: list[dict], affine: np.ndarray = AFF) -> None:
    folder.mkdir(parents=True)
    save_nifti(folder / "lesions.nii.gz", lesions, affine, np.uint16)
    if sites is not None:
        save_nifti(folder / "sites.nii.gz", sites, affine, np.uint8)
    if json_name:
        (folder / json_name).write_text(json.dumps({"lesions": entries}))


def site_map(tibia_hi: int = 15) -> np.ndarray:
    s = np.zeros((N,) * 3, np.uint8)
    s[0:8, 0:8, 0:8] = FEMUR_L
    s[9:15, 9:15, 9:tibia_hi] = TIBIA_R
    return s


def build_folders(root: Path) -> tuple[Path, Path]:
    ref, pred = root / "ref", root / "pred"
    shp = (N,) * 3
    # case_a: reference 1.2 mL femur_left + 0.216 mL tibia_right; prediction hits both (wrong site on the 2nd) + 1 FP
    ra = box(shp, slice(1, 7), slice(1, 6), slice(1, 6), value=1)
    box(shp, slice(10, 13), slice(10, 13), slice(10, 13), value=2, out=ra)
    write_case(ref / "case_a", ra, site_map(), "case.json",
               [{"id": 1, "site": "femur_left", "subregion": "metaphysis_distal", "volume_ml": 1.2},
                {"id": 2, "site": "tibia_right", "subregion": "diaphysis", "volume_ml": 0.216}])
    pa = box(shp, slice(2, 7), slice(1, 6), slice(1, 6), value=1)  # 125 voxels inside ref 1
    box(shp, slice(10, 13), slice(10, 13), slice(10, 12), value=2, out=pa)  # 18 voxels inside ref 2
    box(shp, slice(13, 15), slice(0, 2), slice(0, 2), value=3, out=pa)  # 8 voxels, false positive
    write_case(pred / "case_a", pa, site_map(tibia_hi=14), "report.json",
               [{"id": 1, "site": "femur_left", "subregion": "epiphysis_distal", "confidence": 0.9},
                {"id": 2, "site": "tibia_left", "subregion": "diaphysis", "confidence": 0.6},
                {"id": 3, "site": "humerus_left", "confidence": 0.4}])
    # case_b: no reference lesion, one false positive
    write_case(ref / "case_b", np.zeros(shp, np.uint16), site_map(), "case.json", [])
    write_case(pred / "case_b", box(shp, slice(0, 2), slice(0, 2), slice(0, 2)), site_map(), "report.json",
               [{"id": 1, "site": "femur_left", "confidence": 0.8}])
    # case_c: 0.512 mL reference lesion, prediction missing
    write_case(ref / "case_c", box(shp, slice(4, 8), slice(4, 8), slice(4, 8)), site_map(), "case.json",
               [{"id": 1, "site": "femur_left"}])
    # case_d: prediction on a shifted grid
    rd = box(shp, slice(1, 7), slice(1, 6), slice(1, 6))
    write_case(ref / "case_d", rd, site_map(), None, [])
    shifted = AFF.copy()
    shifted[0, 3] = 1.0
    write_case(pred / "case_d", rd, site_map(), "report.json", [{"id": 1, "site": "femur_left", "confidence": 0.9}],
               affine=shifted)
    # a prediction without reference
    write_case(pred / "case_z", rd, None, None, [])
    # the half-written folder a killed run leaves: not a case
    write_case(pred / ".case_a.1f2e3d4c.partial", rd, None, None, [])
    return pred, ref


def test_evaluate_folders_numbers(tmp_path):
    pred, ref = build_folders(tmp_path)
    out = tmp_path / "eval"
    s = evaluate_folders(pred, ref, out, quiet=False)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert (s["n_cases"], s["n_ok"], s["n_failed"]) == (4, 2, 2)
    assert {f["case"]: f["error"] for f in s["failures"]}["case_c"] == "prediction missing"
    assert "grid mismatch" in {f["case"]: f["error"] for f in s["failures"]}["case_d"]
    assert s["unpaired_predictions"] == ["case_z"]
    assert "10%" in s["matching_rule"]
    assert s["reference"] == {"path": str(ref)}, "no dataset.json: only the folder is recorded"
    meta = {"name": "wbmri-phantom", "first_seed": 700, "generator_version": "9.9"}
    (ref / "dataset.json").write_text(json.dumps(meta))
    again = evaluate_folders(pred, ref, tmp_path / "eval2", quiet=True)["reference"]
    assert again == {"path": str(ref), "generator_version": "9.9", "seeds": "700..703"}

    les = s["lesions"]
    assert {k: (v["n_ref"], v["n_detected"], v["n_tp"], v["n_fp"], v["n_ignored"]) for k, v in les.items()} == {
        "all": (4, 2, 2, 2, 0), "lt_1ml": (2, 1, 1, 2, 1), "ge_1ml": (2, 1, 1, 2, 1), "ge_0p5ml": (3, 1, 1, 2, 1)}
    assert les["all"]["sensitivity"] == 0.5 and les["all"]["precision"] == 0.5 and les["all"]["f1"] == 0.5
    assert les["all"]["fp_per_scan"] == 0.5
    assert s["sensitivity_ge_0p5ml"] == pytest.approx(1 / 3)
    assert s["fp_per_scan_no_reference_lesions"] == {"value": 1.0, "n_cases": 1}
    # femur lesions >= 0.5 mL of cases a (found), c and d (failed); false positives named femur and humerus
    assert s["by_region"] == {
        "lower_limb": {"n_ref": 3, "detected": 1, "fp": 1, "sensitivity": pytest.approx(1 / 3), "fp_per_scan": 0.25},
        "upper_limb": {"n_ref": 0, "detected": 0, "fp": 1, "sensitivity": None, "fp_per_scan": 0.25}}
    case_a_dice = 2 * 143 / (177 + 151)
    assert s["edema_dice"]["mean"] == pytest.approx(case_a_dice / 4)
    assert s["edema_dice"]["median"] == 0.0
    assert s["site_accuracy"] == {"n_matched": 2, "site": 0.5, "side": 0.5}
    # only the femur lesion counts (the tibia lesion's site is wrong), and its subregion is wrong
    assert (s["subregion_accuracy"]["n_scored"], s["subregion_accuracy"]["value"]) == (1, 0.0)
    case_a_site_dice = (1.0 + 2 * 180 / (216 + 180)) / 2
    assert s["mean_site_dice"]["mean"] == pytest.approx((case_a_site_dice + 1.0 + 0 + 0) / 4)
    assert s["vertebral_level_accuracy"]["value"] is None and s["vertebral_level_accuracy"]["n_voxels"] == 0

    fr = s["froc"]
    assert [(p["fp_per_scan"], p["threshold"]) for p in fr["points"]] == [(0.0, 0.9), (0.25, 0.8), (0.5, 0.4)]
    assert [p["sensitivity"] for p in fr["points"]] == pytest.approx([1 / 3] * 3)
    assert fr["sensitivity_at_target_fp"] == pytest.approx(1 / 3) and fr["target_met"] is False

    with open(out / "per_case.csv", newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    a = rows["case_a"]
    assert (a["status"], a["n_ref"], a["n_ref_ge_0p5ml"], a["n_pred"], a["tp"], a["fp"], a["fn"]) == \
        ("ok", "2", "1", "3", "2", "1", "0")
    assert float(a["edema_dice"]) == pytest.approx(case_a_dice, abs=1e-6)
    assert float(a["mean_site_dice"]) == pytest.approx(case_a_site_dice, abs=1e-6)
    assert float(a["site_accuracy"]) == 0.5 and float(a["side_accuracy"]) == 0.5
    assert float(a["ref_volume_ml"]) == pytest.approx(177 * 0.008)
    c = rows["case_c"]
    assert (c["status"], c["n_ref"], c["n_pred"], c["fn"], c["edema_dice"], c["site_accuracy"]) == \
        ("failed", "1", "0", "1", "0.0", "")
    assert rows["case_d"]["status"] == "failed" and "grid mismatch" in rows["case_d"]["error"]

    with open(out / "lesions.csv", newline="") as fh:
        rows_l = list(csv.DictReader(fh))
    lesions = [(r["case"], r["kind"], r["id"], r["site"], r["detected"], r["pred_ids"], r["pred_site"]) for r in rows_l]
    assert (rows_l[0]["subregion"], rows_l[0]["pred_subregion"]) == ("metaphysis_distal", "epiphysis_distal")
    assert lesions == [("case_a", "reference", "1", "femur_left", "True", "1", "femur_left"),
                       ("case_a", "reference", "2", "tibia_right", "True", "2", "tibia_left"),
                       ("case_a", "false_positive", "3", "humerus_left", "", "3", "humerus_left"),
                       ("case_b", "false_positive", "1", "femur_left", "", "1", "femur_left"),
                       ("case_c", "reference", "1", "femur_left", "False", "", ""),
                       ("case_d", "reference", "1", "femur_left", "False", "", "")]
    with open(out / "sites.csv", newline="") as fh:
        sites = {r["site"]: (int(r["n_cases"]), float(r["mean_dice"])) for r in csv.DictReader(fh)}
    assert sites["femur_left"] == (4, pytest.approx(0.5))
    assert sites["tibia_right"] == (4, pytest.approx((2 * 180 / 396 + 1.0) / 4))
    assert list(sites) == ["tibia_right", "femur_left"], "worst site first"
    with open(out / "site_confusion.csv", newline="") as fh:
        confusion = [(r["reference_site"], r["predicted_site"], r["kind"], float(r["ml_per_case"]),
                      float(r["share_of_reference"])) for r in csv.DictReader(fh)]
    # cases c and d scored as empty predictions: all their bone left out; case_a's prediction lacks 36 tibia voxels
    assert confusion == [("femur_left", "none", "missed", pytest.approx(2 * 512 * 0.008 / 4), pytest.approx(0.5)),
                         ("tibia_right", "none", "missed", pytest.approx((36 + 2 * 216) * 0.008 / 4),
                          pytest.approx((36 + 2 * 216) / (4 * 216)))]

    png = (out / "froc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    assert (a["n_site_scored"], a["n_site_right"]) == ("2", "1")
    ci = s["ci95"]
    assert ci["fp_per_scan_no_reference_lesions"] == [1.0, 1.0], "one lesion-free case: no spread"
    assert ci["site_accuracy"] == [0.5, 0.5], "both matched lesions lie in case_a"
    lo, hi = ci["sensitivity_ge_0p5ml"]
    assert 0.0 <= lo < 1 / 3 < hi <= 1.0
    lo, hi = ci["edema_dice"]
    assert lo == 0.0 and s["edema_dice"]["mean"] < hi <= case_a_dice
    assert "bootstrap" in s["ci_method"]


def test_bootstrap_interval_by_hand():
    assert bootstrap_ci([2.0] * 10, [1.0] * 10) == (2.0, 2.0)
    lo, hi = bootstrap_ci([0, 1] * 10, [1] * 20)
    assert 0.2 <= lo < 0.5 < hi <= 0.8, "binomial, n = 20: about 0.5 +- 0.22"
    detected, n_ref = [1, 2, 0, 3, 1], [2, 2, 1, 4, 2]          # pooled: 7 of 11
    lo, hi = bootstrap_ci(detected, n_ref)
    assert lo < 7 / 11 < hi
    assert bootstrap_ci(detected, n_ref, minus=(detected, n_ref)) == (0.0, 0.0), "paired: same cases, same values"
    better = [d + 1 for d in detected]                            # one lesion more found in every case
    lo, hi = bootstrap_ci(better, n_ref, minus=(detected, n_ref))
    assert 0 < lo <= hi
    assert bootstrap_ci([], []) is None and bootstrap_ci([0, 0], [0, 0]) is None


def test_compare_two_evaluations_paired(tmp_path):
    pred, ref = build_folders(tmp_path)
    evaluate_folders(pred, ref, tmp_path / "a", quiet=True)
    # B: the false positive of case_b removed, everything else the same
    write_case(tmp_path / "pred_b" / "case_b", np.zeros((N,) * 3, np.uint16), site_map(), "report.json", [])
    for case in ("case_a", "case_d", "case_z"):
        shutil.copytree(pred / case, tmp_path / "pred_b" / case)
    evaluate_folders(tmp_path / "pred_b", ref, tmp_path / "b", quiet=True)
    result = compare_evaluations(tmp_path / "a", tmp_path / "b")
    assert result["n_cases"] == 4 and result["only_a"] == result["only_b"] == []
    st = result["statistics"]
    assert st["fp_per_scan"]["a"] == 0.5 and st["fp_per_scan"]["b"] == 0.25
    assert st["fp_per_scan"]["b_minus_a"] == -0.25 and st["fp_per_scan"]["ci95"][1] <= 0
    assert st["fp_per_scan_no_reference_lesions"]["ci95"] == [-1.0, -1.0]
    assert st["sensitivity_ge_0p5ml"]["b_minus_a"] == 0 and st["sensitivity_ge_0p5ml"]["ci95"] == [0.0, 0.0]
    from typer.testing import CliRunner
    from service.cli import app
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["statistics"]["fp_per_scan"]["b"] == 0.25
    # an evaluation made before subregions were scored: that statistic is skipped, the rest compared
    per_case = tmp_path / "a" / "per_case.csv"
    with open(per_case, newline="") as fh:
        old = [{k: v for k, v in r.items() if "subregion" not in k} for r in csv.DictReader(fh)]
    with open(per_case, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(old[0]))
        w.writeheader()
        w.writerows(old)
    result = compare_evaluations(tmp_path / "a", tmp_path / "b")
    assert result["skipped"] == ["subregion_accuracy"] and result["statistics"]["fp_per_scan"]["b"] == 0.25
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert res.exit_code == 0 and "subregion_accuracy" in res.output
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert res.exit_code == 2 and "cannot compare" in res.output


def test_a_prediction_named_after_its_nnunet_image_is_scored_against_its_label(tmp_path):
    """wbmri predict names the output of imagesTs/PAT_0000.nii.gz PAT_0000 (the contract); the label is PAT."""
    lesions = box((N,) * 3, slice(0, 4), slice(0, 4), slice(0, 4), value=1)
    write_case(tmp_path / "ref" / "PAT", lesions, site_map(), None, [])
    write_case(tmp_path / "pred" / "PAT_0000", lesions, site_map(), "report.json", [{"id": 1, "site": "femur_left"}])
    s = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", quiet=True)
    assert s["n_failed"] == 0 and s["edema_dice"]["mean"] == 1.0 and s["sensitivity_ge_0p5ml"] == 1.0
    assert s["unpaired_predictions"] == []
    write_case(tmp_path / "pred" / "PAT", lesions, site_map(), "report.json", [])  # an older run's folder beside it
    s = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval2", quiet=True)
    assert s["n_failed"] == 1 and "two predictions, PAT and PAT_0000" in s["failures"][0]["error"]


def test_reference_sites_derived_from_site_map_without_json(tmp_path):
    lesions = box((N,) * 3, slice(0, 2), slice(0, 2), slice(0, 2), value=1)
    box((N,) * 3, slice(10, 12), slice(10, 12), slice(10, 12), value=2, out=lesions)
    box((N,) * 3, slice(15, 16), slice(15, 16), slice(15, 16), value=3, out=lesions)  # outside all bones
    write_case(tmp_path / "c", lesions, site_map(), None, [])
    case = load_case(tmp_path / "c")
    assert case.lesion_site == {1: "femur_left", 2: "tibia_right", 3: "soft_tissue"}
    assert case.confidence == {1: 1.0, 2: 1.0, 3: 1.0}
    assert case.warnings


def test_another_tools_binary_mask_is_scored_as_its_connected_lesions(tmp_path):
    """A 0/1 lesions.nii.gz with no report beside it (another tool's output) holds one lesion per 26-connected
    component: two hits and one false positive here, not a single lesion overlapping both references."""
    shp = (N,) * 3
    ref = box(shp, slice(1, 4), slice(1, 4), slice(1, 4), value=1)
    box(shp, slice(10, 13), slice(10, 13), slice(10, 13), value=2, out=ref)
    write_case(tmp_path / "ref" / "c", ref, site_map(), "case.json",
               [{"id": 1, "site": "femur_left"}, {"id": 2, "site": "tibia_right"}])
    pred = (ref > 0).astype(np.uint16)
    pred[14:16, 0:2, 0:2] = 1  # away from both: a false positive
    pred[4, 4, 4] = 1  # touches the first blob at a corner: the same lesion
    write_case(tmp_path / "pred" / "c", pred, site_map(), None, [])
    case = load_case(tmp_path / "pred" / "c")
    assert int(case.lesions.max()) == 3 and any("binary mask" in w for w in case.warnings)
    s = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", quiet=True)
    counts = s["lesions"]["all"]
    assert (counts["n_ref"], counts["n_tp"], counts["n_fp"]) == (2, 2, 1)
    assert s["site_accuracy"]["site"] == 1.0


def test_a_lesion_of_exactly_a_size_cut_off_counts_at_or_above_it(tmp_path):
    """On 1 x 1 x 5 mm voxels (|det| / 1000 = 0.004999... in floats) 200 voxels are 1.0 mL and 100 are 0.5 mL:
    the first is >= 1 mL, the second < 1 mL and >= 0.5 mL, as lesions.csv prints them."""
    aff = np.diag([1.0, 1.0, 5.0, 1.0])
    ref = box((20, 20, 20), slice(0, 10), slice(0, 10), slice(0, 2), value=1)
    box((20, 20, 20), slice(12, 17), slice(12, 17), slice(10, 14), value=2, out=ref)
    assert (ref == 1).sum() == 200 and (ref == 2).sum() == 100
    write_case(tmp_path / "ref" / "c", ref, None, "case.json", [{"id": 1}, {"id": 2}], affine=aff)
    write_case(tmp_path / "pred" / "c", ref, None, "report.json", [{"id": 1}, {"id": 2}], affine=aff)
    s = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "eval", quiet=True)
    assert {k: v["n_ref"] for k, v in s["lesions"].items()} == {"all": 2, "lt_1ml": 1, "ge_1ml": 1, "ge_0p5ml": 2}
    assert s["froc"]["n_ref"] == 2
    # the command prints the sensitivity at the size it was asked for
    from typer.testing import CliRunner
    from service.cli import app
    res = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                                   "--out", str(tmp_path / "eval1"), "--min-ml", "1"])
    assert res.exit_code == 0 and '"sensitivity_ge_1ml": 1.0' in res.output, res.output


def test_grid_mismatch_is_a_clear_error():
    check_same_grid((4, 4, 4), AFF, (4, 4, 4), AFF + 5e-4)  # within tolerance
    with pytest.raises(GridMismatchError, match=r"shape \(4, 4, 4\) vs \(4, 4, 5\)"):
        check_same_grid((4, 4, 4), AFF, (4, 4, 5), AFF)
    moved = AFF.copy()
    moved[1, 3] = 0.01
    with pytest.raises(GridMismatchError, match="affines differ by up to 0.01"):
        check_same_grid((4, 4, 4), AFF, (4, 4, 4), moved)


def test_target_check_flags_every_missed_target():
    from training.export import DETECTION, _target_limitation, target_check
    good = {"sensitivity_ge_0p5ml": 0.95, "lesions": {"ge_0p5ml": {"fp_per_scan": 0.2}}, "edema_dice": {"mean": 0.8},
            "site_accuracy": {"site": 0.97}, "mean_site_dice": {"mean": 0.85},
            "fp_per_scan_no_reference_lesions": {"value": 0.1}}
    rows = target_check({"wb": good})
    assert len(rows) == 5 and all(r["met"] for r in rows)
    assert _target_limitation(rows) == []
    bad = {**good, "edema_dice": {"mean": 0.5}, "lesions": {"ge_0p5ml": {"fp_per_scan": 2.0}}}
    rows = target_check({"wb": good, "partial": bad})
    assert [r["metric"] for r in rows if r["met"] is False] == [DETECTION, "edema Dice"]
    assert "2 of its 10 targets" in _target_limitation(rows)[0]
    bad["ci95"] = {"edema_dice": [0.41, 0.58], "sensitivity_ge_0p5ml": [0.9, 0.99], "fp_per_scan": [1.5, 2.5]}
    rows = target_check({"partial": bad})
    assert [r["ci95"] for r in rows if r["metric"] == "edema Dice"] == [[0.41, 0.58]]
    text = _target_limitation(rows)[0]
    assert "edema Dice 0.50 (target >= 0.75, 95% interval 0.41-0.58)" in text
    assert ("sensitivity for lesions >= 0.5 mL 0.95 at 2.00 false positives per scan (target >= 0.9 at <= 0.5 "
            "false positives per scan; 95% intervals 0.90-0.99 and 1.50-2.50)") in text
    good["ci95"] = {"fp_per_scan_no_reference_lesions": [0.0, 0.57], "edema_dice": [0.76, 0.84]}
    text = _target_limitation(target_check({"wb": good}))
    assert len(text) == 1 and "NOT" not in text[0], "a target met within its interval is not called missed"
    assert "1 more on the point estimate only" in text[0]
    assert "false positives per lesion-free scan 0.10 (target <= 0.3, 95% interval 0.00-0.57)" in text[0]
    assert "edema Dice" not in text[0], "a met target whose interval clears it is not listed"


def test_a_run_that_validated_nothing_names_the_validation_of_the_rules_it_inherited(tmp_path):
    """Two fine-tunes in a row with ``data.val_cases: 0`` keep the first model's lesion rules: the card names the
    seeds those rules were chosen on, not an empty range."""
    import json

    import yaml

    from training.export import _validation_seeds
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "card.json").write_text(json.dumps({"version": "1.2.7", "data": {
        "validation_seeds": "900000..900095"}}))
    previous = tmp_path / "base"
    for name in ("a", "b"):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "card.json").write_text(json.dumps({"version": "7", "data": {
            "validation_seeds": "900000..899999"}}))  # what a run that validated nothing used to write
        (tmp_path / name / "metrics.csv").write_text("step\n1\n")
        cfg = {"init": str(previous), "data": {"val_seed": 900000, "val_cases": 0}}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
        previous = tmp_path / name / "final"
    assert _validation_seeds(cfg) == f"900000..900095 (the lesion rules are inherited from {tmp_path / 'base'} (1.2.7))"
    assert _validation_seeds({"data": {"val_seed": 900000, "val_cases": 96}, "init": str(previous)}) == "900000..900095"


def test_detection_target_needs_both_figures():
    """Sensitivity and the false-positive rate are one target: each alone missing fails it, both met passes."""
    from training.export import target_check
    base = {"edema_dice": {"mean": 0.8}}
    for sens, fp, met in [(0.95, 0.4, True), (0.95, 0.6, False), (0.5, 0.4, False), (0.9, 0.5, True)]:
        row = target_check({"wb": {**base, "sensitivity_ge_0p5ml": sens,
                                   "lesions": {"ge_0p5ml": {"fp_per_scan": fp}}}})[0]
        assert (row["met"], row["value"], row["fp_per_scan"]) == (met, sens, fp)
    assert target_check({"wb": base})[0]["met"] is None


def test_a_reference_lesion_without_a_site_is_left_out_of_site_accuracy():
    from training.metrics import matched_site_pairs
    pred = np.zeros((6, 6, 6), np.uint8)
    ref = np.zeros_like(pred)
    pred[1:3, 1:3, 1:3] = 1
    ref[1:3, 1:3, 1:3] = 1
    pred[4:6, 4:6, 4:6] = 2
    ref[4:6, 4:6, 4:6] = 2
    m = match_lesions(pred, ref)
    pairs = matched_site_pairs(m, {1: "femur_left", 2: "tibia_left"}, {1: "femur_left"})  # lesion 2: site unknown
    assert pairs == [("femur_left", "femur_left", None, None)]
    assert site_agreement(pairs).n == 1
