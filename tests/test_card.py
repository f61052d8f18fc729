"""`wbmri card`: a bundle's test-set figures re-attached after its lesion rules changed, refused for other rules."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from inference.batch import predict_many
from inference.predictor import Predictor
from models import SOFTWARE
from models.card import CARD, load_bundle
from training.evaluate import evaluate_folders
from training.export import rescore_card
from training.phantom.generate import synth_dataset


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "card", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir):
    """A copy of the tiny bundle whose rules `wbmri validate` changed, and a real evaluation of it on one phantom."""
    root = tmp_path_factory.mktemp("card")
    bundle = root / "bundle"
    shutil.copytree(tiny_model_dir, bundle)
    card = json.loads((bundle / CARD).read_text())
    card["thresholds"] = {"edema": 0.4, "min_lesion_ml": 0.0, "min_bone_fraction": 0.0, "min_confidence": 0.0}
    card["validation"] = {"lesion_f1": 0.5, "val_cases": 3, "val_seeds": "900000..900002"}
    (bundle / CARD).write_text(json.dumps(card))
    data = root / "data"
    synth_dataset(n=1, out=data, seed=3, overrides=["anatomy_mm=4", "fov.p={knees: 1.0}", "lesions.none_p=0"])
    cases = sorted((data / "cases").glob("*/image.nii.gz"))
    evaluation = root / "eval"
    predict_many(Predictor.load(bundle, device="cpu", precision="fp32"), cases, evaluation / "predictions",
                 names=[p.parent.name for p in cases], progress=False)
    evaluate_folders(evaluation / "predictions", data / "cases", evaluation, quiet=True)
    return bundle, evaluation


def test_card_takes_the_figures_of_an_evaluation_of_the_bundle(evaluated):
    bundle, evaluation = evaluated
    proc = _cli(str(bundle), "--eval", f"partial_fov={evaluation}", "--command", "wbmri evaluate ...",
                "--min-cases", "1")  # a one-phantom trial; a real card needs a frozen test set of 20
    assert proc.returncode == 0, proc.stderr
    card = load_bundle(bundle).card  # the sha256 still verifies
    summary = json.loads((evaluation / "summary.json").read_text())
    assert card["metrics"]["frozen_synthetic_test_set"] == {"partial_fov": summary}
    assert card["metrics"]["command"] == "wbmri evaluate ..."
    assert card["metrics"]["devices"] == {"partial_fov": ["cpu fp32"]}  # what the evaluation's reports ran in
    assert [row["test_set"] for row in card["targets"]] == ["partial_fov"] * 5
    assert card["targets"][0]["fp_per_scan"] == summary["lesions"]["ge_0p5ml"]["fp_per_scan"]
    assert card["targets"][1]["value"] == summary["edema_dice"]["mean"]
    assert "validation" not in card and card["training"]["validation_at_selection"]["val_cases"] == 3
    assert card["data"]["validation_seeds"] == "900000..900002"
    assert "edema Dice" in proc.stdout and ("MISSED" in proc.stdout or "met" in proc.stdout)
    # the detection target prints its sensitivity at its false-positive rate
    assert re.search(r"at <= 0\.5 false positives per scan +(\d\.\d{3}|n/a) at \d+\.\d{2} \(target >= 0\.9 at", proc.stdout)


def test_card_refuses_evaluations_made_with_other_rules(evaluated, tmp_path):
    bundle, evaluation = evaluated
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    card = json.loads((other / CARD).read_text())
    card["thresholds"]["edema"] = 0.5  # as after another `wbmri validate`: the evaluation is stale
    (other / CARD).write_text(json.dumps(card))
    before = (other / CARD).read_text()
    with pytest.raises(ValueError, match="was not made with"):
        rescore_card(other, {"partial_fov": evaluation})
    proc = _cli(str(other), "--eval", f"partial_fov={evaluation}")
    assert proc.returncode == 2 and "card not changed" in proc.stderr
    assert (other / CARD).read_text() == before
    empty = tmp_path / "scored_elsewhere"
    empty.mkdir()
    (empty / "summary.json").write_text((evaluation / "summary.json").read_text())
    with pytest.raises(ValueError, match="no predictions"):
        rescore_card(other, {"partial_fov": empty})
    proc = _cli(str(other), "--eval", str(evaluation))
    assert proc.returncode == 2 and "NAME=DIR" in proc.stderr


def test_card_refuses_evaluations_made_by_another_software_version(evaluated, tmp_path):
    bundle, evaluation = evaluated
    old = tmp_path / "old_eval"
    shutil.copytree(evaluation, old)
    report = next((old / "predictions").glob("*/report.json"))
    made = json.loads(report.read_text())
    assert made["model"]["software"] == SOFTWARE
    del made["model"]["software"]  # as written before reports named the software version
    report.write_text(json.dumps(made))
    with pytest.raises(ValueError, match="was not made with"):
        rescore_card(bundle, {"partial_fov": old})
    assert rescore_card(bundle, {"partial_fov": evaluation}, min_cases=1)["metrics"]["software"] == SOFTWARE


def test_card_refuses_a_small_evaluation_and_one_that_drops_a_recorded_test_set(evaluated, tmp_path):
    bundle, evaluation = evaluated
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    before = (other / CARD).read_text()
    proc = _cli(str(other), "--eval", f"partial_fov={evaluation}")  # one phantom, against the default 20
    assert proc.returncode == 2 and "scored 1 cases" in proc.stderr and "at least 20" in proc.stderr, proc.stderr
    assert (other / CARD).read_text() == before
    rescore_card(other, {"partial_fov": evaluation, "whole_body": evaluation}, min_cases=1)
    recorded = (other / CARD).read_text()
    with pytest.raises(ValueError, match="holds test figures of whole_body too"):
        rescore_card(other, {"partial_fov": evaluation}, min_cases=1)
    assert (other / CARD).read_text() == recorded
