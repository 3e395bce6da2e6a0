"""Real hfserve server processes on free ports: started, waited for, stopped.

Shared by the test harness (tests/conftest.py) and the benchmarks; imports no pytest.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

STARTUP_TIMEOUT = float(os.environ.get("HFSERVE_STARTUP_TIMEOUT", "300"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    name: str
    http_port: int
    grpc_port: int
    proc: subprocess.Popen
    log_path: pathlib.Path
    model_dir: pathlib.Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/openai/v1"

    @property
    def http_host(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_host(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)


def start_server(
    model_dir: pathlib.Path,
    name: str,
    log_dir: pathlib.Path,
    *extra: str,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
    entry: list[str] | None = None,
) -> ServerHandle:
    """Start ``python -m hfserve`` (or ``entry``, which takes the same flags) on free ports."""
    http_port, grpc_port = free_port(), free_port()
    args = [
        *(entry or [sys.executable, "-m", "hfserve"]),
        "--model_dir",
        str(model_dir),
        "--model_name",
        name,
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        "--host",
        "127.0.0.1",
        *extra,
    ]
    log_path = log_dir / f"{name}-{http_port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    handle = ServerHandle(name, http_port, grpc_port, proc, log_path, model_dir, args)
    if wait_ready:
        wait_until_ready(handle)
    return handle


def wait_until_ready(handle: ServerHandle, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(f"server {handle.name} exited with {handle.proc.returncode}:\n{handle.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{handle.url}/v2/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    stop_server(handle)
    raise RuntimeError(f"server {handle.name} not ready after {timeout}s:\n{handle.log()[-4000:]}")


def stop_server(handle: ServerHandle, timeout: float = 30) -> int:
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
        try:
            handle.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            handle.proc.kill()
            handle.proc.wait()
    return handle.proc.returncode
