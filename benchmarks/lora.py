"""LoRA benchmark (issue 14), transformers backend: the cost of mixing adapters in one batch. About 2 minutes here.

    python benchmarks/lora.py [--concurrency 8] [--tokens 64] [--rounds 5]

Starts an hfserve server on the fixture Llama with the two fixture adapters (``--enable-lora
--max-loras 2 --lora-modules a=... b=...``) and measures decoding throughput at ``--concurrency``
concurrent completions of ``--tokens`` tokens each (greedy, ``ignore_eos``):

- mixed: the requests spread over the base model and the two adapters (request i -> base, a, b, ...);
- base: the same traffic, all on the base model, on the same server;
- and, on a second server without ``--enable-lora``, the same base traffic (the cost of the
  adapter machinery itself to base requests).

Tokens/s (wall) and tokens per server CPU second (steadier on a shared machine), best and median
of ``--rounds`` rounds, alternated.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.fixture_servers import PROMPTS, ROOT, build_all, cpu_seconds, start_server, stop_server


def throughput(client: httpx.Client, names: list[str], tokens: int, pid: int) -> tuple[float, float]:
    """One request per entry of ``names`` (its model), all at once: (tokens/s wall, tokens per server CPU s)."""

    def one(i: int) -> int:
        body = {"model": names[i], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        r = client.post("/openai/v1/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    with ThreadPoolExecutor(len(names)) as pool:
        cpu, started = cpu_seconds(pid), time.perf_counter()
        total = sum(pool.map(one, range(len(names))))
        return total / (time.perf_counter() - started), total / max(1e-9, cpu_seconds(pid) - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    models = build_all(ROOT / ".fixtures")
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-lora-"))
    lora_flags = [
        "--enable-lora", "--max-loras", "2",
        "--lora-modules", f"a={models['llama_lora_a']}", f"b={models['llama_lora_b']}",
    ]  # fmt: skip
    common = ["--backend", "huggingface", "--disable_log_requests"]
    with_lora = start_server(models["llama"], "llama", log_dir, *common, *lora_flags)
    plain = start_server(models["llama"], "llama", log_dir, *common)
    mixed_names = [("llama", "a", "b")[i % 3] for i in range(args.concurrency)]
    base_names = ["llama"] * args.concurrency
    results: dict[str, list[tuple[float, float]]] = {"mixed": [], "base": [], "plain": []}
    try:
        lc = httpx.Client(base_url=with_lora.url, timeout=300)
        pc = httpx.Client(base_url=plain.url, timeout=300)
        for client, pid, names in ((lc, with_lora.proc.pid, mixed_names), (lc, with_lora.proc.pid, base_names), (pc, plain.proc.pid, base_names)):
            throughput(client, names, 8, pid)  # warm-up
        for _ in range(args.rounds):
            results["mixed"].append(throughput(lc, mixed_names, args.tokens, with_lora.proc.pid))
            results["base"].append(throughput(lc, base_names, args.tokens, with_lora.proc.pid))
            results["plain"].append(throughput(pc, base_names, args.tokens, plain.proc.pid))
    finally:
        stop_server(with_lora)
        stop_server(plain)
    print(f"decoding at concurrency {args.concurrency}, {args.tokens} tokens each ({args.rounds} rounds, alternated):")
    labels = {
        "mixed": "mixed base/a/b (LoRA server)",
        "base": "all base (LoRA server)      ",
        "plain": "all base (no --enable-lora) ",
    }
    summary: dict[str, dict[str, float]] = {}
    for key, label in labels.items():
        wall = [w for w, _ in results[key]]
        cpu = [c for _, c in results[key]]
        summary[key] = {"wall_best": max(wall), "wall_median": statistics.median(wall), "cpu_median": statistics.median(cpu)}
        print(
            f"  {label} wall best {max(wall):6.0f}  median {statistics.median(wall):6.0f} tokens/s;"
            f"  per CPU second (median) {statistics.median(cpu):6.0f}   rounds {', '.join(f'{w:.0f}' for w in wall)}"
        )
    m, b, p = summary["mixed"], summary["base"], summary["plain"]
    print(f"  mixed / all base: wall median {m['wall_median'] / b['wall_median']:.1%}, best {m['wall_best'] / b['wall_best']:.1%}, per CPU second {m['cpu_median'] / b['cpu_median']:.1%}")
    print(f"  all base, LoRA server / plain server: wall median {b['wall_median'] / p['wall_median']:.1%}, per CPU second {b['cpu_median'] / p['cpu_median']:.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
