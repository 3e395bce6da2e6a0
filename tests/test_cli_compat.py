"""Issue 12 parts 1-3: the argument lists of real huggingfaceserver deployments.

vLLM's flags in both spellings resolve into ``EngineConfig.engine_args`` under vLLM's field names
(through vLLM's own parser where it is installed, through the fallback list where it is not); unknown
flags start the server with one warning; huggingfaceserver / KServe model-server flags have their
meaning or are refused with one line.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import subprocess
import sys

import httpx
import pytest

from hfserve import cli
from hfserve.cli import build_parser, resolve
from hfserve.config import ServerConfig
from tests.conftest import VLLM_INSTALLED, needs_vllm
from tests.servers import start_server, stop_server
from tests.test_cli import assert_one_line_error, run_cli

# (argument list, the model section's fields it sets, engine_args)
CASES = [
    pytest.param(
        ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32"],
        {"max_model_len": 512, "dtype": "float32"},
        {"enforce_eager": True},
        id="kserve-e2e",
    ),
    pytest.param(
        ["--tensor-parallel-size=1", "--pipeline-parallel-size=1"],
        {},
        {"tensor_parallel_size": 1, "pipeline_parallel_size": 1},
        id="multinode-runtime",
    ),
    pytest.param(["--gpu_memory_utilization", "0.9"], {}, {"gpu_memory_utilization": 0.9}, id="gpu-memory"),
    pytest.param(["--enable-prefix-caching"], {}, {"enable_prefix_caching": True}, id="prefix-caching"),
    pytest.param(["--max-num-batched-tokens", "256"], {}, {"max_num_batched_tokens": 256}, id="batched-tokens"),
    pytest.param(
        ["--max_num_seqs", "3", "--max-logprobs", "5", "--seed", "7", "--quantization", "awq"],
        {},
        {"max_num_seqs": 3, "max_logprobs": 5, "seed": 7, "quantization": "awq"},
        id="engine-limits",
    ),
    pytest.param(["-tp", "2"], {}, {"tensor_parallel_size": 2}, id="short-tp"),
    pytest.param(
        ["--trust-remote-code", "--revision", "main", "--tokenizer-revision", "v1", "--max_length", "100"],
        {"trust_remote_code": True, "revision": "main", "tokenizer_revision": "v1", "max_model_len": 100},
        {},
        id="shared-model-settings",
    ),
]

@pytest.fixture(params=[pytest.param("vllm", marks=needs_vllm), "fallback"])
def engine_parser(request, monkeypatch):
    """vLLM's own argument definitions, or the list used where vLLM is not installed."""
    if request.param == "fallback":
        monkeypatch.setattr(cli, "vllm_installed", lambda: False)
    return request.param


def _respell(argv: list[str]) -> list[str]:
    """--a-b <-> --a_b: the other spelling of every long flag."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            key = "--" + (key[2:].replace("-", "_") if "-" in key[2:] else key[2:].replace("_", "-"))
            arg = key + eq + value
        out.append(arg)
    return out


@pytest.mark.parametrize("argv,model_fields,engine_args", CASES)
def test_real_argument_lists(models, engine_parser, argv, model_fields, engine_args):
    base = ["--model_dir", str(models["llama"])]
    config = resolve(build_parser().parse_args(base + argv))
    for name, value in model_fields.items():
        assert getattr(config.model, name) == value, name
    assert dict(config.engine.engine_args) == engine_args
    # the other spelling gives the same configuration
    assert resolve(build_parser().parse_args(base + _respell(argv))) == config


def test_only_given_flags_reach_the_engine(models, engine_parser):
    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"])]))
    assert dict(config.engine.engine_args) == {}
    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--no-enforce-eager"]))
    assert dict(config.engine.engine_args) == {"enforce_eager": False}


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_flags_beyond_any_list(models):
    """Flags no hand-written list holds come from vLLM's own definitions, typed by them."""
    argv = ["--model_dir", str(models["llama"]), "--async-scheduling", "--max-cudagraph-capture-size", "16", "--enable-sleep-mode"]
    config = resolve(build_parser().parse_args(argv))
    assert dict(config.engine.engine_args) == {"async_scheduling": True, "max_cudagraph_capture_size": 16, "enable_sleep_mode": True}


def test_unknown_flags_warn_once_with_the_closest_flag(models, engine_parser, caplog):
    argv = ["--model_dir", str(models["llama"]), "--frobnicate", "--max_modl_len", "64", "--max-num-seq", "2"]
    with caplog.at_level(logging.WARNING, logger="hfserve.cli"):
        config = resolve(build_parser().parse_args(argv))
    warnings = [r.getMessage() for r in caplog.records if r.name == "hfserve.cli" and "unknown" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "--frobnicate" in warnings[0]
    assert "--max_modl_len (did you mean --max_model_len?)" in warnings[0]
    assert "--max-num-seq (did you mean --max-num-seqs?)" in warnings[0]
    assert config.model.max_model_len is None  # an unknown flag sets nothing


def test_without_vllm_every_vllm_flag_is_recognised(models, monkeypatch, caplog):
    """Without vLLM, the snapshot of vLLM's flags (vllm_flags.json) keeps them from being called
    unknown: engine flags are engine arguments (named at start-up as without effect), frontend
    flags are named as without effect, switches in both forms."""
    monkeypatch.setattr(cli, "vllm_installed", lambda: False)
    argv = [
        "--model_dir", str(models["llama"]), "--max-parallel-loading-workers", "4", "--enable-sleep-mode", "--no-enable-prefix-caching",
        "--speculative_config", '{"method": "ngram"}', "--port", "8000", "--frobnicate",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hfserve.cli"):
        config = resolve(build_parser().parse_args(argv))
    assert dict(config.engine.engine_args) == {
        "max_parallel_loading_workers": "4", "enable_sleep_mode": True, "enable_prefix_caching": False,
        "speculative_config": '{"method": "ngram"}',
    }  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.name == "hfserve.cli"]
    (unknown,) = [line for line in lines if "unknown" in line]
    assert "--frobnicate" in unknown and "loading" not in unknown and "sleep" not in unknown
    assert any("--port (use --http_port)" in line for line in lines if "no effect" in line)


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_flag_snapshot_matches_the_installed_vllm():
    """vllm_flags.json is regenerated (.ci/vllm_flags.py) whenever the pinned vLLM changes."""
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / ".ci" / "vllm_flags.py"), "--check"], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_server_flags_without_effect_are_named(models, caplog):
    with caplog.at_level(logging.WARNING, logger="hfserve.cli"):
        config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--port", "8000", "--host", "127.0.0.1"]))
    assert config.server.host == "127.0.0.1"  # --host is hfserve's own
    (line,) = [r.getMessage() for r in caplog.records if r.name == "hfserve.cli" and "no effect" in r.getMessage()]
    assert "--port (use --http_port)" in line


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--gpu-memory-utilization", "lots"], ["gpu-memory-utilization", "lots"]),
        (["--max-model-len", "many"], ["--max_model_len", "many"]),
        (["--predictor_host", "predictor.default"], ["--predictor_host", "transformer mode"]),
        (["--workers", "2"], ["--workers"]),
        (["--log_config_file", "/nonexistent/log.yaml"], ["--log_config_file"]),
        (["--max_asyncio_workers", "0"], ["--max_asyncio_workers"]),
        (["--access_log_format", "%(h)s %"], ["--access_log_format", "format"]),
        (["--tool-call-parser", "nope"], ["--tool-call-parser", "hermes"]),
        (["--reasoning-parser", "nope"], ["--reasoning-parser", "deepseek_r1"]),
        (["--enable-auto-tool-choice"], ["--enable-auto-tool-choice", "--tool-call-parser"]),
    ],
)
def test_refused_values_are_one_line(models, argv, words):
    proc = run_cli("--model_dir", str(models["bert_cls"]), *argv, timeout=120)
    if argv[0] == "--gpu-memory-utilization":  # importing vLLM may print its own lines first
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("hfserve: error: ") and all(w in last for w in words), proc.stderr
        assert "Traceback" not in proc.stderr
    else:
        assert_one_line_error(proc, *words)


def test_model_server_flags_resolve(models):
    args = build_parser().parse_args(
        [
            "--model_dir", str(models["bert_cls"]), "--max_asyncio_workers", "3", "--enable_docs_url", "true",
            "--configure_logging", "false", "--grpc_max_receive_message_length", "1000", "--grpc_max_send_message_length", "-1",
            "--max_log_len", "10", "--enable_latency_logging", "false", "--access_log_format", "%(h)s",
            "--predictor_protocol", "v2",
        ]
    )  # fmt: skip
    config = resolve(args)
    assert config.server == ServerConfig(
        max_asyncio_workers=3, enable_docs_url=True, configure_logging=False, grpc_max_receive_message_length=1000,
        grpc_max_send_message_length=-1, access_log_format="%(h)s",
    )


def test_vllm_model_flag_is_model_id(models):
    config = resolve(build_parser().parse_args(["--model", str(models["bert_cls"])]))
    assert config.model.source == str(models["bert_cls"])


def test_transformers_server_honours_the_flags(models, log_dir, tmp_path):
    """A real start: the context length from vLLM's spelling, /docs, a logging dictConfig, the
    unknown-flag warning and the engine flags named as having no effect on this backend."""
    log_file = tmp_path / "hfserve.log"
    log_config = {
        "version": 1,
        "formatters": {"plain": {"format": "CUSTOM %(levelname)s %(name)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain"}},
        "root": {"level": "INFO", "handlers": ["file"]},
    }
    (tmp_path / "log.json").write_text(json.dumps(log_config))
    server = start_server(
        models["bert_cls"], "compat", log_dir,
        "--max-model-len", "64", "--enforce-eager", "--frobnicate", "--enable_docs_url", "true",
        "--log_config_file", str(tmp_path / "log.json"), "--max_asyncio_workers", "2",
    )  # fmt: skip
    try:
        r = httpx.post(f"{server.url}/v1/models/compat:predict", json={"instances": ["word " * 70]}, timeout=30)
        assert r.status_code == 400 and "64" in r.json()["error"]
        docs = httpx.get(f"{server.url}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        log = log_file.read_text()
        assert "CUSTOM WARNING hfserve.cli ignoring unknown flags: --frobnicate" in log
        assert re.search(r"no effect on the huggingface backend: --enforce-eager", log), log
        assert "is ready" in log
    finally:
        assert stop_server(server) == 0


def test_kserve_loglevel(models, log_dir):
    server = start_server(models["bert_cls"], "quiet", log_dir, env={"KSERVE_LOGLEVEL": "WARNING"})
    try:
        assert "is ready" not in server.log()
    finally:
        assert stop_server(server) == 0


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_engine_argument_reaches_the_vllm_engine(models, log_dir):
    server = start_server(
        models["llama"], "llama_compat", log_dir, "--backend", "vllm", "--max-num-seqs", "3", "--max-model-len", "128",
        "--enable-prefix-caching",
    )  # fmt: skip
    try:
        log = server.log()
        assert re.search(r"vLLM engine ready: .*max_model_len 128, max_num_seqs 3", log), log[-3000:]
        assert "no effect" not in log
    finally:
        assert stop_server(server) == 0


def test_hfserve_flags_alone_do_not_import_vllm(models):
    """The CLI stays fast: vLLM's parser is imported only for a flag hfserve does not define."""
    code = (
        "import sys; from hfserve.cli import build_parser, resolve; "
        f"resolve(build_parser().parse_args(['--model_dir', {str(models['bert_cls'])!r}, '--max-model-len', '64', "
        "'--enable-grpc', 'false', '--trust-remote-code'])); "
        "sys.exit('vllm' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_config_file(models, tmp_path):
    """vLLM's --config FILE (YAML of its flags) is read by vLLM's own parser, as with vllm serve."""
    (tmp_path / "engine.yaml").write_text("max-num-seqs: 3\nenforce-eager: true\nmax-logprobs: 7\n")
    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--config", str(tmp_path / "engine.yaml")]))
    assert {k: config.engine.engine_args[k] for k in ("max_num_seqs", "enforce_eager", "max_logprobs")} == {
        "max_num_seqs": 3, "enforce_eager": True, "max_logprobs": 7,
    }  # fmt: skip
