"""What the benchmarks that start hfserve on the test fixtures share: the repository on the import
path (tests.fixtures, tests.servers), offline settings, the prompts, and a server's CPU time."""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures.build_models import build_all  # noqa: E402
from tests.servers import start_server, stop_server  # noqa: E402

__all__ = ["PROMPTS", "ROOT", "build_all", "cpu_seconds", "start_server", "stop_server"]

PROMPTS = ["The cat sat on", "Once upon a time", "hello there, how are", "In the beginning the",
           "A quick brown fox", "The weather today is", "My favourite food", "Tell me about"]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """The server process's CPU time so far (user + system, all its threads), from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
