"""The OpenAI-compatible API family: completions, chat, embeddings, models.

Request models are hfserve's own (with the ranges the OpenAI API documents);
responses are built from the ``openai`` package's types so that the ``openai``
SDK reads them unchanged. Errors are rendered as the OpenAI error object.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Request, Response
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types import Model as OpenAIModel
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion import ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message_tool_call import Function as ToolCallFunction
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from pydantic import BaseModel, ConfigDict, Field

from .. import errors, tools
from ..chat import ChatMessage
from ..chat_output import ChoiceReader, DeltaParts, MessageParts
from ..generation import SequenceDelta, TokenLogprob
from ..parsers.tool_calls import ToolCallDelta
from ..sampling import SamplingOptions
from ..scoring import embedding_dimensions
from ..service import ModelService, cut, merge
from ..structured import from_request as structured_output
from ..tasks import Task
from .routing import (
    ContractRoute,
    JSONResponse,
    admit,
    json_schema_body,
    read_json,
    request_id,
    sse,
    sse_response,
    until_disconnect,
)

router = APIRouter(route_class=ContractRoute, tags=["openai"])

GENERATIVE = (Task.text_generation, Task.text2text_generation)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# --------------------------------------------------------------------- errors
def error_body(err: errors.HFServeError) -> dict[str, Any]:
    """The OpenAI error object: all four keys, always."""
    return {"error": {"message": err.message, "type": err.error_class.openai_type, "param": err.param, "code": err.code}}


def render_error(err: errors.HFServeError, headers: dict[str, str]) -> Response:
    return JSONResponse(error_body(err), status_code=err.http_status, headers=headers)


def error_event(err: errors.HFServeError) -> str:
    return sse(json.dumps(error_body(err)))


DONE = sse("[DONE]")


# ------------------------------------------------------------------- requests
#: vLLM's per-request truncation (its range is checked by the service, with the limit in the message)
TruncatePromptTokens = Annotated[
    int | None,
    Field(
        description="keep only this many prompt tokens (the last ones; embeddings: the first ones), or -1 for "
        "the model's context length; the special tokens the tokenizer adds are kept"
    ),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class CompletionRequest(SamplingOptions):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's request extra


def _structured(body: CompletionRequest | ChatCompletionRequest) -> Any:
    """The request's output constraint (``response_format`` / ``structured_outputs``), or None."""
    rf = body.response_format.model_dump() if body.response_format is not None else None
    return structured_output(response_format=rf, structured_outputs=body.structured_outputs)


class ChatCompletionRequest(SamplingOptions):
    model: str
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's request extra
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    truncate_prompt_tokens: TruncatePromptTokens = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens = None


# ------------------------------------------------------------------- helpers
def _service(request: Request) -> ModelService:
    return request.app.state.service


def _check_model(service: ModelService, name: str) -> None:
    service.check_name(name, param="model")


def _prompts(
    service: ModelService, prompt: str | list[str] | list[int] | list[list[int]], keep: int | None = None
) -> list[tuple[list[int], str]]:
    """Each prompt as (token ids, text), cut to its last ``keep`` tokens (``truncate_prompt_tokens``)."""
    if isinstance(prompt, str):
        return [_text_prompt(service, prompt, keep)]
    if not prompt:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    # the schema admits a list of one kind only: texts, token ids, or lists of token ids
    if all(isinstance(p, str) for p in prompt):
        return [_text_prompt(service, p, keep) for p in cast("list[str]", prompt)]
    if all(isinstance(p, int) for p in prompt):
        ids = service.check_token_ids(list(cast("list[int]", prompt)), "prompt")
        return [_ids_prompt(service, ids, keep)]
    out = []
    for i, token_ids in enumerate(cast("list[list[int]]", prompt)):
        if not token_ids:
            raise errors.InvalidRequest("a token-id prompt must not be empty", param=f"prompt.{i}")
        ids = service.check_token_ids(list(token_ids), f"prompt.{i}")
        out.append(_ids_prompt(service, ids, keep))
    return out


def _text_prompt(service: ModelService, text: str, keep: int | None) -> tuple[list[int], str]:
    ids = service.tokenize(text)
    if keep is None or len(ids) <= keep:
        return ids, text
    ids = service.tokenize_truncated(text, keep, keep_end=True)
    # cut: echo returns the text the model saw
    return ids, service.tokenizer.decode(ids, skip_special_tokens=True)


def _ids_prompt(service: ModelService, ids: list[int], keep: int | None) -> tuple[list[int], str]:
    if keep is not None:
        ids = cut(ids, keep, keep_end=True)
    return ids, service.tokenizer.decode(ids)


def _check_stream_options(body: CompletionRequest | ChatCompletionRequest) -> None:
    options = body.stream_options
    if options is not None and not body.stream:
        raise errors.InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise errors.InvalidRequest(
            "stream_options.continuous_usage_stats puts usage on every chunk in addition to the final usage "
            "chunk, so it needs stream_options.include_usage to be true; set include_usage or remove "
            "continuous_usage_stats",
            param="stream_options.continuous_usage_stats",
        )


def _usage_wanted(body: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk), as vLLM reads ``stream_options``."""
    options = body.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.include_usage and options.continuous_usage_stats


def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _count_tokens(request: Request, prompt_tokens: int, completion_tokens: int) -> None:
    metrics = request.app.state.metrics
    metrics.prompt_tokens.inc(prompt_tokens)
    metrics.generation_tokens.inc(completion_tokens)


class _CompletionLogprobs:
    """Builds the legacy completions ``logprobs`` object incrementally."""

    def __init__(self, k: int, offset: int = 0):
        self.k = k
        self.offset = offset

    def build(self, entries: list[TokenLogprob | None]) -> Logprobs:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for e in entries:
            if e is None:
                continue
            tokens.append(e.token)
            if math.isnan(e.logprob):  # the first prompt token: nothing came before it
                token_logprobs.append(None)
                top.append(None)
            else:
                token_logprobs.append(e.logprob)
                tops = {tok: lp for _, tok, lp in e.top[: self.k]}
                tops.setdefault(e.token, e.logprob)
                top.append(tops)
            offsets.append(self.offset)
            self.offset += len(e.token)
        # model_construct: the first echoed prompt token has null logprobs, which the type forbids
        return Logprobs.model_construct(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


def _prompt_entries(service: ModelService, ids: list[int], plps: list[TokenLogprob | None] | None) -> list[TokenLogprob | None]:
    if plps is None:
        return []
    first = TokenLogprob(ids[0], service.decode_token(ids[0]), float("nan")) if ids else None
    return [first, *plps[1:]] if first is not None else list(plps)


# -------------------------------------------------------------- completions
@router.post("/completions", openapi_extra=json_schema_body(CompletionRequest), response_model=None)
@ContractRoute.declare("openai", model_work=True)
async def create_completion(request: Request) -> Response:
    service = _service(request)
    body = await read_json(request, CompletionRequest)
    _check_model(service, body.model)
    service.require("the completions route", *GENERATIVE)
    if body.suffix:
        raise errors.UnsupportedParameter("suffix is not supported by this server; remove it", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise errors.UnsupportedParameter(
            f"best_of ({body.best_of}) different from n ({body.n}) is not supported; remove best_of", param="best_of"
        )
    _check_stream_options(body)
    await admit(request)
    prompts = _prompts(service, body.prompt, service.truncation(body.truncate_prompt_tokens, generative=True))
    want_prompt_lp = body.logprobs if (body.echo and body.logprobs is not None) else None
    constraint = _structured(body)
    params = [
        service.sampling_params(
            body,
            len(ids),
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
            logprobs=body.logprobs,
            prompt_logprobs=want_prompt_lp,
            structured=constraint,
        )
        for ids, _ in prompts
    ]
    rid = request_id(request)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    n = body.n

    if body.stream:
        return await _stream_completion(request, service, body, prompts, params, cid, created)

    results = await until_disconnect(request, service.generate_all([ids for ids, _ in prompts], params, rid))
    choices = []
    prompt_total = completion_total = 0
    for p_index, ((ids, text), gen) in enumerate(zip(prompts, results)):
        prompt_total += gen.prompt_tokens
        completion_total += gen.completion_tokens
        for c in gen.choices:
            out_text = (text + c.text) if body.echo else c.text
            lp = None
            if body.logprobs is not None:
                builder = _CompletionLogprobs(body.logprobs)
                entries = _prompt_entries(service, ids, gen.prompt_logprobs) if body.echo else []
                lp = builder.build([*entries, *(c.logprobs or [])])
            choices.append(
                CompletionChoice(
                    index=p_index * n + c.index,
                    text=out_text,
                    logprobs=lp,
                    finish_reason=c.finish_reason or "length",  # type: ignore[arg-type]
                    stop_reason=c.stop_reason,  # type: ignore[call-arg]  # vLLM-compatible extension
                )
            )
    _count_tokens(request, prompt_total, completion_total)
    completion = Completion(
        id=cid,
        object="text_completion",
        created=created,
        model=service.model_name(params),
        choices=choices,
        usage=_usage(prompt_total, completion_total),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


async def _stream_completion(
    request: Request,
    service: ModelService,
    body: CompletionRequest,
    prompts: list[tuple[list[int], str]],
    params: list[Any],
    cid: str,
    created: int,
) -> Response:
    rid = request_id(request)
    n = body.n
    include_usage, continuous_usage = _usage_wanted(body)
    streams = [service.generate(ids, p, rid) for (ids, _), p in zip(prompts, params)]

    async def events() -> AsyncIterator[str]:
        builders: dict[int, _CompletionLogprobs] = {}
        started: set[int] = set()
        generated = [0] * (len(prompts) * n)  # tokens so far, per choice
        async for p_index, deltas in merge(streams):
            ids, text = prompts[p_index]
            for d in deltas:
                index = p_index * n + d.index
                generated[index] += len(d.token_ids)
                out_text = d.text
                entries: list[TokenLogprob | None] = []
                if index not in started:
                    started.add(index)
                    if body.echo:
                        out_text = text + out_text
                        entries = _prompt_entries(service, ids, d.prompt_logprobs)
                lp = None
                if body.logprobs is not None:
                    builder = builders.setdefault(index, _CompletionLogprobs(body.logprobs))
                    lp = builder.build(entries + (d.logprobs or []))
                chunk = Completion.model_construct(
                    id=cid,
                    object="text_completion",
                    created=created,
                    model=service.model_name(params),
                    choices=[
                        # model_construct: a chunk's finish_reason is null until the end
                        CompletionChoice.model_construct(
                            index=index,
                            text=out_text,
                            logprobs=lp,
                            finish_reason=d.finish_reason,
                            stop_reason=d.stop_reason,
                        )
                    ],
                    # vLLM's continuous usage: this prompt's tokens and this choice's tokens so far
                    usage=_usage(len(ids), generated[index]) if continuous_usage else None,
                )
                yield sse(chunk.model_dump_json())
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_tokens = sum(generated)
        _count_tokens(request, prompt_tokens, completion_tokens)
        if include_usage:
            chunk = Completion(
                id=cid,
                object="text_completion",
                created=created,
                model=service.model_name(params),
                choices=[],
                usage=_usage(prompt_tokens, completion_tokens),
            )
            yield sse(chunk.model_dump_json())

    return await sse_response(request, events(), error_event, DONE)


# --------------------------------------------------------------------- chat
def _chat_logprobs(entries: list[TokenLogprob] | None, k: int) -> list[ChatCompletionTokenLogprob]:
    out = []
    for e in entries or []:
        out.append(
            ChatCompletionTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=tok, logprob=lp, bytes=list(tok.encode("utf-8"))) for _, tok, lp in e.top[:k]
                ],
            )
        )
    return out


def _check_chat_options(service: ModelService, body: ChatCompletionRequest) -> None:
    from_request = body.chat_template is not None or "chat_template" in (body.chat_template_kwargs or {})
    if from_request and not service.model.trust_request_chat_template:
        raise errors.InvalidRequest(
            "this server does not take chat templates from requests; remove chat_template (the model's or the "
            "server's --chat-template is used), or start the server with --trust-request-chat-template",
            param="chat_template",
        )
    if body.functions:
        raise errors.UnsupportedParameter(
            "functions (OpenAI's deprecated form of tools) is not supported; send tools", param="functions"
        )
    if body.function_call not in (None, "none", "auto"):
        raise errors.UnsupportedParameter(
            "function_call (OpenAI's deprecated form of tool_choice) is not supported; send tool_choice",
            param="function_call",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    _check_stream_options(body)


def _response_role(service: ModelService, body: ChatCompletionRequest) -> str:
    """vLLM's choice: ``--response-role`` when the prompt asks for a new message, else the role
    of the message being continued."""
    if body.add_generation_prompt or not body.messages:
        return service.response_role
    return body.messages[-1].role


def _reasoning_fields(reasoning: str | None) -> dict[str, Any]:
    """The reasoning under vLLM's name and the name other clients read; absent without any."""
    return {} if reasoning is None else {"reasoning": reasoning, "reasoning_content": reasoning}


def _message(role: str, parts: MessageParts) -> ChatCompletionMessage:
    calls = [
        ChatCompletionMessageToolCall(id=c.id, type="function", function=ToolCallFunction(name=c.name, arguments=c.arguments))
        for c in parts.tool_calls
    ]
    fields: dict[str, Any] = {"content": parts.content, **_reasoning_fields(parts.reasoning)}
    if calls:
        fields["tool_calls"] = calls
    if role == "assistant":
        return ChatCompletionMessage(role="assistant", **fields)
    return ChatCompletionMessage.model_construct(role=role, **fields)  # another --response-role


def _delta(role: str | None, parts: DeltaParts) -> ChoiceDelta:
    """A chunk's delta: only the parts this piece of text added (and the role on a choice's first)."""
    fields: dict[str, Any] = {}
    if role is not None or parts.content or not (parts.reasoning or parts.tool_calls):
        fields["content"] = parts.content
    if parts.reasoning:
        fields.update(_reasoning_fields(parts.reasoning))
    if parts.tool_calls:
        fields["tool_calls"] = [_delta_call(c) for c in parts.tool_calls]
    if role is None:
        return ChoiceDelta(**fields)
    if role in ("assistant", "developer", "system", "user", "tool"):
        return ChoiceDelta(role=role, **fields)  # type: ignore[arg-type]
    return ChoiceDelta.model_construct(role=role, **fields)


def _delta_call(call: ToolCallDelta) -> ChoiceDeltaToolCall:
    """A call's first delta carries its id, type and name (and empty arguments); later ones only
    an argument fragment: only those fields are set, so only they are sent."""
    if call.id is None:
        return ChoiceDeltaToolCall(index=call.index, function=ChoiceDeltaToolCallFunction(arguments=call.arguments))
    return ChoiceDeltaToolCall(
        index=call.index, id=call.id, type="function", function=ChoiceDeltaToolCallFunction(name=call.name, arguments=call.arguments)
    )


def _tool_plan(service: ModelService, body: ChatCompletionRequest) -> tools.ToolPlan:
    return tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls, auto_enabled=service.auto_tool_choice)


def _reader(service: ModelService, plan: tools.ToolPlan, prompt_text: str, constrained: bool) -> ChoiceReader:
    return ChoiceReader(
        plan,
        tool_parser=service.tool_parser,
        reasoning_parser=service.reasoning_parser,
        prompt_text=prompt_text,
        constrained=constrained,
        template_parser=service.template_parser(plan.tools, prompt_text, read_tools=plan.mode == "auto"),
    )


@router.post("/chat/completions", openapi_extra=json_schema_body(ChatCompletionRequest), response_model=None)
@ContractRoute.declare("openai", model_work=True)
async def create_chat_completion(request: Request) -> Response:
    service = _service(request)
    body = await read_json(request, ChatCompletionRequest)
    _check_model(service, body.model)
    service.require("the chat completions route", *GENERATIVE)
    _check_chat_options(service, body)
    plan = _tool_plan(service, body)
    await admit(request)
    prompt = service.render_chat(
        body.messages,
        chat_template=body.chat_template,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
        tools=plan.tools or None,
    )
    prompt_ids = prompt.ids
    keep = service.truncation(body.truncate_prompt_tokens, generative=True)
    if keep is not None:  # the rendered prompt's last tokens (its template's tokens included), as vLLM cuts it
        prompt_ids = cut(prompt_ids, keep, keep_end=True)
    k = body.top_logprobs or 0
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = service.sampling_params(
        body,
        len(prompt_ids),
        default_max_tokens=None,
        logprobs=k if body.logprobs else None,
        logprobs_param="top_logprobs",
        max_tokens_param=max_param,
        max_tokens=body.max_completion_tokens,
        structured=_structured(body),
    )
    if plan.constrained:
        tool_constraint = plan.constraint(disable_any_whitespace=service.disable_any_whitespace)
        if params.structured is not None:
            raise errors.InvalidRequest(
                "a forced tool call (tool_choice 'required' or a named function) already fixes the output's "
                "form; remove response_format (or structured_outputs), or set tool_choice to 'auto' or 'none'",
                param="tool_choice",
            )
        params.structured = await service.check_structured(tool_constraint)
    rid = request_id(request)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    constrained = params.structured is not None

    def reader() -> ChoiceReader:
        return _reader(service, plan, prompt.text, constrained)

    if body.stream:
        return await _stream_chat(request, service, body, prompt_ids, params, cid, created, k, reader)

    gen = await until_disconnect(request, service.generate_full(prompt_ids, params, rid))
    _count_tokens(request, gen.prompt_tokens, gen.completion_tokens)
    role = _response_role(service, body)
    choices = []
    for c in gen.choices:
        choice_reader = reader()
        parts = choice_reader.whole(c.text)
        choices.append(
            ChatChoice(
                index=c.index,
                message=_message(role, parts),
                finish_reason=choice_reader.finish_reason(c.finish_reason),  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs(content=_chat_logprobs(c.logprobs, k)) if body.logprobs else None,
                stop_reason=c.stop_reason,  # type: ignore[call-arg]
            )
        )
    completion = ChatCompletion(
        id=cid,
        object="chat.completion",
        created=created,
        model=service.model_name(params),
        choices=choices,
        usage=_usage(gen.prompt_tokens, gen.completion_tokens),
    )
    return Response(completion.model_dump_json(), media_type="application/json")


async def _stream_chat(
    request: Request,
    service: ModelService,
    body: ChatCompletionRequest,
    prompt_ids: list[int],
    params: Any,
    cid: str,
    created: int,
    k: int,
    reader: Callable[[], ChoiceReader],
) -> Response:
    rid = request_id(request)
    include_usage, continuous_usage = _usage_wanted(body)
    stream = service.generate(prompt_ids, params, rid)
    readers: dict[int, ChoiceReader] = {}

    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> str:
        c = ChatCompletionChunk(
            id=cid, object="chat.completion.chunk", created=created, model=service.model_name(params), choices=choices, usage=usage
        )
        return sse(c.model_dump_json(exclude_unset=True))

    role = _response_role(service, body)

    def delta_choices(d: SequenceDelta, first: bool) -> list[ChunkChoice]:
        """The chunk choices of one delta, each for a chunk of its own: the text (reasoning,
        content; the role on the first), then each tool-call delta (a call's header, then its
        arguments, as OpenAI streams them). Empty when the reader holds the text back (a tag not
        yet complete) and there is nothing else to send."""
        choice_reader = readers.get(d.index)
        if choice_reader is None:
            choice_reader = readers[d.index] = reader()
        parts = choice_reader.feed(d.text)
        if d.finish_reason is not None:
            parts = parts.add(choice_reader.finish())
        text = DeltaParts(parts.content, parts.reasoning)
        pieces = [DeltaParts(tool_calls=[call]) for call in parts.tool_calls]
        if text or first or not pieces:
            pieces.insert(0, text)
        if pieces == [text] and not (first or text or d.finish_reason is not None or (body.logprobs and d.logprobs)):
            return []
        finish = None if d.finish_reason is None else choice_reader.finish_reason(d.finish_reason)
        return [
            ChunkChoice(
                index=d.index,
                delta=_delta(role if first and i == 0 else None, piece),
                finish_reason=finish if i == len(pieces) - 1 else None,  # type: ignore[arg-type]
                logprobs=ChunkLogprobs(content=_chat_logprobs(d.logprobs if i == 0 else None, k)) if body.logprobs else None,
            )
            for i, piece in enumerate(pieces)
        ]

    async def events() -> AsyncIterator[str]:
        started: set[int] = set()
        generated = [0] * body.n  # tokens so far, per choice
        async for deltas in stream:
            out = []
            for d in deltas:
                generated[d.index] += len(d.token_ids)
                choices = delta_choices(d, d.index not in started)
                started.add(d.index)
                if continuous_usage:  # vLLM's layout: a chunk per choice, with that choice's usage so far
                    for choice in choices:
                        yield chunk([choice], _usage(len(prompt_ids), generated[d.index]))
                elif len(choices) == 1:
                    out.append(choices[0])
                else:  # a choice index appears once per chunk
                    for choice in choices:
                        yield chunk([choice])
            if out:
                yield chunk(out)
        completion_tokens = sum(generated)
        _count_tokens(request, len(prompt_ids), completion_tokens)
        if include_usage:
            yield chunk([], _usage(len(prompt_ids), completion_tokens))

    return await sse_response(request, events(), error_event, DONE)


# ---------------------------------------------------------------- embeddings
@router.post("/embeddings", openapi_extra=json_schema_body(EmbeddingRequest), response_model=None)
@ContractRoute.declare("openai", model_work=True)
async def create_embeddings(request: Request) -> Response:
    service = _service(request)
    body = await read_json(request, EmbeddingRequest)
    _check_model(service, body.model)
    service.require("the embeddings route", Task.text_embedding)
    await admit(request)
    inp = body.input
    # over-long inputs: cut to the request's truncate_prompt_tokens, else as the server says
    keep = service.truncation(body.truncate_prompt_tokens, generative=False)
    # the schema admits a list of one kind only: texts, token ids, or lists of token ids
    if isinstance(inp, str):
        inputs = service.encode_inputs([inp], "input", refuse_empty_text=True, keep=keep)
    elif inp and all(isinstance(x, str) for x in inp):
        inputs = service.encode_inputs(list(cast("list[str]", inp)), "input", refuse_empty_text=True, keep=keep)
    elif inp and all(isinstance(x, int) for x in inp):
        ids = service.check_token_ids(list(cast("list[int]", inp)), "input")
        inputs = service.check_inputs([ids], "input", keep=keep)
    elif inp:
        ids_lists = [service.check_token_ids(list(x), f"input.{i}") for i, x in enumerate(cast("list[list[int]]", inp))]
        inputs = service.check_inputs(ids_lists, "input", keep=keep)
    else:
        raise errors.InvalidRequest("input must not be empty", param="input")
    vectors = await until_disconnect(request, service.embed(inputs))
    vectors = embedding_dimensions(service, vectors, body.dimensions)  # Matryoshka models only
    tokens = sum(len(x) for x in inputs)
    request.app.state.metrics.prompt_tokens.inc(tokens)
    data = []
    for i, vec in enumerate(vectors):
        if body.encoding_format == "base64":
            emb: Any = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
        else:
            emb = vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": service.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# -------------------------------------------------------------------- models
def _model_card(service: ModelService) -> dict[str, Any]:
    """The model under its reported name, with its other names and the sampling defaults in force
    (``generation_defaults``: from its generation_config.json and ``--override-generation-config``,
    in vLLM's names; what a request leaves out takes these values)."""
    card = OpenAIModel(id=service.name, created=int(service.created), object="model", owned_by="hfserve").model_dump()
    card["aliases"] = list(service.names[1:])
    card["generation_defaults"] = dict(service.generation_defaults)
    return card


def _adapter_card(service: ModelService, name: str) -> dict[str, Any]:
    """A LoRA adapter's card, as vLLM lists it: ``root`` its path, ``parent`` the base model."""
    card = OpenAIModel(id=name, created=int(service.created), object="model", owned_by="hfserve").model_dump()
    card["root"] = service.adapters[name].path
    card["parent"] = service.name
    return card


@router.get("/models", response_model=None)
@ContractRoute.declare("openai")
async def list_models(request: Request) -> Response:
    service = _service(request)
    adapters = [_adapter_card(service, name) for name in list(service.adapters)]
    return JSONResponse({"object": "list", "data": [_model_card(service), *adapters]})


@router.get("/models/{model_id:path}", response_model=None)
@ContractRoute.declare("openai")
async def retrieve_model(request: Request, model_id: str) -> Response:
    service = _service(request)
    _check_model(service, model_id)
    return JSONResponse(_adapter_card(service, model_id) if model_id in service.adapters else _model_card(service))


# ------------------------------------------------------------ LoRA adapters (vLLM's dynamic routes)
class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


def _runtime_lora_updating(request: Request) -> None:
    """As in vLLM, the routes exist only with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``."""
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() not in ("1", "true"):
        raise errors.RouteNotFound(f"No route {request.method} {errors.echo(request.url.path)}; see the README for the routes")


@router.post("/load_lora_adapter", response_model=None, openapi_extra=json_schema_body(LoadLoraRequest))
@ContractRoute.declare("openai")
async def load_lora_adapter(request: Request) -> Response:
    _runtime_lora_updating(request)
    body = await read_json(request, LoadLoraRequest)
    name = body.lora_name
    await _service(request).load_adapter(name, body.lora_path, request_id(request))
    return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")


@router.post("/unload_lora_adapter", response_model=None, openapi_extra=json_schema_body(UnloadLoraRequest))
@ContractRoute.declare("openai")
async def unload_lora_adapter(request: Request) -> Response:
    _runtime_lora_updating(request)
    body = await read_json(request, UnloadLoraRequest)
    name = body.lora_name
    await _service(request).unload_adapter(name, request_id(request))
    return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")
