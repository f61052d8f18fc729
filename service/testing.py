"""Running a real server in a subprocess on a loopback port, for the tests and the load benchmark."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m service.server`` with ``WBMRI_*`` settings from ``env``; a context manager that waits for
    /readyz and stops the server (and its worker processes) on exit."""

    def __init__(self, data_dir: Path, model: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, Any] | None = None, log_path: Path | None = None):
        self.data_dir = Path(data_dir)
        self.host, self.port = host, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}-server-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WBMRI_")}
        self.env.update({"WBMRI_DATA_DIR": str(self.data_dir), "WBMRI_LOG_LEVEL": "info",
                         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        if model is not None:
            self.env["WBMRI_MODEL"] = str(model)
        self.env.update({k: str(v) for k, v in (env or {}).items()})
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.server", "--host", self.host, "--port",
                                      str(self.port)], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        """``kill -9`` of the server process only (its worker children must die with it)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), then SIGKILL of the whole process group if needed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers in the session we started
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()
