"""Inference mechanics with a tiny real model: bad inputs, batch isolation, resumption, atomic outputs, devices."""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from inference.batch import REPLACED_MESSAGE, expand_inputs, predict_many
from inference.predictor import Predictor
from models.nifti import case_name, case_names
from inference.report import validate_report
from models import SOFTWARE
from models.networks import resolve_device
from models.nifti import InputError, header_from_bytes


def blob_volume(shape=(48, 40, 56), spacing=(3.0, 3.0, 3.0)) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, shape).astype(np.float32)
    data[10:30, 10:30, 10:40] += 400
    return nib.Nifti1Image(data, np.diag([*spacing, 1.0]))


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return Predictor.load(tiny_model_dir, device="cpu")


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.nii.gz"
    nib.save(blob_volume(), str(path))
    return path


def write_bad(tmp_path, kind: str):
    path = tmp_path / f"{kind}.nii.gz"
    img = blob_volume()
    if kind == "not_nifti":
        path = tmp_path / "not_nifti.nii"
        path.write_text("this is a text file, not an image\n" * 50)
    elif kind == "truncated_gzip":
        nib.save(img, str(path))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "corrupt_gzip":
        nib.save(img, str(path))
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = b"\x00" * 64
        path.write_bytes(bytes(raw))
    elif kind == "two_d":
        nib.save(nib.Nifti1Image(np.ones((40, 40), np.float32), np.eye(4)), str(path))
    elif kind == "four_d":
        nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20, 5).astype(np.float32), np.eye(4)), str(path))
    elif kind == "nan":
        d = img.get_fdata().astype(np.float32)
        d[5, 5, 5] = np.nan
        nib.save(nib.Nifti1Image(d, img.affine), str(path))
    elif kind == "zero_spacing":
        zero = nib.Nifti1Image(img.get_fdata().astype(np.float32), None)
        zero.header.set_zooms((3.0, 3.0, 0.0))  # no sform/qform: the affine comes from pixdim
        nib.save(zero, str(path))
    elif kind == "zero_spacing_qform":
        path.write_bytes(gzip.compress(qform_only_zero_spacing(img)))
    elif kind == "all_zero":
        nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.float32), np.eye(4)), str(path))
    elif kind == "absurd_dims":
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((4000, 4000, 4000))
        hdr.set_data_dtype(np.float32)
        with gzip.open(path, "wb") as fh:  # a header that promises 256 GB, with almost no data behind it
            fh.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    elif kind == "no_orientation":
        bare = nib.Nifti1Image(img.get_fdata().astype(np.float32), None)
        bare.header.set_zooms((3.0, 3.0, 3.0))  # valid spacing, but qform and sform codes 0: no orientation
        nib.save(bare, str(path))
    elif kind == "rgb":
        rgb = np.zeros((40, 40, 40), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    elif kind == "complex":
        nib.save(nib.Nifti1Image(np.ones((40, 40, 40), np.complex64), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    elif kind == "absurd_dims_truncated":
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((4000, 4000, 4000))
        hdr.set_data_dtype(np.float32)
        raw = gzip.compress(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 100_000)
        path.write_bytes(raw[: len(raw) // 2])  # the header is read before the (broken) stream is inflated
    return path


def qform_only_zero_spacing(img) -> bytes:
    """``img`` as NIfTI-1 bytes whose orientation is its qform alone (sform code 0) and whose third voxel size
    (pixdim[3], the qform's) is 0: nibabel would load it with 1 mm there."""
    hdr = img.header.copy()
    hdr.set_qform(img.affine, code=1)
    hdr.set_sform(img.affine, code=0)
    raw = bytearray(nib.Nifti1Image(np.asanyarray(img.dataobj), None, hdr).to_bytes())
    assert struct.unpack("<i", raw[:4])[0] == 348 and int(np.frombuffer(raw[254:256], "<i2")[0]) == 0
    raw[88:92] = struct.pack("<f", 0.0)  # pixdim[3]: the header's float32 pixdim[8] starts at byte 76
    return bytes(raw)


BAD = {"not_nifti": "not a readable NIfTI", "truncated_gzip": "gzip", "corrupt_gzip": "gzip", "two_d": "2D",
       "four_d": "4D with 5 volumes", "nan": "NaN", "zero_spacing": "spacing",
       "zero_spacing_qform": "zero or negative", "all_zero": "constant",
       "absurd_dims": "over the budget", "absurd_dims_truncated": "over the budget",
       "no_orientation": "no orientation", "rgb": "colour (RGB) values", "complex": "complex values"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_gets_one_clear_message(tmp_path, predictor, kind):
    path = write_bad(tmp_path, kind)
    with pytest.raises(InputError) as exc:
        predictor.predict(path)
    assert BAD[kind] in str(exc.value)


@pytest.mark.parametrize("name, compress", [("plain_named_gz.nii.gz", False), ("gzip_named_plain.nii", True)])
def test_a_file_is_read_for_what_it_holds_whatever_its_extension(tmp_path, predictor, name, compress):
    img = blob_volume()
    raw = img.to_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if compress else raw)
    result = predictor.predict(path)
    assert result.lesions.shape == img.shape
    np.testing.assert_allclose(result.affine, img.affine)


def test_four_d_with_one_volume_is_accepted(tmp_path, predictor):
    img = blob_volume()
    path = tmp_path / "one_vol.nii.gz"
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32)[..., None], img.affine), str(path))
    result = predictor.predict(path)
    assert result.lesions.shape == img.shape


def test_result_files_follow_the_contract(tmp_path, predictor, good_file):
    result = predictor.predict(good_file)
    folder = result.save(tmp_path / "out")
    assert folder.name == "good"
    assert sorted(p.name for p in folder.iterdir()) == ["lesions.nii.gz", "overlay.png", "report.json", "sites.nii.gz"]
    report = json.loads((folder / "report.json").read_text())
    validate_report(report)
    assert report["study"]["filename"] == "good.nii.gz"
    lesions = nib.load(str(folder / "lesions.nii.gz"))
    sites = nib.load(str(folder / "sites.nii.gz"))
    src = nib.load(str(good_file))
    assert lesions.shape == sites.shape == src.shape
    assert np.allclose(lesions.affine, src.affine) and np.allclose(sites.affine, src.affine)
    assert lesions.get_data_dtype() == np.uint16 and sites.get_data_dtype() == np.uint8
    ids = set(np.unique(np.asarray(lesions.dataobj)).tolist()) - {0}
    assert ids == {les["id"] for les in report["lesions"]}
    assert (folder / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clinical judgement" in report["disclaimer"]


def test_batch_isolates_failures_and_resumes(tmp_path, predictor, good_file):
    bad = write_bad(tmp_path, "nan")
    out = tmp_path / "out"
    first = predict_many(predictor, [good_file, bad], out, progress=False)
    assert [o.status for o in first] == ["done", "failed"]
    assert "NaN" in first[1].error
    assert not (out / "nan").exists(), "a failed case leaves nothing behind"
    assert not list(out.glob(".*partial")), "no half-written folders"
    stamp = (out / "good" / "report.json").stat().st_mtime_ns
    second = predict_many(predictor, [good_file], out, progress=False)
    assert second[0].status == "skipped"
    assert (out / "good" / "report.json").stat().st_mtime_ns == stamp
    third = predict_many(predictor, [good_file], out, overwrite=True, progress=False)
    assert third[0].status == "done"
    report = json.loads((out / "good" / "report.json").read_text())
    report["model"]["sha256"] = "0" * 64  # results of other weights are redone, not reused
    (out / "good" / "report.json").write_text(json.dumps(report))
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "skipped"
    report = json.loads((out / "good" / "report.json").read_text())
    report["model"]["thresholds"]["edema"] += 0.1  # ... and so are results of other lesion rules
    (out / "good" / "report.json").write_text(json.dumps(report))
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    report = json.loads((out / "good" / "report.json").read_text())
    assert report["model"]["software"] == SOFTWARE
    report["model"]["software"] = "wbmri 0.0.1"  # ... and so are results of another software version
    (out / "good" / "report.json").write_text(json.dumps(report))
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    tta = Predictor.load(predictor.bundle.path, device="cpu", tta="flip_lr")  # ... or test-time augmentation
    assert predict_many(tta, [good_file], out, progress=False)[0].status == "done"


def test_batch_redoes_a_scan_replaced_under_the_same_name_and_drops_its_old_result_if_that_fails(
        tmp_path, predictor, good_file):
    from models.card import sha256_file
    out = tmp_path / "out"
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    nib.save(blob_volume(spacing=(3.0, 3.0, 2.5)), str(good_file))  # another scan, the same file name
    again = predict_many(predictor, [good_file], out, progress=False)[0]
    assert again.status == "done", "a result of another file is not this file's result"
    assert again.note == REPLACED_MESSAGE  # and the user is told that another file's result was replaced
    redo = predict_many(predictor, [good_file], out, overwrite=True, progress=False)[0]
    assert redo.status == "done" and redo.note is None  # redoing the same file replaces nothing of another
    assert json.loads((out / "good" / "report.json").read_text())["study"]["sha256"] == sha256_file(good_file)
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "skipped"
    d = blob_volume().get_fdata().astype(np.float32)
    d[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(d, np.diag([3.0, 3.0, 3.0, 1.0])), str(good_file))  # replaced by a broken scan
    failed = predict_many(predictor, [good_file], out, overwrite=True, progress=False)[0]
    assert failed.status == "failed" and "NaN" in failed.error and "made from another file, was removed" in failed.error
    assert not (out / "good").exists(), "the old folder must not pass for the broken file's result"


def test_upper_case_extensions_are_found_and_named_like_lower_case_ones(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(blob_volume(), str(folder / "UPPER.NII.GZ"))
    (folder / "notes.txt").write_text("not an image")
    assert expand_inputs([str(folder)]) == [folder / "UPPER.NII.GZ"]
    assert expand_inputs([str(folder / "*")]) == [folder / "UPPER.NII.GZ"]
    assert case_name(folder / "UPPER.NII.GZ") == "UPPER" and case_name("a/Scan.Nii") == "Scan"


def test_a_folder_of_case_folders_gives_each_case_image_named_by_its_folder(tmp_path, predictor):
    cases = tmp_path / "cases"
    for case in ("case_1", "case_2"):
        (cases / case).mkdir(parents=True)
        nib.save(blob_volume(), str(cases / case / "image.nii.gz"))
        nib.save(blob_volume(), str(cases / case / "lesions.nii.gz"))  # the phantom's labels: not inputs
    files = expand_inputs([str(cases)])
    assert files == [cases / "case_1" / "image.nii.gz", cases / "case_2" / "image.nii.gz"]
    outcomes = predict_many(predictor, files, tmp_path / "out", progress=False)
    assert [(o.name, o.status) for o in outcomes] == [("case_1", "done"), ("case_2", "done")]
    assert case_name("x/Image.nii") == "Image" and case_name("x/scan.nii") == "scan"  # alone: as the contract says
    assert case_names(["a/scan.nii", "b/scan.nii.gz", "c/other.nii"]) == ["a", "b", "other"]
    assert case_names(["a/x/scan.nii", "b/x/scan.nii"]) == ["scan", "scan"]  # the folders tell them no apart either
    assert case_names(["d/a.nii", "d/b.nii", "s/a.nii"]) == ["a", "b", "a"]  # folder d holds two inputs


def test_expand_inputs_files_folders_globs(tmp_path, good_file):
    other = tmp_path / "b.nii"
    nib.save(blob_volume(), str(other))
    assert set(expand_inputs([str(tmp_path)])) == {good_file, other}
    assert expand_inputs([str(tmp_path / "*.nii")]) == [other]
    assert case_name("x/y/study.nii.gz") == "study"
    assert case_name("Dataset/imagesTs/PAT01_0000.nii.gz") == "PAT01_0000"  # the contract: the file name, whole
    assert case_name("x/y/scan_0000.nii") == "scan_0000" and case_name("x/.nii.gz") == "study"


def test_expand_inputs_takes_odd_names_once_and_names_what_it_cannot_find(tmp_path, good_file):
    odd = tmp_path / "patient [2].nii.gz"  # an existing file is a file, not a glob pattern
    nib.save(blob_volume(), str(odd))
    assert expand_inputs([str(odd)]) == [odd]
    spelled_twice = [str(good_file), str(tmp_path / "." / "good.nii.gz")]  # one file, two spellings: one input
    assert expand_inputs(spelled_twice) == [good_file]
    (tmp_path / "._good.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork beside the scan
    assert expand_inputs([str(tmp_path)]) == [good_file, odd]
    assert expand_inputs([str(tmp_path / "*.nii.gz")]) == [good_file, odd]
    for missing in ("", str(tmp_path / "nothing*.nii.gz"), str(tmp_path / "empty_folder")):
        (tmp_path / "empty_folder").mkdir(exist_ok=True)
        with pytest.raises(InputError, match="no NIfTI input found in"):
            expand_inputs([str(good_file), missing])


def test_a_folder_that_is_not_a_result_is_never_written_over(tmp_path, predictor):
    """--out the inputs' own folder (CASE/image.nii.gz): each case's folder holds its scan, not a result. The case
    fails with a message, before its prediction, and the scan and the notes beside it stay as they were."""
    cases = tmp_path / "same"
    for case in ("patientA", "patientB"):
        (cases / case).mkdir(parents=True)
        nib.save(blob_volume(), str(cases / case / "image.nii.gz"))
        (cases / case / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in cases.rglob("*") if p.is_file()}
    outcomes = predict_many(predictor, expand_inputs([str(cases)]), cases, progress=False)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert all("is not a wbmri result" in o.error and "notes.txt" in o.error for o in outcomes), outcomes
    assert {p: p.read_bytes() for p in cases.rglob("*") if p.is_file()} == before
    assert not [p for p in cases.iterdir() if p.name.startswith(".")]
    # a result folder with a file of the user's beside it is not replaced either, nor removed after a failure
    out = tmp_path / "out"
    good = cases / "patientA" / "image.nii.gz"
    assert predict_many(predictor, [good], out, names=["a"], progress=False)[0].status == "done"
    (out / "a" / "measurements.csv").write_text("mine")
    redo = predict_many(predictor, [good], out, names=["a"], overwrite=True, progress=False)[0]
    assert redo.status == "failed" and "measurements.csv" in redo.error
    assert (out / "a" / "measurements.csv").read_text() == "mine" and (out / "a" / "report.json").is_file()
    with pytest.raises(FileExistsError, match="not a wbmri result"):
        predictor.predict(good, name="patientB").save(cases)  # the Python API refuses as the batch does


def test_a_result_folder_missing_a_file_is_not_done(tmp_path, predictor, good_file):
    out = tmp_path / "out"
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    (out / "good" / "lesions.nii.gz").unlink()
    assert predict_many(predictor, [good_file], out, progress=False)[0].status == "done"
    assert (out / "good" / "lesions.nii.gz").is_file()


def test_result_folders_follow_the_umask(tmp_path, predictor, good_file):
    old = os.umask(0o022)
    try:
        folder = predictor.predict(good_file).save(tmp_path / "out")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755  # tempfile.mkdtemp would leave 0700: nobody else could read it


def test_sigterm_mid_write_leaves_no_partial_folder(tmp_path):
    """``docker stop`` or a scheduler's time limit while a case is written: the command exits (128 + 15) and the
    half-written ``.CASE.xxxx.partial`` folder goes with it, as on Ctrl-C."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom models.nifti import atomic_dir\n"
            "from service.cli import _exit_on_sigterm\n_exit_on_sigterm()\n"
            "with atomic_dir(Path(sys.argv[1]) / 'case') as tmp:\n"
            "    (tmp / 'lesions.nii.gz').write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    (tmp / 'sites.nii.gz').write_bytes(b'never')\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_in_memory_images_other_than_nifti_are_refused_clearly(predictor):
    img = blob_volume()
    pair = nib.Nifti1Pair(img.get_fdata().astype(np.float32), img.affine)
    assert predictor.predict(pair, name="pair").lesions.shape == img.shape
    mgh = nib.MGHImage(img.get_fdata().astype(np.float32), img.affine)
    with pytest.raises(InputError, match="MGHImage is not a NIfTI image"):
        predictor.predict(mgh, name="mgh")


def test_device_selection_on_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_cli_predict_exit_status_and_summary(tmp_path, tiny_model_dir, good_file):
    bad = write_bad(tmp_path, "two_d")
    out = tmp_path / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(good_file), str(bad), "--out", str(out),
                           "--model", str(tiny_model_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "2D" in proc.stderr and "done" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("failed two_d: ") and "2D" in line]
    # stderr is a pipe, not a terminal: a line per finished case, in order, instead of a progress bar
    progress = [line for line in proc.stderr.splitlines() if line.startswith("predict ")]
    assert re.fullmatch(r"predict 1/2 good: done, \d+ lesions?, \d+\.\d s", progress[0]), progress
    assert re.fullmatch(r"predict 2/2 two_d: failed, \d+\.\d s", progress[1]) and len(progress) == 2, progress
    assert not re.search(r"━ \d+/\d+ ", proc.stderr), proc.stderr  # no progress bar in a log
    assert (out / "good" / "report.json").is_file() and not (out / "two_d").exists()
    # again: the finished case is skipped, saying why
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(good_file), "--out", str(out),
                           "--model", str(tiny_model_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skipped" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    # --out on a file: refused before any case is run
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(good_file), "--out", str(a_file),
                           "--model", str(tiny_model_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", [("--tta", "bogus"), ("--precision", "fp16"), ("--device", "gpu")])
def test_cli_predict_names_a_bad_option_as_such_not_as_a_broken_model(tmp_path, tiny_model_dir, good_file, option):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(good_file), "--out", str(tmp_path / "o"),
                           "--model", str(tiny_model_dir), *option], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "bad option:" in proc.stderr and option[1] in proc.stderr, proc.stderr
    assert "cannot load the model" not in proc.stderr and not (tmp_path / "o").exists()


def test_network_outputs_are_on_the_model_grid(predictor):
    rng = np.random.default_rng(1)
    img = rng.random((20, 18, 30)).astype(np.float32)
    out = predictor.network_outputs(img)
    for arr in (out.edema, out.bone, out.physis):
        assert arr.shape == img.shape and arr.dtype == np.float32
        assert 0.0 <= arr.min() and arr.max() <= 1.0
    assert out.sites.shape == img.shape and out.sites.dtype == np.uint8
    assert not out.sites[out.bone <= 0.5].any(), "site ids only where the bone channel says bone"
    assert np.array_equal(out.sites, np.where(out.bone > 0.5, out.site_ids, 0))


def test_min_confidence_from_the_card_drops_unconfident_lesions(tiny_model_dir, good_file):
    predictor = Predictor.load(tiny_model_dir, device="cpu")  # its own: the rules are changed below
    predictor.min_lesion_ml = 0.0
    for t in np.linspace(0.5, 0.05, 10):  # random weights: find a threshold that gives several lesions
        predictor.threshold = float(t)
        confs = [les["confidence"] for les in predictor.predict(good_file).report["lesions"]]
        if len(set(confs)) >= 2:
            break
    assert len(set(confs)) >= 2, "the check needs lesions of different confidence"
    cut = sorted(set(confs))[len(set(confs)) // 2]
    predictor.min_confidence = cut - 1e-4
    strict = predictor.predict(good_file)
    kept = [les["confidence"] for les in strict.report["lesions"]]
    assert 0 < len(kept) < len(confs) and all(c >= cut - 1e-3 for c in kept)
    assert strict.lesions.max() == len(kept)


def test_tta_comes_from_the_card_and_can_be_overridden(tmp_path, tiny_model_dir, good_file):
    import shutil
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_model_dir, bundle)
    card = json.loads((bundle / "card.json").read_text())
    card["inference"] = {"tta": "flip_lr"}
    (bundle / "card.json").write_text(json.dumps(card))
    with_tta = Predictor.load(bundle, device="cpu")
    assert with_tta.tta == "flip_lr"
    result = with_tta.predict(good_file)
    assert result.report["model"]["tta"] == "flip_lr"
    validate_report(result.report)
    plain = Predictor.load(bundle, device="cpu", tta="none")
    assert plain.predict(good_file).report["model"]["tta"] == "none"
    assert Predictor.load(tiny_model_dir, device="cpu").tta == "none", "cards without the key: no TTA"
    with pytest.raises(ValueError, match="tta"):
        Predictor.load(bundle, device="cpu", tta="rotate")


def test_the_upload_header_check_refuses_zero_qform_spacing_as_the_reader_does():
    raw = qform_only_zero_spacing(blob_volume())
    with pytest.raises(InputError, match="zero or negative"):
        header_from_bytes(raw[:540])
    fixed = bytearray(raw)
    fixed[88:92] = struct.pack("<f", 3.0)
    shape, affine, _, _ = header_from_bytes(bytes(fixed[:540]))
    assert shape == blob_volume().shape and np.allclose(np.sqrt((affine[:3, :3] ** 2).sum(0))[2], 3.0)


def test_a_zero_pixdim_the_sform_makes_unused_is_read_quietly_with_the_sform_spacing(tmp_path, caplog):
    from models.nifti import load_volume
    raw = bytearray(blob_volume(spacing=(2.0, 3.0, 4.0)).to_bytes())  # sform code 2 (nibabel's default)
    raw[88:92] = struct.pack("<f", 0.0)
    path = tmp_path / "sform_zero.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    assert np.allclose(load_volume(path).spacing, (2.0, 3.0, 4.0))
    assert not [r for r in caplog.records if "pixdim" in r.getMessage()]  # nibabel's fix-up note stays unsaid


def test_cli_help_shows_on_off_options_without_a_value():
    proc = subprocess.run([sys.executable, "-m", "service.cli", "predict", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "120"})
    line = next(line for line in proc.stdout.splitlines() if "--overwrite" in line)
    assert "<bool>" not in line.lower(), line


def test_an_image_nibabel_read_from_a_file_is_named_after_that_file(tmp_path, predictor, good_file):
    loaded = predictor.predict(nib.load(str(good_file)))
    assert loaded.name == "good" and loaded.report["study"]["filename"] == "good.nii.gz"
    made = predictor.predict(blob_volume())  # made in memory: no file to name it after
    assert made.name == "study" and predictor.predict(blob_volume(), name="PAT7").name == "PAT7"


def test_the_saved_report_total_time_includes_the_write(tmp_path, predictor, good_file):
    result = predictor.predict(good_file)
    before = dict(result.report["timings_s"])
    report = json.loads((result.save(tmp_path) / "report.json").read_text())
    t = report["timings_s"]
    assert list(t)[-1] == "total" and t["total"] == pytest.approx(before["total"] + t["write"], abs=0.002)


def test_a_gzipped_nifti_with_a_header_extension_reads_as_nibabel_reads_it(tmp_path):
    from models.nifti import load_volume
    img = blob_volume()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment that moves the voxel data" * 10))
    path = tmp_path / "ext.nii.gz"
    nib.save(img, str(path))
    assert struct.unpack("<f", gzip.decompress(path.read_bytes())[108:112])[0] > 352  # the file's vox_offset
    assert np.array_equal(load_volume(path).data, nib.load(str(path)).get_fdata(dtype=np.float32))


def test_a_header_nibabel_cannot_fix_is_refused_in_wbmri_words_alone(caplog):
    raw = bytearray(blob_volume().to_bytes())
    raw[70:72] = struct.pack("<h", 999)  # datatype: no such NIfTI code
    with pytest.raises(InputError, match="not a readable NIfTI header"):
        header_from_bytes(bytes(raw[:540]))
    assert not [r for r in caplog.records if r.name.startswith("nibabel")], "nibabel's own line reached the log"


def test_the_report_tells_the_reader_the_model_learned_from_phantoms_only(predictor, good_file):
    disclaimer = predictor.predict(good_file).report["disclaimer"]
    assert "clinical judgement" in disclaimer and "trained on synthetic phantoms only" in disclaimer
