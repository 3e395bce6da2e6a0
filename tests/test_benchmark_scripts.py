"""benchmarks/gpu.py stays runnable where there is no GPU: its CPU mode on the tiny fixture model writes a table
with sane numbers (it shares peers.py's servers, launch, load generator and table, so this runs those too)."""

from __future__ import annotations

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
