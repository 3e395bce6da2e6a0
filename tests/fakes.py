"""A fake backend and the real app around it, in this process: the fast test layer.

:class:`FakeBackend` is a :class:`hfserve.backends.base.Backend` with no model: deterministic and
instant. Its tokenizer is byte-level (:class:`FakeTokenizer`); a generation echoes the prompt's
tokens (without BOS) until ``max_tokens``; embeddings, class logits and mask predictions are fixed
functions of the token ids. A prompt or input holding one of these words injects a failure, as
tests/fault_server.py does on a real model:

- ``FAIL_BEFORE``: the backend raises before the first token (an unexpected exception);
- ``FAIL_MID``: it raises after two generation steps;
- ``HANG``: it never answers.

It counts the work running now (``running``: generations and embeddings) and records how each
generation ended (``ended``), so a test can check that work stopped, not only that an answer came
back.

:func:`fake_server` serves the real app (:func:`hfserve.app.create_app`) on it through
``httpx.ASGITransport``; :func:`serving` starts as many as a test asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jinja2
from fastapi import FastAPI

from hfserve import errors
from hfserve.app import create_app
from hfserve.backends.base import Backend
from hfserve.config import Config, LimitsConfig, ModelConfig, ServerConfig
from hfserve.generation import SamplingParams, SequenceDelta, TokenLogprob
from hfserve.service import ModelService
from hfserve.tasks import Task

FAIL_BEFORE, FAIL_MID, HANG = "FAIL_BEFORE", "FAIL_MID", "HANG"
#: the step after which a FAIL_MID generation raises
FAIL_MID_STEP = 2

BOS, EOS, MASK = 256, 257, 258
SPECIALS = {BOS: "<s>", EOS: "</s>", MASK: "[MASK]"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EMBEDDING_DIM = 8
LABELS = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}


class FakeTokenizer:
    """Byte-level: a token per UTF-8 byte, plus BOS, EOS and ``[MASK]``."""

    bos_token_id, eos_token_id, pad_token_id, mask_token_id = BOS, EOS, EOS, MASK
    mask_token = SPECIALS[MASK]
    all_special_tokens = list(SPECIALS.values())

    def __init__(self, chat_template: str | None = CHAT_TEMPLATE):
        self.chat_template = chat_template

    def __len__(self) -> int:
        return len(SPECIALS) + 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        for i, part in enumerate(text.split(self.mask_token)):
            ids += ([MASK] if i else []) + list(part.encode("utf-8"))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, pending = [], bytearray()
        for tid in ids:
            if tid < 256:
                pending.append(tid)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[tid])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        assert not tokenize, "hfserve renders the text and tokenizes it itself"
        kwargs.pop("continue_final_message", None)
        template = jinja2.Environment().from_string(chat_template or self.chat_template or "")
        return template.render(messages=conversation, add_generation_prompt=add_generation_prompt, **kwargs)


@dataclass
class Ended:
    """How one generation ended: ``finished``, ``failed`` or ``cancelled``, after ``steps`` steps."""

    request_id: str
    prompt: str
    steps: int
    how: str


class FakeBackend(Backend):
    name = "fake"

    def __init__(
        self,
        task: Task = Task.text_generation,
        *,
        max_model_len: int = 256,
        step_seconds: float = 0.0,
        chat_template: str | None = CHAT_TEMPLATE,
    ):
        super().__init__()
        self.task = task
        self.step_seconds = step_seconds
        self._max_model_len = max_model_len
        self._chat_template = chat_template
        #: generations and embedding calls running now
        self.running = 0
        self.ended: list[Ended] = []
        #: the sampling parameters of each generation, in order
        self.params: list[SamplingParams] = []

    async def start(self) -> None:
        self.tokenizer = FakeTokenizer(self._chat_template)
        self.max_model_len = self._max_model_len
        if self.task is Task.sequence_classification:
            self.labels = dict(LABELS)

    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        return errors.classify(exc, request_id)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _faults(self, text: str) -> None:
        if FAIL_BEFORE in text:
            raise RuntimeError("exploded in /secret/fake_backend.py")
        if HANG in text:
            await asyncio.Event().wait()

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    # generation ------------------------------------------------------
    def _logprob(self, tid: int, k: int) -> TokenLogprob:
        top = [((tid + j) % 256, self._text([(tid + j) % 256]), -1.0 - j) for j in range(k)]
        return TokenLogprob(tid, self._text([tid]), -1.0, top)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        self.params.append(params)
        text = self._text(prompt_ids)
        echo = [t for t in prompt_ids if t < 256] or list(b"x")
        steps, how = 0, "failed"
        try:
            with self._counted():
                await self._faults(text)
                prompt_lps: list[TokenLogprob | None] | None = None
                if params.prompt_logprobs is not None:
                    prompt_lps = [None] + [self._logprob(t, params.prompt_logprobs) for t in prompt_ids[1:]]
                for step in range(params.max_tokens):
                    await asyncio.sleep(self.step_seconds)
                    if FAIL_MID in text and step == FAIL_MID_STEP:
                        raise KeyError("mid-stream failure at /secret/fake_backend.py")
                    tid = echo[step % len(echo)]
                    last = step == params.max_tokens - 1
                    yield [
                        SequenceDelta(
                            index=i,
                            text=self._text([tid]),
                            token_ids=[tid],
                            logprobs=None if params.logprobs is None else [self._logprob(tid, params.logprobs)],
                            finish_reason="length" if last else None,
                            prompt_logprobs=prompt_lps if step == 0 else None,
                        )
                        for i in range(params.n)
                    ]
                    steps += 1
            how = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            how = "cancelled"
            raise
        finally:
            self.ended.append(Ended(request_id, text, steps, how))

    # encoder tasks -----------------------------------------------------
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        with self._counted():
            for ids in inputs:
                await self._faults(self._text(ids))
        return [[float((sum(ids) * (j + 1)) % 17 + 1) for j in range(EMBEDDING_DIM)] for ids in inputs]

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        return [[2.0 if len(ids) % len(LABELS) == j else 0.0 for j in range(len(LABELS))] for ids in inputs]

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        return [[[1.0 if tid % 2 == j else 0.0 for j in range(2)] for tid in ids] for ids in inputs]

    async def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        return [[[(ord("a") + j, 0.5 / (j + 1)) for j in range(top_k)] for tid in ids if tid == MASK] for ids in inputs]


@dataclass
class FakeServer:
    """The real app on a fake backend, and an httpx client talking to it in this process."""

    app: FastAPI
    service: ModelService
    backend: FakeBackend
    client: httpx.AsyncClient
    name: str = "fake"

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.client.post(path, json=body, **kwargs)

    def metric(self, line_start: str) -> float:
        """The value of the first /metrics sample whose line starts with ``line_start`` (0 if none)."""
        body, _ = self.app.state.metrics.render()
        for line in body.decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@contextlib.asynccontextmanager
async def fake_server(
    task: Task = Task.text_generation,
    *,
    name: str = "fake",
    start: bool = True,
    limits: LimitsConfig | None = None,
    server: ServerConfig | None = None,
    return_probabilities: bool = False,
    truncate_inputs: bool = False,
    model_options: dict[str, Any] | None = None,
    **backend_options: Any,
) -> AsyncIterator[FakeServer]:
    """Serve ``name`` on a :class:`FakeBackend` (loaded unless ``start`` is false: still loading).

    ``model_options``: more of the model section (aliases, generation config, chat template ...);
    the generation config is ``vllm`` (none) unless they name one or a ``local_dir``."""
    backend = FakeBackend(task, **backend_options)
    model = ModelConfig(
        **{
            "source": name,
            "name": name,
            "task": task,
            "return_probabilities": return_probabilities,
            "truncate_inputs": truncate_inputs,
            "generation_config": "auto" if "local_dir" in (model_options or {}) else "vllm",
            **(model_options or {}),
        }
    )
    service = ModelService(
        name, backend, return_probabilities=return_probabilities, truncate_inputs=truncate_inputs, model=model
    )
    config = Config(
        model=model,
        limits=limits or LimitsConfig(),
        server=server or ServerConfig(log_requests=False),
    )
    app = create_app(service, config)
    if start:
        await service.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake", timeout=30) as client:
        yield FakeServer(app, service, backend, client, name)


Serve = Callable[..., Awaitable[FakeServer]]


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Serve]:
    """``serve(task, **options)`` starts a :func:`fake_server` that lives until this context ends
    (what a test's ``fake`` fixture yields)."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve(task: Task = Task.text_generation, **options: Any) -> FakeServer:
            return await stack.enter_async_context(fake_server(task, **options))

        yield serve
