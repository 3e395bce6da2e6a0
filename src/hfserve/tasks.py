"""Tasks a model can perform, and how a task is inferred from a model's config."""

from __future__ import annotations

import enum
import json
from pathlib import Path


class Task(str, enum.Enum):
    text_generation = "text_generation"
    text2text_generation = "text2text_generation"
    text_embedding = "text_embedding"
    sequence_classification = "sequence_classification"
    token_classification = "token_classification"
    fill_mask = "fill_mask"

    @property
    def is_generative(self) -> bool:
        return self in (Task.text_generation, Task.text2text_generation)

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


# Architecture-name suffix -> task, checked in order (as KServe's huggingfaceserver
# does; the bare-encoder and sentence-transformers rules are hfserve additions).
_SUFFIXES: tuple[tuple[str, Task], ...] = (
    ("ForTokenClassification", Task.token_classification),
    ("ForSequenceClassification", Task.sequence_classification),
    ("ForMaskedLM", Task.fill_mask),
    ("ForCausalLM", Task.text_generation),
    ("LMHeadModel", Task.text_generation),
    ("ForConditionalGeneration", Task.text2text_generation),
    ("MTModel", Task.text2text_generation),
    ("EncoderDecoderModel", Task.text2text_generation),
)

# Encoder-only model classes whose bare form ("BertModel") is an embedding model.
_EMBEDDING_BASES = ("Bert", "Roberta", "XLMRoberta", "DistilBert", "MPNet", "Electra", "Deberta", "DebertaV2", "NomicBert", "ModernBert", "Camembert", "Albert")


class TaskInferenceError(ValueError):
    """The task could not be inferred; the message says how to set it."""


def parse_task(value: str) -> Task:
    """Accept ``text_generation`` as well as ``text-generation``."""
    norm = value.strip().lower().replace("-", "_")
    try:
        return Task(norm)
    except ValueError:
        choices = ", ".join(t.value for t in Task)
        raise TaskInferenceError(f"unsupported task {value!r}; choose one of: {choices}") from None


def infer_task(architectures: list[str] | None, model_dir: Path | None = None) -> Task:
    """Infer the task from ``config.architectures`` (and sentence-transformers files)."""
    if model_dir is not None and (model_dir / "modules.json").is_file():
        return Task.text_embedding
    if not architectures:
        raise TaskInferenceError("the model config names no architecture; set --task")
    arch = architectures[0]
    for suffix, task in _SUFFIXES:
        if arch.endswith(suffix):
            return task
    if arch.endswith("Model") and arch[: -len("Model")] in _EMBEDDING_BASES:
        return Task.text_embedding
    raise TaskInferenceError(f"the task of architecture {arch} could not be inferred; set --task")


def sentence_transformers_pooling(model_dir: Path | None) -> tuple[str, bool] | None:
    """Pooling mode and normalisation from a sentence-transformers model directory.

    Returns ``(mode, normalize)`` with mode one of ``mean``, ``cls``, ``max``,
    ``lasttoken``; None when the directory is not a sentence-transformers model.
    """
    if model_dir is None or not (model_dir / "modules.json").is_file():
        return None
    modules = json.loads((model_dir / "modules.json").read_text())
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg_path = model_dir / module.get("path", "") / "config.json"
            if cfg_path.is_file():
                cfg = json.loads(cfg_path.read_text())
                for key, name in (
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_lasttoken", "lasttoken"),
                ):
                    if cfg.get(key):
                        mode = name
                        break
        elif kind.endswith("Normalize"):
            normalize = True
    return mode, normalize


def sentence_transformers_max_len(model_dir: Path | None) -> int | None:
    """``max_seq_length`` of a sentence-transformers model (where it truncates; vLLM uses it too)."""
    if model_dir is None or not (model_dir / "sentence_bert_config.json").is_file():
        return None
    value = json.loads((model_dir / "sentence_bert_config.json").read_text()).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None
