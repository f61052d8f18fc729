"""Crash recovery, queue limit and the per-job time limit, against real server processes."""
from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from service.testing import ServerProcess


def study(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    vol = rng.random((32, 32, 32), dtype=np.float32)
    vol[12:20, 12:20, 12:20] += 3
    return gzip.compress(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), 1)


def upload(client: httpx.Client, seed: int = 0) -> httpx.Response:
    return client.post("/v1/studies", files={"file": (f"s{seed}.nii.gz", study(seed))})


def wait_state(client: httpx.Client, job_id: str, states, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    job = {}
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id}: {job}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kill9_mid_job_then_restart_finishes_it_and_queue_limit(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    slow = {"WBMRI_JOB_DELAY_S": 30, "WBMRI_MAX_QUEUE": 2}
    first = ServerProcess(data, tiny_model_dir, env=slow)
    try:
        with first:
            with httpx.Client(base_url=first.url, timeout=30) as c:
                a = upload(c, 1).json()["id"]
                wait_state(c, a, ("running",))
                b = upload(c, 2).json()["id"]
                full = upload(c, 3)
                assert full.status_code == 429, full.text
                assert int(full.headers["retry-after"]) >= 1 and "queue is full" in full.json()["detail"]
                assert c.get(f"/v1/jobs/{b}").json()["queue_position"] == 1
                time.sleep(0.5)
                first.kill9()
                # the worker process dies with its server: nothing of that server is left running
                end = time.monotonic() + 10
                while group_alive(first.proc.pid) and time.monotonic() < end:
                    time.sleep(0.1)
                assert not group_alive(first.proc.pid)
    finally:
        first.stop()
    con = sqlite3.connect(data / "jobs.sqlite3")
    assert con.execute("SELECT state FROM jobs WHERE id = ?", (a,)).fetchone()[0] == "running"
    con.close()
    with ServerProcess(data, tiny_model_dir) as second, httpx.Client(base_url=second.url, timeout=30) as c:
        job_a = wait_state(c, a, ("done", "failed"))
        job_b = wait_state(c, b, ("done", "failed"))
        assert job_a["state"] == "done" and job_a["attempts"] == 2, job_a
        assert job_b["state"] == "done" and job_b["attempts"] == 1, job_b
        assert c.get(f"/v1/jobs/{a}/report").json()["summary"]["lesion_count"] >= 0
        assert "re-queued" in second.log()


def test_time_limit_and_graceful_shutdown(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    env = {"WBMRI_JOB_DELAY_S": 5, "WBMRI_JOB_TIMEOUT_S": 1.5}
    srv = ServerProcess(data, tiny_model_dir, env=env)
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        job_id = upload(c, 4).json()["id"]
        job = wait_state(c, job_id, ("done", "failed"))
        assert job["state"] == "failed" and job["error_kind"] == "timeout"
        assert "time limit of 1.5 s" in job["error"]
        assert c.get("/healthz").status_code == 200
        # the worker is restarted and the service is ready again
        end = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < end:
            time.sleep(0.2)
        assert c.get("/readyz").status_code == 200
        assert 'wbmri_job_failures_total{reason="timeout"} 1' in c.get("/metrics").text
        # graceful stop (SIGTERM) while a job runs puts it back in the queue, not counting the attempt
        second = upload(c, 5).json()["id"]
        wait_state(c, second, ("running",))
        # ... and a ?wait request pending then answers at once with its job's id (202), not a 500 after 20 s
        answer: dict = {}

        def waiting_upload() -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c2:
                t0 = time.monotonic()
                r = c2.post("/v1/studies?wait=100", files={"file": ("s9.nii.gz", study(9))})
                answer.update(status=r.status_code, text=r.text, seconds=time.monotonic() - t0)
        waiting = threading.Thread(target=waiting_upload)
        waiting.start()
        end = time.monotonic() + 5  # its job queued behind the running one (which times out 1.5 s after it started)
        while c.get("/readyz").json()["jobs"]["queued"] < 1 and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)  # the request is now waiting
        srv.proc.send_signal(signal.SIGTERM)
        waiting.join(60)
        srv.proc.wait(30)
    assert answer["status"] == 202 and answer["seconds"] < 12, answer
    third = json.loads(answer["text"])["id"]
    con = sqlite3.connect(data / "jobs.sqlite3")
    state, attempts = con.execute("SELECT state, attempts FROM jobs WHERE id = ?", (second,)).fetchone()
    assert con.execute("SELECT state FROM jobs WHERE id = ?", (third,)).fetchone()[0] == "queued"
    con.close()
    assert (state, attempts) == ("queued", 0)


def test_a_locked_job_store_is_waited_out_and_the_job_runs_again(tiny_model_dir, tmp_path):
    """Another process holds the database's write lock past the store's busy timeout (2 s here, 30 s by default)
    while a job runs: the job's heartbeat fails, and so do the first tries to give the job back. The job goes back
    to the queue once the lock is gone (the store failed, not the job), and the worker keeps taking jobs: it must
    not die while /readyz says it is ready."""
    data = tmp_path / "data"
    env = {"WBMRI_JOB_DELAY_S": 3, "WBMRI_HEARTBEAT_S": 0.5, "WBMRI_DB_BUSY_TIMEOUT_S": 2}
    with ServerProcess(data, tiny_model_dir, env=env) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        a = upload(c, 6).json()["id"]
        wait_state(c, a, ("running",))
        lock = sqlite3.connect(data / "jobs.sqlite3", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        time.sleep(8)  # a heartbeat fails after 2 s, the re-queue after 2 s more and is retried every 5 s
        lock.execute("ROLLBACK")
        lock.close()
        job_a = wait_state(c, a, ("done", "failed"), timeout=90)
        assert job_a["state"] == "done" and job_a["attempts"] == 1, job_a  # the store's failure is not the job's
        log = srv.log_path.read_text()
        assert "database is locked" in log and "the job store failed; trying again" in log
        b = upload(c, 7).json()["id"]
        assert wait_state(c, b, ("done", "failed"))["state"] == "done"
        assert c.get("/readyz").status_code == 200


def test_a_full_disk_refuses_the_upload_in_json_and_keeps_serving(tiny_model_dir, tmp_path):
    """The data folder on a 4 MB file system: a 6 MB study cannot be staged. The client gets 507 with the documented
    ``{"detail": ...}``, nothing is left half-written, and a small study is taken right after."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs a small file system: mounting tmpfs needs root (" + mounted.stderr.decode().strip() + ")")
    try:
        with ServerProcess(data, tiny_model_dir) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            rng = np.random.default_rng(0)
            big = nib.Nifti1Image(rng.random((112, 112, 112), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
            r = c.post("/v1/studies", files={"file": ("big.nii", big.to_bytes())})
            assert r.status_code == 507 and "no space left" in r.json()["detail"], (r.status_code, r.text)
            assert list((data / "incoming").iterdir()) == []
            small = upload(c, 8)
            assert small.status_code == 202, small.text
            assert wait_state(c, small.json()["id"], ("done", "failed"))["state"] == "done"
    finally:
        subprocess.run(["umount", str(data)], capture_output=True)


def worker_pid(server_pid: int) -> int:
    """The pid of the server's inference worker (a spawned child process)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise LookupError(f"no worker process under {server_pid}")


def test_a_worker_killed_mid_job_is_restarted_and_the_job_runs_again(tiny_model_dir, tmp_path):
    """kill -9 of the inference process alone (the out-of-memory killer's way): the server restarts it, says how
    it ended, and runs the job again; a ?wait request for a study deleted meanwhile gets 404, not a stale 202."""
    data = tmp_path / "data"
    with ServerProcess(data, tiny_model_dir, env={"WBMRI_JOB_DELAY_S": 4}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        a = upload(c, 11).json()["id"]
        wait_state(c, a, ("running",))
        os.kill(worker_pid(srv.proc.pid), signal.SIGKILL)
        job = wait_state(c, a, ("done", "failed"), timeout=120)
        assert job["state"] == "done" and job["attempts"] == 2, job
        assert "worker process died (exit code -9); re-queued" in srv.log_path.read_text()
        answer: dict = {}

        def waiting_upload() -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c2:
                r = c2.post("/v1/studies?wait=60", files={"file": ("s12.nii.gz", study(12))})
                answer.update(status=r.status_code, text=r.text)
        waiting = threading.Thread(target=waiting_upload)
        waiting.start()
        end, pending = time.monotonic() + 20, None
        while pending is None and time.monotonic() < end:
            time.sleep(0.1)
            con = sqlite3.connect(data / "jobs.sqlite3")
            pending = con.execute("SELECT id FROM jobs WHERE id != ?", (a,)).fetchone()
            con.close()
        assert c.delete(f"/v1/jobs/{pending[0]}").status_code == 204
        waiting.join(60)
        assert answer["status"] == 404 and "deleted while this request waited" in answer["text"], answer
