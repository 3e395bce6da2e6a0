"""Real argument lists, each starting a real server: what KServe's e2e tests, its single-node and
multinode runtimes and users pass (in both spellings), observed through the API.

tests/test_cli_compat.py checks what each list resolves to; here each list starts a server
(transformers backend; vLLM backend where vLLM is installed) and every flag that has an effect
is observed: a context-length error naming the configured limit, a name and an alias that
answer, a chat template that is used, a default that applies, raw logits that are not labels,
the start-up line that names engine flags without effect on the transformers backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import needs_vllm
from tests.servers import ServerHandle, start_server, stop_server

pytestmark = pytest.mark.timeout(900)

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"


def _post(h: ServerHandle, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{h.url}{path}", json=body, timeout=120)


def context_limit(limit: int, name: str) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        r = _post(h, "/openai/v1/completions", {"model": name, "prompt": "hello", "max_tokens": limit + 10})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert str(limit) in r.json()["error"]["message"]
        ok = _post(h, "/openai/v1/completions", {"model": name, "prompt": "hello", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200, ok.text

    return check


def names(reported: str, *aliases: str) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        for name in (reported, *aliases):
            r = _post(h, f"/v2/models/{name}/generate", {"text_input": "hi", "parameters": {"max_tokens": 2}})
            assert r.status_code == 200 and r.json()["model_name"] == reported, r.text
        cards = httpx.get(f"{h.url}/openai/v1/models", timeout=30).json()["data"]
        assert [(c["id"], c["aliases"]) for c in cards] == [(reported, list(aliases))]

    return check


def template_used(name: str) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        from transformers import AutoTokenizer

        messages = [{"role": "user", "content": "Hi"}]
        r = _post(h, "/openai/v1/chat/completions", {"model": name, "messages": messages, "max_tokens": 2})
        assert r.status_code == 200, r.text
        expected = AutoTokenizer.from_pretrained(str(h.model_dir))("[user]Hi[assistant]", add_special_tokens=False)
        assert r.json()["usage"]["prompt_tokens"] == len(expected["input_ids"])

    return check


def default_applies(name: str, max_tokens: int) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        card = httpx.get(f"{h.url}/openai/v1/models", timeout=30).json()["data"][0]
        assert card["generation_defaults"].get("max_tokens") == max_tokens
        r = _post(h, "/openai/v1/completions", {"model": name, "prompt": "hi", "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == max_tokens, r.text

    return check


def raw_logits(name: str) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        out = _post(h, f"/v1/models/{name}:predict", {"instances": ["a fine day", "awful"]}).json()["predictions"]
        # huggingfaceserver's layout: each class index's raw logit, not a label
        assert all(isinstance(row, dict) and all(isinstance(x, float) for x in row.values()) for row in out), out
        assert all(sorted(row) == [str(i) for i in range(len(row))] and len(row) > 1 for row in out), out

    return check


def named_without_effect(*flags: str) -> Callable[[ServerHandle], None]:
    def check(h: ServerHandle) -> None:
        if "vllm" in h.args:
            assert "no effect" not in h.log()
            return
        line = next(x for x in h.log().splitlines() if "no effect on the huggingface backend" in x)
        assert all(f in line for f in flags), line

    return check


def compiled_before_ready(h: ServerHandle) -> None:
    """``--compile``: the transformers backend compiled its decode step before it answered ready;
    the vLLM backend names the flag as without effect (vLLM compiles by its own settings)."""
    log = h.log()
    if "vllm" in h.args:
        assert "--compile has no effect on the vllm backend" in log
    else:
        assert "decode step compiled in" in log, log[-2000:]


# (id, model, argument list, checks, runs on vLLM too)
ROWS = [
    (
        "kserve-e2e",  # KServe's huggingface e2e tests
        "llama",
        ["--model_name", "gpt", "--max-model-len", "128", "--enforce-eager", "--dtype", "float32"],
        [context_limit(128, "gpt"), named_without_effect("--enforce-eager")],
        True,
    ),
    (
        "multinode-runtime",  # KServe's multinode runtime, --key=value form, snake_case in places
        "llama",
        ["--model_name=llm", "--tensor-parallel-size=1", "--pipeline_parallel_size=1", "--max_model_len=100"],
        [context_limit(100, "llm"), named_without_effect("--tensor-parallel-size", "--pipeline-parallel-size")],
        False,  # on vLLM: tests/test_cli_compat.py checks that these reach the engine
    ),
    (
        "served-names-template-defaults",  # vLLM's frontend flags in snake_case
        "llama",
        [
            "--served_model_name", "primary", "alias",
            "--chat_template", TEMPLATE,
            "--override_generation_config", json.dumps({"max_new_tokens": 3}),
        ],
        [names("primary", "alias"), template_used("primary"), default_applies("primary", 3)],
        True,
    ),  # fmt: skip
    (
        "compile",  # the transformers backend's compiled decode step
        "llama",
        ["--model_name", "gpt", "--compile", "--max_model_len", "64"],
        [compiled_before_ready, context_limit(64, "gpt")],
        True,
    ),
    (
        "kserve-e2e-raw-logits",  # KServe's e2e test of a sequence classifier
        "bert_cls",
        ["--model_name", "cls", "--return_raw_logits", "--max_length", "64"],
        [raw_logits("cls")],
        False,
    ),
]

PARAMS = []
for row_id, model, argv, checks, on_vllm in ROWS:
    PARAMS.append(pytest.param(model, argv, checks, "huggingface", id=f"{row_id}-huggingface"))
    if on_vllm:
        PARAMS.append(pytest.param(model, argv, checks, "vllm", id=f"{row_id}-vllm", marks=needs_vllm))


@pytest.mark.parametrize(("model", "argv", "checks", "backend"), PARAMS)
def test_argument_list_starts_and_every_flag_shows(models, log_dir, model, argv, checks, backend):
    extra = ["--max_num_seqs", "4"] if backend == "vllm" else []
    h = start_server(models[model], f"{model}-{backend}", log_dir, "--backend", backend, *extra, *argv)
    try:
        for check in checks:
            check(h)
    finally:
        assert stop_server(h) == 0
