"""KServe v1 and v2 (REST) routes, with tritonclient and httpx, checked against transformers."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import transformers
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.contract import assert_error

SENTENCES = ["the movie was wonderful", "a cat sat on the mat and slept"]


def v2_infer(server, texts, **extra):
    body = {"inputs": [{"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}
    return httpx.post(f"{server.url}/v2/models/{server.name}/infer", json=body, timeout=60)


def triton_infer(server, texts, binary=True):
    client = triton.InferenceServerClient(server.http_host)
    inp = triton.InferInput("input-0", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    out = triton.InferRequestedOutput("output-0", binary_data=binary)
    return client.infer(server.name, [inp], outputs=[out]).as_numpy("output-0")


# ------------------------------------------------------------------ health
def test_server_routes(bert_cls):
    c = triton.InferenceServerClient(bert_cls.http_host)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("bert_cls")
    assert not c.is_model_ready("other")
    meta = c.get_server_metadata()
    assert meta["name"] == "hfserve" and "generate" in meta["extensions"]
    model = c.get_model_metadata("bert_cls")
    assert model["name"] == "bert_cls"
    assert model["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"][0]["datatype"] == "INT64"
    with httpx.Client(base_url=bert_cls.url) as h:
        assert h.get("/").json() == {"status": "alive"}
        assert h.get("/v1/models").json() == {"models": ["bert_cls"]}
        assert h.get("/v1/models/bert_cls").json() == {"name": "bert_cls", "ready": True}
        assert h.get("/v2/models/bert_cls/ready").json() == {"name": "bert_cls", "ready": True}
        assert h.get("/v2/health/live").json() == {"live": True}
        metrics = h.get("/metrics")
        assert metrics.status_code == 200 and "hfserve_requests_total" in metrics.text


def test_triton_metadata_unknown_model_raises_with_message(bert_cls):
    c = triton.InferenceServerClient(bert_cls.http_host)
    with pytest.raises(InferenceServerException) as exc:
        c.get_model_metadata("nope")
    assert exc.value.status() == "404"
    assert exc.value.message() == "Model with name nope does not exist."


# --------------------------------------------------------- classification
@pytest.fixture(scope="module")
def hf_cls(models):
    tok = transformers.AutoTokenizer.from_pretrained(models["bert_cls"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(models["bert_cls"]).eval()
    with torch.inference_mode():
        logits = torch.stack([model(**tok(s, return_tensors="pt")).logits[0] for s in SENTENCES])
    return logits


def test_sequence_classification_v1(bert_cls, hf_cls):
    r = httpx.post(f"{bert_cls.url}/v1/models/bert_cls:predict", json={"instances": SENTENCES}, timeout=60)
    assert r.status_code == 200
    assert r.json() == {"predictions": hf_cls.argmax(-1).tolist()}


@pytest.mark.parametrize("binary", [True, False])
def test_sequence_classification_v2_tritonclient(bert_cls, hf_cls, binary):
    out = triton_infer(bert_cls, SENTENCES, binary=binary)
    assert out.dtype == np.int64
    assert out.tolist() == hf_cls.argmax(-1).tolist()


def test_sequence_classification_probabilities(server_factory, hf_cls):
    server = server_factory("bert_cls", "--return_probabilities", name="bert_probs")
    r = httpx.post(f"{server.url}/v1/models/bert_probs:predict", json={"instances": SENTENCES}, timeout=60).json()
    want = torch.softmax(hf_cls, -1)
    assert len(r["predictions"]) == len(want) == len(SENTENCES)
    for row, w in zip(r["predictions"], want):
        assert np.allclose([row[str(j)] for j in range(len(w))], w.numpy(), atol=1e-5)
    out = v2_infer(server, SENTENCES).json()["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 3]
    assert np.allclose(np.array(out["data"]).reshape(2, 3), want.numpy(), atol=1e-5)


def test_token_classification(bert_tok, models):
    tok = transformers.AutoTokenizer.from_pretrained(models["bert_tok"])
    model = transformers.AutoModelForTokenClassification.from_pretrained(models["bert_tok"]).eval()
    with torch.inference_mode():
        want = [model(**tok(s, return_tensors="pt")).logits[0].argmax(-1).tolist() for s in SENTENCES]
    r = httpx.post(f"{bert_tok.url}/v1/models/bert_tok:predict", json={"instances": SENTENCES}, timeout=60).json()
    assert r["predictions"] == [[w] for w in want]  # KServe's [N][1][tokens] nesting
    out = triton_infer(bert_tok, SENTENCES)
    width = max(len(w) for w in want)
    assert out.shape == (2, 1, width)
    for row, w in zip(out, want):
        assert row[0, : len(w)].tolist() == w
        assert (row[0, len(w) :] == -1).all()  # padding of shorter inputs


def test_fill_mask(bert_mlm, models):
    tok = transformers.AutoTokenizer.from_pretrained(models["bert_mlm"])
    model = transformers.AutoModelForMaskedLM.from_pretrained(models["bert_mlm"]).eval()
    texts = [f"the cat sat on the {tok.mask_token}", f"{tok.mask_token} movie was {tok.mask_token}"]
    want, masks = [], []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            logits = model(**enc).logits[0]
            pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
            masks.append(len(pos))
            want.append(" ".join(tok.decode([int(logits[p].argmax())]).strip() for p in pos))
    assert masks == [1, 2]
    r = httpx.post(f"{bert_mlm.url}/v1/models/bert_mlm:predict", json={"instances": texts}, timeout=60).json()
    assert r == {"predictions": want}
    out = triton_infer(bert_mlm, texts)
    assert [x.decode() for x in out] == want
    no_mask = httpx.post(f"{bert_mlm.url}/v1/models/bert_mlm:predict", json={"instances": ["no mask here"]}, timeout=60)
    assert no_mask.status_code == 400 and "mask" in no_mask.json()["error"]


def test_embeddings_v1_v2(minilm, models):
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(models["minilm"]), device="cpu").encode(SENTENCES)
    r = httpx.post(f"{minilm.url}/v1/models/minilm:predict", json={"instances": SENTENCES}, timeout=60).json()
    assert np.array(r["predictions"]).shape == want.shape == (2, 384)
    assert np.allclose(np.array(r["predictions"]), want, atol=1e-4)
    out = triton_infer(minilm, SENTENCES)
    assert out.dtype == np.float32 and out.shape == (2, 384)
    assert np.allclose(out, want, atol=1e-4)


# ----------------------------------------------------------------- generative
def test_generation_v1_and_v2_infer_agree_with_openai(llama):
    params = {"max_tokens": 6, "temperature": 0}
    v1 = httpx.post(
        f"{llama.url}/v1/models/llama:predict", json={"instances": ["hello", "The cat"], "parameters": params}, timeout=60
    ).json()["predictions"]
    v2 = v2_infer(llama, ["hello", "The cat"], parameters=params).json()["outputs"][0]
    assert v2["datatype"] == "BYTES" and v2["shape"] == [2]
    oa = [
        httpx.post(f"{llama.openai_url}/completions", json={"model": "llama", "prompt": p, **params}, timeout=60).json()[
            "choices"
        ][0]["text"]
        for p in ["hello", "The cat"]
    ]
    assert v1 == v2["data"] == oa


def test_generate_extension(llama):
    body = {"text_input": "The cat", "parameters": {"max_tokens": 6, "temperature": 0}}
    r = httpx.post(f"{llama.url}/v2/models/llama/generate", json=body, timeout=60)
    assert r.status_code == 200
    out = r.json()
    assert out["model_name"] == "llama" and isinstance(out["text_output"], str)
    assert out["usage"]["completion_tokens"] <= 6
    # top-level parameters are accepted as well (Triton's convention)
    flat = httpx.post(
        f"{llama.url}/v2/models/llama/generate", json={"text_input": "The cat", "max_tokens": 6, "temperature": 0}, timeout=60
    ).json()
    assert flat["text_output"] == out["text_output"]
    with httpx.stream("POST", f"{llama.url}/v2/models/llama/generate_stream", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == out["text_output"]
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_generate_on_encoder_is_unsupported_task(bert_cls):
    r = httpx.post(f"{bert_cls.url}/v2/models/bert_cls/generate", json={"text_input": "x"}, timeout=30)
    assert r.status_code == 400
    assert r.headers["x-error-code"] == "unsupported_task"
    assert set(r.json()) == {"error"}


def test_t5_v1(t5):
    r = httpx.post(
        f"{t5.url}/v1/models/t5:predict", json={"instances": ["translate this"], "parameters": {"max_tokens": 4}}, timeout=60
    )
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    assert len(predictions) == 1 and isinstance(predictions[0], str)


def test_triton_errors_carry_message_and_status(bert_cls):
    c = triton.InferenceServerClient(bert_cls.http_host)
    inp = triton.InferInput("input-0", [1], "INT64")
    inp.set_data_from_numpy(np.array([1], dtype=np.int64))
    with pytest.raises(InferenceServerException) as exc:
        c.infer("bert_cls", [inp])
    assert exc.value.status() == "400"
    assert "BYTES" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        c.infer("missing", [inp])
    assert exc.value.status() == "404"


# ------------------------------------------------------------ v1 verb routes
@pytest.mark.parametrize("verb", ["predict", "explain"])
def test_v1_verb_route_with_another_method_is_405(bert_cls, verb):
    """GET on a verb route is the route's wrong method, not the status of a model named 'name:verb'."""
    r = httpx.get(f"{bert_cls.url}/v1/models/bert_cls:{verb}", timeout=30)
    msg = assert_error(r, "method_not_allowed", param=None)
    assert msg == f"Method GET is not allowed on /v1/models/bert_cls:{verb}; use POST"
    assert r.headers["allow"] == "POST"


def test_v1_explain_says_the_server_has_no_explainer(bert_cls):
    r = httpx.post(f"{bert_cls.url}/v1/models/bert_cls:explain", json={"instances": SENTENCES}, timeout=30)
    msg = assert_error(r, "not_found", param=None)
    assert msg == "Model bert_cls has no explainer: this server does not implement :explain; use :predict for its predictions"
    unknown = httpx.post(f"{bert_cls.url}/v1/models/nope:explain", json={"instances": SENTENCES}, timeout=30)
    assert assert_error(unknown, "model_not_found", param=None) == "Model with name nope does not exist."
