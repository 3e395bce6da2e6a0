"""Issue 16 part 0: the vLLM backend does not give away the engine's own speed.

``--dtype auto`` reaches vLLM as ``auto`` (vLLM picks, as ``vllm serve`` does: bfloat16 on a CPU with
native bf16), an explicit dtype as its canonical name, and nothing is forced that vLLM does not force
(its graphs are compiled unless ``--enforce-eager``). No engine is started: ``_engine_args`` only
builds vLLM's ``AsyncEngineArgs``, and vLLM's own config machinery resolves them.
"""

from __future__ import annotations

import pytest

from hfserve.backends.base import resolve_dtype
from hfserve.cli import build_parser, resolve
from hfserve.config import ModelConfig
from tests.conftest import needs_vllm

pytestmark = needs_vllm


def _backend(models, *argv: str):
    """A VLLMBackend configured through the real CLI (parser -> config -> backend), not started."""
    from hfserve.backends.vllm import VLLMBackend

    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--backend", "vllm", *argv]))
    return VLLMBackend(config.model, config.engine)


def _engine_args(models, *argv: str):
    return _backend(models, *argv)._engine_args()


def test_auto_is_vllms_choice(models):
    assert _engine_args(models).dtype == "auto"
    assert _engine_args(models, "--dtype", "auto").dtype == "auto"


@pytest.mark.parametrize(
    ("given", "passed"),
    [("bfloat16", "bfloat16"), ("float32", "float32"), ("float", "float32"), ("float16", "float16"), ("half", "float16")],
)
def test_explicit_dtype_is_passed_by_its_canonical_name(models, given, passed):
    assert _engine_args(models, "--dtype", given).dtype == passed


@pytest.mark.parametrize(
    ("given", "passed"), [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")]
)
def test_dtype_aliases_outside_the_cli(models, given, passed):
    """The spellings a config (not the CLI's choices) may hold resolve as on the transformers backend."""
    from hfserve.backends.vllm import VLLMBackend

    backend = VLLMBackend(ModelConfig(source=str(models["llama"]), local_dir=models["llama"], dtype=given))
    assert backend._engine_args().dtype == passed


def test_unknown_dtype_is_refused(models):
    from hfserve.backends.vllm import VLLMBackend

    backend = VLLMBackend(ModelConfig(source=str(models["llama"]), local_dir=models["llama"], dtype="int3"))
    with pytest.raises(ValueError, match="unsupported --dtype 'int3'"):
        backend._engine_args()


def test_the_transformers_backend_keeps_float32_for_auto_on_cpu():
    assert resolve_dtype("auto", gpu=False) == "float32"
    assert resolve_dtype(None, gpu=False) == "float32"


def test_eager_mode_only_when_asked(models):
    assert not _engine_args(models).enforce_eager  # vLLM's default: its graphs are compiled
    assert _engine_args(models, "--enforce-eager").enforce_eager is True
    assert _engine_args(models, "--enforce_eager").enforce_eager is True
    assert _engine_args(models, "--no-enforce-eager").enforce_eager is False


def _vllm_serve_defaults(model_dir) -> object:
    """The engine arguments of ``vllm serve MODEL`` with no other flag: vLLM's own parser and defaults."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(model_dir)]))


def test_default_resolves_like_vllms_own_server(models):
    """What hfserve passes with no --dtype / --enforce-eager resolves, in vLLM's own config machinery,
    to the dtype and compilation vLLM's own server picks for the same model with no flags."""
    ours = _engine_args(models).create_engine_config()
    theirs = _vllm_serve_defaults(models["llama"]).create_engine_config()
    assert ours.model_config.dtype == theirs.model_config.dtype
    assert ours.model_config.enforce_eager == theirs.model_config.enforce_eager is False
    assert ours.compilation_config.mode == theirs.compilation_config.mode
    # the fixture's config says float32: the test means something only where vLLM downcasts it
    # (bfloat16 on x86 and aarch64 CPUs), i.e. where the old float32 default gave speed away
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and torch.bfloat16 in current_platform.supported_dtypes:
        assert ours.model_config.dtype == torch.bfloat16


def test_explicit_choices_resolve_in_vllm(models):
    """--dtype float32 --enforce-eager (what the tests pin) is what the engine gets."""
    import torch
    from vllm.config import CompilationMode

    config = _engine_args(models, "--dtype", "float32", "--enforce-eager").create_engine_config()
    assert config.model_config.dtype == torch.float32
    assert config.model_config.enforce_eager
    assert config.compilation_config.mode == CompilationMode.NONE


def test_compile_flag_leaves_vllm_its_own_compilation(models, caplog):
    """``--compile`` is the transformers backend's; vLLM compiles by its own defaults, and the
    server says the flag changes nothing there."""
    import logging

    from hfserve.server import Server

    assert _engine_args(models, "--compile").enforce_eager is False
    assert _engine_args(models, "--compile", "--enforce-eager").enforce_eager is True
    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--backend", "vllm", "--compile"]))
    caplog.set_level(logging.WARNING, logger="hfserve")
    Server(config)
    assert "--compile has no effect on the vllm backend" in caplog.text
