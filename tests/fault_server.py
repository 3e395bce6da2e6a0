"""A real hfserve process whose backend fails on purpose (started by tests/test_faults.py).

Same command line as ``hfserve``; the transformers backend is replaced by one that, depending on
the prompt, raises before the first token (FAIL_BEFORE), after two steps (FAIL_MID), or never
answers (HANG). The failures are real exceptions escaping a backend, not mocked responses.

It logs how each generation ended (finished, failed or cancelled, after how many steps) and how
many are still running, so that a test can see from the log that work stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys

from hfserve import server as hfserve_server
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.cli import build_parser, resolve

logger = logging.getLogger("hfserve.fault_server")


class FaultyBackend(HuggingFaceBackend):
    running = 0  # generations running now

    async def generate(self, prompt_ids, params, request_id):
        text = self.tokenizer.decode(prompt_ids)
        self.running += 1
        steps, how = 0, "failed"
        try:
            if "FAIL_BEFORE" in text:
                raise RuntimeError("exploded in /secret/backend.py")
            if "HANG" in text:
                await asyncio.Event().wait()  # never answers
            # step by step even where only the whole result is read: the failure and the count need the steps
            stepwise = dataclasses.replace(params, whole=False)
            async with contextlib.aclosing(super().generate(prompt_ids, stepwise, request_id)) as stream:
                async for item in stream:
                    for delta in item:  # one delta at a time (the backend may hand over several steps at once)
                        yield [delta]
                        steps += 1
                        if "FAIL_MID" in text and steps == 2:
                            raise KeyError("mid-stream failure at /secret/backend.py")
            how = "finished"
        except (asyncio.CancelledError, GeneratorExit):
            how = "cancelled"
            raise
        finally:
            self.running -= 1
            logger.info("generation of request %s ended: %s after %d steps; %d running", request_id, how, steps, self.running)


def main() -> None:
    config = resolve(build_parser().parse_args(sys.argv[1:]))
    hfserve_server.create_backend = lambda c: FaultyBackend(c.model, c.batching)
    raise SystemExit(hfserve_server.run(config))


if __name__ == "__main__":
    main()
