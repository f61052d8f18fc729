"""Inference workers: each is a thread in the server that claims jobs from the store and hands them to its own
child process holding one loaded :class:`~inference.predictor.Predictor`.

The child process keeps the event loop and the server free of the heavy work, makes the per-job time limit
enforceable (a stuck or overlong job is killed with its process, which is then restarted) and contains crashes.
Children die with their server (PR_SET_PDEATHSIG plus a parent watchdog), so ``kill -9`` leaves nothing behind;
the interrupted job is re-queued at the next start by :meth:`service.store.JobStore.recover`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import sqlite3
import threading
import time
import traceback
from typing import Any, Callable

from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Job, JobStore

log = logging.getLogger("wbmri.service")
INSTANCE = secrets.token_hex(4)  # tells this server process from an earlier one with the same pid
HOST = socket.gethostname()
STORE_RETRY_S = 5.0  # a failed job-store write is tried again this often


# ------------------------------------------------------------------------------------------ child process side
def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the server process is gone, however it ended."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except Exception:
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _child_main(conn: Any, cfg: dict[str, Any], parent_pid: int) -> None:
    """Load the model once, then analyse the jobs sent over ``conn`` one at a time."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    logging.basicConfig(level=cfg["log_level"].upper(), format="%(levelname)s:     [worker] %(message)s")
    try:
        from inference.predictor import Predictor
        predictor = Predictor.load(cfg["model"], device=cfg["device"], precision=cfg["precision"],
                                   threads=cfg["threads"], max_voxels=cfg["max_voxels"], tta=cfg["tta"])
        conn.send(("ready", predictor.model_info, predictor.bundle.card))
    except Exception as exc:
        log.error("model failed to load: %s", traceback.format_exc())
        conn.send(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "job":
            return
        conn.send(_analyse(predictor, conn, *msg[1:]))


def _analyse(predictor: Any, conn: Any, job_id: str, upload: str, results_dir: str, filename: str,
             delay_s: float) -> tuple:
    """Run one study; returns ('done', timings, summary) or ('failed', kind, message)."""
    from models.nifti import InputError

    def progress(stage: str, fraction: float) -> None:
        if stage == "done":
            stage, fraction = "saving", 0.9
        conn.send(("progress", stage, fraction))
        if stage == "preprocess" and delay_s > 0:  # tests only: a deterministic slow job
            time.sleep(delay_s)

    try:
        result = predictor.predict(upload, name=job_id, progress=progress)
        result.report["study"]["filename"] = filename
        result.save(results_dir)
        report = result.report
        summary = {**report.get("summary", {}), "warnings": list(report.get("warnings", []))}
        return ("done", dict(report.get("timings_s", {})), summary)
    except InputError as exc:
        return ("failed", "input", str(exc))
    except MemoryError:
        return ("failed", "error", "not enough memory to analyse this study")
    except Exception as exc:
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        return ("failed", "error", f"the analysis failed ({type(exc).__name__}); see the server log")


# ----------------------------------------------------------------------------------------- server process side
def owner_dead(owner: str) -> bool:
    """Whether the process that claimed a job (``host:pid:instance:index``) is certainly gone."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[0] != HOST:
        return False  # another host: only a stale heartbeat tells
    if parts[2] == INSTANCE:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return True
    if pid == os.getpid():
        return True  # an earlier server with our pid (e.g. restarted in a container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Runner(threading.Thread):
    """One inference worker: a claiming loop in a thread, driving one child process."""

    def __init__(self, index: int, store: JobStore, settings: Settings, metrics: ServiceMetrics,
                 notify: Callable[[str], None]):
        super().__init__(daemon=True, name=f"wbmri-runner-{index}")
        self.index = index
        self.store, self.settings, self.metrics, self.notify = store, settings, metrics, notify
        self.owner = f"{HOST}:{os.getpid()}:{INSTANCE}:{index}"
        self.model_info: dict | None = None
        self.card: dict | None = None
        self.load_error: str | None = None
        self.current: str | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._wake = threading.Event()
        self._halt = threading.Event()

    # ---------------------------------------------------------------------------------------- child control
    def _spawn(self) -> bool:
        """Start a child and wait until its model is loaded; False on a load error or when stopping."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        cfg = {"model": str(self.settings.model) if self.settings.model else None, "device": self.settings.device,
               "precision": self.settings.precision, "tta": self.settings.tta, "threads": self.settings.threads,
               "max_voxels": self.settings.max_voxels, "log_level": self.settings.log_level}
        self._proc = ctx.Process(target=_child_main, args=(child, cfg, os.getpid()), daemon=True,
                                 name=f"wbmri-worker-{self.index}")
        self._proc.start()
        child.close()
        self._conn = parent
        while not self._halt.is_set():
            if parent.poll(0.2):
                try:
                    msg = parent.recv()
                except (EOFError, OSError):
                    msg = ("load_error", f"the worker process exited (code {self._proc.exitcode})")
                if msg[0] == "ready":
                    self.model_info, self.card, self.load_error = msg[1], msg[2], None
                    log.info("worker %d ready: model %s %s on %s", self.index, msg[1]["name"], msg[1]["version"],
                             msg[1]["device"])
                    return True
                self.load_error = msg[1]
                log.error("worker %d: model failed to load: %s", self.index, msg[1])
                self._kill()
                return False
            if not self._proc.is_alive() and not parent.poll(0):
                self.load_error = f"the worker process exited while loading (code {self._proc.exitcode})"
                self._kill()
                return False
        self._kill()
        return False

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _child_ok(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # ----------------------------------------------------------------------------------------------- loop
    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def run(self) -> None:
        """Claim and run jobs until stopped. Nothing ends this loop but :meth:`stop`: a job store that fails (a full
        disk, a database locked by another process) is waited out, so the service never stops taking jobs while
        /readyz says it is ready."""
        while not self._halt.is_set():
            try:
                self._step()
            except Exception:
                log.exception("worker %d: an error outside any job's analysis (the job store?); trying again in %g s",
                              self.index, STORE_RETRY_S)
                self._halt.wait(STORE_RETRY_S)
        self._kill()

    def _step(self) -> None:
        """One turn of the loop: (re)start the child if needed, claim a job, drive it to its end."""
        if not self._child_ok():
            if not self._spawn():
                self._halt.wait(30.0 if self.load_error else 0.1)
            return
        self._wake.clear()
        job = self.store.claim(self.owner)
        if job is None:
            self._wake.wait(0.5)
            return
        try:
            self._process(job)
        except Exception as exc:
            log.exception("worker %d: job %s: internal error", self.index, job.id)
            self._kill()
            if isinstance(exc, sqlite3.Error):  # the job store failed, not the job: it runs again
                self._until_stored(lambda: self.store.requeue(job.id, self.owner))
            else:
                self._until_stored(lambda: self.store.fail(job.id, self.owner,
                                                           "internal error in the service; see the server log",
                                                           "error"))
        finally:
            self.current = None
            self.notify(job.id)

    def _until_stored(self, write: Callable[[], Any]) -> None:
        """Retry a job-store write every STORE_RETRY_S until it succeeds or the service stops (a job left running
        then is re-queued by the next start's recovery)."""
        while True:
            try:
                write()
                return
            except sqlite3.Error:
                log.exception("worker %d: the job store failed; trying again in %g s", self.index, STORE_RETRY_S)
                if self._halt.wait(STORE_RETRY_S):
                    return

    def _process(self, job: Job) -> None:
        """Drive one job to done, failed or back to the queue."""
        self.current = job.id
        s = self.settings
        if job.started_at is not None:
            self.metrics.queue_wait_seconds.observe(max(0.0, job.started_at - job.created_at))
        upload = self.store.upload_path(job)
        if not upload.is_file():
            self._failed(job, "error", "the uploaded file is missing from the store")
            return
        log.info("job %s started (attempt %d)", job.id, job.attempts)
        t0 = time.monotonic()
        deadline, beat = t0 + s.job_timeout_s, t0
        self._conn.send(("job", job.id, str(upload), str(self.store.results), job.filename, s.job_delay_s))
        while True:
            if self._halt.is_set():
                self._kill()
                self.store.requeue(job.id, self.owner)
                log.info("job %s re-queued at shutdown", job.id)
                return
            now = time.monotonic()
            if now >= deadline:
                self._kill()
                self.metrics.worker_restarts.inc(reason="timeout")
                self._failed(job, "timeout", f"the analysis exceeded the time limit of {s.job_timeout_s:g} s")
                return
            msg = None
            try:
                if self._conn.poll(min(0.5, deadline - now)):
                    msg = self._conn.recv()
            except (EOFError, OSError):
                msg = ("crashed",)
            if msg is None and not self._child_ok():
                msg = ("crashed",)
            if msg is None:
                if time.monotonic() - beat >= s.heartbeat_s:
                    beat = time.monotonic()
                    if not self.store.heartbeat(job.id, self.owner):
                        self._cancel(job)
                        return
                continue
            if msg[0] == "progress":
                beat = time.monotonic()
                if not self.store.update_progress(job.id, self.owner, msg[1], msg[2]):
                    self._cancel(job)
                    return
                continue
            run_s = time.monotonic() - t0
            if msg[0] == "done":
                timings = {**msg[1], "run": round(run_s, 3)}
                if job.started_at is not None:
                    timings["queue"] = round(max(0.0, job.started_at - job.created_at), 3)
                if self.store.finish(job.id, self.owner, timings, msg[2]):
                    self.metrics.jobs_finished.inc(state="done")
                    self.metrics.job_seconds.observe(run_s)
                    log.info("job %s done in %.2f s: %d lesions", job.id, run_s, int(msg[2].get("lesion_count", 0)))
                else:  # deleted while running
                    self.store.remove_files(job.id)
                return
            if msg[0] == "failed":
                self._failed(job, msg[1], msg[2], {"run": round(run_s, 3)})
                return
            # the child process died under the job; its exit code is known once it is reaped
            if self._proc is not None:
                self._proc.join(5)
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            self.metrics.worker_restarts.inc(reason="crash")
            if job.attempts >= s.max_attempts:
                self._failed(job, "crash", f"the analysis process stopped unexpectedly (exit code {code}) "
                                           f"{job.attempts} times; giving up")
            else:
                log.warning("job %s: worker process died (exit code %s); re-queued", job.id, code)
                self.store.requeue(job.id, self.owner, count_attempt=True)
            return

    def _failed(self, job: Job, kind: str, message: str, timings: dict | None = None) -> None:
        """Mark the job failed. A refused input (NaN, constant image) cannot be analysed on any later try, so its
        upload and any partial results go at once; the row keeps the error until it is deleted or expires. Other
        failures keep the upload."""
        if self.store.fail(job.id, self.owner, message, kind, timings):
            self.metrics.jobs_finished.inc(state="failed")
            self.metrics.job_failures.inc(reason=kind)
            log.info("job %s failed (%s): %s", job.id, kind, message)
            if kind == "input":
                self.store.remove_files(job.id)

    def _cancel(self, job: Job) -> None:
        """The job was deleted while running: stop its analysis and drop whatever it wrote."""
        log.info("job %s deleted while running; analysis cancelled", job.id)
        self._kill()
        self.metrics.worker_restarts.inc(reason="cancel")
        self.store.remove_files(job.id)


class WorkerPool:
    """``settings.workers`` runners; the model is ready when one of them has loaded it."""

    def __init__(self, store: JobStore, settings: Settings, metrics: ServiceMetrics,
                 notify: Callable[[str], None] = lambda job_id: None):
        self.runners = [Runner(i, store, settings, metrics, notify) for i in range(settings.workers)]

    def start(self) -> None:
        for r in self.runners:
            r.start()

    def stop(self, timeout: float = 15.0) -> None:
        for r in self.runners:
            r.stop()
        end = time.monotonic() + timeout
        for r in self.runners:
            r.join(max(0.1, end - time.monotonic()))

    def wake(self) -> None:
        for r in self.runners:
            r.wake()

    @property
    def ready(self) -> bool:
        return any(r.is_alive() and r.model_info is not None and r.load_error is None for r in self.runners)

    @property
    def model_info(self) -> dict | None:
        return next((r.model_info for r in self.runners if r.model_info), None)

    @property
    def card(self) -> dict | None:
        return next((r.card for r in self.runners if r.card), None)

    @property
    def load_error(self) -> str | None:
        return next((r.load_error for r in self.runners if r.load_error), None)
