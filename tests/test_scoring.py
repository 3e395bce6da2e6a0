"""Rerank and score (issue 14 part 2) and the embeddings' options (part 3), end to end on both
backends: real servers, checked against independent references computed in this process
(sentence-transformers' ``CrossEncoder.predict`` and ``SentenceTransformer`` cosine similarities,
transformers' own forward pass for the Matryoshka fixture).

One server per model and backend, shared by this module (the vLLM engines cost 1-2 minutes each).
"""

from __future__ import annotations

import base64
import math
import pathlib

import httpx
import numpy as np
import pytest

from tests.conftest import VLLM_INSTALLED, VLLM_MAX_NUM_SEQS, needs_vllm
from tests.contract import assert_error
from tests.servers import ServerHandle

BACKENDS = ["huggingface", pytest.param("vllm", marks=needs_vllm)]

QUERY = "how are you today"
DOCUMENTS = [
    line for line in (pathlib.Path(__file__).parent / "fixtures" / "corpus.txt").read_text().splitlines() if line.strip()
][:32]
LONG = " ".join(["wonderful house"] * 80)  # about 160 tokens: a pair with it is longer than 128
TOL = dict(rel=1e-4, abs=1e-4)


def _vllm(server_factory, model: str) -> ServerHandle:
    if not VLLM_INSTALLED:
        pytest.skip("vLLM is not installed")
    return server_factory(model, "--backend", "vllm", "--max_num_seqs", str(VLLM_MAX_NUM_SEQS), name=model)


@pytest.fixture(scope="module", params=BACKENDS)
def ce(request, server_factory) -> ServerHandle:
    """The one-label cross-encoder fixture (a sentence-transformers CrossEncoder directory, Identity activation)."""
    if request.param == "vllm":
        return _vllm(server_factory, "cross_encoder")
    return server_factory("cross_encoder", "--backend", "huggingface")


@pytest.fixture(scope="module", params=BACKENDS)
def minilm_any(request, server_factory) -> ServerHandle:
    if request.param == "vllm":
        return request.getfixturevalue("minilm_vllm")
    return request.getfixturevalue("minilm")


@pytest.fixture(scope="module", params=BACKENDS)
def matryoshka(request, server_factory) -> ServerHandle:
    if request.param == "vllm":
        return _vllm(server_factory, "bert_matryoshka")
    return server_factory("bert_matryoshka", "--backend", "huggingface")


@pytest.fixture(scope="module")
def cross_encoder(models):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(models["cross_encoder"]), device="cpu")


@pytest.fixture(scope="module")
def sentence_transformer(models):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(models["minilm"]), device="cpu")


def post(server: ServerHandle, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.openai_url}{path}", json=body, timeout=120)


def predict(cross_encoder, pairs: list[tuple[str, str]]) -> list[float]:
    return [float(x) for x in cross_encoder.predict(pairs, batch_size=32)]


def pair_tokens(cross_encoder, pairs: list[tuple[str, str]], max_length: int | None = None) -> int:
    tok = cross_encoder.tokenizer
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return sum(len(tok(a, b, **kwargs)["input_ids"]) for a, b in pairs)


# ---------------------------------------------------------------- cross-encoder
def test_cross_encoder_activation_is_the_directorys(cross_encoder):
    """The fixture's explicit Identity (vLLM's default would be a sigmoid): scores leave [0, 1]."""
    import torch

    assert isinstance(cross_encoder.activation_fn, torch.nn.Identity)
    scores = predict(cross_encoder, [(QUERY, d) for d in DOCUMENTS])
    assert min(scores) < 0 or max(scores) > 1


def test_rerank_equals_cross_encoder_predict(ce, cross_encoder):
    resp = post(ce, "/rerank", {"model": "cross_encoder", "query": QUERY, "documents": DOCUMENTS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = predict(cross_encoder, [(QUERY, d) for d in DOCUMENTS])
    results = body["results"]
    assert len(results) == len(DOCUMENTS)
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], **TOL)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    got = [r["relevance_score"] for r in results]
    assert got == sorted(got, reverse=True)
    # the order is the reference's wherever the reference's scores are not within the tolerance
    ref_order = sorted(range(len(expected)), key=lambda i: expected[i], reverse=True)
    for pos, r in enumerate(results):
        if all(abs(expected[r["index"]] - expected[j]) > 1e-3 for j in ref_order if j != r["index"]):
            assert ref_order[pos] == r["index"]
    tokens = pair_tokens(cross_encoder, [(QUERY, d) for d in DOCUMENTS])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert body["model"] == "cross_encoder" and body["id"].startswith("rerank-")


def test_rerank_top_n_and_return_documents(ce, cross_encoder):
    full = post(ce, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:8]}).json()["results"]
    top = post(ce, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:8], "top_n": 3, "return_documents": False})
    assert top.status_code == 200, top.text
    results = top.json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in full[:3]]
    assert all("document" not in r for r in results)
    many = post(ce, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:2], "top_n": 10}).json()["results"]
    assert len(many) == 2


def test_score_one_to_n_and_n_to_n(ce, cross_encoder):
    docs = DOCUMENTS[:5]
    one_n = post(ce, "/score", {"text_1": QUERY, "text_2": docs})
    assert one_n.status_code == 200, one_n.text
    body = one_n.json()
    expected = predict(cross_encoder, [(QUERY, d) for d in docs])
    assert [d["index"] for d in body["data"]] == list(range(5))
    assert all(d["object"] == "score" for d in body["data"])
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, **TOL)
    tokens = pair_tokens(cross_encoder, [(QUERY, d) for d in docs])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens
    firsts = DOCUMENTS[5:10]
    n_n = post(ce, "/score", {"model": "cross_encoder", "text_1": firsts, "text_2": docs}).json()
    assert [d["score"] for d in n_n["data"]] == pytest.approx(predict(cross_encoder, list(zip(firsts, docs))), **TOL)
    one = post(ce, "/score", {"text_1": QUERY, "text_2": docs[0]}).json()
    assert [d["score"] for d in one["data"]] == pytest.approx(expected[:1], **TOL)


def test_long_pair_truncated_by_request(ce, models):
    from sentence_transformers import CrossEncoder

    keep = 40
    short = CrossEncoder(str(models["cross_encoder"]), device="cpu", max_length=keep)
    resp = post(ce, "/rerank", {"query": QUERY, "documents": [LONG, DOCUMENTS[0]], "truncate_prompt_tokens": keep})
    assert resp.status_code == 200, resp.text
    by_index = {r["index"]: r["relevance_score"] for r in resp.json()["results"]}
    expected = predict(short, [(QUERY, LONG), (QUERY, DOCUMENTS[0])])
    assert [by_index[0], by_index[1]] == pytest.approx(expected, **TOL)
    assert resp.json()["usage"]["total_tokens"] == pair_tokens(short, [(QUERY, LONG), (QUERY, DOCUMENTS[0])], keep)


def test_one_label_classifier_keeps_answering_v1_v2(ce):
    v1 = httpx.post(f"{ce.url}/v1/models/cross_encoder:predict", json={"instances": ["hello world"]}, timeout=60)
    assert v1.status_code == 200, v1.text
    v2 = httpx.post(
        f"{ce.url}/v2/models/cross_encoder/infer",
        json={"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["hello world"]}]},
        timeout=60,
    )
    assert v2.status_code == 200, v2.text


# ---------------------------------------------------------------- errors
ERRORS = [
        ("/rerank", {"documents": ["a"]}, "invalid_request", "query"),
        ("/rerank", {"query": "a"}, "invalid_request", "documents"),
        ("/rerank", {"query": "a", "documents": "a"}, "invalid_request", "documents"),
        ("/rerank", {"query": "a", "documents": ["a", 3]}, "invalid_request", "documents.1"),
        ("/rerank", {"query": "a", "documents": []}, "invalid_request", "documents"),
        ("/rerank", {"query": "a", "documents": ["a"], "top_n": 0}, "invalid_request", "top_n"),
        ("/rerank", {"query": "a", "documents": ["a", LONG]}, "context_length_exceeded", "documents.1"),
        ("/rerank", {"query": "a", "documents": ["a"], "truncate_prompt_tokens": 100000}, "invalid_request", "truncate_prompt_tokens"),
        ("/rerank", {"model": "nope", "query": "a", "documents": ["a"]}, "model_not_found", "model"),
        ("/score", {"text_1": "a"}, "invalid_request", "text_2"),
        ("/score", {"text_1": [], "text_2": "a"}, "invalid_request", "text_1"),
        ("/score", {"text_1": ["a", "b", "c"], "text_2": ["a", "b"]}, "invalid_request", "text_2"),
        ("/score", {"text_1": "a", "text_2": [LONG]}, "context_length_exceeded", "text_2.0"),
        ("/score", {"model": "nope", "text_1": "a", "text_2": "b"}, "model_not_found", "model"),
]


@pytest.mark.parametrize(("path", "body", "code", "param"), ERRORS)
def test_errors(ce, path, body, code, param):
    message = assert_error(post(ce, path, body), code, param=param)
    if code == "context_length_exceeded":
        assert "128" in message and "truncate_prompt_tokens" in message


@pytest.mark.vllm
def test_errors_identical_on_both_backends(server_factory):
    """Every error above, the same status, code, param and message on both backends."""
    servers = [server_factory("cross_encoder", "--backend", "huggingface"), _vllm(server_factory, "cross_encoder")]
    for path, body, _, _ in ERRORS:
        a, b = (post(s, path, body) for s in servers)
        assert (a.status_code, a.json()) == (b.status_code, b.json()), (path, body)


@pytest.mark.parametrize("path", ["/rerank", "/score"])
def test_generator_is_unsupported_task(llama_any, path):
    body = {"query": "a", "documents": ["b"]} if path == "/rerank" else {"text_1": "a", "text_2": "b"}
    message = assert_error(post(llama_any, path, body), "unsupported_task", param=None)
    assert "cross-encoder" in message and "text embedding" in message


def test_multi_label_classifier_is_unsupported_task(bert_cls):
    message = assert_error(post(bert_cls, "/rerank", {"query": "a", "documents": ["b"]}), "unsupported_task", param=None)
    assert "3 labels" in message


def test_truncate_inputs_server(server_factory, cross_encoder):
    """Under --truncate_inputs a long pair is cut to the context length, as CrossEncoder.predict cuts it."""
    server = server_factory("cross_encoder", "--backend", "huggingface", "--truncate_inputs", "true", name="ce_truncating")
    resp = post(server, "/score", {"text_1": QUERY, "text_2": [LONG, DOCUMENTS[1]]})
    assert resp.status_code == 200, resp.text
    assert [d["score"] for d in resp.json()["data"]] == pytest.approx(
        predict(cross_encoder, [(QUERY, LONG), (QUERY, DOCUMENTS[1])]), **TOL
    )


# ---------------------------------------------------------------- embedding models
def test_embedding_model_scores_by_cosine(minilm_any, sentence_transformer):
    docs = DOCUMENTS[:8]
    q = sentence_transformer.encode([QUERY], convert_to_tensor=True)
    d = sentence_transformer.encode(docs, convert_to_tensor=True)
    expected = [float(x) for x in sentence_transformer.similarity(q, d)[0]]
    resp = post(minilm_any, "/rerank", {"model": "minilm", "query": QUERY, "documents": docs})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], **TOL)
    got = [r["relevance_score"] for r in results]
    assert got == sorted(got, reverse=True)
    score = post(minilm_any, "/score", {"text_1": [QUERY] * 8, "text_2": docs}).json()
    assert [x["score"] for x in score["data"]] == pytest.approx(expected, **TOL)
    tok = sentence_transformer.tokenizer
    tokens = sum(len(tok(QUERY)["input_ids"]) + len(tok(x)["input_ids"]) for x in docs)
    assert score["usage"]["total_tokens"] == tokens


def test_embedding_dimensions_refused_without_matryoshka(minilm_any):
    resp = post(minilm_any, "/embeddings", {"model": "minilm", "input": "hello", "dimensions": 16})
    assert_error(resp, "unsupported_parameter", param="dimensions")
    same = post(minilm_any, "/embeddings", {"model": "minilm", "input": "hello", "dimensions": 384})
    assert same.status_code == 200 and len(same.json()["data"][0]["embedding"]) == 384


# ---------------------------------------------------------------- Matryoshka
def _reference_embedding(model_dir: pathlib.Path, text: str) -> np.ndarray:
    """Mean pooling of the fixture's BertModel (transformers, in this process), not normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state[0]
    return hidden.mean(dim=0).numpy()


def test_matryoshka_dimensions(matryoshka, models):
    full = _reference_embedding(models["bert_matryoshka"], "hello world")
    for dims in (16, 32, 64):
        resp = post(matryoshka, "/embeddings", {"model": "bert_matryoshka", "input": "hello world", "dimensions": dims})
        assert resp.status_code == 200, resp.text
        vec = np.asarray(resp.json()["data"][0]["embedding"])
        cut = full[:dims] / np.linalg.norm(full[:dims])
        assert vec.shape == (dims,)
        np.testing.assert_allclose(vec, cut, rtol=1e-4, atol=1e-4)
        assert math.isclose(float(np.linalg.norm(vec)), 1.0, rel_tol=1e-5)
    b64 = post(
        matryoshka, "/embeddings",
        {"model": "bert_matryoshka", "input": ["hello world"], "dimensions": 16, "encoding_format": "base64"},
    )
    vec = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, full[:16] / np.linalg.norm(full[:16]), rtol=1e-4, atol=1e-4)
    trunc = post(
        matryoshka, "/embeddings",
        {"model": "bert_matryoshka", "input": LONG, "dimensions": 32, "truncate_prompt_tokens": 20},
    )
    assert trunc.status_code == 200 and trunc.json()["usage"]["prompt_tokens"] == 20


def test_matryoshka_dimension_errors(matryoshka):
    body = {"model": "bert_matryoshka", "input": "hello"}
    msg = assert_error(post(matryoshka, "/embeddings", {**body, "dimensions": 20}), "unsupported_parameter", param="dimensions")
    assert "16, 32, 64" in msg
    assert_error(post(matryoshka, "/embeddings", {**body, "dimensions": 65}), "invalid_request", param="dimensions")
    assert_error(post(matryoshka, "/embeddings", {**body, "dimensions": 0}), "invalid_request", param="dimensions")


def test_truncation_below_the_special_tokens_cuts_plainly(ce):
    """A keep smaller than a pair's special tokens ([CLS] [SEP] [SEP]): the tokenizer cannot cut
    the texts, so the ids are cut plainly to ``keep`` (as vLLM cuts them); never a failure."""
    resp = post(ce, "/score", {"text_1": QUERY, "text_2": [LONG, "hello"], "truncate_prompt_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["total_tokens"] == 4
    scores = [d["score"] for d in resp.json()["data"]]
    assert scores[0] == pytest.approx(scores[1], **TOL)  # both pairs are [CLS] plus the query's first token
