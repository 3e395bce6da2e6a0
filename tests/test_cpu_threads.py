"""PyTorch's CPU thread count is capped at the CPUs the process may use (backends/cpu_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hfserve.backends.cpu_threads import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, AFFINITY),  # no cgroup files: the affinity
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # v2, no limit
        ({"cpu.max": "100000 100000\n"}, 1),  # v2, one CPU
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: rounded down
        ({"cpu.max": "5000 100000\n"}, 1),  # a twentieth: still one thread
        ({"cpu.max": f"{(AFFINITY + 8) * 100000} 100000\n"}, AFFINITY),  # a quota above the affinity
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # v1, no limit
    ],
)
def test_usable_cpus(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cpus(tmp_path) == expected


def _threads_after_configure(cgroup, env_extra):
    code = (
        "import pathlib, torch; from hfserve.backends import cpu_threads; "
        "torch.set_num_threads(64); "  # as PyTorch would on a 64-core node
        f"print(cpu_threads.configure(pathlib.Path({str(cgroup)!r})))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env_extra
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)


def test_configure_caps_torch_at_the_quota_unless_omp_num_threads_says(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert _threads_after_configure(tmp_path, {}) == 1
    assert _threads_after_configure(tmp_path, {"OMP_NUM_THREADS": "3"}) == 64  # the user's choice stands
