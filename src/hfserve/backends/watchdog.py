"""A watchdog on the transformers backend's decode loop.

When the loop has work (rows decoding, requests waiting) and makes no progress for
``stall_timeout_seconds`` (a forward pass that hangs: a stuck kernel, a deadlocked library), the
backend reports itself unhealthy, so readiness turns false and the orchestrator routes traffic
elsewhere; the log says why. When progress resumes, readiness returns (and the log says so).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("hfserve.backends.watchdog")


class StallWatchdog:
    """Checks ``busy_since()`` (None: idle; else the monotonic time of the loop's last progress)."""

    def __init__(self, busy_since: Callable[[], float | None], timeout: float, *, what: str = "the decode loop"):
        self.busy_since = busy_since
        self.timeout = float(timeout)
        self.what = what
        self.stalled = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="hf-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = min(1.0, max(0.05, self.timeout / 4))
        while not self._stop.wait(interval):
            self.check()

    def check(self) -> bool:
        """True while stalled; logs each change."""
        if self.timeout <= 0:
            return False
        since = self.busy_since()
        now = time.monotonic()
        stalled = since is not None and now - since > self.timeout
        with self._lock:
            changed, self.stalled = stalled != self.stalled, stalled
        if changed and stalled:
            assert since is not None
            logger.error(
                "%s has made no progress for %.0f s while requests are waiting (--stall_timeout_seconds %g): "
                "a forward pass is hanging; reporting not ready until it moves again",
                self.what,
                now - since,
                self.timeout,
            )
        elif changed:
            logger.warning("%s is making progress again; ready", self.what)
        return stalled
