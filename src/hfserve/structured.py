"""Structured outputs, request side: what a request asks its output to look like, as one
:class:`~hfserve.generation.StructuredOutput`, checked the same way for every backend.

Accepted (on the OpenAI chat and completions routes, and ``structured_outputs`` also in the v2
generate extension's ``parameters``):

- OpenAI's ``response_format``: ``{"type": "json_object"}`` (any JSON object) and
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}``
  (``strict`` is accepted and has no effect: the schema is always enforced, as in vLLM);
- vLLM's request extra ``structured_outputs``: exactly one of ``json`` (a schema, object or JSON
  text), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF/GBNF, or Lark as vLLM tells
  them apart), ``json_object: true`` and ``structural_tag``; plus ``disable_any_whitespace``.
- the server's ``--structured-outputs-config`` (vLLM's JSON form): ``backend`` ``auto`` or
  ``xgrammar`` (both mean xgrammar; any other is refused at start-up, see
  :func:`check_server_config`) and ``disable_any_whitespace``, which then holds for every request.

The grammar engine is xgrammar, on both backends. llguidance (vLLM's ``guidance`` backend) was
the alternative: it computes masks lazily per step (no compile step, and it enforces a few JSON
schema keywords xgrammar cannot), but xgrammar is vLLM's default, so with xgrammar here the
transformers backend applies exactly the token masks vLLM applies (the same engine, the same
grammars, the same tokenizer information), and greedy constrained outputs are token-for-token
the same on both backends, and the errors (what is invalid, what is unsupported) are the same
too. The transformers backend applies the masks per row in its continuous batch
(:mod:`hfserve.backends.grammar`); the vLLM backend passes the constraint to vLLM's own
structured outputs, which this module pins to xgrammar (vLLM's ``auto`` could fall back to
guidance for some schemas, and the outputs would then differ).

Checking happens before a stream starts: the static checks here (shape, exactly one constraint,
nesting, schema keywords xgrammar cannot enforce: ``unsupported_parameter``), then the backend
compiles the grammar (:meth:`GrammarCache.get`) off the event loop, in a worker thread, within
:data:`COMPILE_TIMEOUT_S`; what does not compile is ``invalid_request`` with the request field as
``param`` and a message that says what is wrong, without the compiler's internals; what takes
longer is refused (``invalid_request``, naming the limit) and never waited on again.

Tool calling builds its constraint here too: :func:`json_schema` (param ``tool_choice``).
xgrammar itself is imported only when a grammar is built (it loads torch), never by the API
families that import this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from . import errors
from .generation import StructuredOutput

logger = logging.getLogger("hfserve.structured")

T = TypeVar("T")

#: how long one grammar may take to compile (seconds; ``HFSERVE_GRAMMAR_COMPILE_TIMEOUT_S``)
COMPILE_TIMEOUT_S = float(os.environ.get("HFSERVE_GRAMMAR_COMPILE_TIMEOUT_S", "10"))
#: objects and arrays may nest at most this deep in a schema (vLLM's limit)
MAX_JSON_NESTING = 64
#: compiled grammars (and refusals) kept per cache
CACHE_ENTRIES = 512

#: ``--structured-outputs-config`` keys and what is accepted for them
SERVER_CONFIG_KEYS = ("backend", "disable_any_whitespace")
#: vLLM's other keys: what to use instead
_SERVER_CONFIG_ELSEWHERE = {
    "reasoning_parser": "use --reasoning-parser",
    "reasoning_parser_plugin": "use --reasoning-parser",
    "enable_in_reasoning": "it is not supported",
    "disable_additional_properties": "it applies to vLLM's guidance backend only",
    "disable_fallback": "there is no fallback: xgrammar serves every request",
}

STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
_CONSTRAINT_KIND = {
    "json": "json",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
    "structural_tag": "structural_tag",
}
#: vLLM's options of other grammar engines
_OTHER_ENGINE_OPTIONS = {"whitespace_pattern": "outlines", "disable_additional_properties": "guidance"}

JSON_OBJECT_SCHEMA = '{"type": "object"}'

#: the string formats xgrammar enforces (vLLM's list)
STRING_FORMATS = frozenset(
    {
        "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
        "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip


# ---------------------------------------------------------------- requests
def _compact(value: Any) -> str:
    """Canonical JSON text: compact, keys in the order given (property order is output order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_schema(schema: Any, *, param: str, disable_any_whitespace: bool = False) -> StructuredOutput:
    """A JSON schema (an object, or its JSON text) as a constraint, checked statically (its shape,
    nesting and the keywords xgrammar cannot enforce); errors name ``param``. Tool calling calls
    this with ``param="tool_choice"`` (or ``tools.N.function.parameters``)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise errors.InvalidRequest(f"{param} is not valid JSON ({exc}); send a JSON schema object", param=param) from None
    if not isinstance(schema, dict):
        raise errors.InvalidRequest(
            f"{param} must be a JSON schema object, got {_json_type(schema)}", param=param
        )
    depth = _nesting(schema)
    if depth > MAX_JSON_NESTING:
        raise errors.InvalidRequest(
            f"{param} is nested {depth} levels deep; objects and arrays may nest at most {MAX_JSON_NESTING} levels",
            param=param,
        )
    problem = unsupported_feature(schema)
    if problem is not None:
        raise errors.UnsupportedParameter(
            f"{param} uses {problem}, which structured outputs cannot enforce; remove it from the schema",
            param=param,
        )
    return StructuredOutput("json", _compact(schema), disable_any_whitespace, param)


def from_response_format(value: Any, *, param: str = "response_format") -> StructuredOutput | None:
    """OpenAI's ``response_format`` (a mapping): None for ``text``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise errors.InvalidRequest(f"{param} must be an object with a type", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "", False, param)
    if kind != "json_schema":
        raise errors.InvalidRequest(
            f"{param}.type must be 'text', 'json_object' or 'json_schema', got {errors.echo(kind)}", param=f"{param}.type"
        )
    spec = value.get("json_schema")
    where = f"{param}.json_schema"
    if not isinstance(spec, Mapping):
        raise errors.InvalidRequest(
            f"{where} is required with type 'json_schema': an object with name and schema", param=where
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise errors.InvalidRequest(f"{where}.name must be a non-empty string", param=f"{where}.name")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise errors.InvalidRequest(f"{where}.strict must be a boolean", param=f"{where}.strict")
    schema = spec.get("schema", spec.get("json_schema"))
    if schema is None:
        raise errors.InvalidRequest(f"{where}.schema is required: the JSON schema of the output", param=f"{where}.schema")
    return json_schema(schema, param=f"{where}.schema")


def from_structured_outputs(value: Any, *, param: str = "structured_outputs") -> StructuredOutput:
    """vLLM's ``structured_outputs`` request extra: exactly one constraint."""
    if not isinstance(value, Mapping):
        raise errors.InvalidRequest(f"{param} must be an object", param=param)
    allowed = (*STRUCTURED_OUTPUTS_KEYS, "disable_any_whitespace", *_OTHER_ENGINE_OPTIONS)
    for key in value:
        if key not in allowed:
            raise errors.InvalidRequest(
                f"{param}.{errors.echo(key)} is not a structured outputs field; use one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}",
                param=f"{param}.{key}",
            )
    for key, engine in _OTHER_ENGINE_OPTIONS.items():
        if value.get(key) not in (None, False, ""):
            raise errors.UnsupportedParameter(
                f"{param}.{key} is an option of vLLM's {engine} engine; this server uses xgrammar; remove it",
                param=f"{param}.{key}",
            )
    daw = value.get("disable_any_whitespace", False)
    if daw is None:
        daw = False
    if not isinstance(daw, bool):
        raise errors.InvalidRequest(f"{param}.disable_any_whitespace must be a boolean", param=f"{param}.disable_any_whitespace")
    given = [k for k in STRUCTURED_OUTPUTS_KEYS if value.get(k) is not None and not (k == "json_object" and value[k] is False)]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        raise errors.InvalidRequest(
            f"{param} must give exactly one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}; got {what}", param=param
        )
    key = given[0]
    where = f"{param}.{key}"
    raw = value[key]
    if key == "json":
        so = json_schema(raw, param=where)
        return StructuredOutput("json", so.source, daw, where)
    if key == "json_object":
        if raw is not True:
            raise errors.InvalidRequest(f"{where} must be true", param=where)
        return StructuredOutput("json_object", "", daw, where)
    if key == "choice":
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
            raise errors.InvalidRequest(f"{where} must be a non-empty list of strings", param=where)
        return StructuredOutput("choice", _compact(raw), daw, where)
    if key == "structural_tag":
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise errors.InvalidRequest(f"{where} is not valid JSON ({exc})", param=where) from None
        if not isinstance(raw, dict):
            raise errors.InvalidRequest(f"{where} must be a structural tag object (or its JSON text)", param=where)
        if _nesting(raw) > MAX_JSON_NESTING + 16:
            raise errors.InvalidRequest(f"{where} is nested too deeply", param=where)
        return StructuredOutput("structural_tag", _compact(raw), daw, where)
    if not isinstance(raw, str) or not raw.strip():
        raise errors.InvalidRequest(f"{where} must be a non-empty string", param=where)
    if "\x00" in raw:
        raise errors.InvalidRequest(f"{where} must not contain a NUL character", param=where)
    return StructuredOutput(key, raw, daw, where)  # type: ignore[arg-type]  # regex or grammar


def from_request(*, response_format: Any = None, structured_outputs: Any = None, prefix: str = "") -> StructuredOutput | None:
    """The constraint of a request with OpenAI's ``response_format`` and/or vLLM's ``structured_outputs``
    (at most one of them may constrain); ``prefix`` is put before the params (``parameters.``)."""
    rf = from_response_format(response_format, param=f"{prefix}response_format")
    if structured_outputs is None:
        return rf
    so = from_structured_outputs(structured_outputs, param=f"{prefix}structured_outputs")
    if rf is not None:
        raise errors.InvalidRequest(
            "response_format and structured_outputs both constrain the output; send only one of them",
            param=f"{prefix}structured_outputs",
        )
    return so


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _nesting(value: Any) -> int:
    """How deep objects and arrays nest in ``value`` (iteratively: a deep value cannot overflow the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_NESTING + 16:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _types(node: Mapping[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return set()


def unsupported_feature(schema: Any, path: str = "") -> str | None:
    """The first schema keyword xgrammar cannot enforce (vLLM's list), described with where it is;
    None when there is none. (xgrammar would silently accept outputs that break these.)"""
    stack: list[tuple[Any, str]] = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{where}.{i}") for i, item in reversed(list(enumerate(node))))
            continue
        if not isinstance(node, dict):
            continue
        at = f" (at {where.lstrip('.')})" if where else ""
        types = _types(node)
        if types & {"integer", "number"} and "multipleOf" in node:
            return f"'multipleOf'{at}"
        if "array" in types:
            for key in ("uniqueItems", "contains", "minContains", "maxContains"):
                if key in node:
                    return f"{key!r} on an array{at}"
        if "string" in types:
            fmt = node.get("format")
            if fmt is not None and fmt not in STRING_FORMATS:
                return f"the string format {errors.echo(fmt)!r}{at}"
            if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
                return f"'pattern' or 'format' together with 'minLength'/'maxLength'{at}"
        if "object" in types:
            if "propertyNames" in node:
                names = node.get("propertyNames")
                if isinstance(names, dict) and ("pattern" in names or "format" in names) and (
                    "minLength" in names or "maxLength" in names
                ):
                    return f"'propertyNames' with a pattern and a length{at}"
                for key in ("patternProperties", "properties"):
                    if key in node:
                        return f"'propertyNames' together with {key!r}{at}"
                if node.get("unevaluatedProperties", True) is not True:
                    return f"'propertyNames' together with 'unevaluatedProperties'{at}"
            pattern_props = node.get("patternProperties")
            if isinstance(pattern_props, dict):
                if "properties" in node:
                    return f"'patternProperties' together with 'properties'{at}"
                if len(pattern_props) > 1:
                    return f"more than one 'patternProperties' pattern{at}"
        all_of = node.get("allOf")
        if isinstance(all_of, list) and len(all_of) >= 2:
            return f"'allOf' with more than one schema{at}"
        for key, child in reversed(list(node.items())):
            if isinstance(child, (dict, list)):
                stack.append((child, f"{where}.{key}"))
    return None


# ------------------------------------------------------------- server config
def check_server_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``--structured-outputs-config`` checked: ``{"backend": "xgrammar", "disable_any_whitespace": bool}``.

    Raises ValueError (one line, for the start-up error) for a key or value this server does not
    honour: another grammar engine than xgrammar (``auto`` means xgrammar here, so that both
    backends constrain alike), vLLM's reasoning keys (hfserve has ``--reasoning-parser``), unknown keys."""
    out: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": False}
    for key, value in config.items():
        if key in _SERVER_CONFIG_ELSEWHERE:
            raise ValueError(f"{key} is not accepted here: {_SERVER_CONFIG_ELSEWHERE[key]}")
        if key not in SERVER_CONFIG_KEYS:
            raise ValueError(f"unknown key {key!r}; the keys are {', '.join(SERVER_CONFIG_KEYS)}")
        if key == "backend":
            if value not in ("auto", "xgrammar"):
                raise ValueError(
                    f"backend {value!r} is not available: hfserve constrains decoding with xgrammar on every backend "
                    "(so that both backends give the same outputs); use \"xgrammar\" or \"auto\""
                )
        elif not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        else:
            out[key] = value
    return out


def with_server_config(so: StructuredOutput, config: Mapping[str, Any]) -> StructuredOutput:
    """``so`` under the server's ``--structured-outputs-config`` (its ``disable_any_whitespace``)."""
    if config.get("disable_any_whitespace") and not so.disable_any_whitespace:
        return StructuredOutput(so.kind, so.source, True, so.param)
    return so


# ------------------------------------------------------------------ grammars
def choice_as_grammar(choices: list[str]) -> str:
    """The EBNF grammar of ``choice`` (vLLM's ``choice_as_grammar``: the same grammar on both backends)."""
    escapes = {"\\": r"\\", '"': r"\"", "\n": r"\n", "\r": r"\r", "\t": r"\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"\\u{ord(ch):04x}"
        return ch

    return "root ::= " + " | ".join('"' + "".join(escape(ch) for ch in c) + '"' for c in choices)


def grammar_is_likely_lark(text: str) -> bool:
    """vLLM's test: a grammar with no ``::=`` rule is Lark, else EBNF."""
    for line in text.split("\n"):
        line = re.sub(r"(#|//).*$", "", line).strip()
        if line and "::=" in line:
            return False
    return True


def build_grammar(so: StructuredOutput) -> Any:
    """The ``xgrammar.Grammar`` of a constraint (vocabulary-independent), built exactly as vLLM's
    xgrammar backend builds it. Raises what xgrammar raises; see :func:`compile_error`."""
    import xgrammar as xgr

    daw = so.disable_any_whitespace
    separators = (",", ":") if daw else None
    if so.kind in ("json", "json_object"):
        source = so.source if so.kind == "json" else JSON_OBJECT_SCHEMA
        return xgr.Grammar.from_json_schema(source, any_whitespace=not daw, separators=separators)
    if so.kind == "regex":
        return xgr.Grammar.from_regex(so.source)
    if so.kind == "choice":
        return xgr.Grammar.from_ebnf(choice_as_grammar(json.loads(so.source)))
    if so.kind == "grammar":
        if grammar_is_likely_lark(so.source):
            return xgr.Grammar.from_lark(so.source)
        return xgr.Grammar.from_ebnf(so.source)
    if so.kind == "structural_tag":
        tag = json.loads(so.source)
        if "structures" in tag:  # vLLM's older form
            items = [
                xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                for s in tag["structures"]
            ]
            return xgr.Grammar.from_structural_tag(items, tag["triggers"])
        return xgr.Grammar.from_structural_tag(so.source)
    raise ValueError(f"unknown structured output kind {so.kind!r}")


def ebnf(so: StructuredOutput) -> str:
    """The constraint as EBNF text (what :func:`build_grammar` builds, printed): the same language,
    so the same token masks, for an engine that takes a grammar but not these options."""
    return str(build_grammar(so))


_WHAT = {
    "json": "a valid JSON schema",
    "json_object": "valid",
    "regex": "a valid regular expression",
    "choice": "a valid list of choices",
    "grammar": "a valid grammar",
    "structural_tag": "a valid structural tag",
}
#: xgrammar's message prefixes: "[13:14:42] /project/cpp/file.cc:123: ", "Check failed: (x) is false: "
_LOG_PREFIX = re.compile(r"\[\d{1,2}:\d{2}:\d{2}\]\s*")
_SOURCE_REF = re.compile(r"(?:/[\w.+-]+)+\.(?:cc|cpp|h|hpp|py|c)(?::\d+)?:?\s*")
_CHECK_FAILED = re.compile(r"Check failed:\s*\(.*?\)\s*is false:\s*", re.S)


def strip_internals(text: str) -> str:
    """``text`` without xgrammar's timestamps, source paths and check expressions."""
    return _CHECK_FAILED.sub("", _SOURCE_REF.sub("", _LOG_PREFIX.sub("", str(text))))


def clean_compiler_message(text: str) -> str:
    """xgrammar's (or vLLM's) message about a grammar, without timestamps, source paths, check
    expressions or the echoed input: what is wrong, in one line."""
    text = strip_internals(text).split("The JSON string is:")[0]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = re.sub(r"\s+", " ", first).strip().rstrip(".:;,")
    if len(first) > 300:
        first = first[:297] + "..."
    return first


def compile_error(exc: BaseException, so: StructuredOutput) -> errors.HFServeError:
    """What a failed build or compile of ``so`` means for the client: ``invalid_request`` with its param."""
    if isinstance(exc, errors.HFServeError):
        return exc
    detail = clean_compiler_message(str(exc))
    param = so.param or "structured_outputs"
    what = _WHAT.get(so.kind, "valid")
    message = f"{param} is not {what}"
    if detail:
        message += f": {detail}"
    return errors.InvalidRequest(message + "; fix it and retry", param=param)


def too_slow(so: StructuredOutput, limit: float) -> errors.HFServeError:
    param = so.param or "structured_outputs"
    return errors.InvalidRequest(
        f"{param} is too complex: its grammar did not compile within the limit of {limit:g} seconds; "
        "simplify it (fewer properties, alternatives or length bounds)",
        param=param,
    )


def cache_key(so: StructuredOutput) -> tuple[str, str, bool]:
    return so.kind, so.source, so.disable_any_whitespace


class _Compile(Generic[T]):
    """One compile in a worker thread: its future and when it started running."""

    __slots__ = ("future", "started")

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.started: float | None = None


class GrammarCache(Generic[T]):
    """Builds (compiles) constraints in worker threads, never on the event loop, and keeps the
    results and the refusals by :func:`cache_key`.

    ``build`` turns a :class:`StructuredOutput` into what is kept (an ``xgrammar.Grammar``, a
    compiled grammar). Requests for a constraint that is being built wait for that build. A
    build that runs longer than ``timeout`` seconds is refused (:func:`too_slow`) and the
    refusal is kept: the thread cannot be stopped, but the same constraint is never built
    again. A request whose build could not even start within ``timeout`` (every worker busy)
    is ``overloaded``.
    """

    def __init__(self, build: Callable[[StructuredOutput], T], *, timeout: float | None = None, workers: int = 4,
                 entries: int = CACHE_ENTRIES, max_bytes: int | None = None, size: Callable[[T], int] | None = None,
                 name: str = "grammar"):  # fmt: skip
        self.build = build
        self.timeout = COMPILE_TIMEOUT_S if timeout is None else timeout
        self.entries = entries
        #: with ``size``: the most bytes the kept results may hold (the oldest go first)
        self.max_bytes = max_bytes
        self.size = size
        self._bytes = 0
        self._sizes: dict[tuple[str, str, bool], int] = {}
        self._done: OrderedDict[tuple[str, str, bool], tuple[T | None, errors.HFServeError | None]] = OrderedDict()
        self._running: dict[tuple[str, str, bool], _Compile[T]] = {}
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"hf-{name}")
        #: builds run (cache misses), for tests and benchmarks
        self.builds = 0

    def cached(self, so: StructuredOutput) -> T | None:
        """The built constraint, if it is built (a refusal is raised)."""
        with self._lock:
            entry = self._done.get(cache_key(so))
            if entry is None:
                return None
            self._done.move_to_end(cache_key(so))
        value, error = entry
        if error is not None:
            raise error
        return value

    def get_sync(self, so: StructuredOutput) -> T:
        """Build (or take from the cache) in the calling thread, without a time limit (tests, tools)."""
        hit = self.cached(so)
        if hit is not None:
            return hit
        try:
            value = self.build(so)
        except Exception as exc:  # noqa: BLE001 - the compiler's errors are the client's
            err = compile_error(exc, so)
            self._keep(cache_key(so), None, err)
            raise err from None
        self._keep(cache_key(so), value, None)
        return value

    async def get(self, so: StructuredOutput) -> T:
        """The built constraint: from the cache, else built in a worker thread within the time limit."""
        hit = self.cached(so)
        if hit is not None:
            return hit
        key = cache_key(so)
        with self._lock:
            job = self._running.get(key)
            if job is None:
                job = self._running[key] = _Compile()
                self.builds += 1
                self._executor.submit(self._run, key, so, job)
        return await self._wait(job, so)

    def _run(self, key: tuple[str, str, bool], so: StructuredOutput, job: _Compile[T]) -> None:
        job.started = time.monotonic()
        try:
            value = self.build(so)
        except Exception as exc:  # noqa: BLE001 - the compiler's errors are the client's
            err = compile_error(exc, so)
            if not isinstance(exc, RuntimeError | ValueError):
                logger.warning("building the %s grammar failed unexpectedly: %s", so.kind, clean_compiler_message(str(exc)))
            self._finish(key, None, err)
            job.future.set_exception(err)
            return
        except BaseException as exc:  # pragma: no cover - interpreter shutdown
            job.future.set_exception(exc)
            raise
        self._finish(key, value, None)
        job.future.set_result(value)

    def _finish(self, key: tuple[str, str, bool], value: T | None, error: errors.HFServeError | None) -> None:
        with self._lock:
            self._running.pop(key, None)
            if key in self._done:  # refused as too slow meanwhile: the refusal stays
                return
        self._keep(key, value, error)

    def _keep(self, key: tuple[str, str, bool], value: T | None, error: errors.HFServeError | None) -> None:
        nbytes = 0
        if value is not None and self.size is not None:
            try:
                nbytes = int(self.size(value))
            except Exception:  # noqa: BLE001 - unknown size: counted as none
                nbytes = 0
        with self._lock:
            self._bytes -= self._sizes.pop(key, 0)
            self._done[key] = (value, error)
            self._done.move_to_end(key)
            self._sizes[key] = nbytes
            self._bytes += nbytes
            while len(self._done) > 1 and (
                len(self._done) > self.entries or (self.max_bytes is not None and self._bytes > self.max_bytes)
            ):
                old, _ = self._done.popitem(last=False)
                self._bytes -= self._sizes.pop(old, 0)

    async def _wait(self, job: _Compile[T], so: StructuredOutput) -> T:
        waiting = asyncio.wrap_future(job.future)
        waiting.add_done_callback(_retrieve)  # a refusal nobody waits for any more is not an unretrieved error
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                started = job.started
                if started is None:
                    raise errors.Overloaded(
                        "Every grammar compiler thread is busy; retry shortly", retry_after=1
                    ) from None
                if started + self.timeout > time.monotonic() + 0.001:  # it started late: give it its full time
                    deadline = started + self.timeout
                    continue
                err = too_slow(so, self.timeout)
                logger.warning("refused a %s constraint: it took more than %gs to compile", so.kind, self.timeout)
                self._keep(cache_key(so), None, err)
                raise err from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


#: the backend-neutral check (the vocabulary-independent grammar), for backends without a compiler
_checked: GrammarCache[Any] | None = None
_checked_lock = threading.Lock()


async def validate(so: StructuredOutput) -> None:
    """Check that ``so`` builds into a grammar (off the event loop, within the time limit); the
    errors are those the backends give (``invalid_request`` with its param). Backends with a
    grammar compiler compile instead (see ``Backend.prepare_structured``)."""
    global _checked
    with _checked_lock:
        if _checked is None:
            _checked = GrammarCache(build_grammar, workers=2, name="grammar-check")
        cache = _checked
    await cache.get(so)
