"""Tool calling, request side: the ``tools`` a chat request offers and what its ``tool_choice``
asks for, validated once for every backend.

:func:`plan` turns a request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` into a
:class:`ToolPlan`:

- ``none``: the tools still reach the chat template (the model may read them), the output is
  plain content;
- ``auto``: the model decides; its output is read by the server's tool-call parser
  (``--enable-auto-tool-choice --tool-call-parser NAME``, vLLM's flags);
- ``required``: decoding is constrained to a JSON list of ``{"name", "parameters"}`` objects,
  one per call (at most one when ``parallel_tool_calls`` is false), each valid against its
  function's ``parameters`` schema (vLLM's schema, so both backends constrain alike);
- a named function: decoding is constrained to that function's arguments.

The JSON schemas go through the same structured-output validation as ``response_format``.
Nothing here knows HTTP or a backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from . import errors, structured
from .generation import StructuredOutput

#: OpenAI's rule for function names
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asked of tool calling, checked."""

    mode: ToolMode
    #: the request's tools in OpenAI's form, for the chat template's ``tools`` argument
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: the function a named ``tool_choice`` forces
    name: str | None = None
    #: the JSON schema decoding is held to (``required`` and named), else None
    schema: dict[str, Any] | None = None
    parallel: bool = True
    #: the request field an error in :attr:`schema` names
    schema_param: str = "tools"

    @property
    def constrained(self) -> bool:
        return self.schema is not None

    def constraint(self, *, disable_any_whitespace: bool = False) -> StructuredOutput | None:
        """The structured output that holds decoding to :attr:`schema` (None: unconstrained)."""
        if self.schema is None:
            return None
        # the schema's own property order is kept: the arguments come out in the order the tool declares
        return structured.json_schema(self.schema, param=self.schema_param, disable_any_whitespace=disable_any_whitespace)

    def parameters(self, name: str) -> dict[str, Any] | None:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters")
        return None


def _check_schema_object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.InvalidRequest(f"{param} must be a JSON schema object, got {type(value).__name__}", param=param)
    return value


def check_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """The request's ``tools``, each ``{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}``; a malformed one is an ``invalid_request`` naming its field."""
    if not tools:
        raise errors.InvalidRequest(
            "tools must not be an empty list; offer at least one tool or leave tools out", param="tools"
        )
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise errors.InvalidRequest(f"{where} must be an object with type and function", param=where)
        kind = tool.get("type")
        if kind != "function":
            raise errors.InvalidRequest(
                f"{where}.type must be 'function' (the only tool type of chat completions), got {kind!r}",
                param=f"{where}.type",
            )
        extra = set(tool) - {"type", "function"}
        if extra:
            raise errors.InvalidRequest(f"{where} has unknown fields: {', '.join(sorted(extra))}", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise errors.InvalidRequest(f"{where}.function must be an object with a name", param=f"{where}.function")
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise errors.InvalidRequest(
                f"{where}.function has unknown fields: {', '.join(sorted(extra))}", param=f"{where}.function"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise errors.InvalidRequest(
                f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes, got {name!r}",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise errors.InvalidRequest(
                f"{where}.function.name {name!r} is offered twice; tool names must be unique",
                param=f"{where}.function.name",
            )
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise errors.InvalidRequest(
                f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
        if "parameters" in fn and fn["parameters"] is not None:
            params = _check_schema_object(fn["parameters"], f"{where}.function.parameters")
            kind = params.get("type", "object")
            if kind != "object":
                raise errors.InvalidRequest(
                    f"{where}.function.parameters must describe an object (type 'object'), got type {kind!r}",
                    param=f"{where}.function.parameters",
                )
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise errors.InvalidRequest(f"{where}.function.strict must be a boolean", param=f"{where}.function.strict")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def _arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    # no parameters: the arguments are still a JSON object (vLLM's rule)
    return dict(parameters) if parameters else {"type": "object", "properties": {}}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for ``tool_choice: required``: a list of ``{"name", "parameters"}`` calls."""
    alternatives = []
    defs: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = _arguments_schema(fn.get("parameters"))
        local = params.pop("$defs", None)
        if local is not None:
            if not isinstance(local, dict):
                raise errors.InvalidRequest(
                    f"$defs in tools.{i}.function.parameters must be an object", param=f"tools.{i}.function.parameters"
                )
            for key, value in local.items():
                if key in defs and defs[key] != value:
                    raise errors.InvalidRequest(
                        f"tools define $defs {key!r} twice with different schemas; give them different names",
                        param=f"tools.{i}.function.parameters",
                    )
                defs[key] = value
        alternatives.append(
            {
                "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def plan(
    tools: list[Any] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    *,
    auto_enabled: bool,
) -> ToolPlan:
    """Check a chat request's tool fields against each other and the server's flags."""
    parallel = parallel_tool_calls is not False
    if tools is None:
        if tool_choice not in (None, "none"):
            raise errors.InvalidRequest(
                f"tool_choice {tool_choice if isinstance(tool_choice, str) else 'naming a function'} needs tools; "
                "send the tools the model may call, or leave tool_choice out",
                param="tool_choice",
            )
        return ToolPlan("none", parallel=parallel)
    checked = check_tools(tools)
    if tool_choice is None:
        tool_choice = "auto"  # OpenAI's (and vLLM's) default when tools are offered
    if tool_choice == "none":
        return ToolPlan("none", checked, parallel=parallel)
    if tool_choice == "auto":
        if not auto_enabled:
            raise errors.InvalidRequest(
                "tool_choice 'auto' (the default when tools are given) needs a server started with "
                "--enable-auto-tool-choice and --tool-call-parser NAME; set those flags, or send tool_choice "
                "'required', 'none' or a named function",
                param="tool_choice",
            )
        return ToolPlan("auto", checked, parallel=parallel)
    if tool_choice == "required":
        return ToolPlan("required", checked, schema=required_schema(checked, parallel), parallel=parallel)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise errors.InvalidRequest(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": NAME}}',
                param="tool_choice",
            )
        name = fn["name"]
        for i, tool in enumerate(checked):
            if tool["function"]["name"] == name:
                schema = _arguments_schema(tool["function"].get("parameters"))
                where = f"tools.{i}.function.parameters"
                return ToolPlan("named", checked, name=name, schema=schema, parallel=parallel, schema_param=where)
        offered = ", ".join(t["function"]["name"] for t in checked)
        raise errors.InvalidRequest(
            f"tool_choice names the function {name!r}, which is not in tools (offered: {offered})",
            param="tool_choice",
        )
    raise errors.InvalidRequest(
        f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}',
        param="tool_choice",
    )
