"""End of sequence: finish_reason "stop", the EOS token counted in usage but not shown in the text.

The random fixture model rarely emits its own EOS, so the test makes the token that greedy decoding
picks second the end-of-sequence token of an in-process backend, and checks what the serving layer
makes of it.
"""

from __future__ import annotations

import asyncio

from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import ModelConfig
from hfserve.generation import SamplingParams
from hfserve.service import ModelService


def test_eos_ends_with_stop_and_is_counted(models):
    async def scenario():
        backend = HuggingFaceBackend(ModelConfig.local(models["llama"]))
        service = ModelService("eos", backend)
        await service.start()
        try:
            prompt = service.tokenize("The cat sat on")
            free = await service.generate_full(prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), "r1")
            ids = free.choices[0].token_ids
            assert ids[0] != ids[1], "the scenario needs two different first tokens"
            backend.eos_token_ids = {ids[1]}  # the second greedy token now ends the sequence
            ended = await service.generate_full(prompt, SamplingParams(max_tokens=6, temperature=0.0), "r2")
            return service, free, ended
        finally:
            await service.stop()

    service, free, ended = asyncio.run(scenario())
    choice = ended.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason is None
    assert choice.token_ids == free.choices[0].token_ids[:2]  # the EOS token is generated and counted...
    assert ended.completion_tokens == 2
    assert choice.text == service.tokenizer.decode(choice.token_ids[:1], skip_special_tokens=True)  # ...not shown
    assert free.choices[0].finish_reason == "length"
