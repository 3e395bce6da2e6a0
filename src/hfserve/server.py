"""Running the server: HTTP (uvicorn) and gRPC in one process and one event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import importlib
import json
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from .app import create_app
from .backends import BackendUnavailable, create_backend
from .config import Config
from .service import ModelService, State

logger = logging.getLogger("hfserve")

#: after the engine dies, how long in-flight responses may take to be written before the process exits
ENGINE_DEATH_DRAIN_SECONDS = 10.0
#: ... and how long the server at least stays up to answer probes, scrapes and requests with the failure
ENGINE_DEATH_LINGER_SECONDS = 3.0

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_logging_configured = False


def configure_logging(enabled: bool = True, config_file: str | None = None) -> None:
    """Set up logging once per process (later calls do nothing): ``config_file`` (a logging
    dictConfig, YAML or JSON) when given, else lines on stderr at ``KSERVE_LOGLEVEL`` (default
    INFO). ``enabled=False`` (``--configure_logging false``) leaves logging as it is.
    A config file that cannot be read or applied raises ValueError."""
    global _logging_configured
    if _logging_configured:
        return
    _logging_configured = True
    if not enabled:
        return
    if config_file is not None:
        yaml = importlib.import_module("yaml")  # PyYAML: a dependency of transformers
        try:
            with open(config_file, encoding="utf-8") as f:
                text = f.read()
            settings = json.loads(text) if config_file.endswith(".json") else yaml.safe_load(text)
            if isinstance(settings, dict):  # hfserve's loggers exist already: keep them unless the file says
                settings.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(settings)
        except (OSError, ValueError, TypeError, AttributeError, KeyError, ImportError, yaml.YAMLError) as exc:
            raise ValueError(f"--log_config_file {config_file}: {exc}") from None
        return
    level_name = os.environ.get("KSERVE_LOGLEVEL", "INFO").strip().upper()
    level = logging.getLevelName(level_name)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    if not isinstance(level, int):
        logger.warning("KSERVE_LOGLEVEL=%s is not a log level; using INFO", level_name)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_docs(app: Any) -> None:
    """The Swagger UI at /docs (``--enable_docs_url true``), over the app's OpenAPI document."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.requests import Request

    async def docs(_request: Request) -> Any:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI")

    app.add_route("/docs", docs, include_in_schema=False)


class _UvicornServer(uvicorn.Server):
    """uvicorn, minus its signal handling (it re-raises SIGTERM after shutdown, so the
    process would exit with -15); :class:`Server` installs its own handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Server:
    """Owns the model service, the HTTP server and (when enabled) the gRPC server."""

    def __init__(self, config: Config):
        self.config = config
        self.backend = create_backend(config)
        self.service = ModelService(
            config.model.name, self.backend, return_probabilities=config.model.return_probabilities
        )
        self.app = create_app(self.service, config)
        if config.server.enable_docs_url:
            _add_docs(self.app)
        ignored = [k for k in config.engine.engine_args if k not in getattr(self.backend, "honoured_engine_args", ())]
        if ignored and self.backend.name != "vllm":
            logger.warning(
                "vLLM engine flags with no effect on the %s backend: %s",
                self.backend.name,
                ", ".join(f"--{k.replace('_', '-')}" for k in ignored),
            )
        if config.batching.compile and self.backend.name == "vllm":
            logger.warning(
                "--compile has no effect on the vllm backend: vLLM compiles its model unless --enforce-eager is given"
            )
        self.http = _UvicornServer(
            uvicorn.Config(
                self.app,
                host=config.server.host,
                port=config.server.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=30,
                # longer than the idle timeout of clients and load balancers (60 s is common), so a
                # client never sends a request on a connection the server is closing at that moment
                timeout_keep_alive=75,
            )
        )
        self.grpc: Any = None
        self.exit_code = 0
        self._draining: asyncio.Future[None] | None = None

    async def _load(self) -> None:
        try:
            await self.service.start()
        except Exception as exc:
            logger.error("cannot serve model %s: %s", self.config.model.source, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            self.exit_code = 1
            self.http.should_exit = True
            return
        freeze_startup_heap()
        logger.info("model %s is ready (%s backend, task %s)", self.service.name, self.backend.name, self.service.task.value)

    def shutdown(self, sig: signal.Signals | None = None) -> None:
        """SIGTERM/SIGINT: readiness turns false at once and new model requests get
        model_not_ready; in-flight requests (streams included) may finish within
        --shutdown_grace_seconds; then the server exits."""
        if self._draining is not None:  # a second signal: stop now
            self.http.force_exit = True
            self.http.should_exit = True
            return
        logger.info("received %s: draining in-flight requests, then exiting", sig.name if sig else "shutdown")
        self.service.begin_shutdown()
        self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        grace = self.config.server.shutdown_grace_seconds
        started = asyncio.get_running_loop().time()
        idle = await self.app.state.admission.wait_idle(grace)
        if not idle:
            logger.warning("requests still running after %.0fs of grace; cancelling them", grace)
        left = max(0.0, grace - (asyncio.get_running_loop().time() - started))
        self.http.config.timeout_graceful_shutdown = max(1, int(left))
        self.http.force_exit = not idle
        self.http.should_exit = True

    async def _watch_engine(self, interval: float = 0.5) -> None:
        """A dead engine (the vLLM engine core process gone): readiness and liveness already fail;
        once in-flight responses are written (at most ENGINE_DEATH_DRAIN_SECONDS) the process exits
        with code 1, as vLLM's own server does, so the orchestrator restarts it. It stays up at least
        ENGINE_DEATH_LINGER_SECONDS, answering probes and requests with the failure."""
        while True:
            await asyncio.sleep(interval)
            if self._draining is not None:
                return
            if self.service.state is State.ready and self.backend.engine_dead():
                break
        bound = min(self.config.server.shutdown_grace_seconds, ENGINE_DEATH_DRAIN_SECONDS)
        logger.error(
            "the %s engine of model %s has died: liveness fails; exiting with code 1 once in-flight responses are written (at most %gs)",
            self.backend.name,
            self.service.name,
            bound,
        )
        self.exit_code = 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        idle = await self.app.state.admission.wait_idle(bound)
        await asyncio.sleep(max(0.0, min(bound, ENGINE_DEATH_LINGER_SECONDS) - (loop.time() - started)))
        self.http.config.timeout_graceful_shutdown = 1
        self.http.force_exit = not idle
        self.http.should_exit = True

    async def serve(self) -> int:
        server, limits = self.config.server, self.config.limits
        if server.enable_grpc:
            from .api.grpc import start_grpc_server

            self.grpc = await start_grpc_server(
                self.service,
                server.host,
                server.grpc_port,
                self.app.state.errors,
                max_message_bytes=server.grpc_max_receive_message_length or limits.max_request_body_bytes,
                max_send_bytes=server.grpc_max_send_message_length,
                admission=self.app.state.admission,
                api_key=limits.api_key,
                request_timeout=limits.request_timeout_seconds,
            )
        loop = asyncio.get_running_loop()
        if server.max_asyncio_workers is not None:
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=server.max_asyncio_workers))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown, sig)
        loader = asyncio.create_task(self._load())
        watcher = asyncio.create_task(self._watch_engine())
        try:
            await self.http.serve()
        finally:
            loader.cancel()
            watcher.cancel()
            await asyncio.gather(loader, watcher, return_exceptions=True)
            if self._draining is not None and not self._draining.done():
                self._draining.cancel()
            if self.grpc is not None:
                await self.grpc.stop(grace=1)
            await self.service.stop()
        return self.exit_code


def freeze_startup_heap() -> None:
    """Move every object alive once the model is loaded (the model, the libraries' modules and
    their caches: about half a million objects with MiniLM) out of the garbage collector's reach.

    They live as long as the process, yet every full collection walked all of them: under load
    (embeddings, 32 concurrent requests) a full collection came every few seconds and held the
    GIL for about 250 ms, stalling the model thread between its operators and every request on
    the event loop. After the freeze those collections take about 2 ms. Objects created later
    are collected as before. (vLLM freezes its heap after start-up for the same reason.)
    """
    gc.collect()
    gc.freeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it): the event loop does the
    HTTP, JSON and hand-over work of every request, and uvloop does it at about half the cost."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: Config) -> int:
    try:
        configure_logging(config.server.configure_logging, config.server.log_config_file)
    except ValueError as exc:
        sys.stderr.write(f"hfserve: error: {exc}\n")
        return 2
    try:
        server = Server(config)
    except BackendUnavailable as exc:
        sys.stderr.write(f"hfserve: error: {exc}\n")
        return 2
    try:
        factory = _loop_factory()
        if factory is None or sys.version_info < (3, 11):
            return asyncio.run(server.serve())
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(server.serve())
    except OSError as exc:  # e.g. a port already in use
        sys.stderr.write(f"hfserve: error: {exc}\n")
        return 2
