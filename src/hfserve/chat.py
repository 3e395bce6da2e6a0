"""Chat messages and chat templating, shared by every family and backend."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import jinja2.meta
import jinja2.nodes
from pydantic import BaseModel, ConfigDict

from . import errors


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """Image, audio, file parts: accepted by the schema, refused as unsupported."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCallItem(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallItem] | None = None
    #: an earlier answer's reasoning, sent back (vLLM's and other clients' names); templates may read it
    reasoning: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat: the template's text and its token ids."""

    text: str
    ids: list[int]


CONTENT_FORMATS = ("auto", "string", "openai")


def detect_content_format(template: Any, wanted: str = "auto") -> str:
    """``string`` (content as one text) or ``openai`` (content as a list of ``{"type": "text",
    "text"}`` parts). ``auto``, as vLLM's ``--chat-template-content-format auto``: ``openai`` when
    the template loops over a message's content, else ``string``."""
    if wanted != "auto":
        return wanted
    if not isinstance(template, str):
        return "string"
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return "string"
    for loop in ast.find_all(jinja2.nodes.For):
        target = loop.iter
        while isinstance(target, jinja2.nodes.Filter) and target.node is not None:
            target = target.node
        if isinstance(target, jinja2.nodes.Getitem) and isinstance(target.arg, jinja2.nodes.Const):
            if target.arg.value == "content":
                return "openai"
        if isinstance(target, jinja2.nodes.Getattr) and target.attr == "content":
            return "openai"
    return "string"


def to_template_messages(messages: list[ChatMessage], content_format: str = "string") -> list[dict[str, Any]]:
    """Flatten messages into the ``{"role", "content"}`` form templates expect: content as one
    string, or (``openai``) as a list of text parts."""
    if not messages:
        raise errors.InvalidRequest("messages must contain at least one message", param="messages")
    out = []
    for i, msg in enumerate(messages):
        if msg.tool_calls and msg.role != "assistant":
            raise errors.InvalidRequest(
                f"only assistant messages carry tool_calls; messages.{i} is a {msg.role} message",
                param=f"messages.{i}.tool_calls",
            )
        if msg.role == "tool" and not msg.tool_call_id:
            raise errors.InvalidRequest(
                f"messages.{i} is a tool message without tool_call_id; give the id of the call it answers",
                param=f"messages.{i}.tool_call_id",
            )
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, OtherPart):
                    raise errors.UnsupportedParameter(
                        f"content parts of type {part.type!r} are not supported by this text-only model; send text parts",
                        param=f"messages.{i}.content.{j}",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
            parts = [{"type": "text", "text": t} for t in texts]
        else:
            parts = [{"type": "text", "text": content}] if content else []
        role = "system" if msg.role == "developer" else msg.role
        entry: dict[str, Any] = {"role": role, "content": parts if content_format == "openai" else content or ""}
        if msg.name:
            entry["name"] = msg.name
        if msg.tool_call_id is not None:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.tool_calls:
            entry["tool_calls"] = [_template_call(call, f"messages.{i}.tool_calls.{j}") for j, call in enumerate(msg.tool_calls)]
        reasoning = msg.reasoning if msg.reasoning is not None else msg.reasoning_content
        if reasoning is not None:
            entry["reasoning_content"] = entry["reasoning"] = reasoning
        out.append(entry)
    return out


def _template_call(call: ToolCallItem, where: str) -> dict[str, Any]:
    """A history tool call as templates read it: ``arguments`` as an object (templates write it
    with ``tojson``; vLLM passes it so), ``name`` also at the top (some templates read it there)."""
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except ValueError:
        raise errors.InvalidRequest(
            f"{where}.function.arguments must be a JSON text of the call's arguments, got "
            f"{errors.echo(call.function.arguments, 60)!r}",
            param=f"{where}.function.arguments",
        ) from None
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
        "name": call.function.name,
        "arguments": arguments,
    }


def template_reads(template: Any, variable: str) -> bool:
    """Whether a chat template reads ``variable`` (e.g. ``tools``) at all."""
    if not isinstance(template, str):
        return False
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return True  # unreadable here: let rendering say what is wrong
    return variable in jinja2.meta.find_undeclared_variables(ast)


def render(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    content_format: str = "string",
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Apply the model's (or the request's) chat template; return the prompt text.

    ``content_format``: how messages' content reaches the template (see :func:`detect_content_format`);
    ``tools``: the request's tool definitions, for the template's ``tools`` argument (a template
    that never reads ``tools`` cannot show them to the model: ``unsupported_parameter``)."""
    template_text = chat_template or getattr(tokenizer, "chat_template", None)
    if content_format == "auto":
        content_format = detect_content_format(template_text)
    flat = to_template_messages(messages, content_format)
    if tools and template_text and not template_reads(template_text, "tools"):
        raise errors.UnsupportedParameter(
            "this model's chat template does not render tool definitions, so the model cannot see the tools; "
            "remove tools, or pass a chat template that renders them (chat_template, or the server's --chat-template)",
            param="tools",
        )
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise errors.InvalidRequest(
            "This model has no chat template, so it cannot serve chat completions; "
            "pass a Jinja template in the request's chat_template field, or use the completions route",
            param="chat_template",
        )
    if continue_final_message and add_generation_prompt:
        raise errors.InvalidRequest(
            "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
        )
    try:
        text = tokenizer.apply_chat_template(
            flat,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            tools=tools or None,
            **(template_kwargs or {}),
        )
    except jinja2.TemplateError as exc:
        raise errors.InvalidRequest(
            f"The chat template could not be applied to these messages: {errors.echo(str(exc), 200)}",
            param="chat_template" if chat_template is not None else "messages",
        ) from None
    except ValueError as exc:  # transformers' own checks (e.g. continue_final_message)
        raise errors.InvalidRequest(
            f"The chat template could not be applied: {errors.echo(str(exc), 200)}", param="messages"
        ) from None
    if not isinstance(text, str):
        raise errors.InvalidRequest("The chat template did not produce text", param="chat_template")
    return text
