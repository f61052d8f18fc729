"""The batch client (``service.client.submit``) against a real server."""
from __future__ import annotations

import gzip
import json

import httpx
import nibabel as nib
import numpy as np
import pytest

from service.client import SubmitError, submit
from service.testing import ServerProcess


def write_study(path, seed: int, bad: bool = False) -> None:
    rng = np.random.default_rng(seed)
    vol = np.zeros((30, 30, 30), np.float32) if bad else rng.random((30, 30, 30), dtype=np.float32)
    if not bad:
        vol[10:20, 10:20, 10:20] += 3
    path.write_bytes(gzip.compress(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), 1))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("client") / "data", tiny_model_dir) as srv:
        yield srv


def test_submit_uploads_waits_and_downloads(server, tmp_path):
    files = []
    for i, name in enumerate(["a.nii.gz", "b.nii.gz", "sub/a.nii.gz", "zero.nii.gz"]):
        p = tmp_path / "in" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        write_study(p, i, bad=name.startswith("zero"))
        files.append(p)
    out = tmp_path / "out"
    subs = submit(files, url=server.url, out_dir=out, poll_s=0.2, progress=True)
    assert [s.state for s in subs] == ["done", "done", "done", "failed"]
    assert "constant" in subs[3].error and subs[3].out is None
    assert [s.out.name for s in subs[:3]] == ["a", "b", "a_2"]
    for s in subs[:3]:
        written = sorted(p.name for p in s.out.iterdir())
        assert written == ["lesions.nii.gz", "overlay.png", "report.json", "sites.nii.gz"]
        report = json.loads((s.out / "report.json").read_text())
        assert report["summary"]["lesion_count"] == s.lesion_count
        assert nib.load(str(s.out / "lesions.nii.gz")).shape == (30, 30, 30)
    assert httpx.get(f"{server.url}/v1/jobs/{subs[3].job_id}").json()["state"] == "failed"
    # --delete removes the studies from the server after download, and the failed one once it failed
    subs = submit([files[0], files[3]], url=server.url, out_dir=tmp_path / "out2", poll_s=0.2, delete=True,
                  progress=False)
    assert subs[0].ok and not subs[1].ok
    assert [httpx.get(f"{server.url}/v1/jobs/{s.job_id}").status_code for s in subs] == [404, 404]
    # a folder of the user's where a result would go is left alone; the study stays on the server, not lost
    mine = tmp_path / "out3" / "a"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    sub = submit([files[0]], url=server.url, out_dir=tmp_path / "out3", poll_s=0.2, delete=True, progress=False)[0]
    assert sub.state == "failed" and "not a wbmri result" in sub.error and sub.out is None
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert httpx.get(f"{server.url}/v1/jobs/{sub.job_id}").json()["state"] == "done"


def test_submit_reports_unreachable_server_and_missing_files(tmp_path):
    p = tmp_path / "a.nii.gz"
    write_study(p, 0)
    with pytest.raises(SubmitError, match="cannot reach"):
        submit([p], url="http://127.0.0.1:9", out_dir=tmp_path / "o", progress=False)
    with pytest.raises(SubmitError, match="no such file"):
        submit([tmp_path / "missing.nii.gz"], url="http://127.0.0.1:9", out_dir=tmp_path / "o", progress=False)
