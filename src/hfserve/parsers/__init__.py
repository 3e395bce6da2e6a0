"""Backend-neutral output parsers: tool calls and reasoning in generated text (issue 13).

Pure Python, no model library: both backends hand their generated text to the same parser, so
both return the same ``tool_calls`` and ``reasoning``. Composition for a model that thinks and then
calls a tool: run the reasoning parser first and feed only its content to the tool-call parser.
A model whose tokenizer declares a ``response_template`` can instead be read by
:class:`ResponseTemplateParser` (vLLM's ``hf``), which gives reasoning, content and calls at once.
"""

from hfserve.parsers.reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    reasoning_parser,
    register_reasoning_parser,
)
from hfserve.parsers.response_template import RESPONSE_TEMPLATE_PARSER, ResponseTemplateParser
from hfserve.parsers.tool_calls import (
    TOOL_CALL_PARSERS,
    ParsedMessage,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    make_tool_call_id,
    register_tool_call_parser,
    tool_call_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "RESPONSE_TEMPLATE_PARSER",
    "TOOL_CALL_PARSERS",
    "ParsedMessage",
    "ReasoningParser",
    "ResponseTemplateParser",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "make_tool_call_id",
    "reasoning_parser",
    "register_reasoning_parser",
    "register_tool_call_parser",
    "tool_call_parser",
]
