"""Structured outputs (issue 13 part 1, and its errors of part 4) on both backends.

Unit level (no server): request parsing and static checks (hfserve.structured), the grammar
engine and its per-row logits processor (hfserve.backends.grammar), the compile time limit and
cache. Server level: real clients against the transformers and vLLM backends; outputs are
checked against independent references (the regex, the choices, ``jsonschema``, xgrammar's own
matcher, the other backend), never against hard-coded generations.

The fixture model has random weights: inside JSON it emits whitespace forever unless
``disable_any_whitespace`` is set, so the JSON tests set it (per request, or server-wide with
``--structured-outputs-config``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
import transformers
from pydantic import BaseModel, Field

from hfserve import errors, structured
from hfserve.backends.grammar import GrammarEngine
from hfserve.generation import StructuredOutput
from tests.conftest import FIXTURE_DIR, needs_vllm
from tests.servers import start_server, stop_server

LLAMA = FIXTURE_DIR / "llama"
EOS = 2  # the fixture tokenizer's </s>

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "admin", "color"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["yes", "no", "maybe later"]
GRAMMAR = 'root ::= ("ab" | "cd") [0-9] [0-9] "!"'
GRAMMAR_RE = r"(ab|cd)[0-9][0-9]!"
LARK = 'start: PAIR ":" PAIR\nPAIR: /[xy]{2}/'
LARK_RE = r"[xy]{2}:[xy]{2}"
#: a schema whose grammar takes many seconds to compile on the fixture tokenizer
SLOW = {
    "type": "object",
    "properties": {f"k{i}": {"type": "string", "minLength": i, "maxLength": 200} for i in range(100)},
    "required": [f"k{i}" for i in range(100)],
}
#: message fragments that would be compiler internals
INTERNALS = re.compile(r"\.cc\b|\.py\b|/project|Traceback|RuntimeError|ValueError|Check failed|\[\d\d:\d\d:\d\d\]|xgr\.")


def _valid_person(text: str) -> bool:
    """Valid JSON against PERSON. ``strict=False``: xgrammar 0.2.8's length-bounded strings admit
    raw control characters (on both backends alike), which strict JSON does not."""
    jsonschema.validate(json.loads(text, strict=False), PERSON)
    return True


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    admin: bool
    color: Literal["red", "green", "blue"]


# ============================================================== unit: parsing
def test_response_format_forms():
    assert structured.from_response_format({"type": "text"}) is None
    so = structured.from_response_format({"type": "json_object"})
    assert so is not None and (so.kind, so.param) == ("json_object", "response_format")
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    so = structured.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert so is not None and so.kind == "json" and so.param == "response_format.json_schema.schema"
    # the property order is kept (it is the output's order)
    assert list(json.loads(so.source)["properties"]) == ["z", "a"]


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "response_format.json_schema.strict"),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_response_format_invalid(value, param):
    with pytest.raises(errors.InvalidRequest) as info:
        structured.from_response_format(value)
    assert info.value.param == param


def test_structured_outputs_forms():
    cases = {
        "json": ({"json": PERSON}, "json"),
        "json text": ({"json": json.dumps(PERSON)}, "json"),
        "regex": ({"regex": REGEX}, "regex"),
        "choice": ({"choice": CHOICES}, "choice"),
        "grammar": ({"grammar": GRAMMAR}, "grammar"),
        "json_object": ({"json_object": True, "disable_any_whitespace": True}, "json_object"),
        "structural_tag": ({"structural_tag": {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}}, "structural_tag"),
    }
    for name, (value, kind) in cases.items():
        so = structured.from_structured_outputs(value)
        assert so.kind == kind, name
        key = next(k for k in value if k != "disable_any_whitespace")
        assert so.param == f"structured_outputs.{key}"
    assert structured.from_structured_outputs({"json_object": True, "disable_any_whitespace": True}).disable_any_whitespace
    # the same schema, as an object or as JSON text, is one constraint (one cache entry)
    a = structured.from_structured_outputs({"json": PERSON})
    b = structured.from_structured_outputs({"json": json.dumps(PERSON, indent=2)})
    assert structured.cache_key(a) == structured.cache_key(b)


@pytest.mark.parametrize(
    ("value", "cls", "param"),
    [
        ({}, errors.InvalidRequest, "structured_outputs"),
        ({"regex": "a", "choice": ["a"]}, errors.InvalidRequest, "structured_outputs"),
        ({"json_object": False}, errors.InvalidRequest, "structured_outputs"),
        ({"choice": []}, errors.InvalidRequest, "structured_outputs.choice"),
        ({"choice": ["a", 1]}, errors.InvalidRequest, "structured_outputs.choice"),
        ({"regex": "a\x00"}, errors.InvalidRequest, "structured_outputs.regex"),
        ({"json": "{nope"}, errors.InvalidRequest, "structured_outputs.json"),
        ({"regex": "a", "bogus": 1}, errors.InvalidRequest, "structured_outputs.bogus"),
        ({"regex": "a", "disable_any_whitespace": "yes"}, errors.InvalidRequest, "structured_outputs.disable_any_whitespace"),
        ({"regex": "a", "whitespace_pattern": " "}, errors.UnsupportedParameter, "structured_outputs.whitespace_pattern"),
        ({"json": {"type": "integer", "multipleOf": 3}}, errors.UnsupportedParameter, "structured_outputs.json"),
    ],
)
def test_structured_outputs_invalid(value, cls, param):
    with pytest.raises(errors.HFServeError) as info:
        structured.from_structured_outputs(value)
    assert type(info.value) is cls
    assert info.value.param == param


def test_both_forms_at_once_refused():
    with pytest.raises(errors.InvalidRequest) as info:
        structured.from_request(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    assert info.value.param == "structured_outputs"
    # text does not constrain: structured_outputs then applies
    so = structured.from_request(response_format={"type": "text"}, structured_outputs={"regex": "a"})
    assert so is not None and so.kind == "regex"


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
        ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
        ({"type": "string", "format": "credit-card"}, "credit-card"),
        ({"type": "string", "pattern": "a+", "maxLength": 3}, "pattern"),
        ({"type": "object", "patternProperties": {"a": {}, "b": {}}}, "patternProperties"),
        ({"allOf": [{"type": "string"}, {"enum": ["a"]}]}, "allOf"),
    ],
)
def test_unsupported_schema_keywords(schema, keyword):
    with pytest.raises(errors.UnsupportedParameter) as info:
        structured.json_schema(schema, param="tool_choice")
    assert info.value.param == "tool_choice"
    assert keyword in info.value.message


def test_nesting_limit():
    deep: dict = {"type": "integer"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(errors.InvalidRequest, match="nest"):
        structured.json_schema(deep, param="response_format.json_schema.schema")


def test_server_config():
    assert structured.check_server_config({}) == {"backend": "xgrammar", "disable_any_whitespace": False}
    assert structured.check_server_config({"backend": "auto", "disable_any_whitespace": True})["disable_any_whitespace"]
    for bad in ({"backend": "guidance"}, {"backend": "outlines"}, {"reasoning_parser": "qwen3"}, {"nope": 1},
                {"disable_any_whitespace": "yes"}, {"disable_additional_properties": True}):  # fmt: skip
        with pytest.raises(ValueError) as info:
            structured.check_server_config(bad)
        assert "\n" not in str(info.value)
    so = StructuredOutput("json_object", "", False, "response_format")
    assert structured.with_server_config(so, {"disable_any_whitespace": True}).disable_any_whitespace
    assert not structured.with_server_config(so, {}).disable_any_whitespace


def test_server_refuses_other_grammar_engine(tmp_path):
    handle = start_server(LLAMA, "llama", tmp_path, "--structured-outputs-config", '{"backend": "guidance"}', wait_ready=False)
    try:
        assert handle.proc.wait(60) != 0
    finally:
        stop_server(handle)
    lines = [line for line in handle.log().splitlines() if "structured-outputs-config" in line]
    assert lines and "xgrammar" in lines[-1] and "Traceback" not in handle.log()


# ============================================================ unit: grammar engine
@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(LLAMA)


@pytest.fixture(scope="module")
def engine(tokenizer):
    eng = GrammarEngine(tokenizer, 1024)
    yield eng
    eng.shutdown()


def _walk(engine, tokenizer, so, *, seed, rows=1, steps=80, stop=(EOS,)):
    """Sample ``rows`` sequences from random logits under the request's processor (all rows through
    one processor, as the scheduler does for n > 1); their texts and whether each ended."""
    processor = engine.processor(engine.compile_sync(so), stop)
    gen = torch.Generator().manual_seed(seed)
    histories: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    for _ in range(steps):
        for r in range(rows):
            if ended[r]:
                continue
            logits = torch.randn(1024, generator=gen)
            masked = processor(histories[r], logits)
            token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
            histories[r].append(token)
            if token in stop:
                ended[r] = True
    return [tokenizer.decode([t for t in h if t not in stop]) for h in histories], ended


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": REGEX}, lambda s: re.fullmatch(REGEX, s)),
        ({"choice": CHOICES}, lambda s: s in CHOICES),
        ({"grammar": GRAMMAR}, lambda s: re.fullmatch(GRAMMAR_RE, s)),
        ({"grammar": LARK}, lambda s: re.fullmatch(LARK_RE, s)),
        ({"json": PERSON, "disable_any_whitespace": True}, lambda s: _valid_person(s)),
    ],
)
def test_processor_enforces_per_row(engine, tokenizer, constraint, check):
    """Random logits, three rows of one request: every row ends, and every row's text is valid."""
    so = structured.from_structured_outputs(constraint)
    texts, ended = _walk(engine, tokenizer, so, seed=7, rows=3, steps=120)
    assert all(ended), texts
    for text in texts:
        assert check(text), text


def test_processor_only_stop_tokens_after_completion(engine, tokenizer):
    so = structured.from_structured_outputs({"choice": ["yes"]})
    processor = engine.processor(engine.compile_sync(so), [EOS, 5])
    history = list(tokenizer("yes", add_special_tokens=False)["input_ids"])
    allowed = processor.allowed(history).nonzero().view(-1).tolist()
    assert allowed == [EOS, 5]  # the model's end of sequence and the request's stop token id
    # before: only a prefix of "yes"
    first = processor.allowed([]).nonzero().view(-1).tolist()
    assert first and all("yes".startswith(tokenizer.decode([t])) for t in first)


def test_processor_rows_are_independent(engine, tokenizer):
    """Two rows: a token accepted on one row does not advance the other's matcher."""
    so = structured.from_structured_outputs({"choice": ["ab", "cd"]})
    processor = engine.processor(engine.compile_sync(so), [EOS])
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    row1, row2 = list(a), []
    after_a = processor.allowed(row1)
    at_start = processor.allowed(row2)
    assert not torch.equal(after_a, at_start)
    assert torch.equal(at_start, engine.processor(engine.compile_sync(so), [EOS]).allowed([]))


def test_logits_width_beyond_tokenizer(tokenizer):
    """A model whose logits are wider than the tokenizer: the extra ids are never allowed."""
    wide = GrammarEngine(tokenizer, 1100)
    try:
        so = structured.from_structured_outputs({"regex": "[a-z]+"})
        processor = wide.processor(wide.compile_sync(so), [EOS])
        masked = processor([], torch.zeros(1100))
        assert masked.shape == (1100,)
        assert torch.isinf(masked[len(tokenizer):]).all()
    finally:
        wide.shutdown()


def test_ebnf_form_has_the_same_masks(engine, tokenizer):
    """What the vLLM backend sends for a per-request disable_any_whitespace (the schema's grammar
    as EBNF) allows exactly the tokens the schema itself allows, at every step of a walk."""
    so = structured.from_structured_outputs({"json": PERSON, "disable_any_whitespace": True})
    via_text = StructuredOutput("grammar", structured.ebnf(so), False, "x")
    direct = engine.processor(engine.compile_sync(so), [EOS])
    printed = engine.processor(engine.compile_sync(via_text), [EOS])
    gen = torch.Generator().manual_seed(3)
    history: list[int] = []
    for _ in range(60):
        mask = direct.allowed(history)
        assert torch.equal(mask, printed.allowed(history))
        choices = mask.nonzero().view(-1)
        token = int(choices[torch.randint(len(choices), (1,), generator=gen)])
        history.append(token)
        if token == EOS:
            break
    assert history[-1] == EOS


@pytest.mark.parametrize(
    ("constraint", "param"),
    [
        ({"json": {"type": "foo"}}, "structured_outputs.json"),
        ({"json": {"type": "array", "minItems": 5, "maxItems": 2}}, "structured_outputs.json"),
        ({"json": {"$ref": "#/$defs/missing"}}, "structured_outputs.json"),
        ({"regex": "a(b"}, "structured_outputs.regex"),
        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
        ({"grammar": 'root ::= "a'}, "structured_outputs.grammar"),
        ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "structured_outputs.structural_tag"),
    ],
)
def test_compile_errors_are_clean(engine, constraint, param):
    so = structured.from_structured_outputs(constraint)
    with pytest.raises(errors.InvalidRequest) as info:
        asyncio.run(engine.compile(so))
    err = info.value
    assert err.param == param
    assert param in err.message and not INTERNALS.search(err.message), err.message
    # the vocabulary-independent check (backends without a compiler) says the same
    with pytest.raises(errors.InvalidRequest) as info2:
        asyncio.run(structured.validate(so))
    assert info2.value.message == err.message


def test_compile_cache_and_shared_builds(tokenizer):
    eng = GrammarEngine(tokenizer, 1024)
    try:
        so = structured.from_structured_outputs({"regex": "[0-9]{4}"})

        async def main():
            return await asyncio.gather(*(eng.compile(so) for _ in range(5)))

        results = asyncio.run(main())
        assert eng.grammars.builds == 1 and all(r is results[0] for r in results)
        asyncio.run(eng.compile(structured.from_structured_outputs({"regex": "[0-9]{4}"})))
        assert eng.grammars.builds == 1
        # whitespace is part of the key
        asyncio.run(eng.compile(structured.from_structured_outputs({"regex": "[0-9]{4}", "disable_any_whitespace": True})))
        assert eng.grammars.builds == 2
    finally:
        eng.shutdown()


def test_cache_bounded_by_bytes():
    built = []

    def build(so):
        built.append(so.source)
        return "x" * int(so.source)

    cache = structured.GrammarCache(build, entries=100, max_bytes=25, size=len)
    try:
        for n in ("10", "10", "12", "8"):
            cache.get_sync(StructuredOutput("regex", n, False, "x"))
        assert built == ["10", "12", "8"]  # the second "10" was cached
        # 10 + 12 + 8 > 25: the oldest ("10") went
        assert cache.cached(StructuredOutput("regex", "10", False, "x")) is None
        assert cache.cached(StructuredOutput("regex", "8", False, "x")) == "x" * 8
    finally:
        cache.shutdown()


def test_slow_compile_is_refused_without_blocking(tokenizer):
    """A grammar that compiles longer than the limit is refused (naming the limit); the event loop
    keeps running meanwhile; the refusal is kept, so the same schema is refused at once after."""
    eng = GrammarEngine(tokenizer, 1024, timeout=0.5)
    try:
        so = structured.json_schema(SLOW, param="response_format.json_schema.schema")

        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1

            task = asyncio.create_task(ticker())
            started = time.monotonic()
            with pytest.raises(errors.InvalidRequest) as info:
                await eng.compile(so)
            took = time.monotonic() - started
            task.cancel()
            return info.value, took, ticks

        err, took, ticks = asyncio.run(main())
        assert err.param == "response_format.json_schema.schema" and "0.5 seconds" in err.message
        assert 0.4 < took < 3 and ticks >= 10
        started = time.monotonic()
        with pytest.raises(errors.InvalidRequest):
            asyncio.run(eng.compile(so))
        assert time.monotonic() - started < 0.2
    finally:
        eng.shutdown()


# ============================================================= servers
COMPACT = '{"backend": "xgrammar", "disable_any_whitespace": true}'
#: the compact servers' compile limit (seconds), short so SLOW is refused soon
COMPACT_LIMIT = "2"


def _compact_server(log_dir: pathlib.Path, backend: str):
    extra = ["--backend", backend, "--structured-outputs-config", COMPACT]
    if backend == "vllm":
        extra += ["--max_model_len", "256", "--max_num_seqs", "8"]
    return start_server(LLAMA, "llama", log_dir, *extra, env={"HFSERVE_GRAMMAR_COMPILE_TIMEOUT_S": COMPACT_LIMIT})


@pytest.fixture(scope="module")
def compact_hf(models, tmp_path_factory):
    handle = _compact_server(tmp_path_factory.mktemp("compact-hf"), "huggingface")
    yield handle
    stop_server(handle)


@pytest.fixture(scope="module")
def compact_vllm(models, tmp_path_factory):
    from tests.conftest import VLLM_INSTALLED

    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    handle = _compact_server(tmp_path_factory.mktemp("compact-vllm"), "vllm")
    yield handle
    stop_server(handle)


@pytest.fixture(params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def compact_any(request):
    """A server with --structured-outputs-config disable_any_whitespace (and a 2 s compile limit), each backend."""
    return request.getfixturevalue("compact_hf" if request.param == "huggingface" else "compact_vllm")


def _client(handle) -> openai.OpenAI:
    return openai.OpenAI(base_url=handle.openai_url, api_key="none", max_retries=0, timeout=120)


def _complete(handle, **body) -> httpx.Response:
    return httpx.post(f"{handle.openai_url}/completions", json={"model": "llama", "prompt": "Hello", **body}, timeout=120)


def _chat(handle, **body) -> httpx.Response:
    body = {"model": "llama", "messages": [{"role": "user", "content": "Who are you?"}], **body}
    return httpx.post(f"{handle.openai_url}/chat/completions", json=body, timeout=120)


def _matcher_accepts(tokenizer, so: StructuredOutput, text: str) -> bool:
    """xgrammar's own matcher (a fresh engine) accepts ``text`` as a prefix of the language."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=1024)).compile_grammar(
        structured.build_grammar(so)
    )
    return bool(xgr.GrammarMatcher(compiled).accept_string(text))


def test_parse_with_pydantic(compact_any):
    """The openai SDK's chat.completions.parse: the answer parses into the pydantic model."""
    completion = _client(compact_any).chat.completions.parse(
        model="llama",
        messages=[{"role": "user", "content": "Describe a person"}],
        response_format=Person,
        max_completion_tokens=120,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    Person.model_validate_json(choice.message.content or "")


def test_json_object(compact_any, tokenizer):
    """json_object: a JSON object (parseable when it ended; a valid prefix when cut at max_tokens)."""
    for seed in (1, 2, 3):
        r = _chat(compact_any, response_format={"type": "json_object"}, max_tokens=60, temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{")
        assert _matcher_accepts(tokenizer, StructuredOutput("json_object", "", True, "x"), text), text
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": REGEX}, lambda s: re.fullmatch(REGEX, s)),
        ({"choice": CHOICES}, lambda s: s in CHOICES),
        ({"grammar": GRAMMAR}, lambda s: re.fullmatch(GRAMMAR_RE, s)),
        ({"json": PERSON, "disable_any_whitespace": True}, lambda s: _valid_person(s)),
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_outputs_match_their_constraint(llama_any, constraint, check, route):
    for temperature in (0.0, 1.0):
        body = {"structured_outputs": constraint, "max_tokens": 80, "temperature": temperature, "seed": 11}
        r = _complete(llama_any, **body) if route == "completions" else _chat(llama_any, **body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if route == "completions" else choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and check(text), text


def test_streamed_output_matches(llama_any):
    with _client(llama_any).completions.create(
        model="llama", prompt="Hi", max_tokens=40, temperature=0, stream=True, extra_body={"structured_outputs": {"regex": REGEX}}
    ) as stream:
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch(REGEX, text), text


def test_n_rows_each_constrained(llama_hf):
    r = _complete(llama_hf, structured_outputs={"regex": REGEX}, n=3, temperature=1.0, seed=5, max_tokens=20)
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 3 and all(re.fullmatch(REGEX, t) for t in texts), texts


def test_v2_generate_parameters(llama_any):
    body = {"text_input": "Hi", "parameters": {"max_tokens": 20, "temperature": 0, "structured_outputs": {"choice": CHOICES}}}
    r = httpx.post(f"{llama_any.url}/v2/models/llama/generate", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["text_output"] in CHOICES, r.text
    body["parameters"]["structured_outputs"] = {"regex": "(a"}
    r = httpx.post(f"{llama_any.url}/v2/models/llama/generate", json=body, timeout=120)
    assert r.status_code == 400 and r.headers["x-error-code"] == "invalid_request"
    assert r.json()["error"].startswith("parameters.structured_outputs.regex is not a valid regular expression")


# ----------------------------------------------------- the same on both backends
EQUAL_CASES = [
    {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
    {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     "structured_outputs": None},
    {"structured_outputs": {"regex": r"[a-z ]{5,30}\."}},
    {"structured_outputs": {"choice": CHOICES}},
    {"structured_outputs": {"grammar": GRAMMAR}},
    {"structured_outputs": {"grammar": LARK}},
]  # fmt: skip


def _tokens(handle, case: dict, prompt: str) -> tuple[list[str], str | None, list[float]]:
    body = {k: v for k, v in case.items() if v is not None}
    r = _complete(handle, prompt=prompt, max_tokens=48, temperature=0, logprobs=0, **body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["finish_reason"], choice["logprobs"]["token_logprobs"]


@pytest.mark.vllm
@pytest.mark.parametrize("case", range(len(EQUAL_CASES)))
def test_greedy_constrained_equal_across_backends(llama_hf, llama_vllm, case):
    """Greedy constrained decoding: token for token the same on both backends (per-request
    disable_any_whitespace: vLLM gets the schema's grammar)."""
    for prompt in ("Hello", "The weather today"):
        hf = _tokens(llama_hf, EQUAL_CASES[case], prompt)
        vl = _tokens(llama_vllm, EQUAL_CASES[case], prompt)
        # the tokens and how they ended; not the log-probabilities: vLLM 0.32 reports them after its
        # grammar mask (applied to the logits in place), hfserve's transformers backend those of the raw logits
        assert hf[:2] == vl[:2], (prompt, hf, vl)


@pytest.mark.vllm
def test_greedy_equal_across_backends_with_server_config(compact_hf, compact_vllm):
    """The same with --structured-outputs-config disable_any_whitespace (vLLM's own json path)."""
    for case in ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
                 {"response_format": {"type": "json_object"}}):  # fmt: skip
        hf = _tokens(compact_hf, case, "Hello")
        vl = _tokens(compact_vllm, case, "Hello")
        assert hf[:2] == vl[:2], (hf, vl)


# ------------------------------------------------------------------- errors
SLOW_RF = {"type": "json_schema", "json_schema": {"name": "slow", "schema": SLOW}}
ERROR_CASES = {
    "invalid schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
                       400, "invalid_request", "response_format.json_schema.schema"),
    "invalid schema extra": ({"structured_outputs": {"json": {"type": "array", "minItems": 3, "maxItems": 1}}},
                             400, "invalid_request", "structured_outputs.json"),
    "invalid regex": ({"structured_outputs": {"regex": "[0-9"}}, 400, "invalid_request", "structured_outputs.regex"),
    "invalid grammar": ({"structured_outputs": {"grammar": "root ::= missing"}}, 400, "invalid_request", "structured_outputs.grammar"),
    "unsupported keyword": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}}}},
                            400, "unsupported_parameter", "response_format.json_schema.schema"),
    "two constraints": ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "invalid_request", "structured_outputs"),
    "both fields": ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
                    400, "invalid_request", "structured_outputs"),
}  # fmt: skip


def _error(handle, route: str, body: dict, stream: bool) -> tuple[int, dict]:
    r = _complete(handle, stream=stream, **body) if route == "completions" else _chat(handle, stream=stream, **body)
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]  # not a 200 stream
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_errors(llama_any, name):
    body, status, code, param = ERROR_CASES[name]
    seen = set()
    for route in ("completions", "chat"):
        for stream in (False, True):
            got_status, err = _error(llama_any, route, body, stream)
            assert (got_status, err["code"], err["param"], err["type"]) == (status, code, param, "invalid_request_error"), err
            assert not INTERNALS.search(err["message"]), err["message"]
            seen.add(err["message"])
    assert len(seen) == 1  # the same message on every route, streamed or not


@pytest.mark.vllm
def test_errors_same_on_both_backends(llama_hf, llama_vllm):
    for body, *_ in ERROR_CASES.values():
        assert _error(llama_hf, "chat", body, True) == _error(llama_vllm, "chat", body, True)


def test_slow_schema_refused(compact_any):
    """A schema that takes too long to compile is refused before any output, naming the limit;
    the server keeps serving others meanwhile and refuses it again at once."""
    started = time.monotonic()
    status, err = _error(compact_any, "chat", {"response_format": SLOW_RF, "max_tokens": 5}, True)
    assert (status, err["code"], err["param"]) == (400, "invalid_request", "response_format.json_schema.schema")
    assert f"{COMPACT_LIMIT} seconds" in err["message"]
    assert time.monotonic() - started < 30
    r = _complete(compact_any, max_tokens=4)  # not stuck behind it
    assert r.status_code == 200
    started = time.monotonic()
    status, _ = _error(compact_any, "completions", {"response_format": SLOW_RF, "max_tokens": 5}, False)
    assert status == 400 and time.monotonic() - started < 1.5


# ------------------------------------------------------- shared batch, HF backend
def test_constrained_and_free_requests_share_the_batch(llama_hf):
    """Constrained and free requests at once: each gets its own correct answer; a free greedy
    request's output is its output alone."""
    free = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}
    alone = _complete(llama_hf, **free).json()["choices"][0]["text"]
    constrained = [
        ({"structured_outputs": {"regex": REGEX}}, lambda s: re.fullmatch(REGEX, s)),
        ({"structured_outputs": {"choice": CHOICES}}, lambda s: s in CHOICES),
        ({"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
         lambda s: _valid_person(s)),
        ({"structured_outputs": {"grammar": GRAMMAR}}, lambda s: re.fullmatch(GRAMMAR_RE, s)),
    ]  # fmt: skip
    barrier = threading.Barrier(len(constrained) + 2)

    def run(body):
        barrier.wait()
        return _complete(llama_hf, **body).json()["choices"][0]

    with ThreadPoolExecutor(len(constrained) + 2) as pool:
        frees = [pool.submit(run, free) for _ in range(2)]
        results = [pool.submit(run, {"max_tokens": 80, "temperature": 0.8, "seed": i, **body}) for i, (body, _) in enumerate(constrained)]
        for future in frees:
            assert future.result()["text"] == alone
        for future, (_, check) in zip(results, constrained):
            choice = future.result()
            assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


def test_batched_bitmask_matches_xgrammar():
    """The scheduler's batched mask (sampler.apply_bitmask, plain torch) masks exactly as
    xgrammar's own kernel does."""
    import xgrammar as xgr

    from hfserve.backends import sampler

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, sampler.bitmask_words(1000)), dtype=torch.int32, generator=gen)
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, bitmask, vocab_size=1000)
    assert torch.equal(sampler.apply_bitmask(logits, bitmask), reference)


def test_greedy_masked_rows_equal_the_per_row_path(llama_hf):
    """Greedy constrained rows take the batched masked argmax; with a logprobs request beside
    them, and n=2, they still give what one request alone gives."""
    body = {"structured_outputs": {"regex": r"[a-z ]{5,40}\."}, "max_tokens": 40, "temperature": 0}
    alone = _complete(llama_hf, **body).json()["choices"][0]["text"]
    both = _complete(llama_hf, n=2, **body).json()["choices"]
    assert [c["text"] for c in both] == [alone, alone]
    assert re.fullmatch(r"[a-z ]{5,40}\.", alone), alone


# ------------------------------------------------ in process: the serving layer
@pytest.mark.anyio
async def test_backend_without_structured_outputs_refuses(fake):
    srv = await fake()  # the fake backend cannot constrain
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    for stream in (False, True):
        r = await srv.post("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                          "response_format": rf, "stream": stream})  # fmt: skip
        err = r.json()["error"]
        assert (r.status_code, err["code"], err["param"]) == (400, "unsupported_parameter", "response_format.json_schema.schema")


@pytest.mark.anyio
async def test_service_puts_the_checked_constraint_on_the_params(fake):
    srv = await fake(model_options={"structured_outputs_config": {"disable_any_whitespace": True}})
    srv.backend.capabilities = dataclasses.replace(srv.backend.capabilities, structured_outputs=True)
    r = await srv.post("/openai/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3,
                                                  "structured_outputs": {"json": PERSON}})  # fmt: skip
    assert r.status_code == 200, r.text
    so = srv.backend.params[-1].structured
    assert so is not None and so.kind == "json" and so.param == "structured_outputs.json"
    assert so.disable_any_whitespace  # the server's --structured-outputs-config
    assert list(json.loads(so.source)["properties"]) == list(PERSON["properties"])
    # a backend without its own compiler: the backend-neutral check refuses what does not compile, before any output
    r = await srv.post("/openai/v1/completions", {"model": "fake", "prompt": "hi", "stream": True,
                                                  "structured_outputs": {"regex": "(unclosed"}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex"
    # what tool calling calls
    service = srv.service
    assert await service.check_structured(None) is None
    checked = await service.check_structured(structured.json_schema({"type": "object"}, param="tool_choice"))
    assert checked is not None and checked.disable_any_whitespace and checked.param == "tool_choice"
    with pytest.raises(errors.UnsupportedParameter) as info:
        await service.check_structured(StructuredOutput("json", '{"type":"integer","multipleOf":2}', False, "tool_choice"))
    assert info.value.param == "tool_choice"
