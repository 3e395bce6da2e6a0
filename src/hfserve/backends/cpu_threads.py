"""How many threads PyTorch's CPU kernels use: no more than the CPUs this process may run on.

PyTorch sizes its OpenMP team by the machine's cores. In a container with a CPU limit (a
Kubernetes pod with ``resources.limits.cpu: 2`` on a 64-core node) that is far more threads
than the process gets CPU time for, and a parallel region ends only when its slowest thread
does: a thread the kernel has descheduled for the quota's period holds every step up. Measured
on 2 cores with the load generator and the server's event loop beside the model: matrix
products over 10 times slower with an OpenMP team larger than the CPU left to it.

:func:`configure` caps PyTorch's thread count at the CPUs this process may use (its CPU
affinity and, under cgroups, its CPU quota, rounded down), unless ``OMP_NUM_THREADS`` says
otherwise (then PyTorch follows it, as always).

Every thread that runs a parallel kernel becomes the master of an OpenMP team of its own,
which lives as long as the thread. Once two teams are alive their threads outnumber the cores,
and GNU OpenMP then lets idle workers spin only briefly before they sleep: every parallel
region of the next forward pass starts by waking a sleeping worker, and the many small kernels
of a decode step (norms, activations, the attention's products) run several times slower.
Measured on 2 cores, a ~110M Llama in bfloat16: a decode step of 1 row 10.2 ms alone, 17.5 ms
while the thread that had loaded the model was alive (8 rows: 13.4 against 21.3). So work
done before or beside the decode loop (loading the model, loading a LoRA adapter) runs on a
thread that ends with it (:func:`run_in_passing_thread`), and the decode thread's team is the
only one alive while it decodes. Encoder batches (embeddings, classification, fill-mask) all run
on one thread for the same reason: on a pool of four, batches submitted back to back (the backend
called in process) landed on two threads, and all-MiniLM-L6-v2 embedded batches of 32 at a median
659/s against 870/s on one (2-core Xeon). Through the server the pool had kept to one thread (the
event loop's work between batches gave the worker time to be idle again): no change measured there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger("hfserve.backends.cpu_threads")

CGROUP = Path("/sys/fs/cgroup")


def _quota(cgroup: Path) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None: no limit."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        if quota.strip() != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs this process can keep busy: its affinity, capped by its cgroup's quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def configure(cgroup: Path = CGROUP) -> int:
    """Cap PyTorch's intra-op threads at :func:`usable_cpus` (``OMP_NUM_THREADS`` takes precedence);
    returns the thread count in use."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = usable_cpus(cgroup)
    if torch.get_num_threads() > cpus:
        logger.info("PyTorch CPU threads: %d (the CPUs this process may use), not %d", cpus, torch.get_num_threads())
        torch.set_num_threads(cpus)
    return torch.get_num_threads()


async def run_in_passing_thread(fn: Callable[..., T], *args: object, name: str = "hf-passing") -> T:
    """``fn(*args)`` on a new thread that ends when it returns, so that the OpenMP team its
    kernels started ends with it (see the module's doc); its result or exception, awaited."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        # the thread's OpenMP team goes once the thread has ended: wait for that
        await asyncio.to_thread(executor.shutdown, wait=True)
