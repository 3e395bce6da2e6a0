"""The typed configuration: what the command line resolves to, and backends built from it directly."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from hfserve.backends import create_backend
from hfserve.cli import build_parser, resolve
from hfserve.config import BatchingConfig, Config, EngineConfig, LimitsConfig, ModelConfig, ServerConfig
from hfserve.tasks import Task


def test_config_is_frozen():
    config = Config(model=ModelConfig(source="m"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = ModelConfig(source="other")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.api_key = "k"  # type: ignore[misc]
    engine = EngineConfig(engine_args={"max_num_seqs": 4})
    with pytest.raises(TypeError):
        engine.engine_args["max_num_seqs"] = 8  # type: ignore[index]


def test_cli_resolves_every_section(models):
    args = build_parser().parse_args(
        [
            "--model_dir", str(models["llama"]), "--model_name", "tiny", "--dtype", "float32", "--max_model_len", "64",
            "--http_port", "9000", "--grpc_port", "9001", "--enable_grpc", "false", "--disable_log_requests",
            "--max_concurrent_requests", "3", "--max_queue_size", "7", "--request_timeout_seconds", "2.5", "--api_key", "k",
            "--max_batch_size", "8", "--max_batch_wait_ms", "3", "--batch_idle_ms", "1", "--max_threads", "2",
            "--backend", "huggingface", "--max_num_seqs", "5", "--tensor_parallel_size", "2",
        ]
    )  # fmt: skip
    config = resolve(args)
    assert config.model == ModelConfig.local(
        models["llama"], name="tiny", task=Task.text_generation, dtype="float32", max_model_len=64
    )
    assert config.server == ServerConfig(http_port=9000, grpc_port=9001, enable_grpc=False, log_requests=False)
    assert config.limits == LimitsConfig(
        max_concurrent_requests=3, max_queue_size=7, request_timeout_seconds=2.5, api_key="k"
    )
    assert config.batching == BatchingConfig(max_batch_size=8, max_batch_wait_ms=3, batch_idle_ms=1)
    assert config.engine.backend == "huggingface"
    # vLLM's engine arguments travel under vLLM's own names
    assert config.engine.engine_args["max_num_seqs"] == 5
    assert config.engine.engine_args["tensor_parallel_size"] == 2


def test_backend_built_from_a_config_without_the_cli(models):
    """No argparse anywhere: a program embedding hfserve builds the configuration itself."""
    config = Config(
        model=ModelConfig.local(models["bert_cls"], name="cls"),
        batching=BatchingConfig(max_batch_size=2, max_batch_wait_ms=0),
        engine=EngineConfig(backend="huggingface"),
    )
    backend = create_backend(config)
    assert type(backend).__name__ == "HuggingFaceBackend"

    async def run() -> list[list[float]]:
        await backend.start()
        try:
            ids = backend.encode_text("hello world")
            return await backend.classify([ids, ids[:2]])
        finally:
            await backend.stop()

    logits = asyncio.run(run())
    assert backend.task is Task.sequence_classification  # inferred from the model's config
    assert backend.max_batch_size == 2
    assert len(logits) == 2 and len(logits[0]) == len(backend.labels) and logits[0] != logits[1]
