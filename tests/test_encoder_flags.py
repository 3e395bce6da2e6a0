"""huggingfaceserver's encoder-task flags (issue 12 part 1) on the transformers backend: the real
app over httpx.ASGITransport with a real HuggingFaceBackend on the BERT fixtures, each answer
checked against the fixture model run by transformers directly."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import transformers

from hfserve.app import create_app
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import BatchingConfig, Config, ModelConfig, ServerConfig
from hfserve.service import ModelService

pytestmark = pytest.mark.anyio
TEXTS = ["hello world", "the cat"]


@contextlib.asynccontextmanager
async def serve(path: Any, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    model = ModelConfig.local(path, name="m", **options)
    backend = HuggingFaceBackend(model, BatchingConfig())
    service = ModelService("m", backend, return_probabilities=model.return_probabilities, model=model)
    app = create_app(service, Config(model=model, server=ServerConfig(log_requests=False)))
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as client:
            yield client
    finally:
        await service.stop()


async def v1(client: httpx.AsyncClient, texts: list[str]) -> Any:
    r = await client.post("/v1/models/m:predict", json={"instances": texts})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


async def v2(client: httpx.AsyncClient, texts: list[str]) -> dict[str, Any]:
    body = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    r = await client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    return dict(out)


def reference(path: Any, cls: Any, text: str, **encode: Any) -> tuple[list[int], torch.Tensor]:
    """The fixture model's logits for ``text``, by transformers alone."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = cls.from_pretrained(str(path)).eval()
    ids = tok(text, **encode)["input_ids"]
    with torch.inference_mode():
        return ids, model(input_ids=torch.tensor([ids])).logits[0].float()


async def test_sequence_classification_raw_logits(models):
    _, ref = reference(models["bert_cls"], transformers.AutoModelForSequenceClassification, TEXTS[0])
    async with serve(models["bert_cls"], return_raw_logits=True) as client:
        preds = await v1(client, TEXTS)
        out = await v2(client, TEXTS)
        meta = (await client.get("/v2/models/m")).json()
    assert list(preds[0]) == [str(j) for j in range(ref.shape[0])]
    assert torch.allclose(torch.tensor(list(preds[0].values())), ref, atol=1e-5)
    assert abs(sum(preds[0].values()) - 1.0) > 1e-3  # logits, not probabilities
    assert out["datatype"] == "FP32" and out["shape"] == [2, ref.shape[0]]
    assert torch.allclose(torch.tensor(out["data"][: ref.shape[0]]), ref, atol=1e-5)
    assert meta["outputs"][0]["datatype"] == "FP32" and meta["outputs"][0]["shape"] == [-1, -1]
    async with serve(models["bert_cls"], return_probabilities=True) as client:
        probs = await v1(client, TEXTS)
    assert torch.allclose(torch.tensor(list(probs[0].values())), torch.softmax(ref, -1), atol=1e-5)
    assert probs[0] != preds[0]


async def test_token_classification_raw_logits(models):
    ids, ref = reference(models["bert_tok"], transformers.AutoModelForTokenClassification, TEXTS[0])
    async with serve(models["bert_tok"], return_raw_logits=True) as client:
        preds = await v1(client, TEXTS)
        out = await v2(client, TEXTS)
    assert len(preds[0]) == len(ids)
    got = torch.tensor([list(tok.values()) for tok in preds[0]])
    assert torch.allclose(got, ref, atol=1e-5)
    assert out["datatype"] == "FP32" and out["shape"][0] == 2 and out["shape"][2] == ref.shape[1]
    assert torch.allclose(torch.tensor(out["data"][: ref.numel()]).view(ref.shape), ref, atol=1e-5)


async def test_fill_mask_raw_logits(models):
    path = models["bert_mlm"]
    text = "hello [MASK]"
    ids, ref = reference(path, transformers.AutoModelForMaskedLM, text)
    mask_pos = ids.index(transformers.AutoTokenizer.from_pretrained(str(path)).mask_token_id)
    async with serve(path, return_raw_logits=True) as client:
        preds = await v1(client, [text])
        out = await v2(client, [text])
    (mask,) = preds[0]
    assert [next(iter(d)) for d in mask] == [str(i) for i in range(ref.shape[1])]
    assert torch.allclose(torch.tensor([next(iter(d.values())) for d in mask]), ref[mask_pos], atol=1e-5)
    assert out["datatype"] == "FP32" and out["shape"] == [1, 1, ref.shape[1]]
    assert torch.allclose(torch.tensor(out["data"]), ref[mask_pos], atol=1e-5)


async def test_disable_special_tokens(models):
    path = models["bert_cls"]
    plain, ref = reference(path, transformers.AutoModelForSequenceClassification, TEXTS[0], add_special_tokens=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok.cls_token_id not in plain and tok.sep_token_id not in plain
    async with serve(path, return_raw_logits=True, disable_special_tokens=True) as client:
        preds = await v1(client, [TEXTS[0]])
    assert torch.allclose(torch.tensor(list(preds[0].values())), ref, atol=1e-5)
    _, with_specials = reference(path, transformers.AutoModelForSequenceClassification, TEXTS[0])
    assert not torch.allclose(ref, with_specials, atol=1e-5)
    backend = HuggingFaceBackend(ModelConfig.local(path, disable_special_tokens=True), BatchingConfig())
    service = ModelService("m", backend, model=backend.model_config)
    await service.start()
    try:
        (ids,) = service.encode_inputs([TEXTS[0]], "instances")
    finally:
        await service.stop()
    assert ids == plain


async def test_disable_lower_case(models):
    """The fixture BERT tokenizer lowercases (do_lower_case=True): with the flag "Hello" is no
    longer "hello"."""
    path = models["bert_cls"]
    for disable, same in ((False, True), (True, False)):
        backend = HuggingFaceBackend(ModelConfig.local(path, disable_lower_case=disable), BatchingConfig())
        await backend.start()
        try:
            upper, lower = backend.encode_text("Hello"), backend.encode_text("hello")
        finally:
            await backend.stop()
        assert (upper == lower) is same


def test_exclusive_flags_are_one_line_error(models):
    proc = subprocess.run(
        [sys.executable, "-m", "hfserve", "--model_dir", str(models["bert_cls"]), "--model_name", "m",
         "--return_raw_logits", "--return_probabilities"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["hfserve: error: --return_raw_logits and --return_probabilities are exclusive; give one"]


async def test_offsets_mapping(models):
    path = models["bert_tok"]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    texts = ["hello world", "the"]
    want = [[list(p) for p in tok(t, return_offsets_mapping=True)["offset_mapping"]] for t in texts]
    async with serve(path, return_offsets_mapping=True) as client:
        r = await client.post("/v1/models/m:predict", json={"instances": texts})
        body = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [2], "data": texts}]}
        r2 = await client.post("/v2/models/m/infer", json=body)
        r3 = await client.post("/v2/models/m/infer", json={**body, "parameters": {"binary_data_output": True}})
        meta = (await client.get("/v2/models/m")).json()
    assert r.status_code == 200 and r.json()["offset_mapping"] == want
    assert [len(row[0]) for row in r.json()["predictions"]] == [len(w) for w in want]
    outs = {o["name"]: o for o in r2.json()["outputs"]}
    off = outs["offset_mapping"]
    width = len(want[0])
    assert off["datatype"] == "INT64" and off["shape"] == [2, width, 2]
    padded = [x for row in want for p in row + [[-1, -1]] * (width - len(row)) for x in p]
    assert off["data"] == padded
    assert {"name": "offset_mapping", "datatype": "INT64", "shape": [-1, -1, 2]} in meta["outputs"]
    assert r3.status_code == 200
    head_len = int(r3.headers["inference-header-content-length"])
    head = json.loads(r3.content[:head_len])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    tail = r3.content[head_len + sizes[0] :]
    assert len(tail) == sizes[1] and np.frombuffer(tail, dtype="<i8").tolist() == padded
    async with serve(path) as client:  # off: no second output
        r4 = await client.post("/v2/models/m/infer", json=body)
    assert [o["name"] for o in r4.json()["outputs"]] == ["output-0"]


def test_offsets_mapping_over_grpc(server_factory, models):
    """gRPC (tritonclient, raw contents): offset_mapping is the second output."""
    import tritonclient.grpc as tg

    server = server_factory("bert_tok", "--return_offsets_mapping", name="tok_offsets")
    tok = transformers.AutoTokenizer.from_pretrained(str(models["bert_tok"]))
    want = [list(p) for p in tok("hello world", return_offsets_mapping=True)["offset_mapping"]]
    inp = tg.InferInput("input-0", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"hello world"], dtype=np.object_))
    with tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as c:
        result = c.infer(server.name, [inp])
        meta = c.get_model_metadata(server.name, as_json=True)
    assert [o.name for o in result.get_response().outputs] == ["output-0", "offset_mapping"]
    assert result.as_numpy("offset_mapping").tolist() == [want]
    assert {"name": "offset_mapping", "datatype": "INT64", "shape": ["-1", "-1", "2"]} in meta["outputs"]


def test_flags_resolve_into_the_model_section(models, capsys):
    from hfserve.cli import build_parser, resolve

    argv = ["--model_dir", str(models["bert_tok"]), "--model_name", "m", "--return_raw_logits",
            "--return_offsets_mapping", "--disable_lower_case", "--disable_special_tokens"]
    model = resolve(build_parser().parse_args(argv)).model
    assert (model.return_raw_logits, model.return_offsets_mapping) == (True, True)
    assert (model.disable_lower_case, model.disable_special_tokens) == (True, True)
    with pytest.raises(SystemExit) as exc:
        resolve(build_parser().parse_args(["--model_dir", str(models["bert_cls"]), "--return_offsets_mapping"]))
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hfserve: error: --return_offsets_mapping applies to token classification models, not to sequence classification"
    ]
