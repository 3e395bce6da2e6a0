"""The command line: KServe-compatible flags, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from hfserve.cli import build_parser, resolve
from hfserve.tasks import Task, TaskInferenceError, infer_task, parse_task
from tests.servers import free_port, free_ports, start_server, stop_server


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfserve", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hfserve: error: ")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0]


def test_unknown_flag(models, caplog):
    """As huggingfaceserver: an unknown flag does not stop the start; one warning names it and the
    closest known flag (tests/test_cli_compat.py starts a server with one)."""
    with caplog.at_level("WARNING", logger="hfserve.cli"):
        config = resolve(build_parser().parse_args(["--model_dir", str(models["bert_cls"]), "--frobnicate", "--http_prot", "1"]))
    assert config.server.http_port == 8080
    (line,) = [r.getMessage() for r in caplog.records if r.name == "hfserve.cli"]
    assert "--frobnicate" in line and "--http_prot (did you mean --http_port?)" in line


def test_missing_model_dir(tmp_path):
    assert_one_line_error(run_cli("--model_dir", str(tmp_path / "nope")), "does not exist")


def test_default_model_dir_missing():
    assert_one_line_error(run_cli(), "/mnt/models")


def test_conflicting_model_flags(models):
    assert_one_line_error(run_cli("--model_dir", str(models["llama"]), "--model_id", "org/model"), "--model_id", "--model_dir")


def test_unsupported_task(models):
    assert_one_line_error(run_cli("--model_dir", str(models["llama"]), "--task", "image_generation"), "image_generation")


def test_uninferable_task(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["WeirdThing"]}))
    assert_one_line_error(run_cli("--model_dir", str(tmp_path)), "WeirdThing", "--task")


def test_bad_values():
    assert_one_line_error(run_cli("--backend", "tensorrt"), "--backend")
    assert_one_line_error(run_cli("--http_port", "eighty"), "--http_port")
    assert_one_line_error(run_cli("--enable_grpc", "maybe"), "--enable_grpc")


def test_return_probabilities_on_a_generator(models):
    assert_one_line_error(run_cli("--model_dir", str(models["llama"]), "--return_probabilities"), "--return_probabilities")


def test_max_length_is_an_alias_of_max_model_len():
    args = build_parser().parse_args(["--max_length", "64"])
    assert args.max_model_len == 64


def test_kserve_defaults():
    args = build_parser().parse_args([])
    assert (args.http_port, args.grpc_port, args.enable_grpc, args.model_name, args.backend, args.dtype) == (
        8080,
        8081,
        True,
        "model",
        "auto",
        "auto",
    )


def test_resolve_infers_task(models):
    config = resolve(build_parser().parse_args(["--model_dir", str(models["bert_tok"])]))
    assert config.model.task is Task.token_classification
    config = resolve(build_parser().parse_args(["--model_dir", str(models["minilm"])]))
    assert config.model.task is Task.text_embedding


@pytest.mark.parametrize(
    "arch,task",
    [
        ("LlamaForCausalLM", Task.text_generation),
        ("GPT2LMHeadModel", Task.text_generation),
        ("T5ForConditionalGeneration", Task.text2text_generation),
        ("BertForSequenceClassification", Task.sequence_classification),
        ("RobertaForTokenClassification", Task.token_classification),
        ("BertForMaskedLM", Task.fill_mask),
        ("BertModel", Task.text_embedding),
    ],
)
def test_infer_task(arch, task):
    assert infer_task([arch]) is task


def test_infer_task_failures():
    with pytest.raises(TaskInferenceError):
        infer_task(["LlamaModelX"])
    with pytest.raises(TaskInferenceError):
        infer_task([])
    assert parse_task("text-generation") is Task.text_generation


def test_console_script_and_module_start_and_stop(models, log_dir):
    """`python -m hfserve` serves the model, and SIGTERM ends it with exit code 0."""
    server = start_server(models["bert_cls"], "cli_model", log_dir, "--max_length", "64")
    try:
        r = httpx.post(f"{server.url}/v1/models/cli_model:predict", json={"instances": ["word " * 70]}, timeout=30)
        assert r.status_code == 400 and "64" in r.json()["error"]  # --max_length took effect
    finally:
        assert stop_server(server) == 0


def test_port_in_use_is_a_one_line_error(models):
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        proc = run_cli(
            "--model_dir", str(models["bert_cls"]), "--grpc_port", str(port), "--http_port", str(free_port()),
            "--host", "127.0.0.1", timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hfserve: error: ")


def test_backend_vllm_for_a_model_it_cannot_serve(models):
    """--backend vllm never falls back silently: a one-line startup error instead."""
    http_port, grpc_port = free_ports(2)
    proc = run_cli("--model_dir", str(models["bert_cls"]), "--backend", "vllm", "--http_port", str(http_port),
                   "--grpc_port", str(grpc_port), timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hfserve: error: --backend vllm cannot serve this model")
    assert "Traceback" not in proc.stderr
