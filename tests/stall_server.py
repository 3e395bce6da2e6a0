"""A real hfserve process whose forward passes can hang (started by tests/test_engine_metrics.py).

Same command line as ``hfserve`` (the mechanism of tests/fault_server.py); the transformers
backend's generation scheduler runs every forward pass (prefill, decode step) only while the file
named by ``$HFSERVE_TEST_GATE`` does not exist: while it exists, the pass hangs, as a stuck kernel
would, and the decode loop makes no progress.
"""

from __future__ import annotations

import os
import sys
import time

from hfserve import server as hfserve_server
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.cli import build_parser, resolve

GATE = os.environ.get("HFSERVE_TEST_GATE", "")


class GatedBackend(HuggingFaceBackend):
    def _load(self) -> None:
        super()._load()
        scheduler = self.scheduler
        assert scheduler is not None
        run = scheduler._run_model

        def gated(adapters, *, encoder=False, **inputs):
            while GATE and os.path.exists(GATE):
                time.sleep(0.02)
            return run(adapters, encoder=encoder, **inputs)

        scheduler._run_model = gated  # type: ignore[method-assign]


def main() -> None:
    config = resolve(build_parser().parse_args(sys.argv[1:]))
    hfserve_server.create_backend = lambda c: GatedBackend(c.model, c.batching, engine=c.engine)
    raise SystemExit(hfserve_server.run(config))


if __name__ == "__main__":
    main()
