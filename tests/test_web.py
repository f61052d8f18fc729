"""The web page in headless Chromium (DevTools protocol over a websocket): upload through the file input, wait
for the overlay and the lesion table, check what a person would see, delete the study."""
from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.testing import ServerProcess

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ws_client = pytest.importorskip("websockets.sync.client", reason="the websockets package is needed to drive Chromium")
SCREENSHOT_DIR = os.environ.get("WBMRI_SCREENSHOT_DIR")  # set it to keep the screenshots


class Browser:
    """Just enough of the DevTools protocol: commands with a session id, events collected on the side."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not port_file.is_file() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > end or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = ws_client.connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=20).__enter__()
        self._id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        end = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self.session)

    def js(self, expression: str):
        out = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return out.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression!r} never became true; page text:\n{self.js('document.body.innerText')}")

    def screenshot(self, path: Path) -> Path:
        data = self.page("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.__exit__(None, None, None)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("web") / "data", tiny_model_dir) as srv:
        yield srv


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser(tmp_path / "profile")
    try:
        b.page("Page.enable")
        b.page("Runtime.enable")
        b.page("Log.enable")
        b.page("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False})
        yield b
    finally:
        b.close()


def study_file(folder: Path) -> Path:
    rng = np.random.default_rng(7)
    vol = rng.random((48, 40, 64), dtype=np.float32) * 0.3
    vol[14:34, 10:30, 10:54] += 1.0
    vol[20:28, 16:24, 28:36] += 3.0
    path = folder / "knee_study.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), 1))
    return path


def _console_problems(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        if ev.get("method") == "Runtime.exceptionThrown":
            out.append(json.dumps(ev["params"]["exceptionDetails"])[:300])
        if ev.get("method") == "Log.entryAdded" and ev["params"]["entry"].get("level") == "error":
            text = ev["params"]["entry"].get("text", "")
            if "favicon" not in text:
                out.append(text[:300])
    return out


def test_upload_through_the_page_shows_overlay_table_and_deletes(server, browser, tmp_path):
    b = browser
    b.page("Page.navigate", {"url": server.url + "/"})
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    text = b.js("document.body.innerText")
    assert "supports and does not replace clinical judgement" in text
    assert "Drop a NIfTI study here" in text
    b.wait_for("document.getElementById('model-info').textContent.includes('wbmri-tiny-test')")
    caution = b.js("document.getElementById('model-caution').hidden ? '' : "
                   "document.getElementById('model-caution').textContent")
    assert "synthetic phantoms only" in caution and "NOT meet 5 of its 5 targets" in caution, caution

    doc = b.page("DOM.getDocument")["root"]["nodeId"]
    node = b.page("DOM.querySelector", {"nodeId": doc, "selector": "#file"})["nodeId"]
    b.page("DOM.setFileInputFiles", {"nodeId": node, "files": [str(study_file(tmp_path))]})

    b.wait_for("!document.getElementById('result').hidden && document.getElementById('overlay').complete "
               "&& document.getElementById('overlay').naturalWidth > 0", timeout=90)
    rows = b.js("[...document.querySelectorAll('#lesions tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
    headers = b.js("[...document.querySelectorAll('#lesions thead th')].map(c => c.textContent)")
    assert headers == ["#", "Site", "Side", "Subregion", "Volume (mL)", "Diameter (mm)", "Extent of bone", "Features",
                       "Signal ratio", "Confidence"]
    assert rows and all(len(r) in (1, len(headers)) for r in rows)
    job_id = b.js("document.querySelector('#downloads a').getAttribute('href').split('/')[3]")
    report = json.loads(b.js(f"fetch('/v1/jobs/{job_id}/report').then(r => r.text())"))
    if report["lesions"]:
        first = report["lesions"][0]
        assert rows[0][0] == str(first["id"]) and rows[0][2] == first["side"]
        assert rows[0][4] == f"{first['volume_ml']:.1f}" and rows[0][5] == f"{first['max_diameter_mm']:.0f}"
        assert rows[0][6] == (first["extension_grade"] or "–")
    else:
        assert rows == [["No lesions detected."]]
    result_text = b.js("document.getElementById('result').innerText")
    assert "knee_study.nii.gz" in result_text and "LESIONS" in result_text.upper()
    assert "Report (JSON)" in result_text and "Lesion labels (NIfTI)" in result_text
    chips = b.js("[...document.querySelectorAll('#summary .chip')].map(c => c.querySelector('.chip-label')"
                 ".textContent + '=' + c.querySelector('.chip-value').textContent)")
    summary = report["summary"]
    assert f"lesions={summary['lesion_count']}" in chips
    pairs = len(summary["symmetric_pairs"])
    assert f"symmetric pair{'' if pairs == 1 else 's'}={pairs}" in chips
    assert f"soft tissue involved={'yes' if summary['soft_tissue_involved'] else 'none flagged'}" in chips
    from models.viz import spine_finding  # the overlay's words: the page says the same
    assert f"spine involved={spine_finding(summary)}" in chips  # a spine not imaged is not a spine without lesions
    assert b.js("document.getElementById('overlay-link').href").startswith("blob:")  # the picture at full size
    assert any(c.startswith("largest lesion (mL)=") for c in chips)
    assert b.js("document.getElementById('error').hidden") is True
    assert not _console_problems(b.events), _console_problems(b.events)

    shot = b.screenshot(Path(SCREENSHOT_DIR) / "web_result.png" if SCREENSHOT_DIR else tmp_path / "web_result.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a phone-sized window: the result fits its width (the lesion table scrolls inside its own box)
    b.page("Emulation.setDeviceMetricsOverride", {"width": 400, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    b.wait_for("window.innerWidth === 400")
    widths = b.js("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    b.page("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})

    # the address names the study: a reload finds it again (and its delete button with it)
    assert b.js("window.location.hash") == f"#job={job_id}"
    b.page("Page.reload")
    b.wait_for("document.readyState === 'complete' && !document.getElementById('result').hidden "
               "&& document.getElementById('overlay').naturalWidth > 0", timeout=60)
    assert "knee_study.nii.gz" in b.js("document.getElementById('result').innerText")

    # delete: two clicks (arm, confirm); the study is gone from the server
    b.js("document.getElementById('delete').click()")
    assert "Confirm" in b.js("document.getElementById('delete').textContent")
    b.js("document.getElementById('delete').click()")
    b.wait_for("document.getElementById('result').hidden && document.body.innerText.includes('were deleted')")
    assert b.js("window.location.hash") == ""
    b.page("Page.navigate", {"url": f"{server.url}/#job={job_id}"})  # an old bookmark of the deleted study
    b.wait_for("document.readyState === 'complete' && !document.getElementById('error').hidden")
    assert "no longer on the server" in b.js("document.getElementById('error').textContent")
    assert b.js(f"fetch('/v1/jobs/{job_id}').then(r => r.status)") == 404


def test_bad_upload_shows_the_message(server, browser, tmp_path):
    b = browser
    b.page("Page.navigate", {"url": server.url + "/"})
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    bad = tmp_path / "notes.nii"
    bad.write_bytes(b"definitely not an image\n" * 50)
    # the address still names an earlier study (as after one that failed): a new upload must not keep it
    b.js("history.replaceState(null, '', '#job=' + 'a'.repeat(32)); location.hash")
    doc = b.page("DOM.getDocument")["root"]["nodeId"]
    node = b.page("DOM.querySelector", {"nodeId": doc, "selector": "#file"})["nodeId"]
    b.page("DOM.setFileInputFiles", {"nodeId": node, "files": [str(bad)]})
    msg = b.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
    assert "not accepted" in msg and "not a readable NIfTI file" in msg
    assert b.js("location.hash") == "", "the refused upload left the earlier study in the address"
    assert b.js("document.getElementById('file').value") == "", "the same file could not be chosen again to retry"
    if SCREENSHOT_DIR:
        b.screenshot(Path(SCREENSHOT_DIR) / "web_error.png")


def test_failed_analysis_shows_the_message_and_can_be_deleted(server, browser, tmp_path):
    """A file that passes the upload checks but cannot be analysed (a constant image): the page says why and
    offers to delete what is left of it (its job record) on the server."""
    b = browser
    b.page("Page.navigate", {"url": server.url + "/"})
    b.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    blank = tmp_path / "blank_study.nii.gz"
    blank.write_bytes(gzip.compress(nib.Nifti1Image(np.zeros((30, 30, 30), np.float32),
                                                    np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), 1))
    doc = b.page("DOM.getDocument")["root"]["nodeId"]
    node = b.page("DOM.querySelector", {"nodeId": doc, "selector": "#file"})["nodeId"]
    b.page("DOM.setFileInputFiles", {"nodeId": node, "files": [str(blank)]})
    msg = b.wait_for("!document.getElementById('failed-actions').hidden && document.getElementById('error').textContent",
                     timeout=60)
    assert "analysis of blank_study.nii.gz failed" in msg and "constant" in msg
    con = sqlite3.connect(server.data_dir / "jobs.sqlite3")
    try:
        (job_id,) = con.execute("SELECT id FROM jobs WHERE filename = ?", (blank.name,)).fetchone()
    finally:
        con.close()
    assert b.js(f"fetch('/v1/jobs/{job_id}').then(r => r.json()).then(j => j.state)") == "failed"
    b.js("document.getElementById('delete-failed').click()")
    assert "Confirm" in b.js("document.getElementById('delete-failed').textContent")
    b.js("document.getElementById('delete-failed').click()")
    b.wait_for("document.getElementById('failed-actions').hidden && document.body.innerText.includes('were deleted')")
    assert b.js("document.activeElement.id") == "drop", "after a delete the focus is where the next study is chosen"
    assert not _console_problems(b.events), _console_problems(b.events)
    assert b.js(f"fetch('/v1/jobs/{job_id}').then(r => r.status)") == 404


def test_api_documentation_page_renders_offline(server, browser):
    b = browser
    b.page("Page.navigate", {"url": server.url + "/docs"})
    text = b.wait_for("document.querySelectorAll('.op').length > 8 && document.body.innerText")
    for needle in ("POST", "/v1/studies", "/v1/jobs/{job_id}/overlay.png", "/metrics", "Bearer"):
        assert needle in text
    assert not _console_problems(b.events), _console_problems(b.events)
    if SCREENSHOT_DIR:
        b.screenshot(Path(SCREENSHOT_DIR) / "web_docs.png")
