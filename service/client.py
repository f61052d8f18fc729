"""A small batch client: upload studies, wait for their jobs, download the results (``wbmri submit``)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx

from models.nifti import RESULT_FILES, case_names, result_dir

RETRY_STATUSES = (429, 503)


class SubmitError(RuntimeError):
    """The server could not be used at all (unreachable, bad key)."""


@dataclass
class Submission:
    """What happened to one file."""
    file: Path
    state: str = "pending"  # pending | uploading | queued | running | done | failed | refused
    job_id: str | None = None
    out: Path | None = None
    error: str | None = None
    lesion_count: int | None = None
    seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body.get("detail"), str):
            return body["detail"]
    except Exception:
        pass
    return f"HTTP {resp.status_code}"


def _out_names(files: Sequence[Path]) -> list[str]:
    """Output folder names: the case names (:func:`models.nifti.case_names`), made unique with _2, _3, ..."""
    seen: dict[str, int] = {}
    names = []
    for base in case_names(files):
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


class _Batch:
    def __init__(self, client: httpx.Client, out_dir: Path, wait_s: float, poll_s: float, delete: bool,
                 max_retries: int):
        self.client, self.out_dir, self.wait_s, self.poll_s = client, out_dir, wait_s, poll_s
        self.delete, self.max_retries = delete, max_retries

    def upload(self, sub: Submission) -> None:
        """Upload one file, honouring Retry-After on 429/503; sets job_id or a final state."""
        for attempt in range(self.max_retries + 1):
            sub.state = "uploading"
            try:
                with open(sub.file, "rb") as fh:
                    resp = self.client.post("/v1/studies", files={"file": (sub.file.name, fh,
                                                                           "application/octet-stream")})
            except httpx.HTTPError as exc:
                sub.state, sub.error = "failed", f"upload failed: {type(exc).__name__}: {exc}"
                return
            if resp.status_code == 401:
                raise SubmitError("the server requires a valid API key (--token or WBMRI_TOKEN)")
            if resp.status_code in RETRY_STATUSES and attempt < self.max_retries:
                time.sleep(min(60.0, float(resp.headers.get("retry-after", "5") or 5)))
                continue
            if resp.status_code in (200, 202):
                body = resp.json()
                sub.job_id, sub.state = body["id"], body["state"]
                return
            sub.state = "refused"
            sub.error = _detail(resp)
            return

    def poll(self, sub: Submission) -> dict | None:
        resp = self.client.get(f"/v1/jobs/{sub.job_id}")
        if resp.status_code != 200:
            sub.state, sub.error = "failed", _detail(resp)
            return None
        job = resp.json()
        sub.state = job["state"]
        if job["state"] == "failed":
            sub.error = job.get("error") or "failed"
        return job

    def download(self, sub: Submission, name: str) -> None:
        """Fetch the four result files into ``out_dir/<name>/`` (complete or absent; a folder there that is not an
        earlier result is left alone and the study fails)."""
        with result_dir(self.out_dir / name) as tmp:
            for fname in RESULT_FILES:
                url = f"/v1/jobs/{sub.job_id}/{'report' if fname == 'report.json' else fname}"
                with self.client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        raise SubmitError(f"{fname}: {_detail(resp)}")
                    with open(tmp / fname, "wb") as fh:
                        for chunk in resp.iter_bytes(1 << 20):
                            fh.write(chunk)
        sub.out = self.out_dir / name
        self.discard(sub)

    def discard(self, sub: Submission) -> None:
        """With ``delete``, remove the study from the server (after its download, or once it has failed)."""
        if self.delete and sub.job_id:
            try:
                self.client.delete(f"/v1/jobs/{sub.job_id}")
            except httpx.HTTPError:
                pass


def submit(files: Sequence[str | Path], url: str = "http://127.0.0.1:8000", token: str | None = None,
           out_dir: str | Path = "results", *, parallel: int = 2, timeout_s: float = 3600.0, poll_s: float = 1.0,
           delete: bool = False, max_retries: int = 30, progress: bool = True) -> list[Submission]:
    """Upload ``files`` to the service at ``url``, keep up to ``parallel`` jobs in flight, wait for each (at
    most ``timeout_s``) and download its results into ``out_dir/<case>/`` (report.json, lesions.nii.gz,
    sites.nii.gz, overlay.png). ``token`` defaults to ``WBMRI_TOKEN``; ``delete`` removes each study from the
    server after download (a failed one once it has failed). Returns one :class:`Submission` per file, in order;
    raises :class:`SubmitError` when the server is unreachable or refuses the key."""
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SubmitError(f"no such file: {', '.join(missing)}")
    token = token or os.environ.get("WBMRI_TOKEN") or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subs = [Submission(p) for p in paths]
    names = _out_names(paths)
    timeout = httpx.Timeout(30.0, read=120.0, write=300.0)
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        try:
            client.get("/healthz").raise_for_status()
        except httpx.HTTPError as exc:
            raise SubmitError(f"cannot reach the service at {url}: {exc}") from None
        batch = _Batch(client, out, timeout_s, poll_s, delete, max_retries)
        with _Progress(progress, subs) as bar:
            _drive(batch, subs, names, parallel, timeout_s, poll_s, bar)
    return subs


def _drive(batch: _Batch, subs: list[Submission], names: list[str], parallel: int, timeout_s: float,
           poll_s: float, bar: "_Progress") -> None:
    """The batch loop: top up the jobs in flight, poll them, download the finished ones."""
    todo = list(range(len(subs)))
    active: dict[int, float] = {}  # index -> start time
    while todo or active:
        while todo and len(active) < max(1, parallel):
            i = todo.pop(0)
            bar.update(i, "uploading", 0.0)
            batch.upload(subs[i])
            if subs[i].job_id:
                active[i] = time.monotonic()
            bar.update(i, subs[i].state, 0.0)
        for i in list(active):
            sub = subs[i]
            try:
                job = batch.poll(sub)
                if job is not None and job["state"] == "done":
                    bar.update(i, "downloading", 0.95)
                    batch.download(sub, names[i])
                    sub.lesion_count = (job.get("summary") or {}).get("lesion_count")
                elif job is not None and job["state"] == "failed":
                    batch.discard(sub)
                elif job is not None:
                    if time.monotonic() - active[i] > timeout_s:
                        sub.state, sub.error = "failed", f"no result within {timeout_s:g} s (job {sub.job_id})"
                    else:
                        bar.update(i, job.get("stage") or job["state"], float(job.get("progress") or 0))
                        continue
            except (httpx.HTTPError, SubmitError, OSError) as exc:
                sub.state, sub.error = "failed", f"{type(exc).__name__}: {exc}"
            sub.seconds = round(time.monotonic() - active.pop(i), 2)
            bar.update(i, sub.state, 1.0)
        if active:
            time.sleep(poll_s)


class _Progress:
    """A rich progress bar per file (or nothing when disabled)."""

    def __init__(self, enabled: bool, subs: list[Submission]):
        self.enabled, self.subs = enabled, subs
        self._p = None
        self._tasks: list = []

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self._p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
                               TimeElapsedColumn(), transient=False)
            self._p.__enter__()
            self._tasks = [self._p.add_task(s.file.name, total=1.0, stage="pending") for s in self.subs]
        return self

    def update(self, i: int, stage: str, fraction: float) -> None:
        if self._p is not None:
            sub = self.subs[i]
            label = stage if not sub.error else f"{stage}: {sub.error}"
            self._p.update(self._tasks[i], completed=fraction, stage=label)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
