"""Issue 15 part 3: ``python -m hfserve.health_check``, the probes of KServe's multinode runtime.

Run as the probes run it (a subprocess; its exit code is the answer: 0 healthy, 1 unhealthy, 2 a
usage error) against a Ray head that the module starts on loopback (one CPU, a small object store,
its own temp dir; stopped by its own process ids at the end), a second Ray node that joins and
leaves, and real hfserve servers: ready, still loading (its backend held before loading by a gate
the test opens), and nothing listening.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest

from tests.servers import free_port, start_server, stop_server, wait_until_ready

pytest.importorskip("ray", reason="the ray extra (pip install 'hfserve[ray]') is not installed")

RAY = pathlib.Path(sys.executable).parent / "ray"
# Ray turns 127.0.0.1 into the machine's outward address unless told it is not a cluster: keep
# every Ray process on loopback
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def health_check(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NODE_COUNT", "ISVC_NAME")}
    full_env.update(RAY_ENV)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hfserve.health_check", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: pathlib.Path
    log: pathlib.Path

    def stop(self) -> None:
        """Stop this node's processes: the `ray start --block` process (which stops what it started),
        then anything left in its process group or naming its temp dir. Never `ray stop`, which would
        stop every Ray on the machine."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        leftovers = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and (
                    os.getpgid(p.pid) == self.proc.pid or any(str(self.temp_dir) in arg for arg in p.info["cmdline"] or [])
                ):
                    leftovers.append(p)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()


def start_ray(*args: str, temp_dir: pathlib.Path) -> RayNode:
    log = temp_dir.with_suffix(".log")
    proc = subprocess.Popen(
        [str(RAY), "start", *args, "--num-cpus=1", "--disable-usage-stats", "--include-dashboard=false", "--block"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **RAY_ENV},
        start_new_session=True,  # its own process group, so that its processes can be found and stopped
    )
    return RayNode(proc, temp_dir, log)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1 (its GCS address is yielded)."""
    # a short path: Ray's socket paths live under it, and a Unix socket path has ~107 characters at most
    temp_dir = pathlib.Path(tempfile.mkdtemp(prefix="hfray", dir="/tmp"))
    port = free_port()
    head = start_ray(
        "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--object-store-memory=78643200", f"--temp-dir={temp_dir}",
        temp_dir=temp_dir,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        proc = health_check(
            "--ray_address", address, "registered_nodes", "--ray_node_count", "1", "--retries", "90", "--interval", "1"
        )
        assert proc.returncode == 0, proc.stderr + head.log.read_text(errors="replace")[-3000:]
        yield address
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        head.log.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ Ray nodes
def test_registered_nodes_counts_the_alive_nodes(ray_head):
    started = time.monotonic()
    proc = health_check("--ray_address", ray_head, "registered_nodes", "--ray_node_count", "1", "--probe_name", "worker_liveness")
    assert proc.returncode == 0, proc.stderr
    assert "1 Ray node(s) registered, 1 expected" in proc.stderr and "worker_liveness probe: healthy" in proc.stderr
    assert time.monotonic() - started < 15, "a probe answers within a probe's timeout"
    # more nodes expected than registered: unhealthy, after the retries
    proc = health_check(
        "--ray_address", ray_head, "registered_nodes", "--ray_node_count", "2", "--retries", "2", "--interval", "0.1"
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("waiting: 1 Ray node(s) registered, 2 expected") == 3
    assert "registered_nodes probe: unhealthy" in proc.stderr


def test_kserve_environment_gives_the_defaults(ray_head):
    """RAY_ADDRESS and RAY_NODE_COUNT (set by KServe's runtime) are the defaults; the options win over them."""
    env = {"RAY_ADDRESS": ray_head, "RAY_NODE_COUNT": "1"}
    assert health_check("registered_nodes", env=env).returncode == 0
    assert health_check("registered_nodes", env={**env, "RAY_NODE_COUNT": "3"}).returncode == 1
    assert health_check("registered_nodes", "--ray_node_count", "1", env={**env, "RAY_NODE_COUNT": "3"}).returncode == 0
    # --ray_address after the subcommand too, and the dashed spelling
    assert health_check("registered_nodes", "--ray-address", ray_head, "--ray-node-count", "1").returncode == 0


#: a second Ray node on this machine, on loopback: `ray start --address` refuses to join a cluster
#: kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so the node is started as Ray's own test
#: clusters start theirs (ray.cluster_utils); it stops on SIGTERM, or by itself after argv[2] seconds
WORKER_NODE = """
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=78643200,
                   min_worker_port=0, max_worker_port=0)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)

def stop(*_):
    node.kill_all_processes(check_alive=False, allow_graceful=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    time.sleep(0.2)
stop()
"""


def test_a_worker_joining_and_leaving(ray_head, tmp_path):
    """The head's start-up wait (registered_nodes --retries) passes once a worker has joined; the
    liveness check fails again once it is gone."""
    waiting = subprocess.Popen(
        [sys.executable, "-m", "hfserve.health_check", "--ray_address", ray_head, "registered_nodes", "--ray_node_count", "2",
         "--retries", "90", "--interval", "1", "--probe_name", "runtime_start"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV},
    )  # fmt: skip
    time.sleep(2)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_NODE, ray_head, "180"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, **RAY_ENV}, start_new_session=True,
    )  # fmt: skip
    node = RayNode(worker, tmp_path / "no-temp-dir-of-its-own", log)
    try:
        _, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err + log.read_text(errors="replace")[-3000:]
        assert "waiting: 1 Ray node(s) registered, 2 expected" in err and "2 Ray node(s) registered, 2 expected" in err
        assert "runtime_start probe: healthy" in err
    finally:
        if waiting.poll() is None:
            waiting.kill()
        node.stop()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        proc = health_check(
            "--ray_address", ray_head, "registered_nodes", "--ray_node_count", "2", "--probe_name", "worker_liveness"
        )
        if proc.returncode == 1:
            break
        time.sleep(1)
    assert proc.returncode == 1 and "worker_liveness probe: unhealthy" in proc.stderr, proc.stderr
    assert health_check("--ray_address", ray_head, "registered_nodes", "--ray_node_count", "1").returncode == 0


def test_no_ray_cluster_is_unhealthy_at_once():
    started = time.monotonic()
    proc = health_check("--ray_address", f"127.0.0.1:{free_port()}", "registered_nodes", "--ray_node_count", "1")
    assert proc.returncode == 1
    assert "cannot count the Ray nodes" in proc.stderr and "unhealthy" in proc.stderr
    assert time.monotonic() - started < 15


def test_without_ray_the_node_checks_say_what_to_install(tmp_path, ray_head):
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named ray (test stand-in)')\n")
    proc = health_check("--ray_address", ray_head, "registered_nodes", "--ray_node_count", "1", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1
    assert "pip install 'hfserve[ray]'" in proc.stderr and "Traceback" not in proc.stderr


def test_driver_fallback_counts_the_same(ray_head):
    """Where Ray's GCS client is not importable, the count comes from ray.nodes() as a driver."""
    code = "from hfserve.health_check import _count_alive_nodes_as_driver as f; import sys; print(f(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, ray_head], capture_output=True, text=True, timeout=120, env={**os.environ, **RAY_ENV}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "1"


def test_usage_errors_exit_2():
    assert health_check().returncode == 2  # no subcommand: a misconfigured probe must not pass
    assert health_check("frobnicate").returncode == 2
    assert health_check("runtime_health").returncode == 2  # --health_check_url is required
    assert health_check("registered_nodes", "--ray_node_count", "two").returncode == 2


# ------------------------------------------------------------------------------------ the server
#: hfserve whose backend waits, before loading, until the file named by HFSERVE_TEST_LOAD_GATE exists:
#: the server is up (live) and not ready for as long as the test wants
GATED = """
import asyncio, os, sys
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.cli import main

start = HuggingFaceBackend.start

async def gated(self):
    while not os.path.exists(os.environ["HFSERVE_TEST_LOAD_GATE"]):
        await asyncio.sleep(0.05)
    await start(self)

HuggingFaceBackend.start = gated
sys.argv[0] = "hfserve"
main()
"""


def test_runtime_health_follows_the_server(models, log_dir, tmp_path):
    gate = tmp_path / "load"
    server = start_server(
        models["bert_cls"], "bert", log_dir, "--backend", "huggingface",
        wait_ready=False, entry=[sys.executable, "-c", GATED], env={"HFSERVE_TEST_LOAD_GATE": str(gate)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/v2/health/live", timeout=2).status_code == 200:
                    break
            assert server.proc.poll() is None, server.log()[-3000:]
            time.sleep(0.1)
        # loading: alive, not ready
        assert health_check("runtime_health", "--health_check_url", f"{server.url}/v2/health/live").returncode == 0
        proc = health_check(
            "runtime_health", "--health_check_url", f"{server.url}/v2/health/ready", "--probe_name", "head_readiness"
        )
        assert proc.returncode == 1 and "answered 503" in proc.stderr and "head_readiness probe: unhealthy" in proc.stderr
        # retries wait for it: the gate opens while the probe retries
        waiting = subprocess.Popen(
            [sys.executable, "-m", "hfserve.health_check", "runtime_health", "--health_check_url", f"{server.url}/v2/health/ready",
             "--retries", "120", "--interval", "0.5"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1)
        gate.touch()
        _, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        wait_until_ready(server)
        proc = health_check(
            "runtime_health", "--health_check_url", f"{server.url}/v2/health/ready", "--probe_name", "head_readiness"
        )
        assert proc.returncode == 0 and "head_readiness probe: healthy" in proc.stderr
        assert health_check("runtime_health", "--health_check_url", f"{server.url}/").returncode == 0
    finally:
        assert stop_server(server) == 0
    # stopped: nothing listening
    proc = health_check("runtime_health", "--health_check_url", f"{server.url}/v2/health/ready")
    assert proc.returncode == 1 and "not reachable" in proc.stderr


def test_nodes_and_runtime_together(ray_head, bert_cls):
    ready = f"{bert_cls.url}/v2/health/ready"
    nowhere = f"http://127.0.0.1:{free_port()}/v2/health/ready"
    head = ("--ray_address", ray_head)
    ok = health_check(
        *head,
        "registered_node_and_runtime_health",
        "--ray_node_count",
        "1",
        "--health_check_url",
        ready,
        "--probe_name",
        "head_startup",
    )
    assert ok.returncode == 0 and "head_startup probe: healthy" in ok.stderr
    # either half failing fails the probe
    assert (
        health_check(*head, "registered_node_and_runtime_health", "--ray_node_count", "2", "--health_check_url", ready).returncode
        == 1
    )
    assert (
        health_check(
            *head, "registered_node_and_runtime_health", "--ray_node_count", "1", "--health_check_url", nowhere
        ).returncode
        == 1
    )


def test_worker_startup_waits_for_the_model(ray_head, bert_cls):
    """registered_node_and_runtime_models: the nodes, and the head's /v1/models lists the InferenceService."""
    models_url = f"{bert_cls.url}/v1/models"
    head = ("--ray_address", ray_head)
    args = ("registered_node_and_runtime_models", "--ray_node_count", "1", "--runtime_url", models_url)
    assert health_check(*head, "--isvc_name", "bert_cls", *args).returncode == 0
    assert health_check(*head, *args, env={"ISVC_NAME": "bert_cls"}).returncode == 0
    proc = health_check(*head, "--isvc_name", "other", *args)
    assert proc.returncode == 1 and "model other is not served" in proc.stderr
    nowhere = f"http://127.0.0.1:{free_port()}/v1/models"
    assert health_check(*head, "--isvc_name", "bert_cls", *args[:-1], nowhere).returncode == 1


def test_the_probe_starts_fast():
    """It imports nothing of the server and no model library (a probe runs every few seconds)."""
    code = "import sys, hfserve.health_check; heavy = {'torch', 'transformers', 'vllm', 'fastapi', 'ray', 'hfserve.server'} & set(sys.modules); print(sorted(heavy))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_port_with_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        proc = health_check(
            "runtime_health", "--health_check_url", f"http://127.0.0.1:{port}/", "--retries", "1", "--interval", "0.1"
        )
    assert proc.returncode == 1 and proc.stderr.count("not reachable") == 2
