"""Probes for KServe's multinode runtime: ``python -m hfserve.health_check COMMAND [options]``.

The subcommands and options are those of huggingfaceserver's ``health_check.py``, which KServe's
``kserve-huggingfaceserver-multinode`` runtime calls from its start-up script and its probes:

- ``runtime_health --health_check_url URL``: the server answers ``URL`` with 200;
- ``registered_nodes --ray_node_count N``: at least ``N`` Ray nodes are alive in the cluster;
- ``registered_node_and_runtime_health``: both of the above;
- ``registered_node_and_runtime_models --runtime_url URL``: the nodes, and the model
  (``--isvc_name``, or ``ISVC_NAME``) is listed by ``URL`` (a ``/v1/models`` route).

Every subcommand also takes ``--probe_name`` (named in the log line), ``--retries N`` (N more
attempts after the first, ``--interval`` seconds apart) and ``--timeout`` (seconds per HTTP
request or Ray query). ``--ray_address`` (default ``RAY_ADDRESS``, else ``auto``: the cluster
started on this machine by ``ray start``), ``--isvc_name`` (default ``ISVC_NAME``) and
``--ray_node_count`` (default ``RAY_NODE_COUNT``, else 2) come from KServe's environment.

Exit codes, as huggingfaceserver's script: 0 healthy, 1 unhealthy (or the check could not run,
e.g. ``ray`` is not installed: ``pip install 'hfserve[ray]'``); 2 for a usage error (no or an
unknown subcommand, a bad option), where huggingfaceserver's script printed its help and exited 0
(a misconfigured probe must not pass).

It runs in a probe every few seconds, so it imports nothing of hfserve's server and no model
library; Ray (only for the node checks) is queried through its GCS client, without joining the
cluster as a driver.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

HEALTHY = 0
UNHEALTHY = 1

logger = logging.getLogger("hfserve.health_check")


# --------------------------------------------------------------------------------------- checks
def _retrying(check: Callable[[], bool], retries: int, interval: float) -> bool:
    """``check()`` once, then up to ``retries`` more times ``interval`` seconds apart, until it passes."""
    for attempt in range(retries + 1):
        if check():
            return True
        if attempt < retries:
            time.sleep(interval)
    return False


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET ``url``: (status, body); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:  # a status >= 400 is an answer, not a failure to connect
        return error.code, error.read()


def _ok_body(url: str, timeout: float) -> bytes | None:
    """The body of ``url``'s 200 answer; None (and the reason logged) when it is unreachable or answers another status."""
    try:
        status, body = _get(url, timeout)
    except (OSError, ValueError) as error:
        logger.error("server %s is not reachable: %s", url, error)
        return None
    if status != 200:
        logger.error("server %s answered %d", url, status)
        return None
    return body


def check_runtime_health(url: str, *, retries: int = 0, interval: float = 1.0, timeout: float = 5.0) -> bool:
    """The server at ``url`` answers 200."""

    def once() -> bool:
        if _ok_body(url, timeout) is None:
            return False
        logger.info("server %s answered 200", url)
        return True

    return _retrying(once, retries, interval)


def check_runtime_models(url: str, isvc_name: str, *, retries: int = 0, interval: float = 1.0, timeout: float = 5.0) -> bool:
    """``url`` (a KServe v1 ``/v1/models`` route) lists ``isvc_name`` (any model when it is empty)."""

    def once() -> bool:
        body = _ok_body(url, timeout)
        if body is None:
            return False
        try:
            models = json.loads(body).get("models", [])
        except (ValueError, AttributeError):
            logger.error("server %s did not answer a model list", url)
            return False
        if (isvc_name in models) if isvc_name else bool(models):
            logger.info("model %s is ready to serve", isvc_name or models[0])
            return True
        logger.error("model %s is not served by %s (it lists %s)", isvc_name or "(any)", url, models)
        return False

    return _retrying(once, retries, interval)


def _import_ray(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise RuntimeError(f"the ray package is needed for the node checks (pip install 'hfserve[ray]'): {error}") from error


def _gcs_address(address: str) -> str:
    """``host:port`` of the Ray cluster's GCS; ``auto`` (or empty) finds the cluster ``ray start`` left on this machine."""
    if address in ("", "auto"):
        services = _import_ray("ray._private.services")
        return str(services.canonicalize_bootstrap_address_or_die("auto"))
    return address.removeprefix("ray://")


def count_alive_nodes(address: str, timeout: float = 5.0) -> int:
    """The number of alive nodes in the Ray cluster at ``address`` (raises when it cannot be asked)."""
    gcs = _gcs_address(address)
    host, _, port = gcs.rpartition(":")
    # Nothing listening fails here at once; Ray's own client would wait ~30 s for the GCS.
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass
    try:
        raylet = importlib.import_module("ray._raylet")
        gcs_pb2 = importlib.import_module("ray.core.generated.gcs_pb2")
        client = raylet.GcsClient(address=gcs)
        alive = gcs_pb2.GcsNodeInfo.ALIVE
        infos = client.get_all_node_info(timeout=timeout)
        return sum(1 for info in infos.values() if info.state == alive)
    except (ImportError, AttributeError, TypeError):  # Ray's internal client moved: ask as a driver instead
        return _count_alive_nodes_as_driver(gcs)


def _count_alive_nodes_as_driver(gcs: str) -> int:
    """The same count through Ray's public API (joins the cluster as a driver for the moment)."""
    ray = _import_ray("ray")
    ray.init(address=gcs, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    finally:
        ray.shutdown()


def check_registered_nodes(expected: int, address: str, *, retries: int = 0, interval: float = 2.0, timeout: float = 5.0) -> bool:
    """At least ``expected`` Ray nodes (head and workers) are alive."""

    def once() -> bool:
        try:
            alive = count_alive_nodes(address, timeout)
        except Exception as error:  # noqa: BLE001 (any failure to ask Ray is an unhealthy answer)
            logger.error("cannot count the Ray nodes at %s: %s", address, error)
            return False
        if alive < expected:
            logger.error("waiting: %d Ray node(s) registered, %d expected", alive, expected)
            return False
        logger.info("%d Ray node(s) registered, %d expected", alive, expected)
        return True

    if _retrying(once, retries, interval):
        return True
    if retries:
        logger.error("gave up after %d attempts: fewer Ray nodes than %d", retries + 1, expected)
    return False


# ------------------------------------------------------------------------------------ command line
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _flag(name: str) -> list[str]:
    """Both spellings of a flag, as hfserve takes them: --ray_node_count and --ray-node-count."""
    dashed = name.replace("_", "-")
    return [f"--{name}", f"--{dashed}"] if dashed != name else [f"--{name}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfserve.health_check", description="Probes for KServe's multinode runtime (exit 0 healthy, 1 unhealthy)."
    )

    def common(p: argparse.ArgumentParser, top: bool) -> None:
        # On the top-level parser with their defaults; repeated on each subcommand (after it, as
        # probes often write them) without a default, so they override only when given there.
        default: Any = argparse.SUPPRESS
        p.add_argument(
            *_flag("ray_address"),
            default=os.environ.get("RAY_ADDRESS", "auto") if top else default,
            help="Ray GCS host:port, or auto (default: RAY_ADDRESS, else auto)",
        )
        p.add_argument(
            *_flag("isvc_name"),
            default=os.environ.get("ISVC_NAME", "") if top else default,
            help="the InferenceService (model) name (default: ISVC_NAME)",
        )

    common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def subcommand(name: str, help: str, *, nodes: bool, url: str | None) -> None:
        p = commands.add_parser(name, help=help, description=help)
        common(p, top=False)
        if nodes:
            p.add_argument(
                *_flag("ray_node_count"),
                type=int,
                default=_env_int("RAY_NODE_COUNT", 2),
                help="Ray nodes expected (default: RAY_NODE_COUNT, else 2)",
            )
        if url:
            p.add_argument(*_flag(url), required=True, help="the URL to GET")
        p.add_argument(*_flag("probe_name"), default="", help="the probe's name, for the log line")
        p.add_argument(*_flag("retries"), type=int, default=0, help="attempts after the first (default 0)")
        p.add_argument(*_flag("interval"), type=float, default=2.0 if nodes else 1.0, help="seconds between attempts")
        p.add_argument(*_flag("timeout"), type=float, default=5.0, help="seconds per HTTP request or Ray query (default 5)")

    subcommand("runtime_health", "the server answers --health_check_url with 200", nodes=False, url="health_check_url")
    subcommand("registered_nodes", "at least --ray_node_count Ray nodes are alive", nodes=True, url=None)
    subcommand("registered_node_and_runtime_health", "registered_nodes and runtime_health", nodes=True, url="health_check_url")
    subcommand(
        "registered_node_and_runtime_models", "registered_nodes, and --runtime_url lists the model", nodes=True, url="runtime_url"
    )
    return parser


def run(args: argparse.Namespace) -> bool:
    timing = {"retries": max(args.retries, 0), "interval": args.interval, "timeout": args.timeout}
    if args.command == "runtime_health":
        return check_runtime_health(args.health_check_url, **timing)
    nodes = check_registered_nodes(args.ray_node_count, args.ray_address, **timing)
    if args.command == "registered_nodes":
        return nodes
    if args.command == "registered_node_and_runtime_health":
        return check_runtime_health(args.health_check_url, **timing) and nodes
    return check_runtime_models(args.runtime_url, args.isvc_name, **timing) and nodes


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a COMMAND is required", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    probe = args.probe_name or args.command
    healthy = run(args)
    if healthy:
        logger.info("%s probe: healthy", probe)
    else:
        logger.error("%s probe: unhealthy", probe)
    return HEALTHY if healthy else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
