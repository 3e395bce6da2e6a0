"""Rerank, score and embedding dimensions in this process: the error contract on a fake backend
(tests/fakes.py), and the transformers backend's cross-encoder path on the real fixture model
through the app in this process (pairs through the encoder micro-batcher)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator

import httpx
import pytest

from hfserve.app import create_app
from hfserve.config import Config, ModelConfig, ServerConfig
from hfserve.scoring import activation_name
from hfserve.service import ModelService
from hfserve.tasks import Task, infer_task
from tests.contract import assert_error
from tests.fakes import EMBEDDING_DIM, FAIL_BEFORE, HANG, fake_server

pytestmark = pytest.mark.anyio

RERANK = "/openai/v1/rerank"
SCORE = "/openai/v1/score"


# ------------------------------------------------------------------ the contract (fake backend)
@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        (RERANK, {"documents": ["a"]}, "invalid_request", "query"),
        (RERANK, {"query": "a"}, "invalid_request", "documents"),
        (RERANK, {"query": "a", "documents": "a"}, "invalid_request", "documents"),
        (RERANK, {"query": "a", "documents": [["a"]]}, "invalid_request", "documents.0"),
        (RERANK, {"query": 1, "documents": ["a"]}, "invalid_request", "query"),
        (RERANK, {"query": "a", "documents": []}, "invalid_request", "documents"),
        (RERANK, {"query": "a", "documents": ["a"], "top_n": 0}, "invalid_request", "top_n"),
        (RERANK, {"query": "a", "documents": ["a"], "top_n": -3}, "invalid_request", "top_n"),
        (RERANK, {"query": "a", "documents": ["a"], "top_n": "2"}, "invalid_request", "top_n"),
        (RERANK, {"query": "a", "documents": ["a"], "unknown_field": 1}, "invalid_request", "unknown_field"),
        (RERANK, {"model": "nope", "query": "a", "documents": ["a"]}, "model_not_found", "model"),
        (RERANK, {"query": "a", "documents": ["a"], "truncate_prompt_tokens": 0}, "invalid_request", "truncate_prompt_tokens"),
        (SCORE, {"text_2": "a"}, "invalid_request", "text_1"),
        (SCORE, {"text_1": "a", "text_2": []}, "invalid_request", "text_2"),
        (SCORE, {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "invalid_request", "text_2"),
        (SCORE, {"text_1": "a", "text_2": [1]}, "invalid_request", "text_2"),
        (SCORE, {"model": "nope", "text_1": "a", "text_2": "b"}, "model_not_found", "model"),
    ],
)
async def test_request_errors(path, body, code, param):
    async with fake_server(Task.text_embedding) as srv:
        message = assert_error(await srv.post(path, body), code, param=param)
        assert "Traceback" not in message and "pydantic" not in message.lower()


@pytest.mark.parametrize("path", [RERANK, SCORE])
@pytest.mark.parametrize("task", [Task.text_generation, Task.fill_mask, Task.token_classification, Task.sequence_classification])
async def test_other_tasks_are_unsupported(path, task):
    """A generator, and every classifier that is not a one-label one (the fake's has 3), cannot score."""
    body = {"query": "a", "documents": ["b"]} if path == RERANK else {"text_1": "a", "text_2": "b"}
    async with fake_server(task) as srv:
        message = assert_error(await srv.post(path, body), "unsupported_task", param=None)
        assert "cross-encoder" in message


async def test_not_ready_and_backend_failures():
    async with fake_server(Task.text_embedding, start=False) as srv:
        assert_error(await srv.post(RERANK, {"query": "a", "documents": ["b"]}), "model_not_ready")
    async with fake_server(Task.text_embedding) as srv:
        resp = await srv.post(RERANK, {"query": "a", "documents": [FAIL_BEFORE]})
        message = assert_error(resp, "internal_error")
        assert "secret" not in message


async def test_client_gone_stops_the_work():
    async with fake_server(Task.text_embedding) as srv:
        task = asyncio.ensure_future(srv.post(RERANK, {"query": "a", "documents": [HANG]}))
        for _ in range(100):
            if srv.backend.running:
                break
            await asyncio.sleep(0.01)
        assert srv.backend.running == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not srv.backend.running:
                break
            await asyncio.sleep(0.01)
        assert srv.backend.running == 0


async def test_embedding_scores_are_cosines_on_the_fake():
    async with fake_server(Task.text_embedding) as srv:
        docs = ["b", "hello", "a"]
        resp = await srv.post(RERANK, {"model": "fake", "query": "a", "documents": docs})
        assert resp.status_code == 200, resp.text
        emb = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": ["a", *docs]})
        vecs = [d["embedding"] for d in emb.json()["data"]]

        def cos(u, v):
            return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

        expected = {i: cos(vecs[0], vecs[i + 1]) for i in range(3)}
        results = resp.json()["results"]
        assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(expected)
        assert [r["index"] for r in results] == sorted(expected, key=expected.__getitem__, reverse=True)
        assert results[[r["index"] for r in results].index(2)]["relevance_score"] == pytest.approx(1.0)
        score = await srv.post(SCORE, {"text_1": ["a", "b"], "text_2": ["a", "hello"]})
        assert [d["score"] for d in score.json()["data"]] == pytest.approx([1.0, cos(vecs[1], vecs[2])])


async def test_embedding_dimensions_without_matryoshka_on_the_fake():
    async with fake_server(Task.text_embedding) as srv:
        resp = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": "a", "dimensions": 4})
        message = assert_error(resp, "unsupported_parameter", param="dimensions")
        assert str(EMBEDDING_DIM) in message and "Matryoshka" in message
        same = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": "a", "dimensions": EMBEDDING_DIM})
        assert same.status_code == 200


# ------------------------------------------------------------------ model files
def test_activation_name_as_cross_encoder_reads_it():
    assert activation_name({}, {"activation_fn": "torch.nn.modules.linear.Identity"}) == "Identity"
    assert activation_name({"sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}, {}) == "Tanh"
    assert activation_name({"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}, {}) == "Identity"
    assert activation_name({}, {}) == "Sigmoid"
    assert activation_name({}, {"activation_fn": "my.module.Custom"}) == "Sigmoid"  # untrusted: the default


def test_cross_encoder_directory_is_a_sequence_classifier(models):
    config = json.loads((models["cross_encoder"] / "config.json").read_text())
    assert infer_task(config, models["cross_encoder"]) is Task.sequence_classification
    assert infer_task(json.loads((models["minilm"] / "config.json").read_text()), models["minilm"]) is Task.text_embedding


# ------------------------------------------------------------------ the real cross-encoder, in process
@contextlib.asynccontextmanager
async def hf_app(model_dir, name: str) -> AsyncIterator[tuple[httpx.AsyncClient, ModelService]]:
    from hfserve.backends.huggingface import HuggingFaceBackend

    model = ModelConfig(source=str(model_dir), name=name, local_dir=model_dir)
    backend = HuggingFaceBackend(model)
    service = ModelService(name, backend, model=model)
    app = create_app(service, Config(model=model, server=ServerConfig(log_requests=False)))
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hf", timeout=60) as client:
            yield client, service
    finally:
        await service.stop()


async def test_concurrent_reranks_share_encoder_batches(models):
    """Pairs of concurrent requests are merged into the micro-batcher's forward passes, and each
    request still gets CrossEncoder.predict's scores for its own documents."""
    from sentence_transformers import CrossEncoder

    docs = [f"document number {i} about the house" for i in range(24)]
    queries = ["the house", "how are you", "good morning", "translate english"]
    async with hf_app(models["cross_encoder"], "ce") as (client, service):
        batcher = service.backend.batcher  # type: ignore[attr-defined]
        before = batcher.stats.batches
        resps = await asyncio.gather(
            *[client.post(RERANK, json={"query": q, "documents": docs[i * 6 : i * 6 + 6]}) for i, q in enumerate(queries)]
        )
        assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
        assert batcher.stats.largest > 6  # more than one request's pairs in one forward pass
        assert batcher.stats.batches - before < len(queries)
    ce = CrossEncoder(str(models["cross_encoder"]), device="cpu")
    for i, (q, resp) in enumerate(zip(queries, resps)):
        mine = docs[i * 6 : i * 6 + 6]
        expected = ce.predict([(q, d) for d in mine])
        got = {r["index"]: r["relevance_score"] for r in resp.json()["results"]}
        assert [got[j] for j in range(6)] == pytest.approx([float(x) for x in expected], rel=1e-4, abs=1e-4)


@pytest.mark.vllm
def test_backend_auto_picks_vllm_for_one_label_classifiers_only(models):
    pytest.importorskip("vllm")
    from hfserve.backends.vllm import supports

    ok, reason = supports(ModelConfig.local(models["cross_encoder"]))
    assert (ok, reason) == (True, "vLLM supports BertForSequenceClassification for sequence classification")
    ok, reason = supports(ModelConfig.local(models["bert_cls"]))
    assert not ok and "one label" in reason
