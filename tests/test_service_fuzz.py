"""OpenAPI fuzzing with schemathesis against a real server: no answer may be a 5xx.

Every operation of /openapi.json gets a bounded number of generated requests, schema-conforming (positive) and
schema-violating (negative) ones; the whole run stays well under a minute.
"""
from __future__ import annotations

import re

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from service.testing import ServerProcess  # noqa: E402

MAX_EXAMPLES = 25  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    with ServerProcess(data, tiny_model_dir, env={"WBMRI_MAX_UPLOAD_MB": 2}) as srv:
        yield srv


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 10
    return ops


def test_no_server_errors(fuzz_server):
    url = fuzz_server.url
    failures: list[str] = []
    calls = {"n": 0}
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for op in _operations(url):
        for mode in modes:
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=url, timeout=30)
                calls["n"] += 1
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} "
                                    f"{response.text[:200]}")
            try:
                run()
            except Unsatisfiable:  # nothing negative to generate (an operation without inputs)
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert calls["n"] >= 60
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(url + "/healthz").status_code == 200
    metrics = httpx.get(url + "/metrics").text
    server_errors = [ln for ln in metrics.splitlines() if ln.startswith("wbmri_http_requests_total")
                     and re.search(r'status="5\d\d"', ln) and 'route="/readyz"' not in ln]
    assert not server_errors, server_errors
