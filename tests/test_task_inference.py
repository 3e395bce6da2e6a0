"""Task inference for today's models (issue 12, part 5).

Decoder-only models whose class ends in ``ForConditionalGeneration`` (Gemma 3, Llama 4,
Mistral 3, Qwen2-VL, ...) are text generators: the configuration decides
(``is_encoder_decoder``, transformers' auto-model mappings), not the class-name suffix.
The tiny Gemma 3 and Qwen2-VL fixtures are served text-only on the transformers backend,
token for token as transformers' own greedy ``generate``.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import torch
import transformers

from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.cli import build_parser, resolve
from hfserve.config import BatchingConfig, ModelConfig
from hfserve.generation import SamplingParams
from hfserve.tasks import Task, TaskInferenceError, infer_task, text_generation_auto_class
from tests.conftest import VLLM_INSTALLED

MULTIMODAL = ["gemma3", "qwen2_vl"]
#: the class transformers 5 loads each fixture with for text-only generation
LOADED_AS = {"gemma3": "Gemma3ForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}
PROMPTS = ["The cat sat on", "Once upon a time there was a king who", "hello"]


def _cfg(arch: str, model_type: str | None, **extra) -> dict:
    cfg: dict = {"architectures": [arch], **extra}
    if model_type is not None:
        cfg["model_type"] = model_type
    return cfg


@pytest.mark.parametrize(
    "config,task",
    [
        # decoder-only "ForConditionalGeneration": multimodal checkpoints of today's chat models
        (_cfg("Gemma3ForConditionalGeneration", "gemma3", text_config={"model_type": "gemma3_text"}), Task.text_generation),
        (_cfg("Qwen2VLForConditionalGeneration", "qwen2_vl"), Task.text_generation),
        (_cfg("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"), Task.text_generation),
        (_cfg("Qwen3VLForConditionalGeneration", "qwen3_vl"), Task.text_generation),
        (_cfg("Llama4ForConditionalGeneration", "llama4"), Task.text_generation),
        (_cfg("Mistral3ForConditionalGeneration", "mistral3"), Task.text_generation),
        (_cfg("LlavaForConditionalGeneration", "llava", text_config={"model_type": "llama"}), Task.text_generation),
        (_cfg("PaliGemmaForConditionalGeneration", "paligemma"), Task.text_generation),
        # encoder-decoders stay text2text, by their config
        (_cfg("T5ForConditionalGeneration", "t5", is_encoder_decoder=True), Task.text2text_generation),
        (_cfg("T5ForConditionalGeneration", "t5"), Task.text2text_generation),  # no flag: the seq2seq mapping
        (_cfg("BartForConditionalGeneration", "bart"), Task.text2text_generation),  # bart also has a causal-LM class
        (_cfg("MarianMTModel", "marian"), Task.text2text_generation),
        (_cfg("WhisperForConditionalGeneration", "whisper"), Task.text2text_generation),
        (_cfg("Florence2ForConditionalGeneration", "florence2", text_config={"model_type": "bart"}), Task.text2text_generation),
        (_cfg("Pix2StructForConditionalGeneration", "pix2struct", is_encoder_decoder=True), Task.text2text_generation),
        (_cfg("EncoderDecoderModel", "encoder-decoder", is_encoder_decoder=True), Task.text2text_generation),
        # remote code (a model type transformers does not know): its auto_map, else the suffix rule
        (_cfg("MyVLForConditionalGeneration", "my_vl", auto_map={"AutoModelForCausalLM": "m.MyVL"}), Task.text_generation),
        (_cfg("MyMTForConditionalGeneration", "my_mt", auto_map={"AutoModelForSeq2SeqLM": "m.MyMT"}), Task.text2text_generation),
        (_cfg("MyForConditionalGeneration", "my_model"), Task.text2text_generation),
        # the unambiguous suffixes are unchanged
        (_cfg("LlamaForCausalLM", "llama"), Task.text_generation),
        (_cfg("Gemma3ForCausalLM", "gemma3_text"), Task.text_generation),
        (_cfg("BertForMaskedLM", "bert"), Task.fill_mask),
        (_cfg("BertModel", "bert"), Task.text_embedding),
    ],
)
def test_task_from_config(config, task):
    assert infer_task(config) is task


def test_bare_architecture_list_keeps_the_suffix_rule():
    assert infer_task(["Gemma3ForConditionalGeneration"]) is Task.text2text_generation
    assert infer_task(["LlamaForCausalLM"]) is Task.text_generation
    with pytest.raises(TaskInferenceError):
        infer_task({"model_type": "gemma3"})


@pytest.mark.parametrize(
    "config,cls",
    [
        (_cfg("Gemma3ForConditionalGeneration", "gemma3"), "AutoModelForCausalLM"),
        (_cfg("Qwen2VLForConditionalGeneration", "qwen2_vl"), "AutoModelForImageTextToText"),
        (_cfg("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"), "AutoModelForImageTextToText"),
        (_cfg("Mistral3ForConditionalGeneration", "mistral3"), "AutoModelForImageTextToText"),
        # llama4's causal-LM class is the text-only Llama4ForCausalLM; the checkpoint is the multimodal class
        (_cfg("Llama4ForConditionalGeneration", "llama4"), "AutoModelForImageTextToText"),
        (_cfg("LlamaForCausalLM", "llama"), "AutoModelForCausalLM"),
        (_cfg("MyVL", "my_vl", auto_map={"AutoModelForImageTextToText": "m.MyVL"}), "AutoModelForImageTextToText"),
    ],
)
def test_text_generation_auto_class(config, cls):
    assert text_generation_auto_class(config) == cls


@pytest.mark.parametrize("name", MULTIMODAL)
def test_fixture_task_is_text_generation(models, name):
    config = json.loads((models[name] / "config.json").read_text())
    assert config["architectures"][0].endswith("ForConditionalGeneration") and "text_config" in config
    assert not config.get("is_encoder_decoder")
    assert infer_task(config, models[name]) is Task.text_generation
    resolved = resolve(build_parser().parse_args(["--model_dir", str(models[name])]))
    assert resolved.model.task is Task.text_generation
    # the encoder-decoder fixture is still one
    assert infer_task(json.loads((models["t5"] / "config.json").read_text())) is Task.text2text_generation


@pytest.mark.parametrize("name", MULTIMODAL)
def test_vllm_supports_says_why(models, name):
    """What ``--backend auto`` decides for these models, without starting an engine."""
    from hfserve.backends.vllm import supports

    ok, reason = supports(ModelConfig.local(models[name]))
    if not VLLM_INSTALLED:
        assert not ok and "vLLM" in reason
        return
    arch = LOADED_AS[name]
    # no longer refused as text2text; vLLM knows both architectures (head dim 64 passes its CPU check)
    assert "text2text" not in reason
    assert (ok, reason) == (True, f"vLLM supports {arch} for text generation"), reason


# ------------------------------------------------------------------ transformers backend


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module", params=MULTIMODAL)
def served(request, models):
    """(name, in-process backend, tokenizer, reference model) for one fixture."""
    name = request.param
    backend = HuggingFaceBackend(ModelConfig.local(models[name]), BatchingConfig(max_batch_size=8, max_batch_wait_ms=50))
    _run(backend.start())
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    auto_cls = getattr(transformers, text_generation_auto_class(json.loads((models[name] / "config.json").read_text())))
    reference = auto_cls.from_pretrained(models[name], dtype=torch.float32).eval()
    yield name, backend, tok, reference
    _run(backend.stop())


def _greedy_reference(tok, model, prompt_ids: list[int], max_new: int, ignore_eos: bool) -> list[int]:
    kwargs = {"eos_token_id": None} if ignore_eos else {}
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


async def _collect(backend, prompt_ids, params, request_id):
    ids: list[int] = []
    async for deltas in backend.generate(prompt_ids, params, request_id):
        for d in deltas:
            ids += d.token_ids
    return ids


def test_backend_loads_the_decoder_only_class(served):
    name, backend, _, reference = served
    assert backend.task is Task.text_generation
    assert type(backend.model).__name__ == LOADED_AS[name] == type(reference).__name__
    assert backend.scheduler is not None and not backend.scheduler.encoder_decoder


def test_greedy_matches_transformers_generate(served):
    """Each prompt alone, and all of them at once (one scheduler batch), past Gemma 3's
    16-token sliding window: token for token as ``generate``."""
    _, backend, tok, reference = served
    max_new = 24
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    expected = [_greedy_reference(tok, reference, ids, max_new, ignore_eos=True) for ids in prompts]
    assert any(len(set(e)) > 2 for e in expected)  # the random model does not just repeat one token
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    alone = [_run(_collect(backend, ids, params, f"a{i}")) for i, ids in enumerate(prompts)]
    assert alone == expected

    async def together():
        return await asyncio.gather(*(_collect(backend, ids, params, f"t{i}") for i, ids in enumerate(prompts)))

    assert _run(together()) == expected


@pytest.mark.parametrize("name", MULTIMODAL)
def test_openai_completion_on_the_transformers_backend(server_factory, models, name):
    """A text-only completion from a real server (task inferred, transformers backend)."""
    server = server_factory(name, "--backend", "huggingface")
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    model_cls = getattr(transformers, text_generation_auto_class(json.loads((models[name] / "config.json").read_text())))
    model = model_cls.from_pretrained(models[name], dtype=torch.float32).eval()
    prompt = "Once upon a time"
    ids = tok(prompt)["input_ids"]
    expected = _greedy_reference(tok, model, ids, 12, ignore_eos=False)
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    cut = next((i for i, t in enumerate(expected) if t == tok.eos_token_id), None)
    assert r.choices[0].text == tok.decode(expected[:cut] if cut is not None else expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == (cut + 1 if cut is not None else 12)
    assert "text_generation" in server.log()
