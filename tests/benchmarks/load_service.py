"""Bounded load test of the HTTP service, on loopback only.

Starts a server (shipped default model if present, else a tiny random-weight model; or ``--model``) in a temp
data dir, or targets ``--url`` on 127.0.0.1. ``--clients`` concurrent clients share ``--uploads`` upload attempts
of small phantom studies; each accepted job is followed to its end. Prints throughput and p50/p95 latencies and
checks that every accepted job finished, every refused upload got 429/503 with Retry-After, and nothing got a 5xx.
Stops by itself (``--deadline``). Exit status 0 when all checks pass.

    python tests/benchmarks/load_service.py [--clients 20] [--uploads 60] [--max-queue 10] [--url http://127.0.0.1:8000]
"""
from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.settings import is_loopback  # noqa: E402
from service.testing import ServerProcess  # noqa: E402


@dataclass
class Outcome:
    status: int
    upload_s: float
    total_s: float | None = None
    state: str | None = None
    retry_after: str | None = None
    run_s: float | None = None
    error: str | None = None


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_index: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


def phantom_studies(n: int, seed: int = 100) -> list[bytes]:
    """Small phantom knee studies (half in-plane resolution), gzipped NIfTI bytes."""
    from training.config import SynthConfig
    from training.phantom.generate import generate_case
    out = []
    for i in range(n):
        case = generate_case(seed + i, SynthConfig(), fov="knees")
        affine = case.affine.copy()
        affine[:3, 0] *= 2
        affine[:3, 2] *= 2
        img = nib.Nifti1Image(np.ascontiguousarray(case.image[::2, :, ::2], np.float32), affine)
        out.append(gzip.compress(img.to_bytes(), 1))
    return out


def tiny_model(folder: Path) -> Path:
    """A tiny random-weight bundle (the test suite's network) for when no trained model is shipped. Its edema
    threshold is raised to 0.98 so that the random weights give tens rather than hundreds of "lesions" per
    phantom: this benchmark measures the service, not the model."""
    import torch
    from models.card import save_bundle
    from models.networks import NetworkConfig, build_network
    torch.manual_seed(0)
    cfg = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), features=4, spacing_mm=(6.0, 6.0, 6.0),
                        patch=(32, 32, 32))
    card = {"name": "wbmri-tiny-bench", "version": "0.0.0", "intended_use": "benchmarks only",
            "thresholds": {"edema": 0.98}}
    return save_bundle(folder, build_network(cfg), cfg, card)


def client_loop(url: str, studies: list[bytes], total: int, tally: Tally, deadline: float, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
        while time.monotonic() < deadline:
            with tally.lock:
                if tally.next_index >= total:
                    return
                i = tally.next_index
                tally.next_index += 1
            t0 = time.monotonic()
            try:
                r = c.post("/v1/studies", files={"file": (f"phantom_{i}.nii.gz", studies[i % len(studies)])})
            except httpx.HTTPError as exc:
                tally.outcomes.append(Outcome(0, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}"))
                continue
            out = Outcome(r.status_code, time.monotonic() - t0, retry_after=r.headers.get("retry-after"))
            tally.outcomes.append(out)
            if r.status_code in (429, 503):
                time.sleep(min(10.0, float(out.retry_after or 1)))  # a polite client honours Retry-After
                continue
            if r.status_code != 202:
                out.error = r.text[:200]
                continue
            job_id = r.json()["id"]
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("done", "failed"):
                    out.state, out.total_s = job["state"], time.monotonic() - t0
                    out.run_s = (job.get("timings_s") or {}).get("run")
                    out.error = job.get("error")
                    break
                time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="target a running server (loopback only) instead of starting one")
    ap.add_argument("--token", help="API key for --url")
    ap.add_argument("--model", type=Path, help="model bundle for the started server")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--uploads", type=int, default=60)
    ap.add_argument("--cases", type=int, default=3, help="distinct phantom studies")
    ap.add_argument("--max-queue", type=int, default=10, help="WBMRI_MAX_QUEUE of the started server")
    ap.add_argument("--workers", type=int, default=1, help="WBMRI_WORKERS of the started server")
    ap.add_argument("--deadline", type=float, default=540.0, help="stop after this many seconds in any case")
    args = ap.parse_args(argv)
    if args.url and not is_loopback(urlparse(args.url).hostname or ""):
        ap.error("--url must point at a loopback address (127.0.0.1, ::1, localhost)")

    t_gen = time.monotonic()
    studies = phantom_studies(args.cases)
    print(f"{len(studies)} phantom studies, {np.mean([len(s) for s in studies]) / 2**20:.1f} MB each on average "
          f"(generated in {time.monotonic() - t_gen:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="wbmri-load-") as tmp:
        server = None
        url = args.url
        if not url:
            from models.card import DEFAULT_MODEL_DIR, WEIGHTS
            model = args.model
            if model is None:
                model = DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / WEIGHTS).is_file() else tiny_model(Path(tmp) / "tiny")
            server = ServerProcess(Path(tmp) / "data", model, env={"WBMRI_MAX_QUEUE": args.max_queue,
                                                                   "WBMRI_WORKERS": args.workers})
            server.__enter__()
            url = server.url
        try:
            info = httpx.get(url + "/readyz", timeout=10).json().get("model") or {}
            print(f"server {url}: model {info.get('name')} {info.get('version')} on {info.get('device')}; "
                  f"{args.clients} clients, {args.uploads} uploads"
                  + (f", max queue {args.max_queue}, {args.workers} worker(s)" if server else ""))
            tally = Tally()
            deadline = time.monotonic() + args.deadline
            t0 = time.monotonic()
            threads = [threading.Thread(target=client_loop, args=(url, studies, args.uploads, tally, deadline,
                                                                 args.token)) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, deadline - time.monotonic() + 30))
            wall = time.monotonic() - t0
            metrics = httpx.get(url + "/metrics", timeout=10,
                                headers={"Authorization": f"Bearer {args.token}"} if args.token else {}).text
        finally:
            if server is not None:
                server.__exit__(None, None, None)
    return report(tally.outcomes, wall, metrics)


def report(outcomes: list[Outcome], wall: float, metrics: str) -> int:
    accepted = [o for o in outcomes if o.status == 202]
    refused = [o for o in outcomes if o.status in (429, 503)]
    done = [o for o in accepted if o.state == "done"]
    unfinished = [o for o in accepted if o.state is None]
    failed = [o for o in accepted if o.state == "failed"]
    server_errors = [o for o in outcomes if o.status >= 500 and o.status != 503]
    other = [o for o in outcomes if o not in accepted and o not in refused and o not in server_errors]
    refused_without_retry = [o for o in refused if not o.retry_after]
    lat = [o.total_s for o in done if o.total_s is not None]
    up = [o.upload_s for o in outcomes]
    runs = [o.run_s for o in done if o.run_s is not None]
    print(f"uploads {len(outcomes)}: accepted {len(accepted)}, refused {len(refused)} "
          f"({sum(o.status == 429 for o in refused)} x 429, {sum(o.status == 503 for o in refused)} x 503), "
          f"other {len(other)}, 5xx {len(server_errors)}")
    print(f"accepted jobs: done {len(done)}, failed {len(failed)}, unfinished {len(unfinished)}")
    print(f"wall {wall:.1f} s; throughput {len(done) / wall:.2f} studies/s ({60 * len(done) / wall:.1f}/min)")
    print(f"end-to-end latency (upload to done): p50 {pct(lat, 50):.2f} s, p95 {pct(lat, 95):.2f} s, "
          f"max {max(lat) if lat else float('nan'):.2f} s")
    print(f"upload response time: p50 {1000 * pct(up, 50):.0f} ms, p95 {1000 * pct(up, 95):.0f} ms")
    print(f"job run time on the server: p50 {pct(runs, 50):.2f} s, p95 {pct(runs, 95):.2f} s")
    server_5xx = [ln for ln in metrics.splitlines() if ln.startswith("wbmri_http_requests_total") and
                  'status="5' in ln and 'route="/readyz"' not in ln and 'route="/v1/studies",status="503"' not in ln]
    checks = {
        "every accepted job finished": not unfinished and not failed,
        "every refused upload got 429/503 with Retry-After": not refused_without_retry and not other,
        "zero 5xx (clients and server metrics)": not server_errors and not server_5xx,
    }
    for name, ok in checks.items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    for o in (failed + other + server_errors)[:5]:
        print(f"  e.g. status {o.status} state {o.state}: {o.error}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
