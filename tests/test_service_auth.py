"""API keys: required off loopback (the server refuses to start without one), bearer tokens checked."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from service.testing import ROOT, ServerProcess, free_port

KEY = "test-key-0123456789abcdef"


def test_refuses_to_start_open_on_a_public_interface(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WBMRI_")}
    env["WBMRI_DATA_DIR"] = str(tmp_path / "d")
    out = subprocess.run([sys.executable, "-m", "service.server", "--host", "0.0.0.0", "--port", str(free_port())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in out.stderr
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# service keys\n{KEY}\n")
    data = tmp_path_factory.mktemp("auth") / "data"
    with ServerProcess(data, tiny_model_dir, host="0.0.0.0", env={"WBMRI_API_KEY_FILE": key_file}) as srv:
        yield srv


def test_bearer_token_required(keyed):
    url = keyed.url  # connects via 127.0.0.1
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    for path in ("/v1/model", "/metrics", "/v1/jobs/0123456789abcdef0123456789abcdef"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    ok = httpx.get(url + "/v1/model", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["name"] == "wbmri-tiny-test"
    r = httpx.post(url + "/v1/studies", files={"file": ("a.nii", b"x" * 600)})
    assert r.status_code == 401
    r = httpx.post(url + "/v1/studies", files={"file": ("a.nii", b"x" * 600)},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 422
    assert httpx.get(url + "/").status_code == 200  # the page itself is static; its API calls need the key
