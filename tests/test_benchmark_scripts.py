"""benchmarks/gpu.py stays runnable where there is no GPU: its CPU mode on the tiny fixture model writes a table
with sane numbers (it shares peers.py's servers, launch, load generator and table, so this runs those too)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_script_runs_on_cpu_with_the_tiny_model(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "OUT": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--model", "tiny", "--device", "cpu", "--quick",
         "--servers", "hfserve-hf", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "no GPU (CPU:" in text  # the device line
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 6 and cells[0] == "hfserve-hf":
            assert "failed" not in line, line
            rows[(cells[1], int(cells[2]))] = cells
    levels = {(m, c) for m, c in rows}
    assert {("tiny Llama (fixture)", c) for c in (1, 8, 32)} <= levels, text
    assert ("all-MiniLM-L6-v2", 32) in levels, text
    for (model, _c), cells in rows.items():
        assert float(cells[3]) > 0, cells  # tokens/s (embeddings/s)
        assert re.fullmatch(r"[\d.]+ ms", cells[5]) and re.fullmatch(r"[\d.]+ ms", cells[6]), cells  # p50, p95
        if model.startswith("tiny"):
            assert re.fullmatch(r"[\d.]+ ms", cells[4]), cells  # TTFT p50
    assert (out.with_suffix(".json")).exists()


def _peers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return peers


def test_peers_side_by_side_measures_every_server_in_turns(tmp_path, monkeypatch):
    """Side by side (peers.py's default), two servers of one model are both started and each level
    runs ROUNDS times on each, every run recorded with the idle servers' CPU before it; both stop."""
    peers = _peers()
    models = peers.build_models(["tiny"])
    first = next(s for s in peers.SERVERS if s.key == "hfserve-hf")
    second = dataclasses.replace(first, key="hfserve-hf-twin")
    stopped = []
    stop = peers.stop
    monkeypatch.setattr(peers, "stop", lambda run: (stop(run), stopped.append(run)))
    out = peers.run_servers(models, [first, second], False, tmp_path, gen_levels=(1,), side_by_side=True)
    assert set(out["tiny"]) == {"hfserve-hf", "hfserve-hf-twin"}, out
    for entry in out["tiny"].values():
        assert "error" not in entry, entry
        (level,) = entry["levels"]
        assert level["concurrency"] == 1
        assert len(level["runs"]) == peers.ROUNDS, level
        assert level["per_s"] == max(r["per_s"] for r in level["runs"]) > 0
        assert all("others_idle_cores" in r for r in level["runs"])
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["hfserve-hf-tiny.log", "hfserve-hf-twin-tiny.log"], logs
    assert sorted(run.server.key for run in stopped) == ["hfserve-hf", "hfserve-hf-twin"]
    assert all(run.proc.poll() is not None for run in stopped)


def test_peers_write_of_a_subset_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--only", "tiny", "--write"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    assert "--write replaces the whole table" in proc.stderr
