"""Command line: a drop-in for KServe huggingfaceserver's flags.

:func:`resolve` turns the parsed arguments into the typed :class:`~hfserve.config.Config`
that everything below takes. Bad flags, conflicting flags, a missing model directory or an
unsupported task end with one line on stderr and exit code 2 (no traceback).

Every flag takes both spellings (``--max_model_len`` and ``--max-model-len``). When vLLM is
installed, its own argument definitions (``vllm serve``'s parser) take the flags hfserve does
not define; the engine arguments among them that the user gave go, under vLLM's
``AsyncEngineArgs`` field names, into ``EngineConfig.engine_args``. An unknown flag is not an
error (as in huggingfaceserver): the server starts and logs one warning naming it and the
closest known flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import access_log, lora
from .chat import CONTENT_FORMATS
from .config import (
    BACKENDS,
    DEFAULT_IDLE_MS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_MODEL_DIR,
    BatchingConfig,
    Config,
    EngineConfig,
    LimitsConfig,
    LoraConfig,
    LoraModule,
    ModelConfig,
    ServerConfig,
)
from .sampling import generation_defaults
from .storage import StorageError, is_uri, localize
from .structured import check_server_config
from .tasks import Task, TaskInferenceError, infer_task, parse_task

DTYPES = ("auto", "float16", "float32", "bfloat16", "float", "half")


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("y", "yes", "t", "true", "on", "1"):
        return True
    if v in ("n", "no", "f", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _chat_template(value: str) -> str:
    """vLLM's reading of --chat-template: a file's text, else the template itself when it looks
    like one (has braces or a line break), else a missing file."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read --chat-template {value}: {exc}")
    if any(c in value for c in "{}\n"):
        return value
    _fail(f"--chat-template {value} is neither a file nor a template (a template holds {{ }} or a line break)")


def _check_output_parsers(args: argparse.Namespace) -> None:
    """--tool-call-parser and --reasoning-parser name parsers hfserve has; --enable-auto-tool-choice
    has a tool-call parser to read the model's calls (vLLM's rule)."""
    from . import parsers

    hf = parsers.RESPONSE_TEMPLATE_PARSER
    for flag, name, lookup in (
        ("--tool-call-parser", args.tool_call_parser, parsers.tool_call_parser),
        ("--reasoning-parser", args.reasoning_parser, parsers.reasoning_parser),
    ):
        if name is not None and name != hf:
            try:
                lookup(name)
            except ValueError as exc:
                _fail(f"{flag} {name}: {exc}")
    if hf in (args.tool_call_parser, args.reasoning_parser) and None not in (args.tool_call_parser, args.reasoning_parser):
        if args.tool_call_parser != args.reasoning_parser:
            _fail(
                f"--tool-call-parser {args.tool_call_parser} and --reasoning-parser {args.reasoning_parser}: the model's "
                f"response template ({hf}) reads both or neither; give {hf} for both, or other parsers for both"
            )
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        _fail("--enable-auto-tool-choice needs --tool-call-parser NAME, the parser that reads the model's tool calls")


def _model_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """--served-model-name, the generation config and the chat template flags, checked."""
    names = list(args.served_model_name or [args.model_name])
    if any(not n.strip() for n in names):
        _fail("--served-model-name has an empty name")
    _check_output_parsers(args)
    mode = args.generation_config
    if mode not in ("auto", "vllm") and not Path(mode).is_dir():
        _fail(f"--generation-config {mode} is not auto, vllm or a directory")
    try:
        generation_defaults({}, args.override_generation_config)
    except ValueError as exc:
        _fail(f"--override-generation-config: {exc}")
    try:
        check_server_config(args.structured_outputs_config or {})
    except ValueError as exc:
        _fail(f"--structured-outputs-config: {exc}")
    return {
        "name": names[0],
        "aliases": tuple(dict.fromkeys(n for n in names[1:] if n != names[0])),
        "generation_config": mode,
        "override_generation_config": args.override_generation_config or {},
        "chat_template": None if args.chat_template is None else _chat_template(args.chat_template),
        "default_chat_template_kwargs": args.default_chat_template_kwargs or {},
        "response_role": args.response_role,
        "chat_template_content_format": args.chat_template_content_format,
        "trust_request_chat_template": args.trust_request_chat_template,
        "enable_auto_tool_choice": args.enable_auto_tool_choice,
        "tool_call_parser": args.tool_call_parser,
        "reasoning_parser": args.reasoning_parser,
        "structured_outputs_config": args.structured_outputs_config or {},
    }


logger = logging.getLogger("hfserve.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hfserve: error: {message}\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """hfserve's flags (either spelling), then vLLM's for the rest; unknown flags are kept
        for a warning (``engine_args``, ``inert_flags``, ``unknown_flags`` on the namespace)."""
        argv = list(sys.argv[1:] if args is None else args)
        ns, rest = self.parse_known_args(_snake_case(argv), namespace)
        ns.engine_args, ns.inert_flags, ns.unknown_flags = _engine_flags(rest, argv, self)
        return ns


def _snake_case(argv: list[str]) -> list[str]:
    """``--max-model-len=5`` -> ``--max_model_len=5`` (the flag's name only, up to a ``.`` of
    vLLM's ``--json-arg.key value`` form; nothing after a bare ``--``)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            head, dot, tail = key[2:].partition(".")
            arg = "--" + head.replace("-", "_") + dot + tail + eq + value
        out.append(arg)
    return out


def _canonical(flag: str) -> str:
    return flag.partition("=")[0].lstrip("-").partition(".")[0].replace("-", "_")


#: model-section settings hfserve's own flags hold; vLLM's spellings of them (``--no-trust-remote-code``)
#: never override those in ``engine_args``
SHARED_SETTINGS = frozenset({"model", "revision", "tokenizer_revision", "dtype", "max_model_len", "trust_remote_code"})

#: vLLM frontend flags that an hfserve flag replaces
FRONTEND_REPLACED = {"port": "--http_port", "uds": "--host", "disable_fastapi_docs": "--enable_docs_url"}

#: without vLLM installed: common engine flags still parsed (the same Config with and without vLLM);
#: the server names them in its start-up log as having no effect on the transformers backend
FALLBACK_ENGINE_FLAGS: dict[str, Any] = {
    "tensor_parallel_size": int, "pipeline_parallel_size": int, "data_parallel_size": int,
    "gpu_memory_utilization": float, "max_num_seqs": int, "max_num_batched_tokens": int, "max_logprobs": int,
    "seed": int, "block_size": int, "swap_space": float, "cpu_offload_gb": float, "quantization": str,
    "kv_cache_dtype": str, "load_format": str, "tokenizer": str, "tokenizer_mode": str,
    "distributed_executor_backend": str, "max_lora_rank": int, "max_loras": int,
    "enforce_eager": bool, "enable_prefix_caching": bool, "enable_chunked_prefill": bool, "enable_lora": bool,
    "disable_custom_all_reduce": bool, "enable_log_requests": bool,
}  # fmt: skip


def _vllm_parser() -> tuple[Any, frozenset[str]]:
    """vLLM's own parser (``vllm serve``'s, else its engine arguments alone) and the engine fields.
    Its ``parse_args`` keeps the flags it does not know in ``parser.extras`` instead of failing."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        flexible = importlib.import_module("vllm.utils.argparse_utils").FlexibleArgumentParser
    except (ImportError, AttributeError):  # older vLLM
        flexible = importlib.import_module("vllm.utils").FlexibleArgumentParser
    parser = flexible(prog="hfserve", allow_abbrev=False, add_help=False)
    parser.extras = []
    parse_known_args = parser.parse_known_args

    def keep_extras(args: Any = None, namespace: Any = None) -> Any:
        ns, extras = parse_known_args(args, namespace)
        parser.extras = list(extras)
        return ns, []

    parser.parse_known_args = keep_extras
    parser.error = _fail
    make_arg_parser = None
    for module in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
        try:
            make_arg_parser = importlib.import_module(module).make_arg_parser
            break
        except (ImportError, AttributeError):
            continue
    if make_arg_parser is not None:
        make_arg_parser(parser)
    else:
        AsyncEngineArgs.add_cli_args(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only what the user gave
    return parser, frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def _vllm_flag_snapshot() -> list[dict[str, Any]]:
    """vLLM's flags as the last vLLM hfserve was checked against defines them (``vllm_flags.json``,
    written by ``.ci/vllm_flags.py`` from vLLM's own parser): names, switches, engine fields."""
    text = importlib.resources.files("hfserve").joinpath("vllm_flags.json").read_text()
    return list(json.loads(text)["flags"])


def _fallback_parser() -> tuple[argparse.ArgumentParser, frozenset[str]]:
    """Without vLLM: the common engine flags typed (the same Config as with vLLM), and every other
    flag of vLLM's snapshot recognised (its value kept as text), so that a deployment's vLLM flags
    are named as having no effect rather than as unknown."""

    class FallbackParser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            _fail(message)

    parser = FallbackParser(prog="hfserve", allow_abbrev=False, add_help=False, argument_default=argparse.SUPPRESS)
    for name, kind in FALLBACK_ENGINE_FLAGS.items():
        if kind is bool:  # vLLM's --x / --no-x (argv is in snake_case here)
            parser.add_argument(f"--{name}", dest=name, action="store_const", const=True)
            parser.add_argument(f"--no_{name}", dest=name, action="store_const", const=False)
        else:
            parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("-tp", dest="tensor_parallel_size", type=int)
    parser.add_argument("-pp", dest="pipeline_parallel_size", type=int)
    taken = {o for a in parser._actions for o in a.option_strings}
    engine = set(FALLBACK_ENGINE_FLAGS)
    for flag in _vllm_flag_snapshot():
        if flag["engine"]:
            engine.add(flag["dest"])
        # argv is in snake_case here (short flags as given)
        spellings = {(o if not o.startswith("--") else "--" + o[2:].replace("-", "_")): o for o in flag["options"]}
        for spelled, original in spellings.items():
            if spelled in taken:
                continue
            taken.add(spelled)
            if "switch" in flag:
                parser.add_argument(spelled, dest=flag["dest"], action="store_const", const=flag["switch"][original])
            else:
                parser.add_argument(spelled, dest=flag["dest"])
    return parser, frozenset(engine)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _engine_flags(
    rest: list[str], argv: list[str], own: argparse.ArgumentParser
) -> tuple[dict[str, Any], list[str], list[tuple[str, str | None]]]:
    """The flags hfserve's parser left: vLLM's engine arguments (by field name), vLLM flags with no
    effect in hfserve, and unknown flags with the closest known one."""
    if not any(arg.startswith("-") for arg in rest):
        return {}, [], []
    parser: Any
    if vllm_installed():  # imported only when a flag needs it
        parser, fields = _vllm_parser()
        ns = parser.parse_args(rest)  # vLLM's own reading (spellings, --json-arg.key value)
        extras: list[str] = parser.extras
    else:
        parser, fields = _fallback_parser()
        ns, extras = parser.parse_known_args(rest)
    given = vars(ns)
    engine_args = {k: v for k, v in given.items() if k in fields and k not in SHARED_SETTINGS}
    inert = [
        f"--{k.replace('_', '-')}" + (f" (use {FRONTEND_REPLACED[k]})" if k in FRONTEND_REPLACED else "")
        for k in given
        if k not in fields and k not in ("model_tag", "help")
    ]
    spelled = {_canonical(a): a.partition("=")[0] for a in argv if a.startswith("-")}
    known = {_canonical(o) for p in (own, parser) for a in p._actions for o in a.option_strings}
    unknown: list[tuple[str, str | None]] = []
    for arg in extras:
        if not arg.startswith("-") or arg == "--":
            continue
        name = spelled.get(_canonical(arg), arg.partition("=")[0])
        close = difflib.get_close_matches(_canonical(arg), sorted(known), n=1, cutoff=0.6)
        suggestion = None
        if close:
            suggestion = "--" + (close[0].replace("_", "-") if "-" in name.lstrip("-") else close[0])
        if all(name != u for u, _ in unknown):
            unknown.append((name, suggestion))
    return engine_args, inert, unknown


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hfserve",
        description="Serve a Hugging Face model over KServe v1/v2 (REST, gRPC) and OpenAI-compatible APIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model_id", "--model", dest="model_id", help="Hugging Face Hub model id (downloaded unless HF_HUB_OFFLINE=1)")
    m.add_argument("--model_dir", help=f"local model directory (default {DEFAULT_MODEL_DIR} when no --model_id)")
    m.add_argument("--model_name", default="model", help="name the model is served under")
    m.add_argument("--model_revision", "--revision", dest="model_revision", help="Hub revision of the model")
    m.add_argument("--tokenizer_revision", help="Hub revision of the tokenizer")
    m.add_argument("--task", help="one of: " + ", ".join(t.value for t in Task) + " (inferred from the config if omitted)")
    m.add_argument("--backend", default="auto", choices=BACKENDS, help="model runtime")
    m.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype; auto: on the transformers backend float32 on CPU and the config's half type (else float16) on GPU, on the vLLM backend vLLM's own choice, as vllm serve makes it (e.g. the config's dtype on GPU, bfloat16 on a CPU with native bf16)")
    m.add_argument("--max_model_len", "--max_length", dest="max_model_len", type=int, help="context length (default: from the model config)")
    m.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the Hub")
    m.add_argument("--return_probabilities", action="store_true", help="classification tasks return probabilities instead of class ids")
    m.add_argument("--return_raw_logits", action="store_true", help="classification and fill-mask tasks return the raw logits (exclusive with --return_probabilities)")
    m.add_argument("--return_offsets_mapping", action="store_true", help="token classification also returns each token's start and end character offsets (v1 offset_mapping, v2 output offset_mapping)")
    m.add_argument("--return_token_type_ids", action="store_true", help="pass token type ids to encoder models")
    m.add_argument("--disable_lower_case", action="store_true", help="load the tokenizer with do_lower_case=False (transformers backend)")
    m.add_argument("--disable_special_tokens", action="store_true", help="encode encoder inputs without the tokenizer's special tokens ([CLS], [SEP])")
    m.add_argument("--truncate_inputs", action="store_true", help="cut encoder inputs (embeddings, classification, fill-mask) longer than the context length to it, as huggingfaceserver does, instead of answering 400 context_length_exceeded")
    m.add_argument("--served-model-name", "--served_model_name", nargs="+", dest="served_model_name", metavar="NAME", help="names the model answers to on every API (vLLM's flag); the first is reported in responses (default: --model_name)")
    m.add_argument("--generation-config", "--generation_config", dest="generation_config", default="auto", help="sampling defaults: auto (the model's generation_config.json), vllm (none), or a directory holding a generation_config.json")
    m.add_argument("--override-generation-config", "--override_generation_config", dest="override_generation_config", type=_json_object, default=None, help='JSON object over the generation config\'s sampling defaults, e.g. \'{"temperature": 0.5}\'')
    m.add_argument("--chat-template", "--chat_template", dest="chat_template", default=None, help="chat template used instead of the tokenizer's: a file, or the template itself")
    m.add_argument("--default-chat-template-kwargs", "--default_chat_template_kwargs", dest="default_chat_template_kwargs", type=_json_object, default=None, help='JSON object of chat template arguments under each request\'s chat_template_kwargs, e.g. \'{"enable_thinking": false}\'')
    m.add_argument("--response-role", "--response_role", dest="response_role", default="assistant", help="role of the chat completion's message when the request asks for a new one")
    m.add_argument("--trust-request-chat-template", "--trust_request_chat_template", dest="trust_request_chat_template", action="store_true", help="let requests bring their own chat template (chat_template); without it they are refused, as vLLM does")
    m.add_argument("--enable-auto-tool-choice", "--enable_auto_tool_choice", dest="enable_auto_tool_choice", action="store_true", help="serve tool_choice auto: the model decides whether to call a tool, its output read by --tool-call-parser")
    m.add_argument("--tool-call-parser", "--tool_call_parser", dest="tool_call_parser", default=None, help="how tool calls are read from the model's output (vLLM's names: hermes, llama3_json, mistral, pythonic, ...)")
    m.add_argument("--reasoning-parser", "--reasoning_parser", dest="reasoning_parser", default=None, help="how reasoning is read from the model's output into the message's reasoning field (vLLM's names: deepseek_r1, qwen3)")
    m.add_argument("--structured-outputs-config", "--structured_outputs_config", dest="structured_outputs_config", type=_json_object, default=None, help='structured outputs settings, vLLM\'s JSON form, e.g. \'{"backend": "xgrammar", "disable_any_whitespace": true}\'')
    m.add_argument("--chat-template-content-format", "--chat_template_content_format", dest="chat_template_content_format", default="auto", choices=CONTENT_FORMATS, help="how messages' content reaches the chat template: string (one text), openai (a list of text parts), auto (openai when the template loops over the content)")
    lo = p.add_argument_group("LoRA adapters (vLLM's flags, on both backends; text generation only)")
    lo.add_argument("--enable_lora", action="store_true", help="serve LoRA adapters, each under its own model name")
    lo.add_argument("--no_enable_lora", dest="enable_lora", action="store_false", help=argparse.SUPPRESS)
    lo.add_argument("--lora_modules", nargs="+", action="extend", default=[], metavar="NAME=PATH", help='adapters to serve: name=path, or vLLM\'s JSON form \'{"name": ..., "path": ..., "base_model_name": ...}\' (several; the flag may repeat)')
    lo.add_argument("--max_loras", type=int, default=1, help="the most different adapters in one batch")
    lo.add_argument("--max_lora_rank", type=int, default=16, help="the highest adapter rank accepted")
    lo.add_argument("--max_cpu_loras", type=int, default=None, help="vLLM's CPU cache of adapters (default: --max_loras); no effect on the transformers backend")
    s = p.add_argument_group("server")
    s.add_argument("--http_port", type=int, default=8080)
    s.add_argument("--grpc_port", type=int, default=8081)
    s.add_argument("--enable_grpc", type=_bool, default=True, help="serve the Open Inference Protocol over gRPC")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on")
    s.add_argument("--workers", type=int, default=1, help="only 1: one process serves one model (run more replicas instead)")
    s.add_argument("--max_asyncio_workers", type=int, default=None, help="threads of the event loop's default executor (default: min(32, CPUs + 4))")
    s.add_argument("--enable_docs_url", type=_bool, default=False, help="serve the Swagger UI at /docs")
    s.add_argument("--configure_logging", type=_bool, default=True, help="false: leave logging as it is (no handler, no level set)")
    s.add_argument("--log_config_file", default=None, help="a logging dictConfig, YAML or JSON, instead of hfserve's logging set-up")
    s.add_argument("--access_log_format", default=None, help="the access-log line in gunicorn's format, as KServe takes it, e.g. '%%(h)s \"%%(r)s\" %%(s)s %%(L)s' (default: hfserve's line, with the request id)")
    s.add_argument("--enable_latency_logging", type=_bool, default=True, help="accepted for compatibility (the access-log line always has the latency)")
    s.add_argument("--max_log_len", type=int, default=None, help="accepted for compatibility (hfserve never logs prompts or outputs)")
    s.add_argument("--grpc_max_receive_message_length", type=int, default=None, help="largest gRPC request in bytes (default: --max_request_body_bytes)")
    s.add_argument("--grpc_max_send_message_length", type=int, default=None, help="largest gRPC response in bytes; a larger answer fails with RESOURCE_EXHAUSTED (default and -1: no limit)")
    t = p.add_argument_group("KServe transformer mode (not supported: --predictor_host is refused)")
    t.add_argument("--predictor_host", default=None)
    t.add_argument("--predictor_protocol", "--protocol", dest="predictor_protocol", default="v1")
    t.add_argument("--predictor_use_ssl", type=_bool, default=False)
    t.add_argument("--predictor_request_timeout_seconds", type=float, default=600)
    t.add_argument("--predictor_request_retries", type=int, default=0)
    t.add_argument("--tensor_input_names", default=None)
    s.add_argument("--max_threads", type=int, default=4, help="accepted for compatibility (the transformers backend runs its model work on one thread)")
    s.add_argument("--max_batch_size", type=int, default=32, help="most inputs (generation: sequences) sharing one forward pass (transformers backend)")
    s.add_argument("--max_batch_wait_ms", type=float, default=DEFAULT_MAX_WAIT_MS, help="longest a batch waits for more requests after its first (transformers backend)")
    s.add_argument("--batch_idle_ms", type=float, default=DEFAULT_IDLE_MS, help="a forming batch closes once no request has joined it for this long (transformers backend)")
    s.add_argument("--stall_timeout_seconds", type=float, default=60.0, help="readiness turns false while the decode loop has work and makes no progress for this long; 0: never (transformers backend)")
    s.add_argument("--compile", action="store_true", help="compile generation's decode step with torch.compile before the server is ready (transformers backend; the vLLM backend compiles as vLLM does, unless --enforce-eager)")
    s.add_argument("--disable_log_requests", action="store_true", help="no access log line per request")
    s.add_argument("--max_request_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    s.add_argument("--max_concurrent_requests", type=int, default=None, help="model requests running at once (default: no limit)")
    s.add_argument("--max_queue_size", type=int, default=256, help="model requests waiting for a slot; beyond it: 503 overloaded")
    s.add_argument("--request_timeout_seconds", type=float, default=None, help="deadline of a request (x-request-timeout overrides it); then 504")
    s.add_argument("--api_key", default=os.environ.get("HFSERVE_API_KEY"), help="require 'Authorization: Bearer KEY' on model routes (or set HFSERVE_API_KEY)")
    s.add_argument("--shutdown_grace_seconds", type=float, default=30.0, help="on SIGTERM, how long in-flight requests may take to finish")
    p.epilog = (
        "Every flag also takes its --dash-case spelling. With vLLM installed, every `vllm serve` flag "
        "(--tensor-parallel-size, --gpu-memory-utilization, --max-num-seqs, --enforce-eager, ...) is accepted "
        "and passed to the engine. An unknown flag is logged and ignored."
    )
    return p


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"hfserve: error: {message}\n")
    raise SystemExit(2)


def _localize(uri: str) -> str:
    """A storage URI's local copy (downloaded and logged; one-line error and exit 2 on failure)."""
    from .server import configure_logging

    configure_logging()  # the download's progress is logged before the server starts
    try:
        local = localize(uri)
    except StorageError as exc:
        _fail(str(exc))
    if not (local / "config.json").is_file():
        _fail(f"{uri} ({local}) has no config.json; is it a Hugging Face model directory?")
    return str(local)


def resolve(args: argparse.Namespace) -> Config:
    """Check the flags against each other and the file system (exit 2 on a problem)."""
    if args.model_id and args.model_dir:
        _fail("--model_id and --model_dir both name a model; give one of them")
    if args.workers != 1:
        _fail("--workers must be 1: one process serves one model (run more replicas instead)")
    if args.predictor_host:
        _fail("--predictor_host: KServe's transformer mode (calling a separate predictor) is not supported; hfserve serves the model itself")
    for flag in ("max_asyncio_workers", "grpc_max_receive_message_length", "grpc_max_send_message_length"):
        value = getattr(args, flag)
        if value is not None and value < 1 and not (flag == "grpc_max_send_message_length" and value == -1):
            _fail(f"--{flag} must be positive, got {value}")
    if args.access_log_format is not None:
        try:
            access_log.check_format(args.access_log_format)
        except ValueError as exc:
            _fail(f"--access_log_format {args.access_log_format!r}: {exc}")
    if args.log_config_file is not None and not Path(args.log_config_file).is_file():
        _fail(f"--log_config_file {args.log_config_file} does not exist")
    _warn_about_flags(args)
    for flag in ("http_port", "grpc_port"):
        port = getattr(args, flag)
        if not 0 <= port <= 65535:
            _fail(f"--{flag} {port} is not a port number (0-65535)")
    if args.enable_grpc and args.grpc_port == args.http_port and args.http_port != 0:
        _fail(f"--http_port and --grpc_port are both {args.http_port}; give them different ports")
    if args.max_model_len is not None and args.max_model_len < 1:
        _fail(f"--max_model_len must be positive, got {args.max_model_len}")
    if args.max_request_body_bytes < 1:
        _fail("--max_request_body_bytes must be positive")
    if args.max_batch_size < 1:
        _fail(f"--max_batch_size must be positive, got {args.max_batch_size}")
    if not args.max_batch_wait_ms >= 0:
        _fail(f"--max_batch_wait_ms must be zero or positive, got {args.max_batch_wait_ms}")
    if not args.stall_timeout_seconds >= 0:
        _fail(f"--stall_timeout_seconds must be zero or positive, got {args.stall_timeout_seconds}")
    if not args.batch_idle_ms >= 0:
        _fail(f"--batch_idle_ms must be zero or positive, got {args.batch_idle_ms}")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        _fail(f"--max_concurrent_requests must be at least 1, got {args.max_concurrent_requests}")
    if args.max_queue_size < 0:
        _fail(f"--max_queue_size must not be negative, got {args.max_queue_size}")
    if args.request_timeout_seconds is not None and not args.request_timeout_seconds > 0:
        _fail(f"--request_timeout_seconds must be positive, got {args.request_timeout_seconds}")
    if args.shutdown_grace_seconds < 0:
        _fail(f"--shutdown_grace_seconds must not be negative, got {args.shutdown_grace_seconds}")
    if args.api_key is not None and not args.api_key.strip():
        _fail("--api_key is empty; give a key or leave it out")
    task = None
    if args.task:
        try:
            task = parse_task(args.task)
        except TaskInferenceError as exc:
            _fail(str(exc))
    local_dir: Path | None = None
    if args.model_id:
        model = args.model_id
        if is_uri(model):
            _fail(f"--model_id {model} is a storage URI; pass storage URIs with --model_dir (--model_id takes a Hub id or a local directory)")
        if Path(model).is_dir():
            local_dir = Path(model)
    else:
        model = args.model_dir or DEFAULT_MODEL_DIR
        if is_uri(model):
            model = _localize(model)
        local_dir = Path(model)
        if not local_dir.is_dir():
            _fail(f"model directory {model} does not exist; pass --model_dir DIR or --model_id HUB_ID")
        if not (local_dir / "config.json").is_file():
            _fail(f"model directory {model} has no config.json; is it a Hugging Face model directory?")
    if local_dir is not None and task is None:
        try:
            config = json.loads((local_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {local_dir / 'config.json'}: {exc}")
        try:
            task = infer_task(config, local_dir)
        except TaskInferenceError as exc:
            _fail(str(exc))
    if args.return_probabilities and task is not None and task not in (
        Task.sequence_classification,
        Task.token_classification,
        Task.fill_mask,
    ):
        _fail(f"--return_probabilities applies to classification and fill-mask models, not to {task.label}")
    if args.return_raw_logits and args.return_probabilities:
        _fail("--return_raw_logits and --return_probabilities are exclusive; give one")
    if args.return_raw_logits and task is not None and task not in (
        Task.sequence_classification,
        Task.token_classification,
        Task.fill_mask,
    ):
        _fail(f"--return_raw_logits applies to classification and fill-mask models, not to {task.label}")
    if args.return_offsets_mapping and task is not None and task is not Task.token_classification:
        _fail(f"--return_offsets_mapping applies to token classification models, not to {task.label}")
    args.lora = _lora(args, local_dir, task)
    return _config(args, model, local_dir, task)


def _lora(args: argparse.Namespace, local_dir: Path | None, task: Task | None) -> LoraConfig:
    """The LoRA flags, every adapter checked against the model (one line and exit 2 on a problem)."""
    for flag in ("max_loras", "max_lora_rank", "max_cpu_loras"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            _fail(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        _fail(f"--max-cpu-loras ({args.max_cpu_loras}) must be at least --max-loras ({args.max_loras})")
    if not args.enable_lora:
        if args.lora_modules:
            _fail("--lora-modules needs --enable-lora")
        return LoraConfig()
    if task is not None and task is not Task.text_generation:
        _fail(f"--enable-lora: LoRA adapters are served for text generation only, and this is a {task.label} model")
    modules: list[LoraModule] = []
    try:
        for spec in args.lora_modules:
            module = lora.parse_module(spec)
            if module.name in {m.name for m in modules} or module.name in (args.served_model_name or [args.model_name]):
                _fail(f"--lora-modules: the name {module.name!r} is given twice; give each adapter its own name")
            lora.check_adapter(module, max_rank=args.max_lora_rank, model_dir=local_dir)
            modules.append(module)
    except lora.AdapterError as exc:
        _fail(str(exc))
    return LoraConfig(
        enabled=True,
        modules=tuple(modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )


def _warn_about_flags(args: argparse.Namespace) -> None:
    """One warning for the unknown flags, one for the vLLM flags that do nothing in hfserve."""
    unknown = getattr(args, "unknown_flags", [])
    if unknown:
        logger.warning(
            "ignoring unknown flags: %s",
            "; ".join(f"{name} (did you mean {close}?)" if close else name for name, close in unknown),
        )
    inert = getattr(args, "inert_flags", [])
    if inert:
        logger.warning("vLLM server flags with no effect in hfserve: %s", ", ".join(inert))


def _config(args: argparse.Namespace, source: str, local_dir: Path | None, task: Task | None) -> Config:
    engine_args: dict[str, Any] = dict(getattr(args, "engine_args", {}))
    return Config(
        model=ModelConfig(
            source=source,
            local_dir=local_dir,
            task=task,
            revision=args.model_revision,
            tokenizer_revision=args.tokenizer_revision,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            trust_remote_code=args.trust_remote_code,
            return_probabilities=args.return_probabilities,
            return_raw_logits=args.return_raw_logits,
            return_offsets_mapping=args.return_offsets_mapping,
            return_token_type_ids=args.return_token_type_ids,
            disable_lower_case=args.disable_lower_case,
            disable_special_tokens=args.disable_special_tokens,
            truncate_inputs=args.truncate_inputs,
            lora=getattr(args, "lora", None) or LoraConfig(),
            **_model_defaults(args),
        ),
        server=ServerConfig(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            enable_grpc=args.enable_grpc,
            log_requests=not args.disable_log_requests,
            access_log_format=args.access_log_format,
            max_asyncio_workers=args.max_asyncio_workers,
            enable_docs_url=args.enable_docs_url,
            configure_logging=args.configure_logging,
            log_config_file=args.log_config_file,
            grpc_max_receive_message_length=args.grpc_max_receive_message_length,
            grpc_max_send_message_length=args.grpc_max_send_message_length,
            shutdown_grace_seconds=args.shutdown_grace_seconds,
        ),
        limits=LimitsConfig(
            max_request_body_bytes=args.max_request_body_bytes,
            max_concurrent_requests=args.max_concurrent_requests,
            max_queue_size=args.max_queue_size,
            request_timeout_seconds=args.request_timeout_seconds,
            api_key=args.api_key,
        ),
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            batch_idle_ms=args.batch_idle_ms,
            stall_timeout_seconds=args.stall_timeout_seconds,
            compile=args.compile,
        ),
        engine=EngineConfig(backend=args.backend, engine_args=engine_args),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .server import configure_logging, run

    try:
        configure_logging(args.configure_logging, args.log_config_file)  # resolve's warnings are logged
    except ValueError as exc:
        _fail(str(exc))
    config = resolve(args)

    raise SystemExit(run(config))


