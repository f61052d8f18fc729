"""The job store: one SQLite database (WAL, synchronous=FULL) plus uploads and results on disk beside it.

Layout under the data dir::

    jobs.sqlite3            the job rows
    incoming/               uploads being received (removed when refused or stale)
    uploads/<id>.nii[.gz]   accepted uploads, named by job id only
    results/<id>/           the contract files of a finished job (written atomically by Result.save)

A file is moved into ``uploads/`` (and fsynced) before its row is committed, and a row is deleted before its
files, so a crash leaves at most orphan files, which :meth:`JobStore.cleanup` removes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

STATES = ("queued", "running", "done", "failed")
ACTIVE = ("queued", "running")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
DB_NAME = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    filename TEXT NOT NULL,
    upload_ext TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    shape TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    error TEXT,
    error_kind TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    timings TEXT,
    summary TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at);
"""


class QueueFull(Exception):
    """The store already holds ``max_queue`` active jobs."""

    def __init__(self, active: int):
        super().__init__(f"{active} studies are queued or running")
        self.active = active


@dataclass
class Job:
    """One row of the job table."""
    id: str
    state: str
    filename: str
    upload_ext: str
    size_bytes: int
    created_at: float
    shape: list[int] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    progress: float = 0.0
    stage: str | None = None
    error: str | None = None
    error_kind: str | None = None
    attempts: int = 0
    owner: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["shape"] = json.loads(d["shape"]) if d["shape"] else None
        d["timings"] = json.loads(d["timings"]) if d["timings"] else {}
        d["summary"] = json.loads(d["summary"]) if d["summary"] else None
        return cls(**d)


class JobStore:
    """Thread-safe (one connection behind a lock) and safe to share between processes (SQLite locking)."""

    def __init__(self, data_dir: str | Path, busy_timeout_s: float = 30.0):
        self.root = Path(data_dir).resolve()
        self.busy_timeout_s = busy_timeout_s  # how long a write waits for another connection's lock
        self.incoming = self.root / "incoming"
        self.uploads = self.root / "uploads"
        self.results = self.root / "results"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # a folder given that exists keeps its mode
        for d in (self.incoming, self.uploads, self.results):  # studies: for this user only, whatever the umask
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.RLock()
        self._db = self._connect(check_same_thread=False)
        os.chmod(self.root / DB_NAME, 0o600)  # SQLite gives its -wal and -shm files the database's mode
        self._db.execute("PRAGMA journal_mode=WAL")
        with self._tx():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(stmt)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    def _connect(self, check_same_thread: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / DB_NAME, timeout=self.busy_timeout_s, isolation_level=None,
                             check_same_thread=check_same_thread)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        db.execute("PRAGMA secure_delete=ON")  # a deleted job's file name is overwritten, not left in free pages
        return db

    # ----------------------------------------------------------------------------------------------- plumbing
    class _Tx:
        def __init__(self, store: "JobStore"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _tx(self) -> "JobStore._Tx":
        """A write transaction (BEGIN IMMEDIATE ... COMMIT/ROLLBACK) under the connection lock."""
        return JobStore._Tx(self)

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Reads use one connection per thread: in WAL mode they never wait for a writer."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect(check_same_thread=False)  # closed by close() from any thread
            with self._lock:
                self._readers.append(db)
        return db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()

    # ------------------------------------------------------------------------------------------------- paths
    def upload_path(self, job: Job) -> Path:
        return self.uploads / f"{job.id}{job.upload_ext}"

    def result_dir(self, job_id: str) -> Path:
        return self.results / job_id

    # --------------------------------------------------------------------------------------------------- jobs
    def create(self, job_id: str, staged: Path, filename: str, upload_ext: str, size_bytes: int,
               shape: list[int] | None, max_active: int) -> Job:
        """Move a received, validated upload into place and queue its job; :class:`QueueFull` refuses it."""
        if not JOB_ID.match(job_id) or upload_ext not in (".nii", ".nii.gz"):
            raise ValueError("bad job id or extension")
        final = self.uploads / f"{job_id}{upload_ext}"
        now = time.time()
        with self._tx() as db:
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]
            if active >= max_active:
                raise QueueFull(active)
            os.replace(staged, final)
            _fsync_dir(self.uploads)
            try:
                db.execute("INSERT INTO jobs (id, state, filename, upload_ext, size_bytes, shape, created_at, stage) "
                           "VALUES (?, 'queued', ?, ?, ?, ?, ?, 'queued')",
                           (job_id, filename, upload_ext, size_bytes, json.dumps(shape) if shape else None, now))
            except BaseException:
                final.unlink(missing_ok=True)
                raise
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.match(job_id or ""):
            return None
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def claim(self, owner: str) -> Job | None:
        """Atomically move the oldest queued job to running for ``owner``."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', owner = ?, started_at = ?, heartbeat_at = ?, "
                       "finished_at = NULL, attempts = attempts + 1, progress = 0, stage = 'starting', "
                       "error = NULL, error_kind = NULL WHERE id = ?", (owner, now, now, row["id"]))
        return self.get(row["id"])

    def update_progress(self, job_id: str, owner: str, stage: str, progress: float) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET stage = ?, progress = ?, heartbeat_at = ? "
                             "WHERE id = ? AND owner = ? AND state = 'running'",
                             (stage, max(0.0, min(1.0, float(progress))), time.time(), job_id, owner))
        return cur.rowcount == 1

    def heartbeat(self, job_id: str, owner: str) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND owner = ? AND state = 'running'",
                             (time.time(), job_id, owner))
        return cur.rowcount == 1

    def finish(self, job_id: str, owner: str, timings: dict[str, float], summary: dict[str, Any]) -> bool:
        """Mark done; False when the row is gone (deleted meanwhile) or owned by someone else."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'done', finished_at = ?, progress = 1, stage = 'done', "
                             "timings = ?, summary = ? WHERE id = ? AND owner = ? AND state = 'running'",
                             (time.time(), json.dumps(timings), json.dumps(summary), job_id, owner))
        return cur.rowcount == 1

    def fail(self, job_id: str, owner: str | None, error: str, kind: str, timings: dict | None = None) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, stage = 'failed', error = ?, "
                             "error_kind = ?, timings = ? "
                             "WHERE id = ? AND (owner IS ? OR ? IS NULL) AND state != 'done'",
                             (time.time(), error, kind, json.dumps(timings or {}), job_id, owner, owner))
        return cur.rowcount == 1

    def requeue(self, job_id: str, owner: str, count_attempt: bool = False) -> bool:
        """Give a running job back to the queue (shutdown, worker crash)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'queued', owner = NULL, stage = 'queued', progress = 0, "
                             "attempts = attempts - ? WHERE id = ? AND owner = ? AND state = 'running'",
                             (0 if count_attempt else 1, job_id, owner))
        return cur.rowcount == 1

    def recover(self, owner_dead: Callable[[str], bool], stale_after_s: float, max_attempts: int) -> tuple[int, int]:
        """Re-queue running jobs whose owner died or whose heartbeat is stale; fail those out of attempts.
        Returns (re-queued, failed)."""
        now = time.time()
        requeued = failed = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, owner, heartbeat_at, attempts FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                stale = (row["heartbeat_at"] or 0) < now - stale_after_s
                if not (stale or owner_dead(row["owner"] or "")):
                    continue
                if row["attempts"] >= max_attempts:
                    message = f"the analysis stopped unexpectedly {row['attempts']} times; giving up"
                    db.execute("UPDATE jobs SET state = 'failed', finished_at = ?, stage = 'failed', "
                               "error_kind = 'crash', error = ? WHERE id = ?", (now, message, row["id"]))
                    failed += 1
                else:
                    db.execute("UPDATE jobs SET state = 'queued', owner = NULL, stage = 'queued', progress = 0 "
                               "WHERE id = ?", (row["id"],))
                    requeued += 1
        return requeued, failed

    def delete(self, job_id: str) -> bool:
        """Remove the row, then the upload and every result. False when there was no such job."""
        job = self.get(job_id)
        if job is None:
            return False
        with self._tx() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        with self._lock:  # the write-ahead log still holds the row's old pages: fold it in and empty it
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.remove_files(job_id)
        return cur.rowcount == 1

    def remove_files(self, job_id: str) -> None:
        if not JOB_ID.match(job_id):
            return
        for ext in (".nii", ".nii.gz"):
            (self.uploads / f"{job_id}{ext}").unlink(missing_ok=True)
        shutil.rmtree(self.results / job_id, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- queries
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for row in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[row["state"]] = row["n"]
        return out

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start; None unless queued."""
        if job.state != "queued":
            return None
        rows = self._query("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (created_at < ? OR "
                           "(created_at = ? AND id <= ?))", (job.created_at, job.created_at, job.id))
        return int(rows[0][0])

    def ids(self) -> set[str]:
        return {r["id"] for r in self._query("SELECT id FROM jobs")}

    def mean_run_s(self, last: int = 20) -> float | None:
        rows = self._query("SELECT finished_at - started_at AS d FROM jobs "
                           "WHERE state = 'done' AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?", (last,))
        vals = [r["d"] for r in rows if r["d"] is not None and r["d"] >= 0]
        return sum(vals) / len(vals) if vals else None

    # ------------------------------------------------------------------------------------------ maintenance
    def purge(self, older_than_s: float) -> int:
        """Delete finished jobs (rows and files) that finished more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        ids = [r["id"] for r in self._query("SELECT id FROM jobs WHERE state IN ('done', 'failed') AND finished_at < ?",
                                            (cutoff,))]
        for job_id in ids:
            self.delete(job_id)
        return len(ids)

    def cleanup(self, min_age_s: float = 300.0, receiving: Collection[str] = ()) -> int:
        """Remove files older than ``min_age_s`` that belong to no job: orphan uploads and results, stale partial
        result folders, abandoned incoming uploads (but not those still ``receiving``, named without suffixes: a
        client may pause). Returns how many were removed."""
        known = self.ids()
        removed = 0
        cutoff = time.time() - min_age_s
        for path in _entries(self.incoming, self.uploads, self.results):
            try:
                if path.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            job_id = path.name.split(".")[0] if path.parent != self.results or not path.name.startswith(".") else ""
            if path.parent != self.incoming and job_id in known:
                continue
            if path.parent == self.incoming and job_id in receiving:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed


def _entries(*dirs: Path) -> Iterator[Path]:
    for d in dirs:
        try:
            yield from list(d.iterdir())
        except FileNotFoundError:
            continue


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
