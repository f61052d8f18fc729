"""The FastAPI application: ``create_app(settings)`` wires the job store, the inference workers, the API under
``/v1``, health and metrics endpoints and the web page."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders

from models import __version__
from inference.report import model_caution
from models.nifti import InputError
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.settings import Settings, load_settings
from service.store import Job, JobStore, QueueFull
from service.upload import (MULTIPART_SLACK, NO_SPACE_MESSAGE, STAGING, UploadRejected, done_staging, new_job_id,
                            no_space, receive, verify_with_nibabel)
from service.worker import WorkerPool, owner_dead

log = logging.getLogger("wbmri.service")
WEB_DIR = Path(__file__).parent / "web"
API_VERSION = "1"
MAX_WAIT_QUERY = 3600.0

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
RESULT_FILES = {  # route suffix: (file in the result folder, media type, download name suffix)
    "report": ("report.json", "application/json", "_report.json"),
    "lesions.nii.gz": ("lesions.nii.gz", "application/gzip", "_lesions.nii.gz"),
    "sites.nii.gz": ("sites.nii.gz", "application/gzip", "_sites.nii.gz"),
    "overlay.png": ("overlay.png", "image/png", "_overlay.png"),
}
KNOWN_METHODS = {"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"}


# --------------------------------------------------------------------------------------------- response models
class JobLinks(BaseModel):
    self: str
    report: str
    lesions: str
    sites: str
    overlay: str


class JobOut(BaseModel):
    """A job's state; ``report`` is filled only by ``POST /v1/studies?wait=`` once the job is done."""
    id: str
    state: Literal["queued", "running", "done", "failed"]
    filename: str = Field(description="the uploaded file's base name, sanitised; metadata only")
    size_bytes: int
    shape: list[int] | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: float = Field(ge=0, le=1)
    stage: str | None = None
    queue_position: int | None = Field(None, description="1 = next to start; only while queued")
    attempts: int
    timings_s: dict[str, float] = {}
    summary: dict[str, Any] | None = None
    error: str | None = None
    error_kind: Literal["input", "timeout", "crash", "error"] | None = None
    links: JobLinks
    report: dict[str, Any] | None = None


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    model: dict[str, Any] | None = None
    jobs: dict[str, int] | None = None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def job_out(job: Job, store: JobStore, report: dict | None = None) -> dict[str, Any]:
    base = f"/v1/jobs/{job.id}"
    return JobOut(
        id=job.id, state=job.state, filename=job.filename, size_bytes=job.size_bytes, shape=job.shape,  # type: ignore[arg-type]
        created_at=_iso(job.created_at) or "", started_at=_iso(job.started_at), finished_at=_iso(job.finished_at),
        progress=round(job.progress, 3), stage=job.stage, queue_position=store.queue_position(job),
        attempts=job.attempts, timings_s=job.timings or {}, summary=job.summary, error=job.error,
        error_kind=job.error_kind,  # type: ignore[arg-type]
        links=JobLinks(self=base, report=f"{base}/report", lesions=f"{base}/lesions.nii.gz",
                       sites=f"{base}/sites.nii.gz", overlay=f"{base}/overlay.png"),
        report=report).model_dump()


# ---------------------------------------------------------------------------------------------------- plumbing
class Waiters:
    """Lets ``?wait=`` requests sleep until a worker thread reports their job finished."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, set[asyncio.Event]] = {}
        self.stopping = False  # the server is shutting down: every wait answers now, with the job as it stands

    def stop(self) -> None:
        """Thread-safe; called when the server begins to shut down (SIGTERM), so that no ?wait request holds the
        shutdown up and then gets cut off without its job's id."""
        self.stopping = True
        for job_id in list(self._events):
            self.notify(job_id)

    def notify(self, job_id: str) -> None:
        """Thread-safe; called by the workers."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fire, job_id)
            except RuntimeError:
                pass

    def _fire(self, job_id: str) -> None:
        for ev in self._events.get(job_id, ()):
            ev.set()

    async def wait(self, job_id: str, store: JobStore, timeout: float) -> Job | None:
        """The job once finished, or as it stands when ``timeout`` runs out (polls too: other processes)."""
        ev = asyncio.Event()
        self._events.setdefault(job_id, set()).add(ev)
        end = time.monotonic() + timeout
        try:
            while True:
                job = store.get(job_id)
                left = end - time.monotonic()
                if job is None or job.finished or left <= 0 or self.stopping:
                    return job
                try:
                    await asyncio.wait_for(ev.wait(), min(left, 1.0))
                except asyncio.TimeoutError:
                    pass
                ev.clear()
        finally:
            self._events[job_id].discard(ev)
            if not self._events[job_id]:
                del self._events[job_id]


class Guard:
    """Pure ASGI middleware: security and cache headers on every response, request metrics."""

    def __init__(self, app: Any, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                headers.setdefault("cache-control", "no-cache" if static else "no-store")
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/static" if static else "unmatched")
            method = scope.get("method", "GET") if scope.get("method") in KNOWN_METHODS else "other"
            self.metrics.requests.inc(method=method, route=path, status=str(status["code"]))
            self.metrics.request_seconds.observe(time.perf_counter() - t0, route=path)


class Service:
    """What the routes share: settings, store, workers, metrics, API keys."""

    def __init__(self, settings: Settings):
        settings.check_safe()
        self.settings = settings
        self.keys = [k.encode() for k in settings.keys()]
        self.store: JobStore | None = None
        self.pool: WorkerPool | None = None
        self.waiters = Waiters()
        self.metrics = ServiceMetrics(self.job_counts, lambda: bool(self.pool and self.pool.ready))
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self.started = time.time()

    def job_counts(self) -> dict[str, int]:
        return self.store.counts() if self.store else {}

    def start(self) -> None:
        s = self.settings
        self.store = JobStore(s.data_dir, busy_timeout_s=s.db_busy_timeout_s)
        requeued, failed = self.store.recover(owner_dead, s.stale_after_s, s.max_attempts)
        if requeued or failed:
            log.warning("recovered interrupted jobs: %d re-queued, %d failed after %d attempts", requeued, failed,
                        s.max_attempts)
        self.pool = WorkerPool(self.store, s, self.metrics, self.waiters.notify)
        self.pool.start()
        self._maintenance = threading.Thread(target=self._maintain, daemon=True, name="wbmri-maintenance")
        self._maintenance.start()

    def stop(self) -> None:
        self._stop.set()
        if self.pool:
            self.pool.stop()
        if self._maintenance:
            self._maintenance.join(5)
        if self.store:
            self.store.close()

    def maintain_once(self) -> None:
        """Re-queue stale jobs, apply retention, remove orphan files."""
        s, store = self.settings, self.store
        assert store is not None
        requeued, _ = store.recover(owner_dead, s.stale_after_s, s.max_attempts)
        if requeued and self.pool:
            self.pool.wake()
        if s.retention_days > 0:
            n = store.purge(s.retention_days * 86400)
            if n:
                log.info("retention: removed %d studies older than %g days", n, s.retention_days)
        store.cleanup(min_age_s=max(300.0, min(s.job_timeout_s, 3600.0) + 60), receiving=frozenset(STAGING))

    def _maintain(self) -> None:
        while not self._stop.is_set():
            try:
                self.maintain_once()
            except Exception:
                log.exception("maintenance failed")
            self._stop.wait(self.settings.maintenance_interval_s)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean job time over the worker count."""
        mean = (self.store.mean_run_s() if self.store else None) or 30.0
        return int(min(600, max(1, math.ceil(mean / self.settings.workers))))

    def not_ready_reason(self) -> str | None:
        if self.pool is None:
            return "starting"
        if self.pool.ready:
            return None
        err = self.pool.load_error
        return f"the model failed to load: {err}" if err else "the model is loading"


# ------------------------------------------------------------------------------------------------------ app
def create_app(settings: Settings | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment and ``WBMRI_CONFIG_FILE``)."""
    settings = settings or load_settings()
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.waiters.loop = asyncio.get_running_loop()
        await run_in_threadpool(svc.start)
        try:
            yield
        finally:
            await run_in_threadpool(svc.stop)

    app = FastAPI(
        title="wbmri", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Whole-body MRI bone-marrow edema segmentation for children with CNO/CRMO. Upload a NIfTI "
                    "study, follow its job, download the report and label maps. Decision support only: it "
                    "supports and does not replace clinical judgement.")
    app.state.service = svc

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """Any unforeseen error still answers the documented ``{"detail": "message"}`` (the traceback goes to the
        server log, which holds no header text)."""
        return JSONResponse({"detail": "internal error in the service; see the server log"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A bad query or path parameter gets the documented ``{"detail": "message"}``, not FastAPI's list."""
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"detail": message}, status_code=422)

    bearer = HTTPBearer(auto_error=False, description="an API key (required when keys are configured)")

    def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not svc.keys:
            return
        token = (creds.credentials if creds else "").strip().encode()
        ok = False
        for key in svc.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(token, key)
        if not ok or not token:
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})

    def store() -> JobStore:
        if svc.store is None:
            raise HTTPException(503, "the service is starting", headers={"Retry-After": "5"})
        return svc.store

    def get_job(job_id: str) -> Job:
        job = store().get(job_id)
        if job is None:
            raise HTTPException(404, "no such job (unknown, deleted or expired)")
        return job

    auth = [Depends(authorised)]
    errors = {401: {"model": Problem}, 404: {"model": Problem}}

    # ------------------------------------------------------------------------------------------ studies
    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "a .nii or .nii.gz study (one 3D volume)"}}}}}}}

    @app.post("/v1/studies", status_code=202, response_model=JobOut, dependencies=auth, openapi_extra=upload_body,
              tags=["studies"], summary="Upload a study and queue its analysis",
              responses={200: {"model": JobOut, "description": "finished within ?wait"},
                         400: {"model": Problem}, 401: {"model": Problem}, 413: {"model": Problem},
                         415: {"model": Problem}, 422: {"model": Problem},
                         429: {"model": Problem, "description": "queue full; see Retry-After"},
                         503: {"model": Problem, "description": "not ready, or the job store busy; see Retry-After"},
                         507: {"model": Problem, "description": "the server's disk is full; nothing was kept"}})
    async def post_study(request: Request,
                         wait: float = Query(0.0, ge=0, le=MAX_WAIT_QUERY,
                                             description="seconds to wait for the result (capped by the server)")
                         ) -> Response:
        st = store()
        reason = svc.not_ready_reason()
        if reason:
            return _reject(svc, 503, reason, {"Retry-After": "10"})
        counts = st.counts()
        if counts["queued"] + counts["running"] >= settings.max_queue:
            return _reject(svc, 429, f"the queue is full ({settings.max_queue} studies); retry later",
                           {"Retry-After": str(svc.retry_after())})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_upload_bytes + MULTIPART_SLACK):
            status = 413 if length.isdigit() else 400
            return _reject(svc, status, f"upload is larger than the limit of {settings.max_upload_mb:,.0f} MB"
                           if status == 413 else "bad Content-Length header", {"Connection": "close"})
        try:
            got = await receive(request.stream(), request.headers.get("content-type", ""), st.incoming,
                                settings.max_upload_bytes, settings.max_voxels)
        except UploadRejected as exc:
            return _reject(svc, exc.status, exc.message, {"Connection": "close"})
        try:
            await run_in_threadpool(verify_with_nibabel, got.path, got.ext, settings.max_voxels)
            job = await run_in_threadpool(st.create, new_job_id(), got.path, got.filename, got.ext, got.size_bytes,
                                          got.shape, settings.max_queue)
        except InputError as exc:
            return _reject(svc, 422, str(exc))
        except QueueFull:
            return _reject(svc, 429, f"the queue is full ({settings.max_queue} studies); retry later",
                           {"Retry-After": str(svc.retry_after())})
        except (OSError, sqlite3.OperationalError) as exc:  # a full disk, or the job store locked
            if no_space(exc):
                log.error("upload not stored: %s", exc)
                return _reject(svc, 507, NO_SPACE_MESSAGE, {"Retry-After": "30"})
            if isinstance(exc, OSError):
                raise
            log.error("upload not stored: %s", exc)
            return _reject(svc, 503, "the job store is busy; nothing was kept: retry later", {"Retry-After": "30"})
        finally:
            done_staging(got.path)
        log.info("job %s accepted: %d bytes, shape %s", job.id, job.size_bytes, job.shape)
        if svc.pool:
            svc.pool.wake()
        if wait > 0:
            waited = await svc.waiters.wait(job.id, st, min(wait, settings.max_wait_s))
            if waited is None:
                raise HTTPException(404, "the study was deleted while this request waited for it")
            job = waited
        return _job_response(st, job, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, dependencies=auth, responses=errors, tags=["jobs"],
             summary="A job's state, progress, timings and error")
    def get_job_route(job_id: str) -> dict[str, Any]:
        return job_out(get_job(job_id), store())

    def result_file(job_id: str, key: str, inline: bool) -> FileResponse:
        job = get_job(job_id)
        if job.state != "done":
            msg = f"the job is {job.state}" + (f": {job.error}" if job.error else "; no result yet")
            raise HTTPException(409, msg)
        name, media, suffix = RESULT_FILES[key]
        path = store().result_dir(job.id) / name
        if not path.is_file():
            raise HTTPException(404, "the result files are gone (deleted or expired)")
        stem = _stem(job.filename)
        return FileResponse(path, media_type=media, filename=stem + suffix,
                            content_disposition_type="inline" if inline else "attachment")

    file_errors = {**errors, 409: {"model": Problem, "description": "the job has not finished successfully"}}

    @app.get("/v1/jobs/{job_id}/report", dependencies=auth, responses=file_errors, tags=["results"],
             response_class=FileResponse, summary="report.json (valid against the contract's JSON Schema)")
    def get_report(job_id: str) -> FileResponse:
        return result_file(job_id, "report", True)

    @app.get("/v1/jobs/{job_id}/lesions.nii.gz", dependencies=auth, responses=file_errors, tags=["results"],
             response_class=FileResponse, summary="lesion instance labels (uint16), on the input grid")
    def get_lesions(job_id: str) -> FileResponse:
        return result_file(job_id, "lesions.nii.gz", False)

    @app.get("/v1/jobs/{job_id}/sites.nii.gz", dependencies=auth, responses=file_errors, tags=["results"],
             response_class=FileResponse, summary="anatomical site labels (uint8, sites.tsv), on the input grid")
    def get_sites(job_id: str) -> FileResponse:
        return result_file(job_id, "sites.nii.gz", False)

    @app.get("/v1/jobs/{job_id}/overlay.png", dependencies=auth, responses=file_errors, tags=["results"],
             response_class=FileResponse, summary="coronal overview with lesions outlined")
    def get_overlay(job_id: str) -> FileResponse:
        return result_file(job_id, "overlay.png", True)

    @app.delete("/v1/jobs/{job_id}", status_code=204, dependencies=auth, responses=errors, tags=["jobs"],
                summary="Delete the upload and every result (cancels a running analysis)")
    def delete_job(job_id: str) -> Response:
        if not store().delete(job_id):
            raise HTTPException(404, "no such job (unknown, deleted or expired)")
        log.info("job %s deleted", job_id)
        return Response(status_code=204)

    @app.get("/v1/model", dependencies=auth, tags=["service"], summary="The model card",
             responses={401: {"model": Problem}, 503: {"model": Problem}})
    def get_model() -> dict[str, Any]:
        if not svc.pool or not svc.pool.card:
            raise HTTPException(503, svc.not_ready_reason() or "the model is loading", headers={"Retry-After": "10"})
        return {**svc.pool.card, "runtime": {**svc.pool.model_info, "caution": model_caution(svc.pool.card)}}

    # ---------------------------------------------------------------------------------------- operations
    @app.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health, tags=["service"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], response_model=Readiness, tags=["service"],
                   summary="Ready once the model is loaded", responses={503: {"model": Readiness}})
    def readyz() -> Response:
        reason = svc.not_ready_reason()
        body = Readiness(ready=reason is None, reason=reason, model=svc.pool.model_info if svc.pool else None,
                         jobs=svc.job_counts() if svc.store else None)
        return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse, tags=["service"],
             summary="Prometheus metrics (text format)", responses={401: {"model": Problem}})
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(svc.metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------------------------------- the page
    index_html = (WEB_DIR / "index.html").read_text() if (WEB_DIR / "index.html").is_file() else "<h1>wbmri</h1>"
    docs_html = (WEB_DIR / "docs.html").read_text() if (WEB_DIR / "docs.html").is_file() else index_html

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_html)

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    if settings.cors_list:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_list, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Location", "Retry-After"])
    app.add_middleware(Guard, metrics=svc.metrics)
    return app


def _stem(filename: str) -> str:
    for ext in (".nii.gz", ".nii", ".gz"):
        if filename.lower().endswith(ext):
            return filename[: -len(ext)] or "study"
    return filename or "study"


def _reject(svc: Service, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    svc.metrics.uploads_rejected.inc(status=str(status))
    log.info("upload refused (%d): %s", status, message)
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _job_response(store: JobStore, job: Job, headers: dict[str, str]) -> JSONResponse:
    """202 while unfinished; 200 with the report when done; 422 when the study itself was bad."""
    if job.state == "done":
        report = None
        path = store.result_dir(job.id) / "report.json"
        if path.is_file():
            report = json.loads(path.read_text())
        return JSONResponse(job_out(job, store, report), status_code=200, headers=headers)
    if job.state == "failed":
        status = 422 if job.error_kind == "input" else 200
        body = job_out(job, store)
        if status == 422:
            body = {"detail": job.error, "job": body}
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(job_out(job, store), status_code=202, headers=headers)
