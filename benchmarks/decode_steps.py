"""What each change to the transformers backend's decode loop buys (issue 16 part 2), in process.

    python benchmarks/decode_steps.py MODEL_DIR [--dtype float32] [--concurrency 1 8 16]
                                      [--prompt-tokens 12] [--tokens 32] [--variants all]
                                      [--arrivals aligned|staggered]

Drives ``HuggingFaceBackend.generate`` directly (no HTTP, no load generator: the scheduler and the
model alone) with ``concurrency`` closed-loop callers, each asking for ``tokens`` greedy tokens of
a prompt of ``prompt-tokens`` tokens, and prints generated tokens/s for each variant. With
``--arrivals aligned`` (the default) the callers start together and stay in step: their requests
join the batch together and share one prefill. With ``staggered`` each caller starts at a random
offset within 0.6 s and calls for 15 s: requests join one by one, each with a prefill of its own,
as a server's clients do (the bfloat16 ~110M model at c8: ~355 tokens/s aligned, ~245 staggered).
The variants:

- ``plain``: transformers' own layers (``nn.Linear`` with plain weights, the concatenating
  ``DynamicLayer`` KV cache): what the backend did before issue 16;
- ``packed``: large linear weights prepacked for oneDNN, or in bfloat16 on a CPU with AVX-512 BF16
  blocked for hfserve's own kernel where it is faster (backends/cpu_linear.py, bf16_kernel.py);
- ``packed+kv``: that and the KV cache layer that appends in place (backends/kv_cache.py): today's
  backend;
- ``compiled``: today's backend with ``--compile`` (backends/compiled.py: the decode step compiled
  before the backend is ready, around the packed weights' products, one operator each);

and, with ``--ceiling``, transformers' batched ``generate`` at batch ``concurrency`` on the plain
model. Each variant runs in its own process (a variant's weights and oneDNN caches do not help the
next), best of ``--repeats``. The model: e.g. the ~110M Llama,
``python tests/fixtures/build_models.py /tmp/bm --only llama_100m``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "packed", "packed+kv", "compiled")


def _measure(
    model_dir: str, dtype: str, variant: str, concurrency: int, prompt_tokens: int, tokens: int, repeats: int, staggered: bool = False
) -> float:
    """In this process: tokens/s of ``variant`` (or of transformers' ``generate`` for "ceiling")."""
    import torch

    from hfserve.backends import cpu_linear, kv_cache
    from hfserve.backends.huggingface import HuggingFaceBackend
    from hfserve.config import BatchingConfig, ModelConfig
    from hfserve.generation import SamplingParams

    if variant in ("plain", "ceiling"):
        cpu_linear.prepack = lambda model: 0  # type: ignore[assignment]
    if variant in ("plain", "packed", "ceiling"):
        kv_cache.grow_in_place = lambda cache: None  # type: ignore[assignment]
    batching = BatchingConfig(max_batch_size=64, compile=variant == "compiled")
    backend = HuggingFaceBackend(dataclasses.replace(ModelConfig.local(model_dir), dtype=dtype), batching)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int]) -> int:
        count = 0
        async for deltas in backend.generate(prompt, params, "bench"):
            count += sum(len(d.token_ids) for d in deltas)
        return count

    async def caller(prompt: list[int], calls: int) -> int:
        return sum([await one(prompt) for _ in range(calls)])

    async def staggered_caller(prompt: list[int], offset: float, until: float) -> int:
        await asyncio.sleep(offset)
        made = 0
        while time.perf_counter() < until:
            made += await one(prompt)
        return made

    async def run() -> float:
        await backend.start()
        vocab = len(backend.tokenizer)
        prompt = [(7 + 31 * i) % (vocab - 10) + 5 for i in range(prompt_tokens)]
        try:
            if variant == "ceiling":
                ids = torch.tensor([prompt] * concurrency)
                kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                best = 0.0
                with torch.inference_mode():
                    backend.model.generate(ids, **kw)
                    for _ in range(repeats):
                        started = time.perf_counter()
                        backend.model.generate(ids, **kw)
                        best = max(best, concurrency * tokens / (time.perf_counter() - started))
                return best
            await asyncio.gather(*(one(prompt) for _ in range(concurrency)))  # warm up
            best = 0.0
            offsets = random.Random(0)
            for _ in range(repeats):
                started = time.perf_counter()
                if staggered:
                    until = started + 15.0
                    made = await asyncio.gather(
                        *(staggered_caller(prompt, offsets.random() * 0.6, until) for _ in range(concurrency))
                    )
                else:
                    made = await asyncio.gather(*(caller(prompt, 3) for _ in range(concurrency)))
                best = max(best, sum(made) / (time.perf_counter() - started))
            return best
        finally:
            await backend.stop()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="all", help=f"comma-separated of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--ceiling", action="store_true", help="also transformers' batched generate")
    parser.add_argument("--arrivals", choices=("aligned", "staggered"), default="aligned", help="callers in step, or joining one by one")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant/level in this process
    args = parser.parse_args(argv)
    if args.one:
        variant, c = args.one.split("@")
        staggered = args.arrivals == "staggered"
        print(json.dumps(_measure(args.model_dir, args.dtype, variant, int(c), args.prompt_tokens, args.tokens, args.repeats, staggered)))
        return 0
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    if args.ceiling:
        variants.append("ceiling")
    print(f"{args.model_dir} {args.dtype}, prompt {args.prompt_tokens} tokens, {args.tokens} generated, {args.arrivals}; tokens/s")
    print("| variant | " + " | ".join(f"c{c}" for c in args.concurrency) + " |")
    print("|---|" + "---:|" * len(args.concurrency))
    for variant in variants:
        row = []
        for c in args.concurrency:
            cmd = [sys.executable, __file__, args.model_dir, "--dtype", args.dtype, "--prompt-tokens", str(args.prompt_tokens),
                   "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--arrivals", args.arrivals,
                   "--one", f"{variant}@{c}"]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            row.append(f"{float(out.stdout.strip().splitlines()[-1]):.1f}" if out.returncode == 0 else "failed")
        print(f"| {variant} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
