"""Model runtimes. :func:`create_backend` picks one for the configuration."""

from __future__ import annotations

import importlib.util
import logging
import os

from ..config import Config, ModelConfig
from .base import Backend

logger = logging.getLogger("hfserve.backends")


class BackendUnavailable(Exception):
    """The requested backend cannot serve this model; the message says why."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_support(model: ModelConfig) -> tuple[bool, str]:
    """Whether vLLM can serve this model, and why (not)."""
    if not vllm_installed():
        return False, "vLLM is not installed"
    try:
        from . import vllm as vllm_backend
    except ImportError as exc:  # pragma: no cover - depends on the install
        return False, f"the vLLM backend cannot be imported ({exc})"
    return vllm_backend.supports(model)


#: iterations an idle OpenMP thread spins before it sleeps (GNU OpenMP's default is 300,000)
OPENMP_SPIN = "50000"


def openmp_defaults() -> None:
    """Shorten how long the forward pass's idle OpenMP threads spin (``GOMP_SPINCOUNT``,
    unless the environment sets it), for the transformers backend on CPU.

    After every forward pass torch's OpenMP workers spin for some milliseconds waiting for
    the next one. In a server, that is exactly when the event loop has to answer the finished
    batch and read the next one, on the same cores: with the default spin the workers took a
    core from it each time. A/B medians, embeddings at concurrency 32 on 2 cores: 482/s with
    the default, 524/s with 50,000 (10,000-20,000 about the same; fully passive waiting 11%
    worse); generation at concurrency 8 unchanged with 50,000 (3% lower with 20,000).
    GNU OpenMP reads the variable when torch loads it, so this runs before torch is imported.
    (vLLM tunes Intel OpenMP's equivalent, ``KMP_BLOCKTIME``, for its CPU workers.)
    """
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)


def create_backend(config: Config) -> Backend:
    choice = config.engine.backend
    if choice == "huggingface" or (choice == "auto" and not vllm_installed()):
        openmp_defaults()  # else vLLM may serve it, and checking that has imported torch
    if choice == "auto":
        ok, why = vllm_support(config.model)
        choice = "vllm" if ok else "huggingface"
        logger.info("--backend auto chose %s: %s", choice, why)
    elif choice == "vllm":
        ok, why = vllm_support(config.model)
        if not ok:
            raise BackendUnavailable(f"--backend vllm cannot serve this model: {why}")
    if choice == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(config.model, config.engine)
    from .huggingface import HuggingFaceBackend

    return HuggingFaceBackend(config.model, config.batching, engine=config.engine)
