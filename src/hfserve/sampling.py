"""Generation options shared by every API family.

The OpenAI request models extend :class:`SamplingOptions`; the KServe v1
``parameters`` and v2 generate ``parameters`` are validated into it too, so the
same value gets the same answer on every route and every backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import errors
from .generation import Capabilities, SamplingParams

MAX_STOP_SEQUENCES = 16

#: the generation_config.json fields that give sampling defaults (vLLM's list, in vLLM's names;
#: ``max_new_tokens`` becomes ``max_tokens``)
GENERATION_DEFAULT_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
)
#: those :class:`SamplingOptions` has no field for (kept out of the defaults in force): none now
UNSUPPORTED_DEFAULTS: tuple[str, ...] = ()
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


def generation_defaults(config: Mapping[str, Any], override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampling defaults a generation config gives, as vLLM's ``get_diff_sampling_param``:
    ``override`` over ``config``, only the sampling fields that are set, ``max_new_tokens``
    renamed ``max_tokens``. A value out of range is a ``ValueError`` naming it."""
    merged = {**config, **(override or {})}
    out: dict[str, Any] = {}
    for name in GENERATION_DEFAULT_FIELDS:
        value = merged.get(name)
        if value is None:
            continue
        out["max_tokens" if name == "max_new_tokens" else name] = value
    checked = {k: v for k, v in out.items() if k not in UNSUPPORTED_DEFAULTS}
    try:
        SamplingOptions.model_validate(checked)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"the generation config's sampling defaults are invalid ({problems})") from None
    return out


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(items)}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def build_params(
    opts: SamplingOptions,
    *,
    prompt_tokens: int,
    max_model_len: int,
    capabilities: Capabilities,
    default_max_tokens: int | None,
    logprobs: int | None = None,
    logprobs_param: str = "logprobs",
    prompt_logprobs: int | None = None,
    max_tokens_param: str = "max_tokens",
    max_tokens: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Check ``opts`` against the model's limits and the backend's abilities.

    ``defaults`` (the model's generation config, from :func:`generation_defaults`) fill in what
    the request leaves out; its ``max_tokens`` replaces ``default_max_tokens``.

    Raises ``context_length_exceeded``, ``unsupported_parameter`` or
    ``invalid_request`` (with the offending ``param``) instead of silently
    clamping or ignoring anything.
    """
    if prompt_tokens >= max_model_len:
        raise errors.ContextLengthExceeded(
            f"The prompt is {prompt_tokens} tokens long, which leaves no room to generate within "
            f"the model's context length of {max_model_len} tokens; shorten the prompt",
            param="prompt" if max_tokens_param == "max_tokens" else None,
        )
    if defaults:
        if defaults.get("max_tokens") is not None:
            default_max_tokens = defaults["max_tokens"]
        unset = {
            k: v
            for k, v in defaults.items()
            if k in SamplingOptions.model_fields and k != "max_tokens" and getattr(opts, k) is None
        }
        if unset:
            opts = opts.model_copy(update=unset)
    room = max_model_len - prompt_tokens
    wanted = max_tokens if max_tokens is not None else opts.max_tokens
    if wanted is None:
        wanted = room if default_max_tokens is None else min(default_max_tokens, room)
    elif wanted > room:
        raise errors.ContextLengthExceeded(
            f"{max_tokens_param} ({wanted}) plus the prompt ({prompt_tokens} tokens) exceeds the model's "
            f"context length of {max_model_len} tokens; lower {max_tokens_param} to at most {room}",
            param=max_tokens_param,
        )

    if opts.n > capabilities.max_n:
        raise errors.InvalidRequest(
            f"n ({opts.n}) exceeds this server's limit of {capabilities.max_n} sequences per request", param="n"
        )
    if logprobs is not None and logprobs > capabilities.max_logprobs:
        raise errors.InvalidRequest(
            f"{logprobs_param} ({logprobs}) exceeds this server's limit of {capabilities.max_logprobs}",
            param=logprobs_param,
        )
    if prompt_logprobs is not None and not capabilities.prompt_logprobs:
        raise errors.UnsupportedParameter("echo with logprobs is not supported by this backend", param="echo")
    if opts.logit_bias:
        raise errors.UnsupportedParameter("logit_bias is not supported by this server; remove it", param="logit_bias")
    penalties = {
        "presence_penalty": (opts.presence_penalty, 0.0),
        "frequency_penalty": (opts.frequency_penalty, 0.0),
        "repetition_penalty": (opts.repetition_penalty, 1.0),
    }
    for name, (value, neutral) in penalties.items():
        if value is not None and value != neutral and not capabilities.penalties:
            raise errors.UnsupportedParameter(f"{name} is not supported by this backend; remove it", param=name)
    if opts.min_tokens and not capabilities.min_tokens:
        raise errors.UnsupportedParameter("min_tokens is not supported by this backend", param="min_tokens")
    if opts.min_tokens > wanted:
        raise errors.InvalidRequest(
            f"min_tokens ({opts.min_tokens}) must not exceed max_tokens ({wanted})", param="min_tokens"
        )

    return SamplingParams(
        max_tokens=wanted,
        temperature=1.0 if opts.temperature is None else opts.temperature,
        top_p=1.0 if opts.top_p is None else opts.top_p,
        top_k=0 if opts.top_k in (None, -1) else opts.top_k,
        min_p=opts.min_p or 0.0,
        seed=opts.seed,
        n=opts.n,
        stop=opts.stop_list(),
        stop_token_ids=list(opts.stop_token_ids or []),
        ignore_eos=opts.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=opts.presence_penalty or 0.0,
        frequency_penalty=opts.frequency_penalty or 0.0,
        repetition_penalty=opts.repetition_penalty or 1.0,
        min_tokens=opts.min_tokens,
    )
