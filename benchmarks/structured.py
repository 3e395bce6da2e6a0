"""Structured-outputs benchmark (issue 13 part 5), transformers backend. About a minute on a laptop CPU.

    python benchmarks/structured.py [--concurrency 8] [--tokens 64] [--rounds 3]

Starts an hfserve server on the project's tiny fixture Llama (``--backend huggingface``) and measures:

- decoding throughput at ``--concurrency`` concurrent completions of ``--tokens`` tokens each
  (``ignore_eos``), greedy: free decoding against decoding constrained by a JSON schema (an array
  of objects, ``disable_any_whitespace``; the grammar never completes within the tokens, so every
  step of every row is masked). Tokens/s, best and median of ``--rounds`` rounds, alternated;
  and tokens per CPU second of the server process (steadier than wall time on a shared machine);
- the cost of a new schema: the latency of a one-token request with a schema the server has not
  seen (compiled) against the same request again (cached), and a one-token free request.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.fixture_servers import PROMPTS, ROOT, build_all, cpu_seconds, start_server, stop_server


def schema(tag: str = "") -> dict:
    item = {
        "type": "object",
        "properties": {f"name{tag}": {"type": "string"}, "count": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": [f"name{tag}", "count", "ok"],
    }
    return {"type": "array", "items": item, "minItems": 1}


def constraint(tag: str = "") -> dict:
    return {"structured_outputs": {"json": schema(tag), "disable_any_whitespace": True}}



def throughput(client: httpx.Client, concurrency: int, tokens: int, extra: dict, pid: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per server CPU second)."""
    body = {"model": "llama", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, **extra}

    def one(i: int) -> int:
        r = client.post("/openai/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)]})
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    with ThreadPoolExecutor(concurrency) as pool:
        cpu, started = cpu_seconds(pid), time.perf_counter()
        total = sum(pool.map(one, range(concurrency)))
        return total / (time.perf_counter() - started), total / max(1e-9, cpu_seconds(pid) - cpu)


def latency(client: httpx.Client, extra: dict) -> float:
    body = {"model": "llama", "prompt": "Hi", "max_tokens": 1, "temperature": 0, **extra}
    started = time.perf_counter()
    client.post("/openai/v1/completions", json=body).raise_for_status()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    models = build_all(ROOT / ".fixtures")
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-structured-"))
    handle = start_server(models["llama"], "llama", log_dir, "--backend", "huggingface", "--disable_log_requests")
    try:
        client = httpx.Client(base_url=handle.url, timeout=300)
        pid = handle.proc.pid
        throughput(client, args.concurrency, 8, {}, pid)  # warm-up (and the schema compiled once)
        throughput(client, args.concurrency, 8, constraint(), pid)
        free, constrained, free_cpu, constrained_cpu = [], [], [], []
        for _ in range(args.rounds):
            wall, cpu = throughput(client, args.concurrency, args.tokens, {}, pid)
            free.append(wall)
            free_cpu.append(cpu)
            wall, cpu = throughput(client, args.concurrency, args.tokens, constraint(), pid)
            constrained.append(wall)
            constrained_cpu.append(cpu)
        cold, warm, plain = [], [], []
        for _ in range(5):
            fresh = constraint(uuid.uuid4().hex[:8])
            cold.append(latency(client, fresh))
            warm.append(latency(client, fresh))
            plain.append(latency(client, {}))
    finally:
        stop_server(handle)
    best_free, best_constrained = max(free), max(constrained)
    mid_free, mid_constrained = statistics.median(free), statistics.median(constrained)
    print(f"decoding at concurrency {args.concurrency}, {args.tokens} tokens each ({args.rounds} rounds, alternated):")
    print(f"  free         best {best_free:6.0f}  median {mid_free:6.0f} tokens/s   rounds {', '.join(f'{x:.0f}' for x in free)}")
    print(f"  constrained  best {best_constrained:6.0f}  median {mid_constrained:6.0f} tokens/s   rounds {', '.join(f'{x:.0f}' for x in constrained)}")
    print(f"  constrained / free: best {best_constrained / best_free:.1%}, median {mid_constrained / mid_free:.1%}")
    cf, cc = statistics.median(free_cpu), statistics.median(constrained_cpu)
    print(f"  per server CPU second (median): free {cf:.0f}, constrained {cc:.0f} tokens; constrained / free {cc / cf:.1%}")
    print("one-token request latency, median of 5 (ms):")
    print(f"  new schema (compile) {statistics.median(cold):7.1f}")
    print(f"  same schema (cached) {statistics.median(warm):7.1f}")
    print(f"  no schema            {statistics.median(plain):7.1f}")
    print(json.dumps({"free": free, "constrained": constrained, "free_cpu": free_cpu, "constrained_cpu": constrained_cpu, "cold_ms": cold, "warm_ms": warm, "plain_ms": plain}))


if __name__ == "__main__":
    main()
