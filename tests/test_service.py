"""The HTTP service against a real uvicorn process on a loopback port (tiny model, tmp data dir)."""
from __future__ import annotations

import gzip
import json
import os
import select
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from models.nifti import InputError, load_volume
from service.testing import ServerProcess

MAX_UPLOAD_MB = 3


# ------------------------------------------------------------------------------------------------- test data
def blob_volume(shape=(40, 40, 40), seed: int = 0) -> np.ndarray:
    """Noise with a bright blob: a tiny study the tiny model analyses in well under a second."""
    rng = np.random.default_rng(seed)
    vol = rng.random(shape, dtype=np.float32)
    c = [s // 2 for s in shape]
    vol[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 5:c[2] + 5] += 3.0
    return vol


def nifti_bytes(data: np.ndarray, affine=None, gz: bool = True, **header) -> bytes:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    for k, v in header.items():
        img.header[k] = v
    raw = img.to_bytes()
    return gzip.compress(raw, 1) if gz else raw


def raw_header_file(shape_dims, srow_x=None, n_bytes: int = 4000) -> bytes:
    """A NIfTI-1 file built from a hand-edited header (dims, sform) followed by ``n_bytes`` of data."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    h = img.header.copy()
    h["dim"][: len(shape_dims) + 1] = [len(shape_dims), *shape_dims]
    if srow_x is not None:
        h["sform_code"], h["qform_code"], h["srow_x"] = 1, 0, srow_x
    return h.binaryblock + b"\x00" * 4 + b"\x00" * n_bytes


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("svc") / "data"
    with ServerProcess(data, tiny_model_dir, env={"WBMRI_MAX_UPLOAD_MB": MAX_UPLOAD_MB, "WBMRI_MAX_VOXELS": 5_000_000,
                                                  "WBMRI_TTA": "flip_lr_anatomy"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory) -> Path:
    """A phantom knee study (half resolution in-plane, to stay small and fast)."""
    from models.nifti import save_nifti
    from training.config import SynthConfig
    from training.phantom.generate import generate_case
    case = generate_case(3, SynthConfig(), fov="knees")
    affine = case.affine.copy()
    affine[:3, 0] *= 2
    affine[:3, 2] *= 2
    path = tmp_path_factory.mktemp("phantom") / "knees_phantom.nii.gz"
    save_nifti(path, case.image[::2, :, ::2], affine)
    return path


def upload(client: httpx.Client, payload: bytes, name: str = "study.nii.gz", wait: float = 0, **kw) -> httpx.Response:
    params = {"wait": wait} if wait else {}
    return client.post("/v1/studies", files={"file": (name, payload, "application/octet-stream")}, params=params, **kw)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60, states=("done", "failed")) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['state']}")


def db_row(data_dir: Path, job_id: str):
    con = sqlite3.connect(data_dir / "jobs.sqlite3")
    try:
        return con.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        con.close()


# ----------------------------------------------------------------------------------------------------- tests
def test_health_ready_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["model"]["tta"] == "flip_lr_anatomy", "the service's setting overrides the card (none)"
    card = client.get("/v1/model").json()
    assert card["name"] == "wbmri-tiny-test" and card["runtime"]["sha256"]
    # load balancers probe with HEAD too
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200


def test_phantom_upload_to_results(client, server, phantom_file, tmp_path):
    from inference.report import validate_report
    r = upload(client, phantom_file.read_bytes(), name=phantom_file.name)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    job = wait_job(client, job["id"])
    assert job["state"] == "done", job
    assert job["progress"] == 1 and job["timings_s"]["run"] > 0 and job["summary"]["lesion_count"] >= 0
    report = client.get(job["links"]["report"]).json()
    validate_report(report)
    assert report["study"]["filename"] == phantom_file.name
    src = nib.load(str(phantom_file))
    for key in ("lesions", "sites"):
        resp = client.get(job["links"][key])
        assert resp.status_code == 200 and resp.content[:2] == b"\x1f\x8b"
        (tmp_path / f"{key}.nii.gz").write_bytes(resp.content)
        img = nib.load(str(tmp_path / f"{key}.nii.gz"))
        assert img.shape == src.shape and np.allclose(img.affine, src.affine, atol=1e-4)
    png = client.get(job["links"]["overlay"])
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["lesions"]) == report["summary"]["lesion_count"] == job["summary"]["lesion_count"]


def test_wait_returns_finished_result(client):
    r = upload(client, nifti_bytes(blob_volume()), wait=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "done" and body["report"]["schema_version"].startswith("1.")


BAD = {
    "not_nifti": (lambda: b"this is not an image at all\n" * 40, "study.nii", "not a readable NIfTI file"),
    "empty": (lambda: b"", "study.nii.gz", "empty"),
    "truncated_gzip": (lambda: nifti_bytes(blob_volume())[:5000], "study.nii.gz", "corrupt or truncated gzip stream"),
    "corrupt_gzip": (lambda: _corrupt(nifti_bytes(blob_volume())), "study.nii.gz", "corrupt or truncated gzip stream"),
    "truncated_data": (lambda: nifti_bytes(blob_volume(), gz=False)[:20000], "study.nii", "truncated"),
    "2d": (lambda: nifti_bytes(np.ones((40, 40), np.float32)), "s.nii.gz", "2D"),
    "4d_many": (lambda: nifti_bytes(np.ones((20, 20, 20, 6), np.float32)), "s.nii.gz", "4D with 6 volumes"),
    "zero_spacing": (lambda: raw_header_file((10, 10, 10), srow_x=[0, 0, 0, 0]), "s.nii", "zero or degenerate"),
    "absurd_dims": (lambda: raw_header_file((30000, 30000, 30000)), "s.nii", "over the budget"),
    "negative_dims": (lambda: raw_header_file((-5, 10, 10)), "s.nii", "dimensions"),
    "no_orientation": (lambda: _without_orientation(blob_volume()), "s.nii.gz", "no orientation"),
    "tiny_fov": (lambda: nifti_bytes(blob_volume((10, 10, 10))), "s.nii.gz", "too small to analyse"),  # 20 mm
    # 100 voxels at 50 mm along x: a 5 m field of view, no body (the same check stops 50 mm on every axis, whose
    # 3 mm model grid would be 1667^3 voxels, 17 GB as float32)
    "huge_fov": (lambda: raw_header_file((100, 100, 100), srow_x=[50, 0, 0, 0]),
                 "s.nii", "larger than any body"),
    # a colour export (RGB24): refused by its header, before its voxels arrive
    "rgb": (lambda: nifti_bytes(np.zeros((40, 40, 40), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])),
            "s.nii.gz", "colour (RGB) values"),
}


def _without_orientation(data: np.ndarray) -> bytes:
    """Valid 2 mm voxels, but qform and sform codes 0: which way is left is not recorded."""
    img = nib.Nifti1Image(data, None)
    img.header.set_zooms((2.0, 2.0, 2.0))
    return gzip.compress(img.to_bytes(), 1)


def _corrupt(payload: bytes) -> bytes:
    b = bytearray(payload)
    for i in range(200, len(b) - 100, 997):
        b[i] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_upload_is_4xx_with_message(client, kind, tmp_path):
    make, name, phrase = BAD[kind]
    payload = make()
    r = upload(client, payload, name=name)
    assert r.status_code in (400, 413, 422), (r.status_code, r.text)
    detail = r.json()["detail"]
    assert phrase.lower() in detail.lower(), detail
    if kind in ("2d", "4d_many", "zero_spacing", "absurd_dims", "no_orientation", "tiny_fov", "huge_fov", "rgb"):  # the library's exact message
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(InputError) as exc:
            load_volume(path, 5_000_000)
        assert detail == str(exc.value)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("kind", ["nan", "all_zero"])
def test_bad_voxels_fail_in_the_job_with_message(server, client, kind, tmp_path):
    vol = blob_volume((30, 30, 30))
    if kind == "nan":
        vol[3, 4, 5] = np.nan
    else:
        vol[:] = 0
    payload = nifti_bytes(vol)
    path = tmp_path / "s.nii.gz"
    path.write_bytes(payload)
    with pytest.raises(InputError) as exc:
        load_volume(path)
    r = upload(client, payload, wait=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == str(exc.value)
    job = client.get(f"/v1/jobs/{r.json()['job']['id']}").json()
    assert job["state"] == "failed" and job["error_kind"] == "input" and job["error"] == str(exc.value)
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 409
    assert not list(server.data_dir.glob(f"uploads/{job['id']}*")), "a refused upload stays on the server"
    assert not (server.data_dir / "results" / job["id"]).exists()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404 and db_row(server.data_dir, job["id"]) is None
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_not_multipart_or_no_file_field(client):
    assert client.post("/v1/studies", content=b"abc", headers={"content-type": "application/json"}).status_code == 415
    r = client.post("/v1/studies", files={"other": ("a.nii", b"123")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]


def _raw_request(url: str, head: bytes, body_chunks, deadline: float = 20.0) -> tuple[bytes, int]:
    """Send a request over a raw socket, stopping as soon as the server answers; returns (response, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=deadline) as s:
        s.sendall(head)
        for chunk in body_chunks:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        s.settimeout(deadline)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except (ConnectionResetError, socket.timeout):
            pass
        return data, sent


def test_upload_too_large_is_413_before_the_body_is_read(server, client):
    # a declared length over the limit: refused from the headers alone
    head = (f"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {10 * 2**30}\r\n\r\n").encode()
    resp, sent = _raw_request(server.url, head, [b"--b\r\n"])
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    # a chunked body: refused while streaming, long before the 64 MB we would send
    head = (b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.nii"\r\n\r\n'
    filler = b"\x00" * (256 * 1024)

    def chunks():
        for payload in [part] + [filler] * 256:
            yield f"{len(payload):x}\r\n".encode() + payload + b"\r\n"
            time.sleep(0.002)

    resp, sent = _raw_request(server.url, head, chunks())
    assert resp.startswith(b"HTTP/1.1 413") or resp.startswith(b"HTTP/1.1 422"), resp[:200]
    assert sent < 40 * 2**20
    # a real multipart body just over the limit, via httpx
    big = nifti_bytes(np.random.default_rng(1).random((100, 100, 100), dtype=np.float32), gz=False)
    assert len(big) > MAX_UPLOAD_MB * 2**20
    try:
        r = upload(client, big, name="big.nii")
        assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    except httpx.TransportError:
        pass  # the server may close the connection while the client is still sending
    assert client.get("/healthz").status_code == 200


def test_delete_removes_everything(server, client):
    r = upload(client, nifti_bytes(blob_volume()), wait=30)
    job_id = r.json()["id"]
    data = server.data_dir
    assert (data / "uploads" / f"{job_id}.nii.gz").is_file()
    assert (data / "results" / job_id / "report.json").is_file()
    assert db_row(data, job_id) is not None
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/overlay.png").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert not (data / "uploads" / f"{job_id}.nii.gz").exists() and not (data / "results" / job_id).exists()
    assert db_row(data, job_id) is None
    assert not [p for p in (data / "incoming").iterdir()]


def test_unknown_ids_are_404(client):
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/..%2F..%2Fetc", "/v1/jobs/x/report"):
        assert client.get(path).status_code == 404


def test_client_name_never_a_path_and_free_text_never_logged(server, client):
    secret = "PATIENT_SECRET_NAME"
    payload = nifti_bytes(blob_volume(seed=2), descrip=secret.encode(), aux_file=b"AUX_" + secret.encode()[:15],
                          intent_name=b"INT_SECRET", db_name=b"DB_SECRET")
    r = upload(client, payload, name="../../etc/<b>passwd\x07 " + secret[:7] + ".nii.gz", wait=30)
    assert r.status_code == 200, r.text
    job = r.json()
    assert "/" not in job["filename"] and "<" not in job["filename"] and "\x07" not in job["filename"]
    assert job["report"]["study"]["filename"] == job["filename"]
    assert sorted(p.name for p in (server.data_dir / "uploads").iterdir() if job["id"] in p.name) == [
        f"{job['id']}.nii.gz"]
    lesions = client.get(job["links"]["lesions"]).content
    for needle in (secret, "INT_SECRET", "DB_SECRET"):
        assert needle.encode() not in gzip.decompress(lesions)
        assert needle not in json.dumps(job["report"])
    time.sleep(0.3)
    log = server.log_path.read_text(errors="replace")
    for needle in (secret, "INT_SECRET", "DB_SECRET", "AUX_"):
        assert needle not in log
    assert "passwd" not in log  # nor the uploaded file name


def test_security_headers_and_page(client):
    page = client.get("/")
    assert page.status_code == 200 and "supports and does not replace clinical judgement" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    for asset in ("/static/app.js", "/static/app.css", "/docs", "/static/docs.js"):
        body = client.get(asset)
        assert body.status_code == 200 and "http://" not in body.text and "https://" not in body.text
    assert "/v1/studies" in client.get("/openapi.json").json()["paths"]
    pre = client.options("/v1/studies", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    assert client.get("/v1/jobs/0123456789abcdef0123456789abcdef").headers["cache-control"] == "no-store"


def test_a_bad_query_parameter_gets_the_documented_one_line_error(client):
    from models import __version__
    for wait in ("abc", "-5"):
        r = client.post(f"/v1/studies?wait={wait}", files={"file": ("a.nii.gz", b"x" * 10)})
        assert r.status_code == 422 and isinstance(r.json()["detail"], str) and "wait" in r.json()["detail"], r.text
    assert client.get("/openapi.json").json()["info"]["version"] == __version__


def test_metrics_exposition(client):
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    body = text.text
    for name in ("wbmri_http_requests_total{", "wbmri_queue_length ", "wbmri_job_duration_seconds_bucket{le=",
                 "wbmri_jobs{state=\"done\"}", "wbmri_ready 1", "wbmri_job_failures_total{reason=\"input\"}",
                 "wbmri_uploads_rejected_total{status=\"422\"}"):
        assert name in body, name
    assert 'route="/v1/studies"' in body


def test_store_retention_and_cleanup(tmp_path):
    from service.store import JobStore
    from service.upload import new_job_id
    store = JobStore(tmp_path / "d")
    try:
        ids = []
        for _ in range(2):
            staged = store.incoming / "x.part"
            staged.write_bytes(b"data")
            job = store.create(new_job_id(), staged, "a.nii.gz", ".nii.gz", 4, [2, 2, 2], max_active=10)
            ids.append(job.id)
            claimed = store.claim("me")
            assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
            (store.result_dir(job.id)).mkdir()
            assert store.finish(job.id, "me", {"run": 1.0}, {"lesion_count": 0})
        store._db.execute("UPDATE jobs SET finished_at = finished_at - 10 * 86400 WHERE id = ?", (ids[0],))
        assert store.purge(7 * 86400) == 1
        assert store.get(ids[0]) is None and store.get(ids[1]) is not None
        assert not store.upload_path(job).with_name(f"{ids[0]}.nii.gz").exists()
        assert not store.result_dir(ids[0]).exists() and store.result_dir(ids[1]).exists()
        orphan = store.uploads / ("f" * 32 + ".nii.gz")
        orphan.write_bytes(b"x")
        assert store.cleanup(min_age_s=0) >= 1 and not orphan.exists() and store.upload_path(job).exists()
    finally:
        store.close()


def test_store_recovery_and_queue_limit(tmp_path):
    from service.store import JobStore, QueueFull
    from service.upload import new_job_id
    store = JobStore(tmp_path / "d")
    try:
        for _ in range(2):
            staged = store.incoming / "x.part"
            staged.write_bytes(b"data")
            store.create(new_job_id(), staged, "a.nii", ".nii", 4, None, max_active=2)
        staged = store.incoming / "x.part"
        staged.write_bytes(b"data")
        with pytest.raises(QueueFull):
            store.create(new_job_id(), staged, "a.nii", ".nii", 4, None, max_active=2)
        job = store.claim("dead-owner")
        assert store.recover(lambda owner: owner == "dead-owner", 3600, 3) == (1, 0)
        assert store.get(job.id).state == "queued"
        for _ in range(2):
            assert store.claim("dead-owner").id == job.id
            store.recover(lambda owner: True, 3600, 3)
        assert store.get(job.id).state == "failed" and "giving up" in store.get(job.id).error
    finally:
        store.close()


def test_stream_check_units():
    from service.upload import NiftiStreamCheck, sanitise_filename
    assert sanitise_filename("C:\\scans\\..\\pat ient<1>.nii.gz") == "pat ient_1_.nii.gz"
    assert sanitise_filename("../../") == "study.nii.gz" and sanitise_filename(None) == "study.nii.gz"
    assert sanitise_filename(".hidden.nii") == "hidden.nii" and len(sanitise_filename("a" * 500)) <= 128
    raw = nib.Nifti1Image(blob_volume((12, 12, 12)), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes()
    two_members = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    for payload in (raw, gzip.compress(raw), two_members):
        check = NiftiStreamCheck(10**6)
        for i in range(0, len(payload), 333):
            check.feed(payload[i:i + 333])
        assert check.finish() == (12, 12, 12)
    bomb = gzip.compress(raw + b"\x00" * (40 * 2**20))
    with pytest.raises(InputError, match="more than"):
        NiftiStreamCheck(10**6).feed(bomb)


def test_settings_precedence_and_safety(tmp_path, monkeypatch):
    from service.settings import ServiceConfigError, is_loopback, load_settings
    cfg = tmp_path / "wbmri.yaml"
    cfg.write_text("port: 9001\nworkers: 2\nmax_queue: 5\n")
    monkeypatch.setenv("WBMRI_MAX_QUEUE", "7")
    s = load_settings(cfg, workers=3)
    assert (s.port, s.workers, s.max_queue) == (9001, 3, 7)
    cfg.write_text("nonsense: 1\n")
    with pytest.raises(ServiceConfigError, match="unknown settings"):
        load_settings(cfg)
    cfg.write_text("tta: flip_lr\nlog_level: debug\n")
    monkeypatch.setenv("WBMRI_TTA", "none")
    assert load_settings(cfg).tta == "none" and load_settings(cfg, tta="flip_lr_anatomy").tta == "flip_lr_anatomy"
    monkeypatch.delenv("WBMRI_TTA")
    for bad, phrase in (({"tta": "bogus"}, "tta: .*must be one of none, flip_lr"), ({"log_level": "loud"}, "log_level"),
                        ({"threads": 0}, "threads")):
        with pytest.raises(ServiceConfigError, match=phrase):
            load_settings(**bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")
    with pytest.raises(ServiceConfigError, match="refusing to listen on 0.0.0.0 without an API key"):
        load_settings(host="0.0.0.0").check_safe()
    monkeypatch.setenv("WBMRI_API_KEYS", "k" * 20 + ", " + "j" * 20)
    s = load_settings(host="0.0.0.0")
    s.check_safe()
    assert s.keys() == ["k" * 20, "j" * 20] and "kkkk" not in repr(s)


def test_the_store_keeps_studies_to_its_user_and_forgets_a_deleted_file_name(tmp_path):
    import stat
    from service.store import DB_NAME, JobStore
    from service.upload import new_job_id
    old = os.umask(0o022)  # a permissive umask, as on many servers
    try:
        store = JobStore(tmp_path / "d")
    finally:
        os.umask(old)
    try:
        staged = store.incoming / "x.part"
        staged.write_bytes(b"data")
        job = store.create(new_job_id(), staged, "Doe_Jane_1234.nii.gz", ".nii.gz", 4, [2, 2, 2], max_active=10)
        for d in (store.incoming, store.uploads, store.results):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert stat.S_IMODE((store.root / DB_NAME).stat().st_mode) == 0o600
        assert store.delete(job.id)
        held = b"".join(p.read_bytes() for p in store.root.glob(DB_NAME + "*"))
        assert b"Doe_Jane_1234" not in held, "the deleted study's file name is still in the database files"
    finally:
        store.close()


def test_clean_up_leaves_an_upload_that_is_still_being_received(tmp_path):
    """A client that pauses mid-upload for longer than the clean-up age keeps its staged file: the maintenance
    clean-up runs while the body is half received, and the upload completes afterwards."""
    import asyncio
    from service.store import JobStore
    from service.upload import STAGING, done_staging, receive
    store = JobStore(tmp_path / "d")
    payload = nifti_bytes(blob_volume())
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.nii.gz\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n--b--\r\n")
    removed = []

    async def pausing_client():
        yield body[:5000]
        await asyncio.sleep(0)  # the pause: the maintenance clean-up runs now, as if the file were old
        removed.append(store.cleanup(min_age_s=0, receiving=frozenset(STAGING)))
        yield body[5000:]

    try:
        got = asyncio.run(receive(pausing_client(), "multipart/form-data; boundary=b", store.incoming, 10 ** 8,
                                  10 ** 8))
        assert removed == [0] and got.path.is_file() and got.size_bytes == len(payload)
        assert got.path.stem in STAGING
        done_staging(got.path)
        assert got.path.stem not in STAGING and not got.path.exists()
        abandoned = store.incoming / ("a" * 32 + ".part")  # an upload no request is receiving: removed
        abandoned.write_bytes(b"x")
        assert store.cleanup(min_age_s=0, receiving=frozenset(STAGING)) == 1 and not abandoned.exists()
    finally:
        store.close()
