"""Real hfserve server processes on free ports: started, waited for, stopped.

Shared by the test harness (tests/conftest.py) and the benchmarks; imports no pytest.
"""

from __future__ import annotations

import contextlib
import importlib.util
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

#: what every test server that may run on vLLM relies on: float32 weights (the tests compare with
#: float32 references; vLLM's own ``auto`` is bfloat16 on CPUs with native bf16) and eager mode (vLLM
#: compiles its graphs by default, minutes per engine start on a small CPU)
VLLM_PINS = {"--dtype": ("--dtype", "float32"), "--enforce-eager": ("--enforce-eager",)}
#: the flags that already decide each pin, in either spelling
_PINNED_BY = {"--dtype": ("--dtype",), "--enforce-eager": ("--enforce-eager", "--no-enforce-eager")}


def _flag(arg: str) -> str:
    """``--enforce_eager`` / ``--dtype=x`` -> ``--enforce-eager`` / ``--dtype``."""
    return "--" + arg[2:].partition("=")[0].replace("_", "-") if arg.startswith("--") else arg


def _backend(args: list[str]) -> str:
    backend = "auto"
    for i, arg in enumerate(args):
        if _flag(arg) == "--backend":
            backend = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else backend)
    return backend


def _auto_picks_vllm(model_dir: pathlib.Path | str) -> bool:
    """Whether ``--backend auto`` may serve this model on vLLM (hfserve's own check, which imports
    vLLM only for a model whose task vLLM serves). A model that is no local directory: no."""
    if importlib.util.find_spec("vllm") is None or not (pathlib.Path(model_dir) / "config.json").is_file():
        return False
    try:
        from hfserve.backends.vllm import supports
        from hfserve.config import ModelConfig

        return supports(ModelConfig.local(model_dir))[0]
    except Exception:  # cannot tell: pin (harmless on the transformers backend)
        return True


def vllm_pins(model_dir: pathlib.Path | str, args: list[str]) -> list[str]:
    """The pins (:data:`VLLM_PINS`) the argument list lacks, where its server may run on vLLM:
    ``--backend vllm``, or ``auto`` (the default) for a model vLLM would serve."""
    backend = _backend(args)
    if backend != "vllm" and not (backend == "auto" and _auto_picks_vllm(model_dir)):
        return []
    given = {_flag(arg) for arg in args}
    return [arg for pin, flags in VLLM_PINS.items() if given.isdisjoint(_PINNED_BY[pin]) for arg in flags]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are picked (picked one at
    a time, the kernel may hand out the same port twice, e.g. an HTTP and a gRPC port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


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
    pin_vllm: bool = True,
) -> ServerHandle:
    """Start ``python -m hfserve`` (or ``entry``, which takes the same flags) on free ports.

    A server that may run on vLLM gets ``--dtype float32 --enforce-eager`` unless the flags already
    choose them (:func:`vllm_pins`); ``pin_vllm=False`` runs it with vLLM's own defaults instead.
    """
    http_port, grpc_port = free_ports(2)
    pins = vllm_pins(model_dir, list(extra)) if pin_vllm else []
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
        *pins,
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
