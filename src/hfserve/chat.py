"""Chat messages and chat templating, shared by every family and backend."""

from __future__ import annotations

from typing import Any, Literal

import jinja2
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Flatten messages into the ``{"role", "content": str}`` form templates expect."""
    if not messages:
        raise errors.InvalidRequest("messages must contain at least one message", param="messages")
    out = []
    for i, msg in enumerate(messages):
        if msg.tool_calls:
            raise errors.UnsupportedParameter(
                "tool calls are not supported by this server", param=f"messages.{i}.tool_calls"
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
        role = "system" if msg.role == "developer" else msg.role
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if msg.name:
            entry["name"] = msg.name
        out.append(entry)
    return out


def render(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Apply the model's (or the request's) chat template; return the prompt text."""
    flat = to_template_messages(messages)
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
