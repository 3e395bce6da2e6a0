"""Rerank and score (backend-neutral), and the embeddings' Matryoshka ``dimensions``.

Two kinds of model score a pair of texts (as vLLM serves them):

- a **cross-encoder**: a sequence classifier with one label (a sentence-transformers
  ``CrossEncoder`` directory or a plain ``...ForSequenceClassification``). Each pair is
  tokenized as a pair (``tokenizer(query, document)``: ``[CLS] q [SEP] d [SEP]`` with token
  type 1 from the document on, where the model has token types), its one logit computed by
  the backend (the transformers backend's encoder micro-batcher, vLLM's pooling runner), and
  the model's activation applied as ``CrossEncoder.predict`` does (:func:`activation_name`);
- an **embedding model**: the cosine similarity of the two texts' embeddings.

The API family parses and renders; :func:`score_pairs` does the work through the service.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import errors
from .config import ModelConfig
from .service import ModelService, run_all
from .tasks import Task, sentence_transformers_pooling

logger = logging.getLogger("hfserve.scoring")

#: the activations a one-label cross-encoder may name (``torch.nn`` classes) -> the function
_ACTIVATIONS = {
    "Sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x)),
    "Identity": lambda x: x,
    "Tanh": math.tanh,
    "ReLU": lambda x: max(0.0, x),
    "Softsign": lambda x: x / (1.0 + abs(x)),
}


# ------------------------------------------------------------------ model files
def _read_json(model: ModelConfig, filename: str) -> dict[str, Any]:
    """A JSON file of the model (its directory, else the Hub repository); ``{}`` when absent."""
    path: Path | None = None
    if model.local_dir is not None:
        path = model.local_dir / filename
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model.source, filename, revision=model.revision))
        except Exception:  # noqa: BLE001 - not there (or offline): nothing to read
            return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def activation_name(config: dict[str, Any], st_config: dict[str, Any]) -> str:
    """The activation a cross-encoder's scores go through, chosen as sentence-transformers'
    ``CrossEncoder`` does: ``activation_fn`` of config_sentence_transformers.json (sentence-
    transformers 5+), else ``sentence_transformers.activation_fn`` of config.json (4.x, which vLLM
    reads), else ``sbert_ce_default_activation_function`` (older), else Sigmoid for one label.
    The short class name (``Sigmoid``, ``Identity``, ...)."""
    path = st_config.get("activation_fn")
    if not isinstance(path, str):
        nested = config.get("sentence_transformers")
        path = nested.get("activation_fn") if isinstance(nested, dict) else None
    if not isinstance(path, str):
        path = config.get("sbert_ce_default_activation_function")
    if not isinstance(path, str) or not path.startswith("torch."):
        return "Sigmoid"  # CrossEncoder's default for one label (it also ignores untrusted paths)
    return path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelScoring:
    """What a model's files say about scoring and embedding options (read once per service)."""

    num_labels: int
    activation: str
    matryoshka: bool
    matryoshka_dimensions: tuple[int, ...] | None
    normalized: bool  # the embeddings are L2-normalised (sentence-transformers Normalize, or hfserve's default)

    @classmethod
    def read(cls, model: ModelConfig) -> ModelScoring:
        config = _read_json(model, "config.json")
        st_config = _read_json(model, "config_sentence_transformers.json")
        labels = config.get("id2label")
        num_labels = len(labels) if isinstance(labels, dict) and labels else int(config.get("num_labels") or 2)
        dims = config.get("matryoshka_dimensions")
        dims_tuple = tuple(int(d) for d in dims) if isinstance(dims, list) and dims else None
        _, normalized = sentence_transformers_pooling(model.local_dir) or ("mean", True)
        return cls(
            num_labels=num_labels,
            activation=activation_name(config, st_config),
            matryoshka=bool(dims_tuple) or bool(config.get("is_matryoshka", False)),
            matryoshka_dimensions=dims_tuple,
            normalized=normalized,
        )


def model_scoring(service: ModelService) -> ModelScoring:
    """The service's :class:`ModelScoring` (read at first use, kept)."""
    found = service.__dict__.get("_scoring")
    if found is None:
        found = service.__dict__["_scoring"] = ModelScoring.read(service.model)
    return found


# ------------------------------------------------------------------ embeddings
def embedding_dimensions(service: ModelService, vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """``vectors`` cut to ``dimensions`` as vLLM does for a Matryoshka model (the first
    ``dimensions`` values, L2-normalised again where the model's embeddings are normalised).
    A model that declares no Matryoshka representation (``is_matryoshka`` or
    ``matryoshka_dimensions`` in its config.json, as vLLM reads it) takes only its own size."""
    if dimensions is None or not vectors:
        return vectors
    size = len(vectors[0])
    info = model_scoring(service)
    if not info.matryoshka:
        if dimensions == size:
            return vectors
        raise errors.UnsupportedParameter(
            f"dimensions ({dimensions}) is not supported: this model's embeddings have {size} dimensions "
            "and it declares no Matryoshka representation; leave dimensions out",
            param="dimensions",
        )
    if not 1 <= dimensions <= size:
        raise errors.InvalidRequest(
            f"dimensions ({dimensions}) must be from 1 to the model's embedding size of {size}", param="dimensions"
        )
    if info.matryoshka_dimensions is not None and dimensions not in info.matryoshka_dimensions:
        allowed = ", ".join(str(d) for d in info.matryoshka_dimensions)
        raise errors.UnsupportedParameter(
            f"dimensions ({dimensions}) is not supported: this model's Matryoshka dimensions are {allowed}",
            param="dimensions",
        )
    out = []
    for vec in vectors:
        cut = vec[:dimensions]
        if info.normalized:
            norm = math.sqrt(sum(x * x for x in cut))
            cut = [x / norm for x in cut] if norm > 0 else cut
        out.append(cut)
    return out


# ------------------------------------------------------------------ scoring
@dataclass
class Scores:
    scores: list[float]
    tokens: int


def check_scoring(service: ModelService, operation: str) -> str:
    """How this model scores (``"cross-encoder"`` or ``"embedding"``), or ``unsupported_task``."""
    service.check_ready()
    if service.task is Task.text_embedding:
        return "embedding"
    if service.task is Task.sequence_classification and model_scoring(service).num_labels == 1:
        return "cross-encoder"
    what = f"a {service.task.label} model"
    if service.task is Task.sequence_classification:
        what = f"a sequence classification model with {model_scoring(service).num_labels} labels"
    raise errors.UnsupportedTask(
        f"Model {service.name} is {what}; {operation} needs a cross-encoder (a sequence classifier with one label) "
        "or a text embedding model"
    )


async def score_pairs(
    service: ModelService,
    firsts: list[str],
    seconds: list[str],
    *,
    keep: int | None,
    param_first: str,
    param_second: str,
    operation: str,
) -> Scores:
    """The score of each pair ``(firsts[i], seconds[i])``; ``keep``: tokens to keep per pair
    (the request's truncation, checked by :meth:`ModelService.truncation`), else the server's
    ``--truncate_inputs``, else a pair longer than the model is ``context_length_exceeded``."""
    kind = check_scoring(service, operation)
    if kind == "embedding":
        return await _embedding_scores(service, firsts, seconds, keep=keep, params=(param_first, param_second))
    return await _cross_encoder_scores(service, firsts, seconds, keep=keep, param=param_second)


async def _embedding_scores(
    service: ModelService, firsts: list[str], seconds: list[str], *, keep: int | None, params: tuple[str, str]
) -> Scores:
    """Cosine similarity of the embeddings; each distinct text embedded once."""
    unique_1 = list(dict.fromkeys(firsts))
    unique_2 = list(dict.fromkeys(seconds))
    ids_1 = service.encode_inputs(unique_1, params[0], keep=keep)
    ids_2 = service.encode_inputs(unique_2, params[1], keep=keep)
    vec_1, vec_2 = await run_all([service.embed(ids_1), service.embed(ids_2)])
    by_1 = dict(zip(unique_1, zip(vec_1, ids_1)))
    by_2 = dict(zip(unique_2, zip(vec_2, ids_2)))
    scores, tokens = [], 0
    for a, b in zip(firsts, seconds, strict=True):
        (va, ia), (vb, ib) = by_1[a], by_2[b]
        scores.append(_cosine(va, vb))
        tokens += len(ia) + len(ib)
    return Scores(scores, tokens)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-8)  # torch.nn.functional.cosine_similarity's eps


async def _cross_encoder_scores(
    service: ModelService, firsts: list[str], seconds: list[str], *, keep: int | None, param: str
) -> Scores:
    act = _ACTIVATIONS.get(model_scoring(service).activation)
    if act is None:
        raise errors.UnsupportedTask(
            f"Model {service.name} names the activation {model_scoring(service).activation}, which hfserve cannot apply "
            "to its scores; serve a cross-encoder with Sigmoid, Identity, Tanh, ReLU or Softsign"
        )
    keep = service._encoder_keep(keep)
    limit = service.backend.max_model_len
    kwargs: dict[str, Any] = {"add_special_tokens": service.add_special_tokens}
    if keep is not None:  # as CrossEncoder.predict truncates: longest first, special tokens kept
        kwargs.update(truncation=True, max_length=keep)
    with service.backend.map_exceptions():
        enc = service.tokenizer(list(firsts), list(seconds), **kwargs)
    inputs: list[list[int]] = [list(ids) for ids in enc["input_ids"]]
    types = enc.get("token_type_ids") if hasattr(enc, "get") else None
    starts: list[int] = []
    for i, ids in enumerate(inputs):
        where = f"{param}.{i}"
        if keep is not None and len(ids) > keep:  # fewer tokens than the pair's special tokens: the
            ids = inputs[i] = ids[:keep]  # tokenizer does not cut, so the ids are cut plainly (as vLLM does)
        if not ids:
            raise errors.InvalidRequest("a pair must not be empty", param=where)
        if len(ids) > limit:
            raise errors.ContextLengthExceeded(
                f"Pair {i} (the query and document {i}) is {len(ids)} tokens long, more than the model's context length "
                f"of {limit} tokens; shorten it, or send truncate_prompt_tokens to cut it",
                param=where,
            )
        row = list(types[i])[: len(ids)] if types is not None else []
        starts.append(next((p for p, t in enumerate(row) if t), len(ids)))
    with service.backend.map_exceptions():
        logits = await service.backend.classify_pairs(inputs, starts)
    return Scores([float(act(row[0])) for row in logits], sum(len(x) for x in inputs))
