"""Encoder inputs and prompts longer than the model (issue 12, part 7).

By default an over-long encoder input is ``context_length_exceeded`` (huggingfaceserver cuts it
silently). ``--truncate_inputs`` cuts encoder inputs (every KServe and OpenAI encoder route) to the
context length as huggingfaceserver does: at their end, the tokenizer's special tokens kept. The
per-request ``truncate_prompt_tokens`` of vLLM's OpenAI server (embeddings, completions, chat)
keeps that many tokens: the first ones for embeddings (vLLM's pooling models truncate on the
right), the last ones for prompts (its generation models truncate on the left); -1 is the context
length (less one token for the output when generating). Usage counts the tokens kept.

The first half runs in this process on the fake backend (tests/fakes.py: a byte-level tokenizer
with a BOS, a generation that echoes the prompt's bytes); the second against real servers on both
backends, each answer compared with one computed independently.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from hfserve.tasks import Task
from tests.conftest import needs_vllm
from tests.contract import assert_error
from tests.fakes import FakeTokenizer
from tests.servers import ServerHandle, start_server, stop_server

LIMIT = 16  # the fake model's context length
PARAM = "truncate_prompt_tokens"


def v2_inputs(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


TOK = FakeTokenizer()


def ids_of(text: str) -> list[int]:
    """The fake tokenizer's ids of ``text`` (BOS, then a token per byte; ``[MASK]`` is one token)."""
    return TOK.encode(text)


LONG = "abcdefghijklmnopqrstuvwxyz0123456789"  # 37 tokens with BOS: more than LIMIT
CHAT_LONG = [{"role": "user", "content": LONG}]
OPENAI_ROUTES = {
    "completions": ("/openai/v1/completions", {"model": "fake", "prompt": "hi"}, Task.text_generation),
    "chat": ("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}, Task.text_generation),
    "embeddings": ("/openai/v1/embeddings", {"model": "fake", "input": "hi"}, Task.text_embedding),
}


# ================================================================ in process: validation
@pytest.mark.anyio
@pytest.mark.parametrize("route", sorted(OPENAI_ROUTES))
@pytest.mark.parametrize("value", [0, -2, -100, LIMIT + 1, 10**30])
async def test_out_of_range_is_invalid_request_naming_the_limit(fake, route, value):
    """vLLM's range: -1, or 1 up to the context length (it refuses more; 0 would leave no prompt)."""
    path, body, task = OPENAI_ROUTES[route]
    srv = await fake(task, max_model_len=LIMIT)
    msg = assert_error(await srv.post(path, {**body, PARAM: value}), "invalid_request", param=PARAM)
    assert PARAM in msg and str(LIMIT) in msg and "-1" in msg and str(value) in msg


@pytest.mark.anyio
@pytest.mark.parametrize("route", sorted(OPENAI_ROUTES))
@pytest.mark.parametrize("value", ["8", 8.5, True, [8]])
async def test_wrong_type_is_invalid_request(fake, route, value):
    path, body, task = OPENAI_ROUTES[route]
    srv = await fake(task, max_model_len=LIMIT)
    msg = assert_error(await srv.post(path, {**body, PARAM: value}), "invalid_request", param=PARAM)
    assert PARAM in msg


@pytest.mark.anyio
@pytest.mark.parametrize("route", sorted(OPENAI_ROUTES))
async def test_the_range_is_checked_for_short_prompts_too(fake, route):
    """As vLLM: a value beyond the context length is refused even when nothing needs cutting."""
    path, body, task = OPENAI_ROUTES[route]
    srv = await fake(task, max_model_len=LIMIT)
    assert_error(await srv.post(path, {**body, PARAM: LIMIT + 1}), "invalid_request", param=PARAM)
    fits = {PARAM: LIMIT} if task is Task.text_embedding else {PARAM: LIMIT - 1, "max_tokens": 1}
    ok = await srv.post(path, {**body, **fits})
    assert ok.status_code == 200, ok.text


# ============================================================ in process: encoder inputs
ENCODER_ROUTES = [
    ("openai", Task.text_embedding),
    ("v1", Task.text_embedding),
    ("v2", Task.text_embedding),
    ("v1", Task.sequence_classification),
    ("v2", Task.sequence_classification),
    ("v1", Task.token_classification),
    ("v2", Task.token_classification),
    ("v1", Task.fill_mask),
    ("v2", Task.fill_mask),
]


async def _encode(srv, family: str, texts: list[str], **extra: Any) -> httpx.Response:
    if family == "openai":
        return await srv.post("/openai/v1/embeddings", {"model": "fake", "input": texts, **extra})
    if family == "v1":
        return await srv.post("/v1/models/fake:predict", {"instances": texts})
    return await srv.post("/v2/models/fake/infer", v2_inputs(texts))


def _predictions(family: str, resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    if family == "openai":
        return [d["embedding"] for d in body["data"]]
    if family == "v1":
        return body["predictions"]
    return body["outputs"][0]["data"]


@pytest.mark.anyio
@pytest.mark.parametrize("family, task", ENCODER_ROUTES)
async def test_over_long_encoder_input_is_an_error_by_default(fake, family, task):
    srv = await fake(task, max_model_len=LIMIT)
    text = "[MASK]" + LONG
    msg = assert_error(await _encode(srv, family, ["short", text]), "context_length_exceeded")
    assert str(LIMIT) in msg and str(len(ids_of(text))) in msg


@pytest.mark.anyio
@pytest.mark.parametrize("family, task", ENCODER_ROUTES)
async def test_truncate_inputs_cuts_encoder_inputs_at_their_end(fake, family, task):
    """--truncate_inputs: the answer for an over-long input is the answer for its first LIMIT
    tokens (BOS and the first LIMIT - 1 bytes), computed on a server that does not truncate."""
    cutting = await fake(task, max_model_len=LIMIT, truncate_inputs=True, name="fake")
    plain = await fake(task, max_model_len=LIMIT, name="fake")
    text = "[MASK]" + LONG  # the fill-mask models need the mask within the part kept
    assert len(ids_of(text)) > LIMIT
    kept = ids_of(text)[:LIMIT]
    want_text = "[MASK]" + LONG[: LIMIT - 2]
    assert ids_of(want_text) == kept
    got = _predictions(family, await _encode(cutting, family, [text, "s[MASK]t"]))
    want = _predictions(family, await _encode(plain, family, [want_text, "s[MASK]t"]))
    assert got == want
    if family == "openai":  # the tokens actually embedded
        resp = await cutting.post("/openai/v1/embeddings", {"model": "fake", "input": [text, "s[MASK]t"]})
        assert resp.json()["usage"]["prompt_tokens"] == len(kept) + len(ids_of("s[MASK]t"))
        by_ids = await plain.post("/openai/v1/embeddings", {"model": "fake", "input": [kept]})
        assert by_ids.json()["data"][0]["embedding"] == got[0]


@pytest.mark.anyio
async def test_truncate_inputs_cuts_token_id_inputs_too(fake):
    srv = await fake(Task.text_embedding, max_model_len=LIMIT, truncate_inputs=True)
    ids = ids_of(LONG)
    resp = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": [ids, ids[:LIMIT]]})
    body = resp.json()
    assert body["data"][0]["embedding"] == body["data"][1]["embedding"]
    assert body["usage"]["prompt_tokens"] == 2 * LIMIT


@pytest.mark.anyio
async def test_truncate_inputs_can_cut_away_the_mask(fake):
    srv = await fake(Task.fill_mask, max_model_len=LIMIT, truncate_inputs=True)
    msg = assert_error(await srv.post("/v1/models/fake:predict", {"instances": [LONG + "[MASK]"]}), "invalid_request")
    assert "mask" in msg


@pytest.mark.anyio
async def test_truncate_inputs_leaves_generation_prompts_alone(fake):
    """The flag is about encoder inputs (KServe's behaviour); a prompt still has to fit."""
    srv = await fake(Task.text_generation, max_model_len=LIMIT, truncate_inputs=True)
    assert_error(await srv.post("/openai/v1/completions", {"model": "fake", "prompt": LONG}), "context_length_exceeded")
    assert_error(await srv.post("/v1/models/fake:predict", {"instances": [LONG]}), "context_length_exceeded")


# ======================================================= in process: truncate_prompt_tokens
@pytest.mark.anyio
@pytest.mark.parametrize("truncate_inputs", [False, True])
@pytest.mark.parametrize("k, kept", [(5, 5), (-1, LIMIT), (LIMIT, LIMIT)])
async def test_embeddings_keep_the_first_k_tokens(fake, truncate_inputs, k, kept):
    """Text: BOS and the first k - 1 bytes (the tokenizer's special tokens stay); token ids: the first
    k; usage counts them. The request's value wins over --truncate_inputs."""
    srv = await fake(Task.text_embedding, max_model_len=LIMIT, truncate_inputs=truncate_inputs)
    plain = await fake(Task.text_embedding, max_model_len=LIMIT)
    for inp, first in [([LONG, LONG[::-1]], [ids_of(LONG), ids_of(LONG[::-1])]), ([ids_of(LONG)[1:]], [ids_of(LONG)[1:]])]:
        resp = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": inp, PARAM: k})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["usage"]["prompt_tokens"] == len(inp) * kept
        want = await plain.post("/openai/v1/embeddings", {"model": "fake", "input": [ids[:kept] for ids in first]})
        assert [d["embedding"] for d in body["data"]] == [d["embedding"] for d in want.json()["data"]]
    # short inputs are left as they are
    short = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": "abc", PARAM: k})
    assert short.json()["usage"]["prompt_tokens"] == len(ids_of("abc"))


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_completions_keep_the_last_k_tokens(fake, stream):
    """A text prompt keeps BOS and its last k - 1 bytes (as the tokenizer truncates on the left);
    the fake model echoes the prompt's bytes, so the completion shows what was kept."""
    srv = await fake(Task.text_generation, max_model_len=LIMIT)
    k = 6
    body = {"model": "fake", "prompt": LONG, PARAM: k, "max_tokens": k - 1, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    resp = await srv.post("/openai/v1/completions", body)
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = [line[6:] for line in resp.text.splitlines() if line.startswith("data: {")]
        events = [json.loads(c) for c in chunks]
        text = "".join(c["text"] for e in events for c in e["choices"])
        usage = events[-1]["usage"]
    else:
        text, usage = resp.json()["choices"][0]["text"], resp.json()["usage"]
    assert text == LONG[-(k - 1) :]
    assert usage["prompt_tokens"] == k
    assert srv.backend.ended[-1].prompt == LONG[-(k - 1) :]


@pytest.mark.anyio
async def test_completions_token_ids_keep_the_last_k_and_echo_what_was_kept(fake):
    srv = await fake(Task.text_generation, max_model_len=LIMIT)
    ids = ids_of(LONG)
    r = await srv.post("/openai/v1/completions", {"model": "fake", "prompt": [ids, ids], PARAM: 4, "max_tokens": 4})
    body = r.json()
    assert [c["text"] for c in body["choices"]] == [LONG[-4:]] * 2
    assert body["usage"]["prompt_tokens"] == 8
    echo = await srv.post("/openai/v1/completions", {"model": "fake", "prompt": LONG, PARAM: 4, "max_tokens": 1, "echo": True})
    assert echo.json()["choices"][0]["text"] == LONG[-3:] + LONG[-3]
    # -1: the context length less one token for the output
    r = await srv.post("/openai/v1/completions", {"model": "fake", "prompt": ids, PARAM: -1, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == LIMIT - 1


@pytest.mark.anyio
async def test_completions_cut_to_the_context_length_still_need_room(fake):
    """k = the context length is allowed (vLLM's bound), but leaves no room to generate: an error, not a silent cut."""
    srv = await fake(Task.text_generation, max_model_len=LIMIT)
    assert_error(await srv.post("/openai/v1/completions", {"model": "fake", "prompt": LONG, PARAM: LIMIT}), "context_length_exceeded")
    msg = assert_error(
        await srv.post("/openai/v1/completions", {"model": "fake", "prompt": LONG, PARAM: 10, "max_tokens": 10}),
        "context_length_exceeded",
        param="max_tokens",
    )
    assert "at most 6" in msg


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_keeps_the_last_k_tokens_of_the_rendered_prompt(fake, stream):
    srv = await fake(Task.text_generation, max_model_len=LIMIT)
    k = 12
    body = {"model": "fake", "messages": CHAT_LONG, PARAM: k, "max_tokens": 3}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    resp = await srv.post("/openai/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    rendered = f"<|user|>{LONG}\n<|assistant|>"  # the fake template, without BOS (the template holds its own)
    assert srv.backend.ended[-1].prompt == rendered[-k:]
    if stream:
        assert f'"prompt_tokens":{k}' in resp.text.replace(" ", "")
    else:
        assert resp.json()["usage"]["prompt_tokens"] == k
    # without it, the same chat is too long
    assert_error(
        await srv.post("/openai/v1/chat/completions", {"model": "fake", "messages": CHAT_LONG}), "context_length_exceeded"
    )


# ======================================================================= real servers
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # over every fixture's context length


def _embed(server: ServerHandle, inp: Any, **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{server.openai_url}/embeddings", json={"model": server.name, "input": inp, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def minilm_any(request) -> ServerHandle:
    return request.getfixturevalue("minilm" if request.param == "huggingface" else "minilm_vllm")


@pytest.fixture(scope="module")
def st_model(models):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(models["minilm"]), device="cpu")


def _st_embed(st, text: str, max_len: int) -> np.ndarray:
    """sentence-transformers truncates with the tokenizer on the right, keeping [CLS] and [SEP]."""
    saved = st.max_seq_length
    st.max_seq_length = max_len
    try:
        return st.encode([text])[0]
    finally:
        st.max_seq_length = saved


def test_real_embeddings_truncate_prompt_tokens(minilm_any, st_model):
    k = 40
    body = _embed(minilm_any, LONG_TEXT, truncate_prompt_tokens=k)
    assert body["usage"]["prompt_tokens"] == k
    assert np.allclose(body["data"][0]["embedding"], _st_embed(st_model, LONG_TEXT, k), atol=1e-4)
    # token ids: the first k, embedded as sent
    ids = st_model.tokenizer(LONG_TEXT)["input_ids"]
    assert len(ids) > 256
    by_ids = _embed(minilm_any, [ids], truncate_prompt_tokens=k)
    assert by_ids["usage"]["prompt_tokens"] == k
    plain = _embed(minilm_any, [ids[:k]])
    assert np.allclose(by_ids["data"][0]["embedding"], plain["data"][0]["embedding"], atol=1e-5)
    # -1: the context length (256 for this model on both backends)
    assert _embed(minilm_any, LONG_TEXT, truncate_prompt_tokens=-1)["usage"]["prompt_tokens"] == 256
    # and without it: the error
    r = httpx.post(f"{minilm_any.openai_url}/embeddings", json={"model": minilm_any.name, "input": LONG_TEXT}, timeout=60)
    assert "256" in assert_error(r, "context_length_exceeded")
    r = httpx.post(
        f"{minilm_any.openai_url}/embeddings",
        json={"model": minilm_any.name, "input": "hi", "truncate_prompt_tokens": 257},
        timeout=60,
    )
    assert "256" in assert_error(r, "invalid_request", param=PARAM)


def _complete(server: ServerHandle, prompt: Any, **extra: Any) -> dict[str, Any]:
    body = {"model": server.name, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    r = httpx.post(f"{server.openai_url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def llama_tokenizer(models):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(models["llama"])


def test_real_completions_truncate_prompt_tokens(llama_any, llama_tokenizer):
    k = 24
    ids = llama_tokenizer(LONG_TEXT)["input_ids"]
    assert len(ids) > 256
    # token ids: the last k
    cut = _complete(llama_any, ids, truncate_prompt_tokens=k)
    want = _complete(llama_any, ids[-k:])
    assert cut["choices"][0]["text"] == want["choices"][0]["text"]
    assert cut["usage"]["prompt_tokens"] == k
    # text: as the tokenizer truncates on the left (vLLM's generation side), BOS kept
    llama_tokenizer.truncation_side = "left"
    kept = llama_tokenizer(LONG_TEXT, truncation=True, max_length=k)["input_ids"]
    assert len(kept) == k and kept[0] == llama_tokenizer.bos_token_id and kept[1:] == ids[-(k - 1) :]
    by_text = _complete(llama_any, LONG_TEXT, truncate_prompt_tokens=k)
    assert by_text["choices"][0]["text"] == _complete(llama_any, kept)["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == k
    # without it: the error
    r = httpx.post(f"{llama_any.openai_url}/completions", json={"model": llama_any.name, "prompt": ids}, timeout=60)
    assert_error(r, "context_length_exceeded")


def test_real_chat_truncate_prompt_tokens(llama_any, llama_tokenizer):
    k = 30
    messages = [{"role": "user", "content": LONG_TEXT}]
    rendered = llama_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = llama_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    body = {"model": llama_any.name, "messages": messages, "max_tokens": 8, "temperature": 0, PARAM: k}
    r = httpx.post(f"{llama_any.openai_url}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == k
    assert r.json()["choices"][0]["message"]["content"] == _complete(llama_any, ids[-k:])["choices"][0]["text"]


@pytest.fixture(scope="module")
def minilm_truncating(models, log_dir) -> Iterator[ServerHandle]:
    """all-MiniLM-L6-v2 with --truncate_inputs and a context length of 128."""
    handle = start_server(
        models["minilm"], "minilm", log_dir, "--backend", "huggingface", "--max_model_len", "128", "--truncate_inputs"
    )
    yield handle
    stop_server(handle)


def test_truncate_inputs_server(minilm_truncating, minilm, st_model):
    """Where the default server refuses an over-long input on every family, --truncate_inputs
    embeds its first 128 tokens ([CLS] ... [SEP]), as huggingfaceserver does."""
    want = _st_embed(st_model, LONG_TEXT, 128)
    client = httpx.Client(timeout=120)
    requests = {
        "openai": ("/openai/v1/embeddings", {"model": "minilm", "input": LONG_TEXT}),
        "v1": ("/v1/models/minilm:predict", {"instances": [LONG_TEXT]}),
        "v2": ("/v2/models/minilm/infer", v2_inputs([LONG_TEXT])),
    }
    for family, (path, body) in requests.items():
        assert "context length" in assert_error(client.post(f"{minilm.url}{path}", json=body), "context_length_exceeded")
        r = client.post(f"{minilm_truncating.url}{path}", json=body)
        assert r.status_code == 200, (family, r.text)
        got = {
            "openai": lambda b: b["data"][0]["embedding"],
            "v1": lambda b: b["predictions"][0],
            "v2": lambda b: b["outputs"][0]["data"],
        }[family](r.json())
        assert np.allclose(got, want, atol=1e-4), family
    usage = client.post(f"{minilm_truncating.url}/openai/v1/embeddings", json=requests["openai"][1]).json()["usage"]
    assert usage["prompt_tokens"] == 128
    # the request's own value still wins
    r = client.post(f"{minilm_truncating.url}/openai/v1/embeddings", json={"model": "minilm", "input": LONG_TEXT, PARAM: 20})
    assert r.json()["usage"]["prompt_tokens"] == 20
    b64 = client.post(
        f"{minilm_truncating.url}/openai/v1/embeddings",
        json={"model": "minilm", "input": LONG_TEXT, "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), want, atol=1e-4)


# ============================================== the cut matches the tokenizer's own truncation
@pytest.mark.parametrize("model", ["minilm", "llama", "t5", "bert_cls"])
def test_tokenize_truncated_matches_the_tokenizer(models, model):
    """The service cuts without touching the (shared) tokenizer's settings, yet gets what
    ``tokenizer(text, truncation=True, max_length=k)`` gets on either side: the special tokens
    (BOS; [CLS] ... [SEP]; ... </s>) kept, the text between them cut."""
    import transformers

    from hfserve.service import ModelService
    from tests.fakes import FakeBackend

    tok = transformers.AutoTokenizer.from_pretrained(models[model])
    backend = FakeBackend(Task.text_embedding)
    backend.tokenizer, backend.max_model_len = tok, 10_000
    service = ModelService("m", backend)
    text = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox."
    full = tok(text)["input_ids"]
    added = len(full) - len(tok(text, add_special_tokens=False)["input_ids"])
    for side in ("left", "right"):
        tok.truncation_side = side
        for k in range(max(1, added), len(full) + 2):
            want = tok(text, truncation=True, max_length=k)["input_ids"]
            assert service.tokenize_truncated(text, k, keep_end=side == "left") == want, (side, k)
    # no room for any text: a plain cut of the ids (as vLLM slices what the tokenizer could not cut)
    if added > 1:
        assert service.tokenize_truncated(text, 1, keep_end=False) == full[:1]
        assert service.tokenize_truncated(text, 1, keep_end=True) == full[-1:]


# ====================================================================== the flag's wiring
def test_flag_reaches_the_service(models):
    """--truncate_inputs -> ModelConfig.truncate_inputs -> the service (through the backend's model
    section, which both backends keep), off by default."""
    from hfserve.backends.huggingface import HuggingFaceBackend
    from hfserve.backends.vllm import VLLMBackend
    from hfserve.cli import build_parser, resolve
    from hfserve.service import ModelService

    base = ["--model_dir", str(models["minilm"])]
    on = resolve(build_parser().parse_args([*base, "--truncate_inputs"]))
    off = resolve(build_parser().parse_args(base))
    assert on.model.truncate_inputs and not off.model.truncate_inputs
    for backend in (HuggingFaceBackend, VLLMBackend):
        assert ModelService("m", backend(on.model)).truncate_inputs is True
        assert ModelService("m", backend(off.model)).truncate_inputs is False
        assert ModelService("m", backend(off.model), truncate_inputs=True).truncate_inputs is True
