"""Task predictions for the KServe families (v1 predict, v2 infer REST and gRPC).

One function turns a list of input texts into the task's answer, once, in two
renderings: the v1 ``predictions`` list and the v2 ``output-0`` tensor. The
shapes follow KServe's huggingfaceserver where it defines them (see README).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import errors
from .sampling import SamplingOptions
from .service import ModelService, argmax, softmax
from .tasks import Task
from .validation import validate

OUTPUT_NAME = "output-0"
#: token classification's second output under ``--return_offsets_mapping``
OFFSETS_NAME = "offset_mapping"
INPUT_NAME = "input-0"
FILL_MASK_TOP_K = 5


@dataclass
class Tensor:
    name: str
    datatype: str  # "INT64", "FP32", "BYTES"
    shape: list[int]
    data: list[Any]  # flat, row-major; str for BYTES

    def as_numpy(self) -> np.ndarray:
        if self.datatype == "BYTES":
            return np.array([d.encode("utf-8") for d in self.data], dtype=np.object_).reshape(self.shape)
        dtype = {"INT64": np.int64, "FP32": np.float32}[self.datatype]
        return np.asarray(self.data, dtype=dtype).reshape(self.shape)


@dataclass
class Prediction:
    predictions: list[Any]  # v1
    tensor: Tensor  # v2
    #: further v1 response keys beside ``predictions`` (``offset_mapping``)
    v1_extra: dict[str, Any] = field(default_factory=dict)
    #: further v2 outputs after ``output-0`` (``offset_mapping``)
    extra: list[Tensor] = field(default_factory=list)


def output_spec(task: Task, return_probabilities: bool, return_raw_logits: bool = False) -> tuple[str, list[int]]:
    """The v2 datatype and shape (-1: variable) of ``output-0`` for a task."""
    if return_raw_logits and task in (Task.sequence_classification, Task.token_classification, Task.fill_mask):
        return "FP32", [-1, -1] if task is Task.sequence_classification else [-1, -1, -1]
    if task.is_generative:
        return "BYTES", [-1]
    if task is Task.text_embedding:
        return "FP32", [-1, -1]
    if task is Task.sequence_classification:
        return ("FP32", [-1, -1]) if return_probabilities else ("INT64", [-1])
    if task is Task.token_classification:
        return ("FP32", [-1, -1, -1]) if return_probabilities else ("INT64", [-1, 1, -1])
    return "BYTES", [-1]


def model_metadata(service: ModelService) -> dict[str, Any]:
    datatype, shape = output_spec(service.task, service.return_probabilities, service.return_raw_logits)
    return {
        "name": service.name,
        "versions": ["1"],
        "platform": f"hfserve-{service.backend.name}",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": datatype, "shape": shape}]
        + (
            [{"name": OFFSETS_NAME, "datatype": "INT64", "shape": [-1, -1, 2]}]
            if service.return_offsets_mapping and service.task is Task.token_classification
            else []
        ),
    }


class PredictParameters(SamplingOptions):
    """v1 ``parameters`` / v2 request ``parameters`` for generative models."""


async def predict(
    service: ModelService,
    texts: list[str],
    parameters: dict[str, Any] | None,
    request_id: str,
    *,
    param: str,
) -> Prediction:
    """Run the model's task on ``texts``. ``param`` names the inputs in errors."""
    task = service.task
    if not texts:
        raise errors.InvalidRequest(f"{param} must hold at least one input", param=param)
    if task.is_generative:
        return await _generate(service, texts, parameters or {}, request_id, param)
    if parameters:
        name = next(iter(parameters))
        raise errors.UnsupportedParameter(
            f"parameter {errors.echo(name)} is not supported for a {task.label} model; remove it",
            param=f"parameters.{name}",
        )
    inputs = service.encode_inputs(texts, param)
    if task is Task.text_embedding:
        return _embeddings(await service.embed(inputs))
    if task is Task.sequence_classification:
        if service.return_raw_logits:
            return _raw_classes(await service.classify(inputs))
        return _classes(await service.classify(inputs), service.return_probabilities)
    if task is Task.token_classification:
        per_token = await service.classify_tokens(inputs)
        if service.return_raw_logits:
            result = _raw_token_classes(per_token)
        else:
            result = _token_classes(per_token, service.return_probabilities)
        if service.return_offsets_mapping:
            _add_offsets(result, service.offset_mapping(texts, inputs))
        return result
    return await _fill_mask(service, inputs)


def _embeddings(vectors: list[list[float]]) -> Prediction:
    dim = len(vectors[0]) if vectors else 0
    return Prediction(vectors, Tensor(OUTPUT_NAME, "FP32", [len(vectors), dim], [x for v in vectors for x in v]))


def _classes(logits: list[list[float]], probs_wanted: bool) -> Prediction:
    n = len(logits)
    if probs_wanted:
        probs = [softmax(row) for row in logits]
        v1 = [{str(j): p for j, p in enumerate(row)} for row in probs]
        return Prediction(v1, Tensor(OUTPUT_NAME, "FP32", [n, len(probs[0])], [p for r in probs for p in r]))
    ids = [argmax(row) for row in logits]
    return Prediction(ids, Tensor(OUTPUT_NAME, "INT64", [n], ids))


def _token_classes(per_token: list[list[list[float]]], probs_wanted: bool) -> Prediction:
    n = len(per_token)
    width = max(len(x) for x in per_token)
    if probs_wanted:
        probs = [[softmax(tok) for tok in row] for row in per_token]
        v1 = [[{str(j): p for j, p in enumerate(tok)} for tok in row] for row in probs]
        classes = len(probs[0][0])
        flat: list[float] = []
        for row in probs:
            for tok in row:
                flat.extend(tok)
            flat.extend([0.0] * classes * (width - len(row)))
        return Prediction(v1, Tensor(OUTPUT_NAME, "FP32", [n, width, classes], flat))
    ids = [[argmax(tok) for tok in row] for row in per_token]
    flat_ids = [i for row in ids for i in row + [-1] * (width - len(row))]
    return Prediction([[row] for row in ids], Tensor(OUTPUT_NAME, "INT64", [n, 1, width], flat_ids))


def _add_offsets(result: Prediction, offsets: list[list[tuple[int, int]]]) -> None:
    """``--return_offsets_mapping``: v1 ``offset_mapping`` beside ``predictions`` (per input, per
    token ``[start, end]``); v2 output ``offset_mapping`` INT64 [N, tokens, 2] (shorter inputs
    padded with -1)."""
    width = max(len(row) for row in offsets)
    result.v1_extra["offset_mapping"] = [[[s, e] for s, e in row] for row in offsets]
    flat = [x for row in offsets for pair in [*row, *[(-1, -1)] * (width - len(row))] for x in pair]
    result.extra.append(Tensor(OFFSETS_NAME, "INT64", [len(offsets), width, 2], flat))


def _raw_classes(logits: list[list[float]]) -> Prediction:
    """``--return_raw_logits``: v1 ``{"0": l0, ...}`` per input (huggingfaceserver's), v2 FP32 [N, classes]."""
    v1 = [{str(j): x for j, x in enumerate(row)} for row in logits]
    return Prediction(v1, Tensor(OUTPUT_NAME, "FP32", [len(logits), len(logits[0])], [x for r in logits for x in r]))


def _raw_token_classes(per_token: list[list[list[float]]]) -> Prediction:
    """``--return_raw_logits``: v1 per input a list of ``{"0": l0, ...}`` per token (huggingfaceserver's),
    v2 FP32 [N, tokens, classes] (shorter inputs padded with 0)."""
    width = max(len(x) for x in per_token)
    classes = len(per_token[0][0])
    v1 = [[{str(j): x for j, x in enumerate(tok)} for tok in row] for row in per_token]
    flat: list[float] = []
    for row in per_token:
        for tok in row:
            flat.extend(tok)
        flat.extend([0.0] * classes * (width - len(row)))
    return Prediction(v1, Tensor(OUTPUT_NAME, "FP32", [len(per_token), width, classes], flat))


async def _raw_fill_mask(service: ModelService, inputs: list[list[int]]) -> Prediction:
    """``--return_raw_logits``: v1 per input, per mask token, ``{"id": logit}`` per vocabulary id
    (huggingfaceserver's); v2 FP32 [N, masks, vocab] (inputs with fewer masks padded with 0)."""
    top = await service.fill_mask(inputs, 0)
    v1 = [[[{str(tid): x} for tid, x in mask] for mask in row] for row in top]
    masks = max(len(row) for row in top)
    vocab = len(top[0][0])
    flat: list[float] = []
    for row in top:
        for mask in row:
            flat.extend(x for _, x in mask)
        flat.extend([0.0] * vocab * (masks - len(row)))
    return Prediction(v1, Tensor(OUTPUT_NAME, "FP32", [len(top), masks, vocab], flat))


async def _fill_mask(service: ModelService, inputs: list[list[int]]) -> Prediction:
    if service.return_raw_logits:
        return await _raw_fill_mask(service, inputs)
    n = len(inputs)
    probs_wanted = service.return_probabilities
    top = await service.fill_mask(inputs, FILL_MASK_TOP_K if probs_wanted else 1)
    if probs_wanted:
        v1 = [
            [
                [{"token_id": tid, "token": service.decode_token(tid).strip(), "score": p} for tid, p in mask]
                for mask in row
            ]
            for row in top
        ]
        return Prediction(v1, Tensor(OUTPUT_NAME, "BYTES", [n], [json.dumps(r) for r in v1]))
    words = [" ".join(service.decode_token(mask[0][0]).strip() for mask in row) for row in top]
    return Prediction(words, Tensor(OUTPUT_NAME, "BYTES", [n], words))


async def _generate(
    service: ModelService, texts: list[str], parameters: dict[str, Any], request_id: str, param: str
) -> Prediction:
    opts = validate(parameters, PredictParameters, prefix="parameters")
    if opts.n != 1:
        raise errors.UnsupportedParameter("n must be 1 on this route; use the OpenAI routes for n > 1", param="parameters.n")
    prompts = [service.tokenize(t) for t in texts]
    params = [
        service.sampling_params(
            opts,
            len(ids),
            default_max_tokens=None,
            max_tokens_param="parameters.max_tokens",
        )
        for ids in prompts
    ]
    results = await service.generate_all(prompts, params, request_id)
    outputs = [r.choices[0].text for r in results]
    return Prediction(outputs, Tensor(OUTPUT_NAME, "BYTES", [len(outputs)], outputs))
