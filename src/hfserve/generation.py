"""What generation requests and results are, on every layer: the validated sampling
parameters a backend runs, the deltas it streams back, and what a backend can honour.

Backend-neutral data: the backends produce and consume it, the service passes it on, and the
API families render it; it imports nothing of hfserve's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

StructuredKind = Literal["json", "regex", "choice", "grammar", "json_object", "structural_tag"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on what a request may generate, in one canonical form for every backend.

    ``source``: for ``json`` the JSON schema as compact JSON text, its keys in the order given
    (not sorted: a schema's property order is the order the output's properties are generated in,
    as in OpenAI's and vLLM's structured outputs; :func:`hfserve.structured.json_schema` makes it); ``regex``
    the pattern; ``choice`` a JSON list of the allowed strings; ``grammar`` the EBNF (GBNF)
    text; ``json_object`` empty (any JSON object); ``structural_tag`` the structural tag as
    JSON text. Equal constraints have equal sources, so a compiled grammar is cached by
    ``(kind, source, disable_any_whitespace)``.
    """

    kind: StructuredKind
    source: str = ""
    disable_any_whitespace: bool = False
    #: the request field it came from (``response_format.json_schema.schema``, ``structured_outputs.regex``,
    #: ``tool_choice``...): errors a backend finds later name it
    param: str | None = None


@dataclass
class SamplingParams:
    """Validated generation parameters, the same for every backend."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0  # 0: no min-p filter; else keep tokens at least min_p times as likely as the top one
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # for echo with logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    structured: StructuredOutput | None = None  # constrained decoding (validated by the service)
    adapter: str | None = None  # the LoRA adapter the request names (None: the base model)
    whole: bool = False  # only the whole result is read (not streamed): a backend may deliver it in one piece

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """A generated (or prompt) token with its log-probability and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class SequenceDelta:
    """What one step added to one of the ``n`` sequences of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked


def coalesce(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """Several steps' deltas as one delta per sequence (consumers render one choice per index)."""
    merged: dict[int, SequenceDelta] = {}
    for d in deltas:
        into = merged.get(d.index)
        if into is None:
            merged[d.index] = SequenceDelta(
                d.index, d.text, list(d.token_ids), list(d.logprobs) if d.logprobs is not None else None,
                d.finish_reason, d.stop_reason, d.prompt_logprobs,
            )  # fmt: skip
            continue
        into.text += d.text
        into.token_ids += d.token_ids
        if d.logprobs is not None:
            into.logprobs = (into.logprobs or []) + d.logprobs
        into.finish_reason, into.stop_reason = d.finish_reason, d.stop_reason
        if into.prompt_logprobs is None:
            into.prompt_logprobs = d.prompt_logprobs
    return list(merged.values())


@dataclass
class Capabilities:
    """What a backend can honour; the serving layer rejects the rest up front."""

    max_logprobs: int = 20
    max_n: int = 16
    penalties: bool = False  # presence/frequency/repetition penalties
    prompt_logprobs: bool = True
    min_tokens: bool = False
    structured_outputs: bool = False
