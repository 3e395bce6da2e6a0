"""The server's typed configuration: what the command line resolves to.

:mod:`hfserve.cli` turns the arguments into one frozen :class:`Config`; everything below it
(the server, the app, the middleware, the backends) takes that object or one of its sections
and never sees an argparse namespace. A test, or an embedding program, builds a ``Config``
directly::

    Config(model=ModelConfig(source="/models/minilm", name="minilm"))

Sections:

- :class:`ModelConfig`: which model, under which name, loaded how (task, dtype, context length,
  revisions, tokenizer options);
- :class:`ServerConfig`: listening, logging, shutdown;
- :class:`LimitsConfig`: what protects the model from its clients (body size, admission,
  deadlines, API key);
- :class:`BatchingConfig`: the transformers backend's threads and batch windows;
- :class:`EngineConfig`: the backend choice, and vLLM's own engine arguments carried unchanged
  (``engine_args``, keyed by vLLM's ``AsyncEngineArgs`` field names) to the vLLM backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .tasks import Task

DEFAULT_MODEL_DIR = "/mnt/models"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: the longest a batch waits for more requests once it could start (ms)
DEFAULT_MAX_WAIT_MS = 20.0
#: a forming batch closes once no newcomer has joined it for this long (ms)
DEFAULT_IDLE_MS = 5.0

BACKENDS = ("auto", "huggingface", "vllm")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class LoraModule:
    """One LoRA adapter served under its own model name (``--lora-modules name=path``)."""

    name: str
    path: str
    #: the model it was trained on, as vLLM's JSON form names it (``base_model_name``); informative
    base_model_name: str | None = None


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (vLLM's ``--enable-lora``, ``--lora-modules``, ``--max-loras``, ``--max-lora-rank``,
    ``--max-cpu-loras``), honoured by both backends; defaults are vLLM's."""

    enabled: bool = False
    modules: tuple[LoraModule, ...] = ()
    #: the most different adapters in one batch
    max_loras: int = 1
    #: the highest adapter rank accepted
    max_lora_rank: int = 16
    #: vLLM's CPU cache of adapters (None: ``max_loras``); no effect on the transformers backend
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))


@dataclass(frozen=True)
class ModelConfig:
    #: what to load: a local directory or a Hub id
    source: str
    #: ``source`` when it is a local directory (task inference and sentence-transformers files read it)
    local_dir: Path | None = None
    #: the name served in routes and in ``model`` fields (the one reported in responses)
    name: str = "model"
    #: further names the model answers to on every family (``--served-model-name NAME ALIAS ...``)
    aliases: tuple[str, ...] = ()
    #: None: inferred from the model's config when it is loaded
    task: Task | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    trust_remote_code: bool = False
    return_probabilities: bool = False
    #: classification and fill-mask answer the raw logits (exclusive with return_probabilities)
    return_raw_logits: bool = False
    #: token classification also answers each token's (start, end) character offsets
    return_offsets_mapping: bool = False
    return_token_type_ids: bool = False
    disable_lower_case: bool = False
    disable_special_tokens: bool = False
    #: encoder inputs longer than the context length are cut to it (huggingfaceserver's behaviour)
    #: instead of refused with ``context_length_exceeded``
    truncate_inputs: bool = False
    #: where the sampling defaults come from: ``auto`` (the model's generation_config.json),
    #: ``vllm`` (none: neutral defaults) or a directory holding a generation_config.json
    generation_config: str = "auto"
    #: sampling defaults over the model's (``--override-generation-config``, HF names: max_new_tokens)
    override_generation_config: Mapping[str, Any] = field(default_factory=dict)
    #: the chat template's text, used instead of the tokenizer's (``--chat-template``)
    chat_template: str | None = None
    #: chat template arguments under each request's ``chat_template_kwargs``
    default_chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: the role of the chat completion's message (``--response-role``)
    response_role: str = "assistant"
    #: how messages' content reaches the chat template: ``auto``, ``string`` or ``openai`` (text parts)
    chat_template_content_format: str = "auto"
    #: requests may bring their own chat template (``chat_template``); vLLM's default refuses them
    trust_request_chat_template: bool = False
    #: ``tool_choice: auto`` is served, its output read by ``tool_call_parser`` (``--enable-auto-tool-choice``)
    enable_auto_tool_choice: bool = False
    #: vLLM's tool-call parser name (``hermes``, ``llama3_json``, ``mistral``, ``pythonic``...)
    tool_call_parser: str | None = None
    #: vLLM's reasoning parser name (``deepseek_r1``, ``qwen3``): the reasoning goes to its own field
    reasoning_parser: str | None = None
    #: vLLM's ``--structured-outputs-config`` (``backend``, ``disable_any_whitespace``, ...), both backends
    structured_outputs_config: Mapping[str, Any] = field(default_factory=dict)
    #: LoRA adapters, each served under its own name (generation only)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "structured_outputs_config", _frozen_mapping(self.structured_outputs_config))
        object.__setattr__(self, "override_generation_config", _frozen_mapping(self.override_generation_config))
        object.__setattr__(self, "default_chat_template_kwargs", _frozen_mapping(self.default_chat_template_kwargs))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the model answers to, the reported one first."""
        return (self.name, *(a for a in self.aliases if a != self.name))

    @classmethod
    def local(cls, path: str | Path, **kwargs: Any) -> ModelConfig:
        """A model in a local directory."""
        return cls(source=str(path), local_dir=Path(path), **kwargs)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True
    log_requests: bool = True
    #: gunicorn's access-log format (``--access_log_format``, as KServe); None: hfserve's own line
    access_log_format: str | None = None
    #: threads of the event loop's default executor (None: min(32, CPUs + 4), as KServe)
    max_asyncio_workers: int | None = None
    #: serve the Swagger UI at ``/docs``
    enable_docs_url: bool = False
    #: False: hfserve sets up no logging (an embedding program's own set-up stays)
    configure_logging: bool = True
    #: a logging dictConfig (YAML or JSON) used instead of hfserve's set-up
    log_config_file: str | None = None
    #: largest gRPC request in bytes (None: ``LimitsConfig.max_request_body_bytes``)
    grpc_max_receive_message_length: int | None = None
    #: largest gRPC response in bytes (None or -1: no limit); a larger answer fails with RESOURCE_EXHAUSTED
    grpc_max_send_message_length: int | None = None
    shutdown_grace_seconds: float = 30.0
    #: the OpenAI routes' prefix; None: ``$KSERVE_OPENAI_ROUTE_PREFIX`` or ``openai``
    openai_prefix: str | None = None


@dataclass(frozen=True)
class LimitsConfig:
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: model requests running at once (None: no limit)
    max_concurrent_requests: int | None = None
    #: model requests waiting for a slot; beyond it: overloaded
    max_queue_size: int = 256
    request_timeout_seconds: float | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class BatchingConfig:
    """The transformers backend's batch windows."""

    max_batch_size: int = 32
    max_batch_wait_ms: float = DEFAULT_MAX_WAIT_MS
    batch_idle_ms: float = DEFAULT_IDLE_MS
    #: readiness turns false while the decode loop has work and makes no progress for this long (0: never)
    stall_timeout_seconds: float = 60.0
    #: generation's decode step compiled with torch.compile before the server is ready (``--compile``)
    compile: bool = False


@dataclass(frozen=True)
class EngineConfig:
    #: ``auto``, ``huggingface`` or ``vllm``
    backend: str = "auto"
    #: vLLM's engine arguments, by ``AsyncEngineArgs`` field name, passed to vLLM unchanged
    #: (the model section's source, revisions, dtype, context length and trust_remote_code are
    #: added by the vLLM backend; an entry here overrides what hfserve would choose)
    engine_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_args", _frozen_mapping(self.engine_args))


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def replace(self, **sections: Any) -> Config:
        """A copy with some sections replaced (``config.replace(engine=EngineConfig(...))``)."""
        return dataclasses.replace(self, **sections)
