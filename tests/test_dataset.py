"""A user's labelled dataset in nnU-Net raw layout: what is read, what is refused, and how the error reads."""
from __future__ import annotations

import csv
import json
import re
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from training.data import load_npz, nnunet_cases
from training.nnunet import DatasetError

SPACING = (4.0, 4.0, 4.0)
SHAPE = (24, 20, 16)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _image(rng: np.random.Generator) -> np.ndarray:
    img = 100 + 10 * rng.random(SHAPE, dtype=np.float32)
    img[8:16, 6:14, 4:12] += 400  # a bright block
    return img


def _label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 2:8, 5:11] = 1  # off-centre: a mirrored label lands elsewhere
    return lab


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def make_dataset(root: Path, names=("PAT01", "PAT02"), labels: dict | None = None) -> Path:
    """imagesTr/NAME_0000.nii.gz and labelsTr/NAME.nii.gz for each name, plus dataset.json."""
    rng = np.random.default_rng(0)
    for name in names:
        _save(root / "imagesTr" / f"{name}_0000.nii.gz", _image(rng))
        _save(root / "labelsTr" / f"{name}.nii.gz", _label())
    ds = {"channel_names": {"0": "STIR"}, "labels": labels or {"background": 0, "edema": 1},
          "numTraining": len(names), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(ds))
    return root


def _cached_edema(root: Path, tmp_path: Path, name: str = "PAT01") -> np.ndarray:
    files = nnunet_cases(root, SPACING, tmp_path / "cache")
    return load_npz(next(p for p in files if p.stem == name))["edema"]


def test_a_label_in_another_axis_order_is_reordered_onto_the_image(tmp_path):
    root = make_dataset(tmp_path / "ds")
    reference = _cached_edema(root, tmp_path)
    assert reference.sum() > 0
    # the same mask written LPS (first two axes reversed, affine to match): the same voxels in the world
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [(SHAPE[0] - 1), (SHAPE[1] - 1)]
    lps = AFFINE @ flip
    _save(root / "labelsTr" / "PAT01.nii.gz", _label()[::-1, ::-1].copy(), lps)
    np.testing.assert_array_equal(_cached_edema(root, tmp_path / "second"), reference)


@pytest.mark.parametrize("change, message", [
    ("shift", "voxel grid is not the image's"),
    ("spacing", re.escape("voxel spacing (2.01, 2, 3) mm is not the image's (2, 2, 3) mm")),
    ("shape", "does not match the image's"),
    ("soft", "whole numbers"),
    ("nan_image", "NaN"),
])
def test_a_label_that_does_not_fit_its_image_names_the_file(tmp_path, change, message):
    root = make_dataset(tmp_path / "ds")
    label = root / "labelsTr" / "PAT02.nii.gz"
    if change == "shift":
        moved = AFFINE.copy()
        moved[:3, 3] = 30.0
        _save(label, _label(), moved)
    elif change == "spacing":
        wider = AFFINE.copy()
        wider[0, 0] = 2.01
        _save(label, _label(), wider)
    elif change == "shape":
        _save(label, _label()[:-4])
    elif change == "soft":
        _save(label, _label().astype(np.float32) * 0.3)
    else:
        img = _image(np.random.default_rng(1))
        img[0, 0, 0] = np.nan
        _save(root / "imagesTr" / "PAT02_0000.nii.gz", img)
    for workers in (1, 2):  # the same message whether cases are cached one at a time or in parallel
        with pytest.raises(DatasetError, match=message) as err:
            nnunet_cases(root, SPACING, tmp_path / f"cache{workers}", workers)
        assert "PAT02" in str(err.value) and "1 of 2 cases" in str(err.value)


def test_float_labels_and_large_lesion_ids_keep_their_lesions(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _save(root / "labelsTr" / "PAT01.nii.gz", _label().astype(np.float32) * 0.999)
    assert _cached_edema(root, tmp_path).sum() > 0
    ids = np.zeros(SHAPE, np.int32)
    ids[3:9, 2:8, 4:7] = 40_000
    ids[3:9, 2:8, 9:12] = 70_000
    _save(root / "labelsTr" / "PAT02.nii.gz", ids)
    case = load_npz(next(p for p in nnunet_cases(root, SPACING, tmp_path / "c2") if p.stem == "PAT02"))
    assert case["edema"].sum() > 0
    assert set(np.unique(case["instances"]).tolist()) == {0, 1, 2}


def test_every_problem_of_the_dataset_is_listed_at_once(tmp_path):
    root = make_dataset(tmp_path / "ds", names=("PAT01", "PAT02", "PAT03"))
    (root / "labelsTr" / "PAT02.nii.gz").unlink()
    os.rename(root / "imagesTr" / "PAT03_0000.nii.gz", root / "imagesTr" / "PAT03.nii.gz")
    _save(root / "imagesTr" / "PAT01_0001.nii.gz", _image(np.random.default_rng(2)))
    with pytest.raises(DatasetError) as err:
        nnunet_cases(root, SPACING, tmp_path / "cache")
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "labelsTr/PAT02.nii.gz: missing" in text
    assert "imagesTr/PAT03.nii.gz: images are named NAME_0000" in text
    assert "imagesTr/PAT01_0001.nii.gz: a second channel" in text


@pytest.mark.parametrize("dataset_json, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"labels": {"background": 0, "edema": 1, "bone": 2}}), "2 foreground classes"),
    (json.dumps({"file_ending": ".mha"}), "file_ending '.mha'"),
    (json.dumps({"channel_names": {"0": "STIR", "1": "T1"}}), "2 channels"),
    ("{}", "no 'labels' key"),  # an empty or misspelled file must not let a multi-class label train as edema
    (json.dumps({"modalities": {"0": "STIR"}, "label": {"background": 0, "edema": 1, "bone": 2},
                 "fileending": ".nii.gz"}), "no 'labels' key"),
])
def test_dataset_json_that_wbmri_cannot_follow_is_refused(tmp_path, dataset_json, message):
    root = make_dataset(tmp_path / "ds")
    (root / "dataset.json").write_text(dataset_json)
    with pytest.raises(DatasetError, match=message) as err:
        nnunet_cases(root, SPACING, tmp_path / "cache")
    assert "dataset.json" in str(err.value)


def test_an_nnunet_v1_dataset_json_is_read(tmp_path):
    """nnU-Net v1's dataset.json (modality; labels from values to names; no file_ending) trains as v2's does; a
    v1 file with two foreground classes is still refused (v1's labels were read as names: 'background' counted)."""
    root = make_dataset(tmp_path / "ds")
    v1 = {"name": "MyCNO", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "edema"}, "numTraining": 2,
          "training": [{"image": "./imagesTr/PAT01.nii.gz", "label": "./labelsTr/PAT01.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(v1))
    assert _cached_edema(root, tmp_path).any()
    (root / "dataset.json").write_text(json.dumps({**v1, "labels": {"0": "background", "1": "edema", "2": "bone"}}))
    with pytest.raises(DatasetError, match=r"2 foreground classes \(edema, bone\)"):
        nnunet_cases(root, SPACING, tmp_path / "cache2")


def test_files_that_would_silently_drop_out_are_listed_with_the_dataset_json_problems(tmp_path):
    root = make_dataset(tmp_path / "ds", names=("PAT01", "PAT02", "PAT03"))
    _save(root / "labelsTr" / "PAT09.nii.gz", _label())  # a label without its image
    os.rename(root / "imagesTr" / "PAT02_0000.nii.gz", root / "imagesTr" / "PAT02_0000.NII.GZ")
    (root / "imagesTr" / "PAT04_0000.mha").write_bytes(b"not NIfTI")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"")  # hidden files are nobody's cases
    ds = json.loads((root / "dataset.json").read_text())
    del ds["file_ending"]
    (root / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(DatasetError) as err:
        nnunet_cases(root, SPACING, tmp_path / "cache")
    text = str(err.value)
    for problem in ("dataset.json: no 'file_ending' key", "labelsTr/PAT09.nii.gz: no image",
                    "imagesTr/PAT02_0000.NII.GZ: name the file's ending in lower case",
                    "imagesTr/PAT04_0000.mha: not a NIfTI file", "numTraining is 3, imagesTr/ holds the images of 2"):
        assert problem in text, text
    assert ".DS_Store" not in text and not (tmp_path / "cache").exists()


def test_site_ids_outside_the_vocabulary_are_refused_before_training(tmp_path):
    root = make_dataset(tmp_path / "ds")
    sites = np.zeros(SHAPE, np.uint8)
    sites[8:16, 6:14, 4:12] = 200
    _save(root / "sitesTr" / "PAT01.nii.gz", sites)
    with pytest.raises(DatasetError, match=r"sitesTr/PAT01.nii.gz: site ids must be 0\.\.66"):
        nnunet_cases(root, SPACING, tmp_path / "cache")
    shifted = AFFINE.copy()
    shifted[:3, 3] = 30.0
    _save(root / "labelsTr" / "PAT01.nii.gz", _label(), shifted)  # a second problem in the same case
    with pytest.raises(DatasetError) as err:
        nnunet_cases(root, SPACING, tmp_path / "cache")
    assert "labelsTr/PAT01.nii.gz: its voxel grid" in str(err.value) and "sitesTr/PAT01.nii.gz: site ids" in str(err.value)


def test_a_label_replaced_by_an_older_file_is_cached_again(tmp_path):
    root = make_dataset(tmp_path / "ds")
    label = root / "labelsTr" / "PAT01.nii.gz"
    assert _cached_edema(root, tmp_path).sum() > 0
    _save(label, np.zeros(SHAPE, np.uint8))
    os.utime(label, ns=(1_000_000_000, 1_000_000_000))  # as `cp -p` of an old file leaves it
    assert _cached_edema(root, tmp_path).sum() == 0


def test_train_cli_reports_data_and_config_problems_without_a_traceback(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "PAT02.nii.gz").unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "no such config file" in res.output
    res = runner.invoke(app, ["train", "--config", "configs/train/tiny.yaml", "--prepare-only",
                              "--set", f"data.dataset_dirs=[{root}]", "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert res.exit_code == 2 and "labelsTr/PAT02.nii.gz: missing" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--config", "configs/train/tiny.yaml", "--out-dir", str(tmp_path / "run"),
                              "--set", "data.phantom_cases=0", "--set", "data.val_cases=0"])
    assert res.exit_code == 2 and "no training cases" in res.output
    res = runner.invoke(app, ["train", "--config", "configs/train/tiny.yaml", "--init", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "--init:" in res.output and "not a model bundle" in res.output
    res = runner.invoke(app, ["train", "--config", "configs/train/tiny.yaml", "--set", "network.channels=[16,32]"])
    assert res.exit_code == 2 and "strides needs one entry fewer" in res.output


def test_other_commands_report_missing_paths_in_one_line(tmp_path):
    """export, show and evaluate on paths that do not exist: exit status 2, one message, no traceback, nothing
    written."""
    runner = CliRunner()
    for args, phrase in ((["export", str(tmp_path / "no_run"), "--to", str(tmp_path / "bundle")], "not a model bundle"),
                         (["show", str(tmp_path / "no_case")], "no image.nii.gz"),
                         (["evaluate", "--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r"),
                           "--out", str(tmp_path / "ev")], "cannot evaluate"),
                         (["evaluate", "--pred", str(tmp_path / "p"), "--ref", "data/README.md",
                           "--out", str(tmp_path / "ev")], "is not a folder of predicted case folders"),
                         (["evaluate", "--pred", "data", "--ref", "data/README.md",
                           "--out", str(tmp_path / "ev")], "is not a folder of reference case folders")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and phrase in res.output and "Traceback" not in res.output, (args, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _evaluate(root: Path, out: Path):
    """``wbmri evaluate`` of the shipped model on a dataset: the CLI result and, when it succeeded, per_case.csv's
    rows by case."""
    res = CliRunner().invoke(app, ["evaluate", "--model", "models/default", "--data", str(root), "--out", str(out),
                                   "--device", "cpu"])
    rows = {r["case"]: r for r in csv.DictReader(open(out / "per_case.csv"))} if res.exit_code in (0, 1) else {}
    return res, rows


def test_evaluate_scores_a_model_on_a_labelled_nnunet_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds")
    two = _label()
    two[14:20, 12:18, 5:11] = 1  # a second, separate lesion
    _save(root / "labelsTr" / "PAT02.nii.gz", two)
    out = tmp_path / "eval"
    res, rows = _evaluate(root, out)
    assert res.exit_code == 0, res.output
    assert {k: int(v["n_ref"]) for k, v in rows.items()} == {"PAT01": 1, "PAT02": 2}
    assert all(v["status"] == "ok" for v in rows.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2
    # no sitesTr: the lesions' sites are unknown, not soft tissue, and no site accuracy is claimed
    assert summary["site_accuracy"]["site"] is None and summary["site_accuracy"]["n_matched"] == 0, summary["site_accuracy"]
    assert "soft_tissue" not in summary["by_region"] or not summary["by_region"]["soft_tissue"]["n_ref"]
    _save(out / "reference" / "GHOST" / "lesions.nii.gz", _label())  # left by an earlier run: not scored again
    res, _ = _evaluate(root, out)
    assert res.exit_code == 0 and json.loads((out / "summary.json").read_text())["n_cases"] == 2
    (root / "labelsTr" / "PAT01.nii.gz").unlink()
    res, _ = _evaluate(root, out)
    assert res.exit_code == 2 and "labelsTr/PAT01.nii.gz: missing" in res.output
    _save(root / "labelsTr" / "PAT01.nii.gz", _label())
    shifted = AFFINE.copy()
    shifted[:3, 3] = 30.0
    _save(root / "labelsTr" / "PAT02.nii.gz", _label(), shifted)  # a label off its image's grid
    before = sorted(p.relative_to(out) for p in (out / "reference").rglob("*"))
    res, _ = _evaluate(root, out)
    assert res.exit_code == 2 and "PAT02.nii.gz" in res.output, res.output
    assert sorted(p.relative_to(out) for p in (out / "reference").rglob("*")) == before, \
        "a refused dataset leaves the earlier evaluation's references as they were"
    assert not list(out.glob(".reference*")), "nothing staged is left behind"


def test_evaluate_on_a_dataset_scores_a_case_whose_image_cannot_be_predicted_as_failed(tmp_path):
    """References are made from the label files and the image headers; an image's voxels are read once, when it is
    predicted, so a NaN image fails its own case (every lesion missed) and the others are scored."""
    root = make_dataset(tmp_path / "ds")
    bad = _image(np.random.default_rng(1))
    bad[0, 0, 0] = np.nan
    _save(root / "imagesTr" / "PAT02_0000.nii.gz", bad)
    out = tmp_path / "eval"
    res, rows = _evaluate(root, out)
    assert res.exit_code == 1 and "1 of 2 cases had no usable prediction" in res.output, res.output
    assert rows["PAT01"]["status"] == "ok" and rows["PAT02"]["status"] == "failed"
    assert "NaN" in rows["PAT02"]["error"] and rows["PAT02"]["detected"] == "0"
    # a result of other weights left in the folder is redone; when that fails, the old result is not scored
    stale = out / "predictions" / "PAT02"
    shutil.copytree(out / "predictions" / "PAT01", stale)
    report = json.loads((stale / "report.json").read_text())
    report["model"]["sha256"] = "0" * 64
    (stale / "report.json").write_text(json.dumps(report))
    res, rows = _evaluate(root, out)
    assert rows["PAT02"]["status"] == "failed" and "NaN" in rows["PAT02"]["error"]
    assert res.exit_code == 1 and "no usable prediction for PAT02" in res.output, "a failed case is not scored quietly"


def test_an_image_grid_is_read_from_its_header_alone(tmp_path):
    from models.nifti import InputError, load_volume, read_grid
    path = tmp_path / "img.nii.gz"
    _save(path, _image(np.random.default_rng(0)))
    shape, affine = read_grid(path)
    vol = load_volume(path)
    assert shape == vol.data.shape and np.array_equal(affine, vol.affine)
    path.write_bytes(path.read_bytes()[:40])  # a truncated gzip stream: no header to read
    with pytest.raises(InputError, match="gzip"):
        read_grid(path)


def test_held_out_folders_are_checked_first_with_the_training_ones_and_kept_apart(tmp_path):
    train = make_dataset(tmp_path / "train", names=("PAT01", "PAT02"))
    bad_train = make_dataset(tmp_path / "bad_train", names=("PAT05",))
    (bad_train / "labelsTr" / "PAT05.nii.gz").unlink()
    held_out = make_dataset(tmp_path / "held_out", names=("PAT03",))
    (held_out / "labelsTr" / "PAT03.nii.gz").unlink()
    base = ["train", "--config", "configs/train/tiny.yaml", "--out-dir", str(tmp_path / "run"), "--prepare-only",
            "--set", "data.phantom_cases=0", "--set", "data.val_cases=1", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    res = CliRunner().invoke(app, [*base, "--set", f"data.dataset_dirs=[{train},{bad_train}]",
                                   "--set", f"data.val_dataset_dirs=[{held_out}]"])
    assert res.exit_code == 2 and "labelsTr/PAT05.nii.gz: missing" in res.output, res.output
    assert "labelsTr/PAT03.nii.gz: missing" in res.output, "the held-out folder's problems come in the same pass"
    assert not list((tmp_path / "c").glob("val_*/*.npz")), "no validation phantom is made before the folders pass"
    res = CliRunner().invoke(app, [*base, "--set", f"data.dataset_dirs=[{train}]",
                                   "--set", f"data.val_dataset_dirs=[{train}]"])
    assert res.exit_code == 2 and "in both dataset_dirs and val_dataset_dirs" in res.output, res.output


def test_a_users_held_out_scans_validate_the_fine_tune(tmp_path):
    train = make_dataset(tmp_path / "train", names=("PAT01", "PAT02"))
    held_out = make_dataset(tmp_path / "held_out", names=("PAT03",))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--config", "configs/train/tiny.yaml", "--out-dir", str(run),
                                   "--set", "data.phantom_cases=0", "--set", "data.val_cases=0",
                                   "--set", f"data.dataset_dirs=[{train}]", "--set", f"data.val_dataset_dirs=[{held_out}]",
                                   "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "optim.steps=2",
                                   "--set", "val_every=2", "--set", "network.patch=[16,16,16]"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert rows[-1]["val_lesion_f1"] != ""  # scored on PAT03
    assert (run / "best" / "card.json").is_file()

    # the lesion rules re-chosen on the held-out scans alone, with every candidate rule's figures in a table
    table = tmp_path / "rules.csv"
    res = CliRunner().invoke(app, ["validate", str(run / "best"), "--val-cases", "0", "--table", str(table)])
    assert res.exit_code == 0, res.output
    chosen = json.loads((run / "best" / "card.json").read_text())["validation"]
    assert chosen["val_seeds"] is None and chosen["val_dataset_dirs"] == [str(held_out)]
    rules = list(csv.DictReader(open(table)))
    assert len(rules) == 13 * 3 * 3 * 7  # thresholds x bone shares x sizes (0.1, 0.25, 0.5 mL) x confidences (0-0.9)
    assert {"sens_scan", "fp_per_scan_scan"} <= set(rules[0])  # PAT03 has no field of view: kind "scan"
    picked = [r for r in rules if float(r["threshold"]) == chosen["threshold"]
              and float(r["min_confidence"]) == chosen["min_confidence"]
              and float(r["min_lesion_ml"]) == chosen["min_lesion_ml"]
              and float(r["min_bone_fraction"]) == chosen["min_bone_fraction"]]
    assert len(picked) == 1 and float(picked[0]["lesion_f1"]) == pytest.approx(chosen["lesion_f1"])
    res = CliRunner().invoke(app, ["validate", str(run / "best"), "--val-cases", "0", "--set", "data.val_dataset_dirs=[]"])
    assert res.exit_code == 2 and "nothing to validate on" in res.output and "Traceback" not in res.output


def test_evaluate_on_a_synth_folder_keeps_its_lesion_instances(tmp_path):
    """A `wbmri synth` folder has cases/ (lesion ids) and the nnU-Net layout (binary labels): two touching lesions
    stay two reference lesions."""
    root = make_dataset(tmp_path / "synth", names=("case_000001",))
    touching = np.zeros(SHAPE, np.uint16)
    touching[3:9, 2:8, 5:8] = 1
    touching[3:9, 2:8, 8:11] = 2
    case = root / "cases" / "case_000001"
    _save(case / "lesions.nii.gz", touching)
    os.link(root / "imagesTr" / "case_000001_0000.nii.gz", case / "image.nii.gz")
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", "--model", "models/default", "--data", str(root), "--out", str(out),
                                   "--device", "cpu", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [(r["case"], int(r["n_ref"])) for r in rows] == [("case_000001", 2)]
    report = json.loads((out / "predictions" / "case_000001" / "report.json").read_text())
    assert report["model"]["device"] == "cpu fp32"  # the card records it (bf16 and fp32 can differ by a lesion)
    res = CliRunner().invoke(app, ["evaluate", "--model", "models/default", "--data", str(root), "--out", str(out),
                                   "--precision", "half"])
    assert res.exit_code == 2 and "precision must be auto, bf16 or fp32" in res.output


def test_a_binary_label_caches_each_lesion_apart_and_old_caches_are_made_again(tmp_path):
    """Validation on a user's held-out scans scores lesion by lesion: the two lesions of a binary mask are two
    reference lesions (the whole mask was one, so finding either lesion counted both as found)."""
    root = make_dataset(tmp_path / "ds", names=("PAT01",))
    two = _label()
    two[14:20, 12:18, 5:11] = 1  # a second, separate lesion
    _save(root / "labelsTr" / "PAT01.nii.gz", two)
    path = nnunet_cases(root, SPACING, tmp_path / "cache")[0]
    instances = load_npz(path)["instances"]
    assert sorted(np.unique(instances).tolist()) == [0, 1, 2]
    assert set(instances[load_npz(path)["edema"] > 0].tolist()) == {1, 2}
    ids = two.astype(np.uint16)
    ids[14:20, 12:18, 5:11] = 7  # a label with lesion ids keeps them (renumbered), even where they touch
    ids[9, 2:8, 5:11] = 7
    _save(root / "labelsTr" / "PAT01.nii.gz", ids)
    assert sorted(np.unique(load_npz(nnunet_cases(root, SPACING, tmp_path / "cache")[0])["instances"]).tolist()) == [0, 1, 2]
    # a cache written before the split (format 1: no format in its stamp) is made again
    _save(root / "labelsTr" / "PAT01.nii.gz", two)
    path = nnunet_cases(root, SPACING, tmp_path / "cache")[0]
    stamp = path.with_suffix(".sources.json")
    old = {k: v for k, v in json.loads(stamp.read_text()).items() if k != "format"}
    stamp.write_text(json.dumps(old))
    case = load_npz(path)
    case["instances"] = (case["instances"] > 0).astype(np.uint16)
    np.savez_compressed(path, **case)
    assert sorted(np.unique(load_npz(nnunet_cases(root, SPACING, tmp_path / "cache")[0])["instances"]).tolist()) == [0, 1, 2]


def test_train_without_a_config_where_the_default_one_is_missing_says_so(tmp_path, monkeypatch):
    import service.cli as cli
    monkeypatch.setattr(cli, "_ROOT", tmp_path)  # as in a pip-installed wbmri: no configs/ beside the code
    res = CliRunner().invoke(app, ["train", "--set", "optim.steps=1"])
    assert res.exit_code == 2 and "no --config given" in res.output and "carries no configs/" in res.output, res.output
    assert not list(tmp_path.iterdir())
