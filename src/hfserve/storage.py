"""Model storage URIs: a local copy of ``s3://``, ``gs://``, ``hf://``, ``https://``, ... models.

``--model_dir`` takes the storage URIs KServe takes (as huggingfaceserver does, through the
same ``kserve-storage`` package, installed by ``pip install 'hfserve[storage]'``). The command
line calls :func:`localize` before it looks at the model; the typed configuration then holds
the local copy, and everything below loads from it as from any local directory.

- A plain path (no ``scheme://``) is used in place, as before; ``file://PATH`` too.
- ``pvc://CLAIM/PATH`` is the claim as KServe mounts it: ``/mnt/pvc/PATH`` (``$HFSERVE_PVC_ROOT``
  moves the mount point), used in place.
- Every other scheme kserve-storage handles is downloaded into ``$HFSERVE_STORAGE_DIR`` when it is
  set (kept after exit; KServe's storage initializer uses ``/mnt/models``), else into a fresh
  temporary directory (as huggingfaceserver does) that is removed when the process exits.

The download is logged: kserve-storage's own lines (each object found and copied) and, every few
seconds, the bytes received so far. A failure is one :class:`StorageError` whose message fits on
one line; the lines logged before it are held back until the download has been under way for a
moment, so a URI that fails at once (no such bucket, no such key, no endpoint) ends in that one
line alone. This module knows nothing of HTTP serving: it only turns a URI into a directory.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("hfserve.storage")

#: the URI schemes kserve-storage downloads (``https://`` covers Azure blob and file shares and git
#: repositories too)
DOWNLOAD_SCHEMES = ("s3", "gs", "hf", "http", "https", "hdfs", "webhdfs", "modelscope", "oci")
#: the schemes used in place
LOCAL_SCHEMES = ("file", "pvc")
SCHEMES = DOWNLOAD_SCHEMES + LOCAL_SCHEMES

#: where KServe mounts a ``pvc://`` claim
DEFAULT_PVC_ROOT = "/mnt/pvc"
#: seconds between two progress lines
PROGRESS_INTERVAL = 5.0
#: lines logged in the first seconds of a download that has received nothing are held back
HOLD_SECONDS = 2.0

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: kserve-storage's logger
_KSERVE_LOGGER = "storage.initializer"
#: the loggers of the storage clients kserve-storage drives (WARNING and above still show)
_CLIENT_LOGGERS = ("botocore", "boto3", "s3transfer", "google", "azure", "huggingface_hub", "oras", "dulwich", "modelscope_hub")


class StorageError(Exception):
    """The model could not be copied from its storage URI; the message is one line."""


def scheme(location: str) -> str | None:
    """The URI scheme of ``location`` (lower case), or None for a plain path."""
    match = _SCHEME_RE.match(location)
    return match.group(1).lower() if match else None


def is_uri(location: str) -> bool:
    return scheme(location) is not None


def localize(
    location: str,
    dest: str | Path | None = None,
    *,
    progress_interval: float = PROGRESS_INTERVAL,
) -> Path:
    """The local directory holding the model at ``location`` (downloaded when it is remote).

    ``dest``: where a download goes (default ``$HFSERVE_STORAGE_DIR``, else a temporary directory
    removed at exit). Raises :class:`StorageError`.
    """
    kind = scheme(location)
    if kind is None:
        return Path(location)
    if kind == "file":
        return Path(location[len("file://") :])
    if kind == "pvc":
        return _pvc_path(location)
    if kind not in DOWNLOAD_SCHEMES:
        raise StorageError(
            f"{location}: no storage handler for the scheme {kind}:// (supported: "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + ")"
        )
    return download(location, dest, progress_interval=progress_interval)


def _pvc_path(uri: str) -> Path:
    rest = uri[len("pvc://") :]
    _claim, _, sub = rest.partition("/")
    root = Path(os.environ.get("HFSERVE_PVC_ROOT", DEFAULT_PVC_ROOT))
    path = root / sub if sub else root
    if not path.is_dir():
        raise StorageError(f"{uri}: the claim's path {path} does not exist (KServe mounts a pvc:// claim at {root})")
    return path


def download(uri: str, dest: str | Path | None = None, *, progress_interval: float = PROGRESS_INTERVAL) -> Path:
    """Copy the model at ``uri`` into a local directory with kserve-storage; return the directory
    that holds its ``config.json`` (the download itself, or the one folder an archive held)."""
    try:
        from kserve_storage import Storage
    except ImportError as exc:
        raise StorageError(
            f"{uri}: storage URIs need the kserve-storage package: pip install 'hfserve[storage]' ({exc})"
        ) from exc
    out = _destination(dest)
    started = time.monotonic()
    with _logged_progress(uri, out, progress_interval) as gate:
        try:
            local = Path(Storage.download(uri, str(out)))
        except Exception as exc:  # kserve-storage raises RuntimeError, Exception and the clients' own errors
            raise StorageError(f"cannot download {uri}: {_one_line(exc)}") from exc
        local = _model_root(local)
        files, size = _tree_size(out)
        if not (local / "config.json").is_file():
            raise StorageError(f"{uri} holds no config.json ({files} files copied to {out}); is it a Hugging Face model directory?")
        gate.open()
    logger.info(
        "downloaded %s to %s: %d files, %s in %.1f s", uri, local, files, _mib(size), time.monotonic() - started
    )
    return local


def _destination(dest: str | Path | None) -> Path:
    if dest is None and os.environ.get("HFSERVE_STORAGE_DIR"):
        dest = os.environ["HFSERVE_STORAGE_DIR"]
    if dest is not None:
        path = Path(dest)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the download directory {path}: {exc.strerror or exc}") from exc
        return path
    path = Path(tempfile.mkdtemp(prefix="hfserve-model-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _model_root(local: Path) -> Path:
    """An archive that held one top-level directory with the model: that directory."""
    if (local / "config.json").is_file() or not local.is_dir():
        return local
    entries = [p for p in local.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    return local


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:  # renamed or removed while we looked
                continue
            files += 1
    return files, size


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class _Gate(logging.Handler):
    """Forwards kserve-storage's records (and this module's progress lines) to hfserve's logger;
    holds them back until :meth:`open` (a download that fails at once logs nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._held: list[logging.LogRecord] = []
        self._open = False
        self._mutex = threading.Lock()

    def open(self) -> None:
        with self._mutex:
            if self._open:
                return
            self._open = True
            held, self._held = self._held, []
        for record in held:
            self._forward(record)

    def emit(self, record: logging.LogRecord) -> None:
        with self._mutex:
            if not self._open:
                self._held.append(record)
                return
        self._forward(record)

    @staticmethod
    def _forward(record: logging.LogRecord) -> None:
        # kserve-storage logs an error before it raises it: the raised error is reported once, by the caller
        level = logging.DEBUG if record.levelno >= logging.ERROR else record.levelno
        if not logger.isEnabledFor(level):
            return
        record.name, record.levelno, record.levelname = logger.name, level, logging.getLevelName(level)
        logger.handle(record)  # with its own time: a held line keeps when it happened


@contextmanager
def _logged_progress(uri: str, out: Path, interval: float) -> Iterator[_Gate]:
    gate = _Gate()
    source = logging.getLogger(_KSERVE_LOGGER)
    saved: dict[str, Any] = {"level": source.level, "propagate": source.propagate}
    source.addHandler(gate)
    source.setLevel(logging.INFO)
    source.propagate = False
    # the storage clients' own INFO lines ("Found credentials in environment variables") say nothing useful
    quieted = [logging.getLogger(name) for name in _CLIENT_LOGGERS if logging.getLogger(name).level == logging.NOTSET]
    for client in quieted:
        client.setLevel(logging.WARNING)
    gate.handle(_record(f"downloading {uri} to {out}"))
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(uri, out, interval, gate, done), name="hfserve-storage-progress", daemon=True)
    watcher.start()
    try:
        yield gate
    finally:
        done.set()
        watcher.join()
        source.removeHandler(gate)
        source.setLevel(saved["level"])
        source.propagate = saved["propagate"]
        for client in quieted:
            client.setLevel(logging.NOTSET)


def _record(message: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)


def _watch(uri: str, out: Path, interval: float, gate: _Gate, done: threading.Event) -> None:
    started = time.monotonic()
    last_size = 0
    next_report = started + interval
    while not done.wait(min(interval, HOLD_SECONDS) / 4):
        now = time.monotonic()
        files, size = _tree_size(out)
        if size > 0 or now - started >= HOLD_SECONDS:
            gate.open()
        if now >= next_report:
            next_report = now + interval
            if size != last_size:
                rate = size / max(now - started, 1e-9)
                gate.handle(_record(f"downloading {uri}: {_mib(size)} in {files} files so far ({_mib(int(rate))}/s)"))
                last_size = size
