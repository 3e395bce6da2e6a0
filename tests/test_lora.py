"""LoRA adapters (issue 14 part 1) on both backends.

One server per backend for the module, serving the fixture Llama with two peft adapters
(``llama_lora_a`` rank 4 on q/v, ``llama_lora_b`` rank 8 on q/k/v/o/down; random non-zero
weights, see tests/fixtures/build_models.py) under the names ``a`` and ``b``. Every answer is
compared with an independent reference computed here: peft in process (``PeftModel`` with the
adapter, transformers ``generate``, greedy) for the adapters, the plain model for the base.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import VLLM_INSTALLED, needs_vllm
from tests.contract import assert_error
from tests.servers import ServerHandle, start_server, stop_server

PROMPTS = ["hello world", "the cat sat on the", "good morning, how are"]
MAX_TOKENS = 10
BASE = "llama"
ADAPTERS = ("a", "b")
RUNTIME_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


# ------------------------------------------------------------------ references
@pytest.fixture(scope="module")
def reference(models) -> dict[tuple[str, str], str]:
    """(model name, prompt) -> the greedy completion, by peft / transformers in this process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["llama"]))
    out: dict[tuple[str, str], str] = {}

    def run(model, name: str) -> None:
        model.eval()
        for prompt in PROMPTS:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS)
            out[(name, prompt)] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)

    run(AutoModelForCausalLM.from_pretrained(str(models["llama"])), BASE)
    for name in ADAPTERS:
        base = AutoModelForCausalLM.from_pretrained(str(models["llama"]))
        run(PeftModel.from_pretrained(base, str(models[f"llama_lora_{name}"])), name)
    # the adapters must change the answers, or the tests below would prove nothing
    for prompt in PROMPTS:
        assert len({out[(n, prompt)] for n in (BASE, *ADAPTERS)}) == 3, prompt
    return out


# ------------------------------------------------------------------ servers
def _lora_flags(models) -> list[str]:
    b = json.dumps({"name": "b", "path": str(models["llama_lora_b"]), "base_model_name": str(models["llama"])})
    return ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--lora-modules", f"a={models['llama_lora_a']}", b]


@pytest.fixture(scope="module")
def lora_hf(models, log_dir):
    handle = start_server(models["llama"], BASE, log_dir, "--backend", "huggingface", *_lora_flags(models), env=RUNTIME_ENV)
    yield handle
    stop_server(handle)


@pytest.fixture(scope="module")
def lora_vllm(models, log_dir):
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    handle = start_server(
        models["llama"], BASE, log_dir, "--backend", "vllm", "--max_model_len", "256", "--max-num-seqs", "16",
        *_lora_flags(models), env=RUNTIME_ENV,
    )  # fmt: skip
    yield handle
    stop_server(handle)


@pytest.fixture(scope="module", params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def server(request) -> ServerHandle:
    return request.getfixturevalue("lora_hf" if request.param == "huggingface" else "lora_vllm")


def _complete(server: ServerHandle, model: str, prompt: str) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(f"{server.openai_url}/completions", json=body, timeout=120)


# ------------------------------------------------------------------ listing
def test_adapters_are_listed_on_every_family(server, models):
    cards = {c["id"]: c for c in httpx.get(f"{server.openai_url}/models", timeout=30).json()["data"]}
    assert set(cards) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        assert cards[name]["parent"] == BASE
        assert cards[name]["root"] == str(models[f"llama_lora_{name}"])
        assert cards[name]["object"] == "model"
        one = httpx.get(f"{server.openai_url}/models/{name}", timeout=30).json()
        assert one["id"] == name and one["parent"] == BASE
    assert set(httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]) == {BASE, *ADAPTERS}
    assert set(httpx.get(f"{server.url}/v2/models", timeout=30).json()["models"]) == {BASE, *ADAPTERS}
    for name in ADAPTERS:
        meta = httpx.get(f"{server.url}/v2/models/{name}", timeout=30)
        assert meta.status_code == 200 and meta.json()["name"] == name
        assert httpx.get(f"{server.url}/v2/models/{name}/ready", timeout=30).status_code == 200
        assert httpx.get(f"{server.url}/v1/models/{name}", timeout=30).json()["ready"] is True


# ------------------------------------------------------------------ outputs
def test_greedy_outputs_equal_peft(server, reference):
    for name in (BASE, *ADAPTERS):
        for prompt in PROMPTS:
            r = _complete(server, name, prompt)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            assert r.json()["choices"][0]["text"] == reference[(name, prompt)], (name, prompt)


def test_adapter_selected_by_the_path_on_kserve(server, reference):
    import tritonclient.grpc as tgrpc

    prompt = PROMPTS[0]
    params = {"max_tokens": MAX_TOKENS, "temperature": 0}
    for name in ADAPTERS:
        v1 = httpx.post(f"{server.url}/v1/models/{name}:predict", json={"instances": [prompt], "parameters": params}, timeout=120)
        assert v1.status_code == 200, v1.text
        assert v1.json()["predictions"] == [reference[(name, prompt)]]
        gen = httpx.post(f"{server.url}/v2/models/{name}/generate", json={"text_input": prompt, "parameters": params}, timeout=120)
        assert gen.status_code == 200, gen.text
        assert gen.json()["text_output"] == reference[(name, prompt)]
        assert gen.json()["model_name"] == name
        with httpx.stream(
            "POST", f"{server.url}/v2/models/{name}/generate_stream", json={"text_input": prompt, "parameters": params}, timeout=120
        ) as stream:
            text = "".join(
                json.loads(line[5:])["text_output"] for line in stream.iter_lines() if line.startswith("data:")
            )
        assert text == reference[(name, prompt)]
        infer = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [prompt]}], "parameters": params}
        v2 = httpx.post(f"{server.url}/v2/models/{name}/infer", json=infer, timeout=120)
        assert v2.status_code == 200, v2.text
        assert v2.json()["outputs"][0]["data"] == [reference[(name, prompt)]]
        assert v2.json()["model_name"] == name
        client = tgrpc.InferenceServerClient(server.grpc_host)
        inp = tgrpc.InferInput("input-0", [1], "BYTES")
        inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        result = client.infer(name, [inp], parameters=params)
        assert [x.decode() for x in result.as_numpy("output-0")] == [reference[(name, prompt)]]
        assert result.get_response().model_name == name


def test_concurrent_mixed_traffic(server, reference):
    """Base, a and b requests sent at once (3 of each per prompt): every answer is its own model's."""
    jobs = [(name, prompt) for _ in range(3) for prompt in PROMPTS for name in (BASE, *ADAPTERS)]

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(name: str, prompt: str) -> str:
                body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                r = await client.post(f"{server.openai_url}/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(name, prompt) for name, prompt in jobs))

    answers = asyncio.run(main())
    wrong = [(job, got, reference[job]) for job, got in zip(jobs, answers) if got != reference[job]]
    assert not wrong, wrong


def test_chat_with_an_adapter_streams_under_its_name(server):
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.openai_url}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"a"}


# ------------------------------------------------------------------ errors
def test_unknown_adapter_is_model_not_found_on_every_family(server):
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    assert_error(_complete(server, "c", "x"), "model_not_found", param="model")
    chat = {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    assert_error(httpx.post(f"{server.openai_url}/chat/completions", json=chat, timeout=30), "model_not_found", param="model")
    assert_error(httpx.post(f"{server.url}/v1/models/c:predict", json={"instances": ["x"]}, timeout=30), "model_not_found")
    infer = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    assert_error(httpx.post(f"{server.url}/v2/models/c/infer", json=infer, timeout=30), "model_not_found")
    assert_error(httpx.post(f"{server.url}/v2/models/c/generate", json={"text_input": "x"}, timeout=30), "model_not_found")
    assert_error(httpx.get(f"{server.url}/v2/models/c", timeout=30), "model_not_found")
    client = tgrpc.InferenceServerClient(server.grpc_host)
    inp = tgrpc.InferInput("input-0", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("c", [inp])
    assert exc.value.status() == "StatusCode.NOT_FOUND"


def test_dynamic_load_and_unload(server, models, reference, tmp_path):
    load, unload = f"{server.openai_url}/load_lora_adapter", f"{server.openai_url}/unload_lora_adapter"
    path_a = str(models["llama_lora_a"])
    r = httpx.post(load, json={"lora_name": "c", "lora_path": path_a}, timeout=120)
    assert r.status_code == 200, r.text
    assert "c" in {c["id"] for c in httpx.get(f"{server.openai_url}/models", timeout=30).json()["data"]}
    got = _complete(server, "c", PROMPTS[1])
    assert got.json()["choices"][0]["text"] == reference[("a", PROMPTS[1])]
    # loading errors: 400 invalid_request, nothing loaded
    assert_error(httpx.post(load, json={"lora_name": "c", "lora_path": path_a}, timeout=30), "invalid_request")
    assert_error(httpx.post(load, json={"lora_name": "d", "lora_path": str(tmp_path / "none")}, timeout=30), "invalid_request")
    high = tmp_path / "high"
    shutil.copytree(models["llama_lora_b"], high)
    config = json.loads((high / "adapter_config.json").read_text())
    config["r"] = 64  # above --max-lora-rank 16
    (high / "adapter_config.json").write_text(json.dumps(config))
    msg = assert_error(httpx.post(load, json={"lora_name": "d", "lora_path": str(high)}, timeout=30), "invalid_request")
    assert "--max-lora-rank" in msg
    assert_error(httpx.post(load, json={"lora_name": "d"}, timeout=30), "invalid_request")
    assert "d" not in {c["id"] for c in httpx.get(f"{server.openai_url}/models", timeout=30).json()["data"]}
    # unloading
    assert httpx.post(unload, json={"lora_name": "c"}, timeout=60).status_code == 200
    assert_error(_complete(server, "c", "x"), "model_not_found", param="model")
    assert_error(httpx.post(unload, json={"lora_name": "c"}, timeout=30), "model_not_found")
    # the others still answer with their own weights
    assert _complete(server, "a", PROMPTS[0]).json()["choices"][0]["text"] == reference[("a", PROMPTS[0])]
    assert _complete(server, BASE, PROMPTS[0]).json()["choices"][0]["text"] == reference[(BASE, PROMPTS[0])]


# ------------------------------------------------------------------ in process: the routes


@pytest.mark.anyio
async def test_dynamic_routes_exist_only_when_allowed(fake, monkeypatch):
    server = await fake()
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    r = await server.post("/openai/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert_error(r, "not_found")
    r = await server.post("/openai/v1/unload_lora_adapter", {"lora_name": "x"})
    assert_error(r, "not_found")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    r = await server.post("/openai/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert "--enable-lora" in assert_error(r, "invalid_request")
    assert_error(await server.post("/openai/v1/unload_lora_adapter", {"lora_name": "x"}), "model_not_found")


# ------------------------------------------------------------------ start-up
def _other_base_adapter(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny Llama of another shape, and a LoRA adapter made on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "other-base", tmp_path / "other-adapter"
    config = LlamaConfig(
        vocab_size=1024, hidden_size=96, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def _startup_error(models, capsys, *flags: str) -> str:
    from hfserve import cli

    argv = ["--model_dir", str(models["llama"]), "--model_name", BASE, "--backend", "huggingface", *flags]
    with pytest.raises(SystemExit) as exc:
        cli.resolve(cli.build_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hfserve: error: "), err
    assert "Traceback" not in err and "Error:" not in err.removeprefix("hfserve: error: ")
    return err


def test_startup_refuses_bad_adapters(models, capsys, tmp_path):
    a = str(models["llama_lora_a"])
    assert "does not exist" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"x={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert "not a LoRA adapter" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"x={tmp_path / 'empty'}")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    assert "not a LoRA adapter" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"x={prefix}")
    msg = _startup_error(models, capsys, "--enable-lora", "--max-lora-rank", "4", "--lora-modules", f"b={models['llama_lora_b']}")
    assert "rank 8" in msg and "--max-lora-rank 4" in msg
    base_dir, other = _other_base_adapter(tmp_path)
    capsys.readouterr()  # the builder's progress bars
    assert "another base model" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"x={other}")
    # named by a Hub id (nothing to compare by name): its shapes give it away
    hub = tmp_path / "hub-named"
    shutil.copytree(other, hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (hub / "adapter_config.json").write_text(json.dumps(config))
    msg = _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"x={hub}")
    assert "another base model" in msg and "size" in msg
    assert "needs --enable-lora" in _startup_error(models, capsys, "--lora-modules", f"a={a}")
    assert "not valid JSON" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", '{"name": "a", ')
    assert "twice" in _startup_error(models, capsys, "--enable-lora", "--lora-modules", f"a={a}", f"a={a}")
    assert "--max-loras" in _startup_error(models, capsys, "--enable-lora", "--max-loras", "0")
    assert "--max-cpu-loras (1)" in _startup_error(models, capsys, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "1")


def test_startup_refuses_lora_on_encoder_models(models, capsys):
    from hfserve import cli

    argv = ["--model_dir", str(models["bert_cls"]), "--enable-lora", "--lora-modules", f"a={models['llama_lora_a']}"]
    with pytest.raises(SystemExit) as exc:
        cli.resolve(cli.build_parser().parse_args(argv))
    assert exc.value.code == 2
    assert "text generation only" in capsys.readouterr().err


def test_cli_reads_both_forms(models):
    from hfserve import cli

    a, b = str(models["llama_lora_a"]), str(models["llama_lora_b"])
    argv = [
        "--model_dir", str(models["llama"]), "--enable-lora", "--max-loras", "3", "--max-cpu-loras", "4", "--max_lora_rank", "8",
        "--lora-modules", f"a={a}", json.dumps({"name": "b", "path": b, "base_model_name": "llama"}), "--lora_modules", f"c={a}",
    ]  # fmt: skip
    lora = cli.resolve(cli.build_parser().parse_args(argv)).model.lora
    assert lora.enabled and (lora.max_loras, lora.max_cpu_loras, lora.max_lora_rank) == (3, 4, 8)
    assert [(m.name, m.path, m.base_model_name) for m in lora.modules] == [("a", a, None), ("b", b, "llama"), ("c", a, None)]


# ------------------------------------------------------------------ in process: one batch
@pytest.fixture(scope="module")
def lora_backend(models):
    from hfserve.backends.huggingface import HuggingFaceBackend
    from hfserve.config import BatchingConfig, LoraConfig, ModelConfig

    lora = LoraConfig(enabled=True, max_loras=2)
    b = HuggingFaceBackend(ModelConfig.local(models["llama"], lora=lora), BatchingConfig(max_batch_size=32, max_batch_wait_ms=200))
    asyncio.run(b.start())
    for name in ADAPTERS:
        asyncio.run(b.load_adapter(name, str(models[f"llama_lora_{name}"])))
    yield b
    asyncio.run(b.stop())


def _generate_all(backend, jobs: list[tuple[str | None, str]]) -> list[str]:
    from hfserve.generation import SamplingParams

    async def one(adapter: str | None, prompt: str) -> str:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, adapter=adapter)
        text = ""
        async for deltas in backend.generate(backend.tokenizer(prompt)["input_ids"], params, "r"):
            text += "".join(d.text for d in deltas)
        return text

    async def main() -> list[str]:
        return await asyncio.gather(*(one(a, p) for a, p in jobs))

    return asyncio.run(main())


def test_rows_of_different_adapters_share_one_batch(lora_backend, reference):
    """Base, a and b requests arriving together are prefilled together and decode as rows of one
    batch (max_rows = every request), each with its own adapter's answer."""
    b = lora_backend
    jobs = [(name, prompt) for prompt in PROMPTS for name in (None, *ADAPTERS)]
    _generate_all(b, [(None, PROMPTS[0])])  # the first prefill finds out whether KV caches can be merged
    b.scheduler._last_group = 0  # a burst after a lone request: the batch window still waits for it (else the first starts alone)
    b.stats["max_rows"], prefills = 0, b.stats["prefills"]
    answers = _generate_all(b, jobs)
    assert answers == [reference[(name or BASE, prompt)] for name, prompt in jobs]
    assert b.stats["max_rows"] == len(jobs)
    assert b.stats["prefills"] - prefills == 1
    # rows of different adapters cannot share one flat sequence: no prompt rides in a decode step
    assert not b.scheduler.fold_prompts and b.stats["folded_prompts"] == 0


def test_max_loras_bounds_the_adapters_of_a_batch(lora_backend, reference):
    """With --max-loras 1, a and b never share a batch, base rows join either; answers stay right."""
    b = lora_backend
    b.scheduler.max_adapters = 1
    seen: list[set[str]] = []
    run_model = b.scheduler.run_with_adapters

    def spy(adapters, encoder, inputs):
        seen.append(set(adapters) - {None})
        return run_model(adapters, encoder, inputs)

    b.scheduler.run_with_adapters = spy
    try:
        jobs = [(name, prompt) for prompt in PROMPTS for name in (None, *ADAPTERS)]
        answers = _generate_all(b, jobs)
    finally:
        b.scheduler.run_with_adapters = run_model
        b.scheduler.max_adapters = 2
    assert answers == [reference[(name or BASE, prompt)] for name, prompt in jobs]
    assert seen and max(len(s) for s in seen) == 1
    assert {"a", "b"} <= set().union(*seen)


def test_lora_weights_per_row_unload_and_reload(models):
    """The per-row forward pass itself: a base row equals the plain model's, an adapter row differs;
    after the last adapter is unloaded the model is the plain one again, and an unloaded adapter's
    row is model_not_found, never the base model's answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfserve import errors
    from hfserve.backends.lora import LoraWeights

    model = AutoModelForCausalLM.from_pretrained(str(models["llama"])).eval()
    ids = torch.tensor([[1, 5, 9, 20], [1, 7, 8, 9]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        weights = LoraWeights(model)
        weights.load("a", str(models["llama_lora_a"]))
        mixed = weights.run([None, "a"], False, {"input_ids": ids}).logits
        assert torch.allclose(mixed[0], plain[0], atol=1e-5) and not torch.allclose(mixed[1], plain[1], atol=1e-3)
        weights.unload("a")
        assert torch.allclose(weights.run([None, None], False, {"input_ids": ids}).logits, plain, atol=1e-5)
        with pytest.raises(errors.ModelNotFound):
            weights.run([None, "a"], False, {"input_ids": ids})
        weights.load("b", str(models["llama_lora_b"]))
        again = weights.run(["b", None], False, {"input_ids": ids}).logits
        assert torch.allclose(again[1], plain[1], atol=1e-5) and not torch.allclose(again[0], plain[0], atol=1e-3)


def test_startup_error_is_one_line_and_exit_2(models, tmp_path):
    """The real process: a bad adapter stops the start with one line on stderr and exit code 2."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "hfserve", "--model_dir", str(models["llama"]), "--enable-lora", "--lora-modules", f"x={tmp_path / 'gone'}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hfserve: error: LoRA adapter 'x'") and "does not exist" in lines[0], lines
