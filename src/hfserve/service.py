"""The serving layer: one served model, its readiness, and the task operations.

API families call this module with backend-neutral inputs and render what it
returns. It validates against the model (task, context length, limits), keeps
readiness, and runs every backend call inside the backend's
``map_exceptions`` so that only :mod:`hfserve.errors` classes come out.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import chat, errors, lora, parsers
from .backends.base import Backend
from .config import LoraModule, ModelConfig
from .generation import SamplingParams, SequenceDelta, StructuredOutput, TokenLogprob
from .sampling import PENALTIES, UNSUPPORTED_DEFAULTS, SamplingOptions, build_params, generation_defaults
from .structured import json_schema, with_server_config
from .tasks import Task

logger = logging.getLogger("hfserve.service")

T = TypeVar("T")


class State(str, enum.Enum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    stopping = "stopping"


@dataclass
class Choice:
    """A finished sequence, accumulated from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: SequenceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


@dataclass
class Generation:
    choices: list[Choice]
    prompt_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


def cut(ids: list[int], keep: int, *, keep_end: bool) -> list[int]:
    """The last (``keep_end``) or the first ``keep`` ids."""
    if len(ids) <= keep:
        return ids
    return ids[len(ids) - keep :] if keep_end else ids[:keep]


def softmax(row: list[float]) -> list[float]:
    peak = max(row)
    exps = [math.exp(x - peak) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


GENERATION_CONFIG_FILE = "generation_config.json"
GENERATIVE_TASKS = (Task.text_generation, Task.text2text_generation)


def read_generation_config(model: ModelConfig) -> dict[str, Any]:
    """The model's generation_config.json (``{}`` when it has none, or under ``--generation-config vllm``).

    ``model.generation_config`` is ``auto`` (the model's own: its directory, or the Hub
    repository's file), ``vllm`` (none) or a directory. An unreadable file is a ``ValueError``."""
    mode = model.generation_config
    if mode == "vllm":
        return {}
    path: Path | None
    if mode != "auto":
        path = Path(mode) / GENERATION_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"--generation-config {mode} has no {GENERATION_CONFIG_FILE}")
    elif model.local_dir is not None:
        path = model.local_dir / GENERATION_CONFIG_FILE
    else:
        path = _hub_generation_config(model)
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _hub_generation_config(model: ModelConfig) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model.source, GENERATION_CONFIG_FILE, revision=model.revision))
    except Exception as exc:  # noqa: BLE001 - a model without the file (or offline) has no defaults
        logger.debug("no %s for %s: %s", GENERATION_CONFIG_FILE, model.source, exc)
        return None


#: the LoRA adapter the current request selected by its model name (set by ``check_name``)
_SELECTED_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("hfserve_adapter", default=None)


class ModelService:
    """The one model this server serves."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        return_probabilities: bool = False,
        return_raw_logits: bool | None = None,
        truncate_inputs: bool | None = None,
        model: ModelConfig | None = None,
    ):
        self.name = name
        self.backend = backend
        if model is None:  # the backend's model section (names, defaults, templates)
            model = getattr(backend, "model_config", None)
        if not isinstance(model, ModelConfig):  # no model section: no defaults, no template
            model = ModelConfig(source=name, name=name, generation_config="vllm")
        self.model = model
        #: every name the model answers to; ``name`` (the reported one) first
        self.names = (name, *dict.fromkeys(a for a in model.aliases if a != name))
        #: the sampling defaults in force (vLLM's names), set when the model is loaded
        self.generation_defaults: dict[str, Any] = {}
        self.response_role = model.response_role
        self.state = State.loading
        self.return_probabilities = return_probabilities
        if return_raw_logits is None:  # the model section says (``--return_raw_logits``)
            return_raw_logits = model.return_raw_logits
        #: classification and fill-mask answer raw logits
        self.return_raw_logits = return_raw_logits
        #: token classification also answers character offsets (``--return_offsets_mapping``)
        self.return_offsets_mapping = model.return_offsets_mapping
        #: encoder inputs are encoded without special tokens (``--disable_special_tokens``)
        self.add_special_tokens = not model.disable_special_tokens
        if truncate_inputs is None:  # the backend's model section says (``--truncate_inputs``)
            truncate_inputs = bool(getattr(getattr(backend, "model_config", None), "truncate_inputs", False))
        #: cut over-long encoder inputs to the context length instead of refusing them
        self.truncate_inputs = truncate_inputs
        self.created = int(time.time())
        #: tool calling and reasoning: ``tool_choice: auto`` served, and who reads the output
        self.auto_tool_choice = model.enable_auto_tool_choice
        #: the parsers that read a choice's text (classes; ``hf``: the model's response template instead)
        self.tool_parser: type[parsers.ToolCallParser] | None = None
        self.reasoning_parser: type[parsers.ReasoningParser] | None = None
        hf = parsers.RESPONSE_TEMPLATE_PARSER
        if model.tool_call_parser not in (None, hf):
            self.tool_parser = parsers.tool_call_parser(model.tool_call_parser)
        if model.reasoning_parser not in (None, hf):
            self.reasoning_parser = parsers.reasoning_parser(model.reasoning_parser)
        #: what the tokenizer's response_template reads (``--tool-call-parser hf``, ``--reasoning-parser hf``)
        self.template_reads_tools = model.tool_call_parser == hf
        self.template_reads_reasoning = model.reasoning_parser == hf
        #: LoRA adapters served, by name (``--lora-modules``, then dynamic loads), each a model name
        self.adapters: dict[str, LoraModule] = {}
        self._adapter_lock = asyncio.Lock()

    def template_parser(
        self, tools: list[dict[str, Any]], prompt_text: str, *, read_tools: bool
    ) -> parsers.ToolCallParser | None:
        """A reader of one answer by the model's own response template, when the server was told
        to use it (``hf``); None otherwise. ``read_tools``: the request lets the model call tools."""
        read_tools = read_tools and self.template_reads_tools
        if not (read_tools or self.template_reads_reasoning):
            return None
        from transformers.utils.chat_parsing import ResponseParser

        template = self.tokenizer.response_template
        schemas: list[Any] | None = list(tools) or None
        return parsers.ResponseTemplateParser(
            tools,
            make_parser=lambda prefix: ResponseParser(template, prefix=prefix, tools=schemas),
            prompt_text=prompt_text,
            parse_tools=read_tools,
            parse_reasoning=self.template_reads_reasoning,
        )

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            await self.backend.start()
            if self.model.lora.enabled:
                await self._start_adapters()
            if self.backend.task in GENERATIVE_TASKS:
                self.generation_defaults = self._generation_defaults()
            if (self.template_reads_tools or self.template_reads_reasoning) and not getattr(
                self.tokenizer, "response_template", None
            ):
                flag = "--tool-call-parser" if self.template_reads_tools else "--reasoning-parser"
                raise ValueError(
                    f"{flag} hf reads the model's response template, and this model's tokenizer has none "
                    "(no response_template in tokenizer_config.json); name a parser for its output format instead"
                )
        except BaseException:
            self.state = State.failed
            raise
        self.state = State.ready

    def _generation_defaults(self) -> dict[str, Any]:
        """The model's generation config's sampling defaults (with the override), less those this
        backend cannot apply (logged)."""
        defaults = generation_defaults(read_generation_config(self.model), self.model.override_generation_config)
        dropped = [k for k in defaults if k in UNSUPPORTED_DEFAULTS]
        if not self.backend.capabilities.penalties:
            dropped += [k for k in defaults if k in PENALTIES and defaults[k] != (1.0 if k == "repetition_penalty" else 0.0)]
        for k in dropped:
            del defaults[k]
        if dropped:
            logger.warning(
                "the generation config's %s not applied: not supported by the %s backend", ", ".join(dropped), self.backend.name
            )
        if defaults:
            logger.info("sampling defaults from the generation config: %s", json.dumps(defaults, sort_keys=True))
        return defaults

    def begin_shutdown(self) -> None:
        """Readiness turns false at once; new requests get model_not_ready."""
        if self.state is not State.failed:
            self.state = State.stopping

    async def stop(self) -> None:
        self.begin_shutdown()
        await self.backend.stop()

    @property
    def task(self) -> Task:
        assert self.backend.task is not None
        return self.backend.task

    @property
    def ready(self) -> bool:
        return self.state is State.ready and self.backend.healthy()

    @property
    def live(self) -> bool:
        """False once the backend's engine has died for good (the server then exits)."""
        return not self.backend.engine_dead()

    def check_live(self) -> None:
        if not self.live:
            raise errors.ModelNotReady(f"Model {self.name} is not available: its engine has died and the server is exiting", retry_after=10)

    def check_ready(self) -> None:
        if self.ready:
            return
        if self.state is State.loading:
            raise errors.ModelNotReady(f"Model {self.name} is still loading; retry shortly", retry_after=5)
        if self.state is State.stopping:
            raise errors.ModelNotReady(f"Model {self.name} is shutting down; retry on another replica", retry_after=1)
        raise errors.ModelNotReady(f"Model {self.name} is not available: its engine has stopped", retry_after=10)

    def check_name(self, name: str | None, *, param: str | None = None) -> None:
        """Unknown model names are ``model_not_found``, checked before readiness.

        A LoRA adapter's name selects it: the request's later :meth:`sampling_params` (in the same
        task, as every API family calls them) carry the adapter, the base model's names none."""
        if name is not None and name not in self.names and name not in self.adapters:
            raise errors.ModelNotFound(f"Model with name {errors.echo(name)} does not exist.", param=param)
        _SELECTED_ADAPTER.set(name if name in self.adapters else None)

    # ------------------------------------------------------------ LoRA adapters
    def reported_name(self, name: str | None) -> str:
        """The name a response reports for a request to model ``name``: an adapter's own, else the model's."""
        return name if name is not None and name in self.adapters else self.name

    def model_name(self, params: SamplingParams | Sequence[SamplingParams]) -> str:
        """The name a generation's response reports: its adapter's (as vLLM does), else the model's."""
        first = params if isinstance(params, SamplingParams) else (params[0] if params else None)
        return first.adapter if first is not None and first.adapter is not None else self.name

    async def _start_adapters(self) -> None:
        """The ``--lora-modules`` adapters, loaded into the backend (checked by the command line)."""
        if self.backend.task is not Task.text_generation:
            raise ValueError(f"--enable-lora: LoRA adapters are served for text generation only, and this is a {self.task.label} model")
        for module in self.model.lora.modules:
            await self.backend.load_adapter(module.name, module.path)
            self.adapters[module.name] = module
        if self.adapters:
            logger.info("LoRA adapters served: %s", ", ".join(f"{m.name} ({m.path})" for m in self.adapters.values()))

    async def load_adapter(self, name: str, path: str, request_id: str | None = None) -> None:
        """A dynamic load (``load_lora_adapter``): checked as at start-up, then loaded. Errors are
        ``invalid_request``."""
        self.check_ready()
        if not self.model.lora.enabled:
            raise errors.InvalidRequest("LoRA adapters are not enabled on this server; start it with --enable-lora")
        async with self._adapter_lock:
            try:
                lora.check_name(name)
            except lora.AdapterError as exc:
                raise errors.InvalidRequest(str(exc), param="lora_name") from None
            if name in self.adapters or name in self.names:
                raise errors.InvalidRequest(f"The lora adapter {errors.echo(name)} has already been loaded.", param="lora_name")
            module = LoraModule(name, path)
            try:
                await asyncio.to_thread(
                    lora.check_adapter,
                    module,
                    max_rank=self.model.lora.max_lora_rank,
                    model_dir=self.model.local_dir,
                    label=f"LoRA adapter {name!r} ({path})",
                )
            except lora.AdapterError as exc:
                raise errors.InvalidRequest(str(exc), param="lora_path") from None
            with self.backend.map_exceptions(request_id):
                await self.backend.load_adapter(name, path)
            self.adapters[name] = module
        logger.info("loaded LoRA adapter %s from %s", name, path)

    async def unload_adapter(self, name: str, request_id: str | None = None) -> None:
        """A dynamic unload: an adapter that is not loaded is ``model_not_found``."""
        async with self._adapter_lock:
            if name not in self.adapters:
                raise errors.ModelNotFound(f"The lora adapter {errors.echo(name)} cannot be found.", param="lora_name")
            del self.adapters[name]  # new requests no longer select it
            with self.backend.map_exceptions(request_id):
                await self.backend.unload_adapter(name)
        logger.info("unloaded LoRA adapter %s", name)

    def require(self, operation: str, *tasks: Task) -> None:
        self.check_ready()
        if self.task not in tasks:
            wanted = " or ".join(t.label for t in tasks)
            raise errors.UnsupportedTask(
                f"Model {self.name} is a {self.task.label} model; {operation} needs a {wanted} model"
            )

    # ----------------------------------------------------------- tokenizing
    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self.backend.map_exceptions():
            return self.backend.encode_text(text, add_special_tokens)

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        for i, tid in enumerate(ids):
            if tid < 0 or tid >= vocab:
                raise errors.InvalidRequest(
                    f"token id {tid} is outside the vocabulary (0..{vocab - 1})", param=f"{param}.{i}"
                )
        return ids

    def render_chat(
        self,
        messages: list[chat.ChatMessage],
        *,
        chat_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> chat.ChatPrompt:
        """The prompt of a chat: the request's template, else the server's (``--chat-template``),
        else the tokenizer's; the request's template arguments over the server's defaults."""
        kwargs = {**self.model.default_chat_template_kwargs, **(template_kwargs or {})}
        kwargs_template = kwargs.pop("chat_template", None)  # vLLM also takes it there
        if chat_template is None and isinstance(kwargs_template, str):
            chat_template = kwargs_template
        template = chat_template if chat_template is not None else self.model.chat_template
        with self.backend.map_exceptions():
            text = chat.render(
                self.tokenizer,
                messages,
                chat_template=template,
                template_kwargs=kwargs,
                content_format=self.model.chat_template_content_format,
                **options,
            )
            # the template already holds the special tokens it wants
            return chat.ChatPrompt(text, self.tokenize(text, add_special_tokens=False))

    # ----------------------------------------------------------- truncation
    def truncation(self, value: int | None, *, generative: bool, param: str = "truncate_prompt_tokens") -> int | None:
        """A request's ``truncate_prompt_tokens`` checked: None (no truncation) or how many tokens to keep.

        vLLM's meaning: -1 is the context length (less one token for the output on the
        generation routes); otherwise from 1 to the context length. vLLM also refuses more
        than the context length; 0 would leave an empty prompt, which is refused here."""
        if value is None:
            return None
        limit = self.backend.max_model_len
        if value == -1:
            return max(1, limit - 1) if generative else limit
        if not 1 <= value <= limit:
            minus_one = "the context length less one token for the output" if generative else "the context length"
            raise errors.InvalidRequest(
                f"{param} ({value}) must be from 1 to the model's context length of {limit} tokens, "
                f"or -1 for {minus_one}",
                param=param,
            )
        return value

    def tokenize_truncated(self, text: str, keep: int, *, keep_end: bool, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, cut to at most ``keep`` tokens as the tokenizer truncates.

        As ``tokenizer(text, truncation=True, max_length=keep)`` with ``truncation_side`` left
        (``keep_end``: the last tokens of the text stay) or right (the first stay): the special
        tokens the tokenizer adds (BOS, [CLS] ... [SEP]) are kept and the text between them is
        cut. When ``keep`` leaves no room for the text, the ids are cut plainly (as vLLM does)."""
        ids = self.tokenize(text, add_special_tokens=add_special_tokens)
        if len(ids) <= keep:
            return ids
        if add_special_tokens:
            content = self.tokenize(text, add_special_tokens=False)
            added = len(ids) - len(content)
            start = next((p for p in range(added + 1) if ids[p : p + len(content)] == content), None) if added >= 0 else None
            if start is not None and keep >= added:
                room = keep - added
                kept = content[len(content) - room :] if keep_end else content[:room]
                return ids[:start] + kept + ids[start + len(content) :]
        return cut(ids, keep, keep_end=keep_end)

    # --------------------------------------------------------- encoder inputs
    def encode_inputs(
        self, texts: list[str], param: str, *, refuse_empty_text: bool = False, keep: int | None = None
    ) -> list[list[int]]:
        """Tokenize encoder inputs. An input longer than the context length is an error, unless
        the server truncates (``--truncate_inputs``) or the request does (``keep``: tokens to keep,
        from :meth:`truncation`): then it is cut at its end, its special tokens kept, as
        huggingfaceserver's tokenizer and vLLM's pooling models do. With ``refuse_empty_text``
        an empty string is an error too (OpenAI's embeddings refuse it; the tokenizer would turn
        it into special tokens alone)."""
        if not texts:
            raise errors.InvalidRequest(f"{param} must contain at least one input", param=param)
        indexed = len(texts) > 1 or param.endswith("s")
        if refuse_empty_text and "" in texts:
            where = f"{param}.{texts.index('')}" if indexed else param
            raise errors.InvalidRequest(f"{where} is an empty string; send some text", param=where)
        keep = self._encoder_keep(keep)
        if keep is None:
            inputs = [self.tokenize(text, add_special_tokens=self.add_special_tokens) for text in texts]
        else:
            inputs = [
                self.tokenize_truncated(text, keep, keep_end=False, add_special_tokens=self.add_special_tokens)
                for text in texts
            ]
        return self.check_inputs(inputs, param, indexed=indexed, keep=keep)

    def offset_mapping(self, texts: list[str], inputs: list[list[int]]) -> list[list[tuple[int, int]]]:
        """Each input token's (start, end) character offsets in its text, as the tokenizer's
        ``offset_mapping`` gives them ((0, 0) for special tokens), for ``inputs`` from
        :meth:`encode_inputs` (a truncated input: as the tokenizer truncates it)."""
        out = []
        with self.backend.map_exceptions():
            for text, ids in zip(texts, inputs, strict=True):
                enc = self.tokenizer(
                    text, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True,
                    truncation=True, max_length=len(ids),
                )
                out.append([(int(s), int(e)) for s, e in enc["offset_mapping"]])
        return out

    def check_inputs(
        self, inputs: list[list[int]], param: str, *, indexed: bool = True, keep: int | None = None
    ) -> list[list[int]]:
        """Encoder inputs as token ids: none empty, none longer than the context length (those
        given as token ids are cut to their first ``keep`` ids, or to the context length under
        ``--truncate_inputs``, instead)."""
        keep = self._encoder_keep(keep)
        limit = self.backend.max_model_len
        out = []
        for i, ids in enumerate(inputs):
            where = f"{param}.{i}" if indexed else param
            if not ids:
                raise errors.InvalidRequest("an input must not be empty", param=where)
            if keep is not None:
                ids = cut(ids, keep, keep_end=False)
            if len(ids) > limit:
                raise errors.ContextLengthExceeded(
                    f"Input {i} is {len(ids)} tokens long, more than the model's context length of "
                    f"{limit} tokens; shorten it",
                    param=where,
                )
            out.append(ids)
        return out

    def _encoder_keep(self, keep: int | None) -> int | None:
        """The request's truncation, else the server's (the context length), else none."""
        if keep is None and self.truncate_inputs:
            return self.backend.max_model_len
        return keep

    # ------------------------------------------------------------ generation
    def sampling_params(
        self, opts: SamplingOptions, prompt_tokens: int, *, structured: StructuredOutput | None = None, **options: Any
    ) -> SamplingParams:
        """``opts`` checked against this model's context length and its backend's abilities.

        ``structured``: the request's constraint (:mod:`hfserve.structured`), put on the params
        under the server's ``--structured-outputs-config``; it is compiled (and so checked) when
        the generation starts, before its first output (:meth:`generate`)."""
        params = build_params(
            opts,
            prompt_tokens=prompt_tokens,
            max_model_len=self.backend.max_model_len,
            capabilities=self.backend.capabilities,
            defaults=self.generation_defaults,
            **options,
        )
        if structured is not None:
            params.structured = self.structured(structured)
        params.adapter = _SELECTED_ADAPTER.get()
        return params

    @property
    def disable_any_whitespace(self) -> bool:
        """The server's ``--structured-outputs-config`` ``disable_any_whitespace``."""
        return bool(self.model.structured_outputs_config.get("disable_any_whitespace", False))

    def structured(self, so: StructuredOutput) -> StructuredOutput:
        """A constraint checked against the backend's abilities and statically (a JSON schema's
        keywords: :func:`hfserve.structured.json_schema`), under the server's
        ``--structured-outputs-config``."""
        param = so.param or "structured_outputs"
        if not self.backend.capabilities.structured_outputs:
            raise errors.UnsupportedParameter(
                f"{param}: structured outputs are not supported by the {self.backend.name} backend for this model; "
                "remove the constraint",
                param=param,
            )
        if so.kind == "json":
            checked = json_schema(so.source, param=param)
            so = StructuredOutput("json", checked.source, so.disable_any_whitespace, so.param)
        return with_server_config(so, self.model.structured_outputs_config)

    async def check_structured(self, so: StructuredOutput | None, request_id: str | None = None) -> StructuredOutput | None:
        """:meth:`structured`, then compiled now (off the event loop, within the time limit): the
        constraint to put on the params, or its error (``invalid_request`` /
        ``unsupported_parameter`` with ``so.param``). For constraints built outside
        :meth:`sampling_params` (tool calling). None stays None."""
        if so is None:
            return None
        so = self.structured(so)
        await self.prepare_structured(so, request_id)
        return so

    async def prepare_structured(self, so: StructuredOutput, request_id: str | None = None) -> None:
        """Compile (and so check) a constraint now: its errors, contract errors with its param.
        :meth:`generate` does it before the first output; tool calling may call it earlier."""
        with self.backend.map_exceptions(request_id):
            await self.backend.prepare_structured(so)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        """Stream deltas; only contract errors come out."""
        self.check_ready()
        if params.stop_token_ids:
            self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.structured is not None:  # before any output: an invalid constraint is a plain 400
            await self.prepare_structured(params.structured, request_id)
        stream = self.backend.generate(prompt_ids, params, request_id)
        try:
            while True:
                with self.backend.map_exceptions(request_id):
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        return
                yield item
        finally:
            await close(stream)

    async def generate_full(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Generation:
        choices = [Choice(index=i) for i in range(params.n)]
        result = Generation(choices=choices, prompt_tokens=len(prompt_ids))
        async for deltas in self.generate(prompt_ids, dataclasses.replace(params, whole=True), request_id):
            for delta in deltas:
                if delta.prompt_logprobs is not None:
                    result.prompt_logprobs = delta.prompt_logprobs
                choices[delta.index].add(delta)
        return result

    async def generate_all(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams], request_id: str
    ) -> list[Generation]:
        """One full generation per prompt (``params[i]`` for ``prompts[i]``), run side by side.

        They stand or fall together (see :func:`run_all`): when one fails, or the request is
        cancelled (its deadline passed, its client went away), the others stop at once."""
        return await run_all([self.generate_full(ids, p, request_id) for ids, p in zip(prompts, params, strict=True)])

    # --------------------------------------------------------- encoder tasks
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        with self.backend.map_exceptions():
            return await self.backend.embed(inputs)

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        with self.backend.map_exceptions():
            return await self.backend.classify(inputs)

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        with self.backend.map_exceptions():
            return await self.backend.classify_tokens(inputs)

    async def fill_mask(self, inputs: list[list[int]], top_k: int = 1) -> list[list[list[tuple[int, float]]]]:
        mask_id = getattr(self.tokenizer, "mask_token_id", None)
        for i, ids in enumerate(inputs):
            if mask_id is None or mask_id not in ids:
                token = getattr(self.tokenizer, "mask_token", None) or "[MASK]"
                raise errors.InvalidRequest(
                    f"Input {i} has no mask token; put {token} where a word should be predicted", param=None
                )
        with self.backend.map_exceptions():
            return await self.backend.fill_mask(inputs, top_k)

    def decode_token(self, token_id: int) -> str:
        with self.backend.map_exceptions():
            return self.tokenizer.decode([token_id])

    def label(self, class_id: int) -> str:
        return self.backend.labels.get(class_id, str(class_id))


async def run_all(work: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``work`` concurrently, as a task group does; the results in order.

    The first failure cancels the rest, and so does cancelling the caller; the rest are
    awaited before the failure (or the cancellation) goes on, so no work outlives the
    request that asked for it. (``asyncio.gather`` leaves the others running when one
    fails; ``asyncio.TaskGroup`` needs Python 3.11.)
    """
    if len(work) <= 1:
        return [await w for w in work]
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                raise failure
        return [task.result() for task in tasks]
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel the tasks that are still running and wait until every one has ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators, yielding ``(stream index, item)``.

    The first exception from any stream is raised; every stream is closed
    (and so its work cancelled) when the consumer stops.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None, False))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, exc, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, exc, done = await queue.get()
            if exc is not None:
                if isinstance(exc, asyncio.CancelledError):
                    raise errors.ClientDisconnected() from None
                raise exc
            if done:
                remaining -= 1
                continue
            yield i, item
    finally:
        await cancel_all(tasks)
        for s in streams:
            await close(s)


async def close(stream: AsyncIterator[Any]) -> None:
    """Close an async iterator that can be closed (an async generator): its work is cancelled."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
