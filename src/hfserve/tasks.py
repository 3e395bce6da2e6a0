"""Tasks a model can perform, and how a task is inferred from a model's config."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


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
)

# Suffixes that name a generative model without saying whether it is an encoder-decoder
# ("T5ForConditionalGeneration") or decoder-only ("Gemma3ForConditionalGeneration",
# "Qwen2VLForConditionalGeneration"): the configuration decides (:func:`_generation_task`).
_GENERATIVE_SUFFIXES = ("ForConditionalGeneration", "MTModel", "EncoderDecoderModel")

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


def infer_task(config: Mapping[str, Any] | Sequence[str] | None, model_dir: Path | None = None) -> Task:
    """Infer the task from a model's ``config.json`` (as a dict) and its sentence-transformers files.

    ``config`` may also be a bare ``architectures`` list; a ``...ForConditionalGeneration``
    architecture is then ``text2text_generation``, as the suffix alone says in huggingfaceserver.
    """
    cfg: Mapping[str, Any] = config if isinstance(config, Mapping) else {"architectures": list(config or [])}
    if model_dir is not None and (model_dir / "modules.json").is_file() and not is_cross_encoder_dir(model_dir):
        return Task.text_embedding
    architectures = cfg.get("architectures")
    if not architectures:
        raise TaskInferenceError("the model config names no architecture; set --task")
    arch = str(architectures[0])
    for suffix, task in _SUFFIXES:
        if arch.endswith(suffix):
            return task
    if arch.endswith(_GENERATIVE_SUFFIXES):
        return _generation_task(arch, cfg)
    if arch.endswith("Model") and arch[: -len("Model")] in _EMBEDDING_BASES:
        return Task.text_embedding
    raise TaskInferenceError(f"the task of architecture {arch} could not be inferred; set --task")


def is_cross_encoder_dir(model_dir: Path | None) -> bool:
    """A sentence-transformers ``CrossEncoder`` directory (its config_sentence_transformers.json
    says so): a sequence classifier, not an embedding model, although it has a modules.json."""
    path = model_dir / "config_sentence_transformers.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "CrossEncoder"
    except (OSError, ValueError, AttributeError):
        return False


def _generation_task(arch: str, cfg: Mapping[str, Any]) -> Task:
    """Encoder-decoder or decoder-only, from the configuration rather than the class name:
    ``is_encoder_decoder`` (of the config or of its ``text_config``), then which of
    transformers' auto-model mappings list the model type, then the ``auto_map`` of a
    remote-code model; a model none of these describes keeps the suffix rule (text2text)."""
    if not isinstance(cfg.get("model_type"), str) and not cfg.get("auto_map") and "is_encoder_decoder" not in cfg:
        return Task.text2text_generation  # a bare architectures list: the suffix rule
    text_cfg = cfg.get("text_config")
    text_cfg = text_cfg if isinstance(text_cfg, Mapping) else {}
    if cfg.get("is_encoder_decoder") or text_cfg.get("is_encoder_decoder"):
        return Task.text2text_generation
    seq2seq, decoder_only = _generation_mappings()
    model_type, text_type = cfg.get("model_type"), text_cfg.get("model_type")
    if model_type in seq2seq or text_type in seq2seq:
        return Task.text2text_generation
    if model_type in decoder_only:
        return Task.text_generation
    auto_map = cfg.get("auto_map")
    if isinstance(auto_map, Mapping):
        if "AutoModelForSeq2SeqLM" in auto_map:
            return Task.text2text_generation
        if "AutoModelForCausalLM" in auto_map or "AutoModelForImageTextToText" in auto_map:
            return Task.text_generation
    if "is_encoder_decoder" in cfg and model_type is not None:
        return Task.text_generation  # said explicitly: not an encoder-decoder
    return Task.text2text_generation


def _generation_mappings() -> tuple[set[str], set[str]]:
    """Model types transformers loads as sequence-to-sequence models, and as decoder-only
    generators (causal LM, image-text-to-text). Imported here: the import costs seconds (torch)."""
    from transformers.models.auto import modeling_auto as auto

    seq2seq = set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)
    decoder_only = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    return seq2seq, decoder_only - seq2seq


def text_generation_auto_class(config: Mapping[str, Any]) -> str:
    """The transformers auto class that loads a decoder-only model for text generation.

    ``AutoModelForCausalLM`` where its mapping lists the model type (Llama, Gemma 3, ...),
    else ``AutoModelForImageTextToText`` where that one does (Qwen2-VL, Mistral 3, ...);
    where both do, the one whose mapping names the config's architecture (Llama 4's
    causal-LM class is the text-only ``Llama4ForCausalLM``, its checkpoints are
    ``Llama4ForConditionalGeneration``)."""
    from transformers.models.auto import modeling_auto as auto

    model_type = str(config.get("model_type") or "")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    image_text = auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if model_type in causal and model_type in image_text and causal[model_type] != arch and image_text[model_type] == arch:
        return "AutoModelForImageTextToText"
    if model_type not in causal and model_type in image_text:
        return "AutoModelForImageTextToText"
    auto_map = config.get("auto_map")
    if isinstance(auto_map, Mapping) and "AutoModelForCausalLM" not in auto_map and "AutoModelForImageTextToText" in auto_map:
        return "AutoModelForImageTextToText"
    return "AutoModelForCausalLM"


def sentence_transformers_pooling(model_dir: Path | None) -> tuple[str, bool] | None:
    """Pooling mode and normalisation from a sentence-transformers model directory.

    Returns ``(mode, normalize)`` with mode one of ``mean``, ``cls``, ``max``,
    ``lasttoken``; None when the directory is not a sentence-transformers model.
    """
    if model_dir is None or not (model_dir / "modules.json").is_file() or is_cross_encoder_dir(model_dir):
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
