"""The model's own defaults and templates (issue 12 part 4): --served-model-name aliases, the
generation config's sampling defaults (--generation-config, --override-generation-config),
--chat-template, --default-chat-template-kwargs and --response-role.

In process (tests/fakes.py) for routing and the defaults' arithmetic; one real server per backend
for what needs a real model, a real chat template and gRPC."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest
import tritonclient.grpc as tg

from hfserve.chat import detect_content_format
from hfserve.cli import build_parser, resolve
from hfserve.generation import Capabilities
from hfserve.sampling import generation_defaults
from tests.conftest import needs_vllm
from tests.contract import assert_error
from tests.fakes import FakeServer, Serve, serving
from tests.servers import start_server, stop_server


@pytest.fixture
async def serve():
    async with serving() as s:
        yield s


def v2_inputs(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text_input", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


# ------------------------------------------------------------------------------ names
@pytest.mark.anyio
async def test_every_name_answers_on_every_family_and_the_first_is_reported(serve: Serve):
    s: FakeServer = await serve(name="main", model_options={"aliases": ("alias-a", "alias-b")})
    for name in ("main", "alias-a", "alias-b"):
        r = await s.post("/openai/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "main"
        r = await s.post("/openai/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "main"
        r = await s.post(f"/v1/models/{name}:predict", {"instances": ["hi"]})
        assert r.status_code == 200, r.text
        r = await s.post(f"/v2/models/{name}/infer", v2_inputs(["hi"]))
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == "main"
        r = await s.post(f"/v2/models/{name}/generate", {"text_input": "hi", "parameters": {"max_tokens": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["model_name"] == "main"
        assert (await s.client.get(f"/v2/models/{name}")).json()["name"] == "main"
        assert (await s.client.get(f"/v2/models/{name}/ready")).status_code == 200
        assert (await s.client.get(f"/v1/models/{name}")).status_code == 200
        assert (await s.client.get(f"/openai/v1/models/{name}")).json()["id"] == "main"
    assert (await s.client.get("/v1/models")).json() == {"models": ["main"]}
    listed = (await s.client.get("/openai/v1/models")).json()["data"]
    assert [(m["id"], m["aliases"]) for m in listed] == [("main", ["alias-a", "alias-b"])]
    r = await s.post("/openai/v1/completions", {"model": "other", "prompt": "hi"})
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (404, "model_not_found", "model")
    r = await s.post("/v2/models/other/infer", v2_inputs(["hi"]))
    assert (r.status_code, r.json()) == (404, {"error": "Model with name other does not exist."})


# -------------------------------------------------------------------- sampling defaults
def write_generation_config(directory: pathlib.Path, **values) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **values}))
    return directory


GEN = {"temperature": 0.3, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "max_new_tokens": 7}


@pytest.mark.anyio
async def test_generation_config_fills_what_the_request_leaves_out(serve: Serve, tmp_path):
    s = await serve(model_options={"local_dir": write_generation_config(tmp_path, **GEN), "generation_config": "auto"})
    # the fake backend has no penalties: those are not in force (min_p is, on every backend)
    in_force = {"temperature": 0.3, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "max_tokens": 7}
    assert s.service.generation_defaults == in_force
    card = (await s.client.get("/openai/v1/models")).json()["data"][0]
    assert card["generation_defaults"] == in_force

    r = await s.post("/openai/v1/completions", {"model": "fake", "prompt": "hello"})
    assert r.json()["usage"]["completion_tokens"] == 7
    p = s.backend.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (0.3, 0.9, 5, 0.05, 7)

    body = {"model": "fake", "prompt": "hello", "temperature": 1.0, "top_p": 0.5, "top_k": -1, "max_tokens": 3}
    await s.post("/openai/v1/completions", body)
    p = s.backend.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 0.5, 0, 3)

    await s.post("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}]})
    assert (s.backend.params[-1].max_tokens, s.backend.params[-1].temperature) == (7, 0.3)
    await s.post("/v2/models/fake/generate", {"text_input": "hello"})
    assert (s.backend.params[-1].max_tokens, s.backend.params[-1].top_k) == (7, 5)
    await s.post("/v1/models/fake:predict", {"instances": ["hello"]})
    assert s.backend.params[-1].top_p == 0.9


@pytest.mark.anyio
async def test_default_max_tokens_stays_within_the_context(serve: Serve, tmp_path):
    s = await serve(max_model_len=40, model_options={"local_dir": write_generation_config(tmp_path, max_new_tokens=100)})
    r = await s.post("/openai/v1/completions", {"model": "fake", "prompt": "0123456789"})
    assert r.status_code == 200, r.text
    assert s.backend.params[-1].max_tokens == 40 - 11  # BOS + 10 bytes (not the completions' 16)


@pytest.mark.anyio
async def test_penalty_defaults_apply_where_the_backend_has_penalties(serve: Serve, tmp_path):
    s = await serve(start=False, model_options={"local_dir": write_generation_config(tmp_path, **GEN)})
    s.backend.capabilities = Capabilities(penalties=True)
    await s.service.start()
    assert s.service.generation_defaults["repetition_penalty"] == 1.2
    await s.post("/openai/v1/completions", {"model": "fake", "prompt": "hi"})
    assert s.backend.params[-1].repetition_penalty == 1.2
    await s.post("/openai/v1/completions", {"model": "fake", "prompt": "hi", "repetition_penalty": 1.0})
    assert s.backend.params[-1].repetition_penalty == 1.0


@pytest.mark.anyio
async def test_generation_config_vllm_and_override(serve: Serve, tmp_path):
    model = write_generation_config(tmp_path / "model", **GEN)
    off = await serve(model_options={"local_dir": model, "generation_config": "vllm"})
    assert off.service.generation_defaults == {}
    await off.post("/openai/v1/completions", {"model": "fake", "prompt": "hi"})
    p = off.backend.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)  # OpenAI's 16 for completions

    override = {"temperature": 0.5, "max_new_tokens": 4, "unrelated": 1}
    over = await serve(model_options={"local_dir": model, "override_generation_config": override})
    assert over.service.generation_defaults == {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "max_tokens": 4}
    only = await serve(model_options={"local_dir": model, "generation_config": "vllm", "override_generation_config": override})
    assert only.service.generation_defaults == {"temperature": 0.5, "max_tokens": 4}
    other_dir = write_generation_config(tmp_path / "elsewhere", top_p=0.25)
    elsewhere = await serve(model_options={"local_dir": model, "generation_config": str(other_dir)})
    assert elsewhere.service.generation_defaults == {"top_p": 0.25}


def test_generation_defaults_as_vllm_reads_them():
    assert generation_defaults({"bos_token_id": 1, "do_sample": True}) == {}
    assert generation_defaults({"temperature": 0.6, "top_k": None, "max_new_tokens": 9}) == {"temperature": 0.6, "max_tokens": 9}
    with pytest.raises(ValueError, match="temperature"):
        generation_defaults({"temperature": 7.0})


@pytest.mark.anyio
async def test_encoders_have_no_sampling_defaults(serve: Serve, tmp_path):
    from hfserve.tasks import Task

    s = await serve(Task.text_embedding, model_options={"local_dir": write_generation_config(tmp_path, **GEN)})
    assert s.service.generation_defaults == {}


# ----------------------------------------------------------------- templates and role
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ greeting }}"


@pytest.mark.anyio
async def test_server_chat_template_and_default_kwargs(serve: Serve):
    s = await serve(
        model_options={
            "chat_template": TEMPLATE,
            "default_chat_template_kwargs": {"greeting": "HI"},
            "trust_request_chat_template": True,
        }
    )
    messages = [{"role": "user", "content": "ab"}]
    r = await s.post("/openai/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 10})
    assert r.json()["choices"][0]["message"]["content"] == "[user]abHI"  # the fake echoes its prompt
    body = {"model": "fake", "messages": messages, "max_tokens": 10, "chat_template_kwargs": {"greeting": "YO"}}
    assert (await s.post("/openai/v1/chat/completions", body)).json()["choices"][0]["message"]["content"] == "[user]abYO"
    body = {"model": "fake", "messages": messages, "max_tokens": 4, "chat_template": "<{{ greeting }}>"}
    assert (await s.post("/openai/v1/chat/completions", body)).json()["choices"][0]["message"]["content"] == "<HI>"


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["chat_template", "chat_template_kwargs"])
@pytest.mark.parametrize("stream", [False, True])
async def test_request_chat_template_needs_the_flag(serve: Serve, where, stream):
    """As vLLM: a request's own chat template is refused unless --trust-request-chat-template."""
    s = await serve(model_options={"chat_template": TEMPLATE})
    messages = [{"role": "user", "content": "ab"}]
    field = {"chat_template": "<x>"} if where == "chat_template" else {"chat_template_kwargs": {"chat_template": "<x>"}}
    body = {"model": "fake", "messages": messages, "max_tokens": 3, "stream": stream, **field}
    message = assert_error(await s.post("/openai/v1/chat/completions", body), "invalid_request", param="chat_template")
    assert "--trust-request-chat-template" in message
    trusted = await serve(name="fake", model_options={"chat_template": TEMPLATE, "trust_request_chat_template": True})
    assert (await trusted.post("/openai/v1/chat/completions", {**body, "stream": False})).status_code == 200


@pytest.mark.anyio
async def test_response_role(serve: Serve):
    s = await serve(model_options={"response_role": "bot"})
    messages = [{"role": "user", "content": "ab"}]
    r = await s.post("/openai/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["role"] == "bot"
    r = await s.post("/openai/v1/chat/completions", {"model": "fake", "messages": messages, "max_tokens": 2, "stream": True})
    first = json.loads(r.text.split("data: ", 2)[1].split("\n")[0])
    assert first["choices"][0]["delta"]["role"] == "bot"
    body = {
        "model": "fake",
        "messages": [*messages, {"role": "assistant", "content": "c"}],
        "max_tokens": 2,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    r = await s.post("/openai/v1/chat/completions", body)
    assert r.json()["choices"][0]["message"]["role"] == "assistant"  # the continued message's role


PARTS_TEMPLATE = "{% for m in messages %}{% for p in m['content'] %}({{ p['text'] }}){% endfor %}{% endfor %}"


def test_content_format_detection():
    assert detect_content_format(PARTS_TEMPLATE) == "openai"
    assert detect_content_format("{% for m in messages %}{% for p in m.content | list %}{% endfor %}{% endfor %}") == "openai"
    assert detect_content_format(TEMPLATE) == "string"
    assert detect_content_format(TEMPLATE, "openai") == "openai"
    assert detect_content_format(None) == "string"


@pytest.mark.anyio
@pytest.mark.parametrize("fmt, expected", [("auto", "(ab)(cd)"), ("openai", "(ab)(cd)"), ("string", "()" * 5)])
async def test_chat_template_content_format(serve: Serve, fmt, expected):
    s = await serve(model_options={"chat_template": PARTS_TEMPLATE, "chat_template_content_format": fmt})
    content = [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]  # as a string: "ab\ncd", 5 characters
    body = {"model": "fake", "messages": [{"role": "user", "content": content}], "max_tokens": len(expected)}
    r = await s.post("/openai/v1/chat/completions", body)
    assert r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.anyio
async def test_string_content_as_openai_parts(serve: Serve):
    s = await serve(model_options={"chat_template": PARTS_TEMPLATE})
    body = {"model": "fake", "messages": [{"role": "user", "content": "xy"}], "max_tokens": 4}
    assert (await s.post("/openai/v1/chat/completions", body)).json()["choices"][0]["message"]["content"] == "(xy)"


# ------------------------------------------------------------------------------ the flags
def resolved(model_dir: pathlib.Path, *flags: str):
    return resolve(build_parser().parse_args(["--model_dir", str(model_dir), *flags])).model


def test_flags_in_both_spellings(models, tmp_path):
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TEMPLATE)
    llama = models["llama"]
    m = resolved(llama, "--served-model-name", "a", "b", "a", "--generation-config", "vllm", "--chat-template", str(template_file))
    assert (m.name, m.aliases, m.generation_config, m.chat_template) == ("a", ("b",), "vllm", TEMPLATE)
    m = resolved(
        llama,
        "--model_name", "x",
        "--served_model_name", "a",
        "--override_generation_config", '{"temperature": 0.5}',
        "--chat_template", "{{ messages }}",
        "--default_chat_template_kwargs", '{"enable_thinking": false}',
        "--response_role", "bot",
        "--chat_template_content_format", "openai",
    )  # fmt: skip
    assert (m.name, m.aliases, dict(m.override_generation_config)) == ("a", (), {"temperature": 0.5})
    assert (m.chat_template, dict(m.default_chat_template_kwargs), m.response_role) == ("{{ messages }}", {"enable_thinking": False}, "bot")
    assert m.chat_template_content_format == "openai"
    assert resolved(llama, "--chat-template-content-format", "string").chat_template_content_format == "string"
    m = resolved(llama, "--model_name", "x")
    assert (m.name, m.aliases, m.generation_config, m.chat_template, m.response_role) == ("x", (), "auto", None, "assistant")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--override-generation-config", "[1]"], ["JSON object"]),
        (["--override-generation-config", '{"top_p": 3}'], ["--override-generation-config", "top_p"]),
        (["--default-chat-template-kwargs", "nope"], ["JSON object"]),
        (["--chat-template", "/no/such/template.jinja"], ["--chat-template", "neither a file nor a template"]),
        (["--generation-config", "/no/such/dir"], ["--generation-config"]),
        (["--chat-template-content-format", "xml"], ["--chat-template-content-format"]),
    ],
)
def test_bad_values_are_one_line_errors(models, flags, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        resolved(models["llama"], *flags)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hfserve: error: "), lines
    for w in words:
        assert w in lines[0]


# ---------------------------------------------------------------------- real servers
REAL_TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}{{ marker }}"


@pytest.fixture(scope="module")
def llama_with_defaults(models, tmp_path_factory) -> pathlib.Path:
    """The fixture Llama (its files linked) with sampling defaults in its generation_config.json."""
    src = models["llama"]
    dest = tmp_path_factory.mktemp("llama_defaults")
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (dest / f.name).symlink_to(f.resolve())
    gen = json.loads((src / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.7, "top_k": 1, "max_new_tokens": 5}))
    (dest.parent / "template.jinja").write_text(REAL_TEMPLATE)
    return dest


@pytest.fixture(scope="module", params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def defaults_server(request, llama_with_defaults, log_dir):
    backend = request.param
    extra = ["--max_model_len", "256", "--max_num_seqs", "8"] if backend == "vllm" else []
    handle = start_server(
        llama_with_defaults,
        "ignored",
        log_dir,
        "--backend", backend,
        *extra,
        "--served-model-name", "primary", "second",
        "--chat-template", str(llama_with_defaults.parent / "template.jinja"),
        "--default-chat-template-kwargs", '{"marker": "!?"}',
        "--response-role", "bot",
    )  # fmt: skip
    yield handle
    stop_server(handle)


def test_real_server_defaults_aliases_and_template(defaults_server):
    from transformers import AutoTokenizer

    h = defaults_server
    with httpx.Client(base_url=h.url, timeout=120) as c:
        card = c.get("/openai/v1/models").json()["data"][0]
        assert (card["id"], card["aliases"]) == ("primary", ["second"])
        assert card["generation_defaults"] == {"temperature": 0.7, "top_k": 1, "max_tokens": 5}
        # top_k 1 from the generation config: sampling at temperature 0.7 is greedy; 5 tokens by default
        plain = c.post("/openai/v1/completions", json={"model": "second", "prompt": "Hello there"}).json()
        greedy = c.post(
            "/openai/v1/completions", json={"model": "primary", "prompt": "Hello there", "temperature": 0, "max_tokens": 5}
        ).json()
        assert plain["model"] == "primary"
        assert plain["choices"][0]["text"] == greedy["choices"][0]["text"]
        assert plain["usage"]["completion_tokens"] <= 5
        # the server's template with its default kwargs, and the response role
        messages = [{"role": "user", "content": "Hi"}]
        chat = c.post("/openai/v1/chat/completions", json={"model": "second", "messages": messages, "max_tokens": 4, "temperature": 0})
        assert chat.status_code == 200, chat.text
        tok = AutoTokenizer.from_pretrained(str(h.model_dir))
        ids = tok("<<user>>Hi!?", add_special_tokens=False)["input_ids"]
        same = c.post("/openai/v1/completions", json={"model": "primary", "prompt": ids, "max_tokens": 4, "temperature": 0}).json()
        body = chat.json()
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["choices"][0]["message"] == {**body["choices"][0]["message"], "role": "bot"}
        assert body["choices"][0]["message"]["content"] == same["choices"][0]["text"]
        # KServe v2 under the alias
        r = c.post("/v2/models/second/generate", json={"text_input": "Hello there"})
        assert r.status_code == 200, r.text
        assert (r.json()["model_name"], r.json()["text_output"]) == ("primary", plain["choices"][0]["text"])
    grpc = tg.InferenceServerClient(h.grpc_host)
    try:
        assert grpc.is_model_ready("second")
        assert grpc.get_model_metadata("second").name == "primary"
    finally:
        grpc.close()


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_auto_dtype_on_a_gpu_is_the_models_own(tmp_path, key):
    """The transformers backend's ``--dtype auto`` on a GPU loads the half type the model's
    config.json names, under transformers 5's ``dtype`` key or the older ``torch_dtype``; on CPU
    float32 whatever the config says."""
    import torch
    import transformers

    from hfserve.backends.huggingface import HuggingFaceBackend
    from hfserve.config import ModelConfig

    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("dtype", None)
    saved.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**saved, key: "bfloat16"}))
    backend = HuggingFaceBackend(ModelConfig(source=str(tmp_path), local_dir=tmp_path))
    backend.config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert backend._resolve_dtype("cuda") == torch.bfloat16
    assert backend._resolve_dtype("cpu") == torch.float32
