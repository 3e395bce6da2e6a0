"""Command line: a drop-in for KServe huggingfaceserver's flags.

:func:`resolve` turns the parsed arguments into the typed :class:`~hfserve.config.Config`
that everything below takes. Bad flags, conflicting flags, a missing model directory or an
unsupported task end with one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

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
    ModelConfig,
    ServerConfig,
)
from .sampling import generation_defaults
from .storage import StorageError, is_uri, localize
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


def _model_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """--served-model-name, the generation config and the chat template flags, checked."""
    names = list(args.served_model_name or [args.model_name])
    if any(not n.strip() for n in names):
        _fail("--served-model-name has an empty name")
    mode = args.generation_config
    if mode not in ("auto", "vllm") and not Path(mode).is_dir():
        _fail(f"--generation-config {mode} is not auto, vllm or a directory")
    try:
        generation_defaults({}, args.override_generation_config)
    except ValueError as exc:
        _fail(f"--override-generation-config: {exc}")
    return {
        "name": names[0],
        "aliases": tuple(dict.fromkeys(n for n in names[1:] if n != names[0])),
        "generation_config": mode,
        "override_generation_config": args.override_generation_config or {},
        "chat_template": None if args.chat_template is None else _chat_template(args.chat_template),
        "default_chat_template_kwargs": args.default_chat_template_kwargs or {},
        "response_role": args.response_role,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hfserve: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hfserve",
        description="Serve a Hugging Face model over KServe v1/v2 (REST, gRPC) and OpenAI-compatible APIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    m = p.add_argument_group("model")
    m.add_argument("--model_id", help="Hugging Face Hub model id (downloaded unless HF_HUB_OFFLINE=1)")
    m.add_argument("--model_dir", help=f"local model directory (default {DEFAULT_MODEL_DIR} when no --model_id)")
    m.add_argument("--model_name", default="model", help="name the model is served under")
    m.add_argument("--model_revision", help="Hub revision of the model")
    m.add_argument("--tokenizer_revision", help="Hub revision of the tokenizer")
    m.add_argument("--task", help="one of: " + ", ".join(t.value for t in Task) + " (inferred from the config if omitted)")
    m.add_argument("--backend", default="auto", choices=BACKENDS, help="model runtime")
    m.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype (auto: float32 on CPU, float16 on GPU)")
    m.add_argument("--max_model_len", "--max_length", dest="max_model_len", type=int, help="context length (default: from the model config)")
    m.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the Hub")
    m.add_argument("--return_probabilities", action="store_true", help="classification tasks return probabilities instead of class ids")
    m.add_argument("--return_token_type_ids", action="store_true", help="pass token type ids to encoder models")
    m.add_argument("--disable_lower_case", action="store_true", help="accepted for compatibility (tokenizers keep their own casing)")
    m.add_argument("--disable_special_tokens", action="store_true", help="accepted for compatibility (special tokens follow the tokenizer)")
    m.add_argument("--truncate_inputs", action="store_true", help="cut encoder inputs (embeddings, classification, fill-mask) longer than the context length to it, as huggingfaceserver does, instead of answering 400 context_length_exceeded")
    m.add_argument("--served-model-name", "--served_model_name", nargs="+", dest="served_model_name", metavar="NAME", help="names the model answers to on every API (vLLM's flag); the first is reported in responses (default: --model_name)")
    m.add_argument("--generation-config", "--generation_config", dest="generation_config", default="auto", help="sampling defaults: auto (the model's generation_config.json), vllm (none), or a directory holding a generation_config.json")
    m.add_argument("--override-generation-config", "--override_generation_config", dest="override_generation_config", type=_json_object, default=None, help='JSON object over the generation config\'s sampling defaults, e.g. \'{"temperature": 0.5}\'')
    m.add_argument("--chat-template", "--chat_template", dest="chat_template", default=None, help="chat template used instead of the tokenizer's: a file, or the template itself")
    m.add_argument("--default-chat-template-kwargs", "--default_chat_template_kwargs", dest="default_chat_template_kwargs", type=_json_object, default=None, help='JSON object of chat template arguments under each request\'s chat_template_kwargs, e.g. \'{"enable_thinking": false}\'')
    m.add_argument("--response-role", "--response_role", dest="response_role", default="assistant", help="role of the chat completion's message when the request asks for a new one")
    s = p.add_argument_group("server")
    s.add_argument("--http_port", type=int, default=8080)
    s.add_argument("--grpc_port", type=int, default=8081)
    s.add_argument("--enable_grpc", type=_bool, default=True, help="serve the Open Inference Protocol over gRPC")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on")
    s.add_argument("--workers", type=int, default=1, help="accepted for compatibility; only 1 is supported")
    s.add_argument("--max_threads", type=int, default=4, help="threads running model work")
    s.add_argument("--max_batch_size", type=int, default=32, help="most inputs (generation: sequences) sharing one forward pass (transformers backend)")
    s.add_argument("--max_batch_wait_ms", type=float, default=DEFAULT_MAX_WAIT_MS, help="longest a batch waits for more requests after its first (transformers backend)")
    s.add_argument("--batch_idle_ms", type=float, default=DEFAULT_IDLE_MS, help="a forming batch closes once no request has joined it for this long (transformers backend)")
    s.add_argument("--disable_log_requests", action="store_true", help="no access log line per request")
    s.add_argument("--max_request_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    s.add_argument("--max_concurrent_requests", type=int, default=None, help="model requests running at once (default: no limit)")
    s.add_argument("--max_queue_size", type=int, default=256, help="model requests waiting for a slot; beyond it: 503 overloaded")
    s.add_argument("--request_timeout_seconds", type=float, default=None, help="deadline of a request (x-request-timeout overrides it); then 504")
    s.add_argument("--api_key", default=os.environ.get("HFSERVE_API_KEY"), help="require 'Authorization: Bearer KEY' on model routes (or set HFSERVE_API_KEY)")
    s.add_argument("--shutdown_grace_seconds", type=float, default=30.0, help="on SIGTERM, how long in-flight requests may take to finish")
    v = p.add_argument_group("vLLM engine")
    v.add_argument("--tensor_parallel_size", type=int, default=1)
    v.add_argument("--gpu_memory_utilization", type=float, default=0.9)
    v.add_argument("--max_num_seqs", type=int, default=None)
    v.add_argument("--enforce_eager", action="store_true")
    v.add_argument("--max_logprobs", type=int, default=20)
    return p


#: flags of the "vLLM engine" group: passed to vLLM under the same name (AsyncEngineArgs fields)
ENGINE_FLAGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "max_logprobs")


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
    return _config(args, model, local_dir, task)


def _config(args: argparse.Namespace, source: str, local_dir: Path | None, task: Task | None) -> Config:
    engine_args: dict[str, Any] = {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}
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
            return_token_type_ids=args.return_token_type_ids,
            disable_lower_case=args.disable_lower_case,
            disable_special_tokens=args.disable_special_tokens,
            truncate_inputs=args.truncate_inputs,
            **_model_defaults(args),
        ),
        server=ServerConfig(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            enable_grpc=args.enable_grpc,
            log_requests=not args.disable_log_requests,
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
            max_threads=max(1, args.max_threads),
            max_batch_size=args.max_batch_size,
            max_batch_wait_ms=args.max_batch_wait_ms,
            batch_idle_ms=args.batch_idle_ms,
        ),
        engine=EngineConfig(backend=args.backend, engine_args=engine_args),
    )


def main(argv: list[str] | None = None) -> None:
    config = resolve(build_parser().parse_args(argv))
    from .server import run

    raise SystemExit(run(config))


