"""LoRA adapters: reading ``--lora-modules`` and checking an adapter directory against the model.

Plain file reading, no torch: the command line checks the adapters at start-up (one line, exit
2) and the service checks a dynamically loaded one (``invalid_request``) with the same rules,
before any backend sees them. An adapter is refused when:

- its directory is missing, or has no ``adapter_config.json``, or that file is not a peft LoRA
  configuration (``peft_type`` LORA; DoRA is refused: neither backend serves it per row);
- its rank (``r``, and any ``rank_pattern`` entry) is above ``--max-lora-rank``;
- it was made for another base model: its ``base_model_name_or_path`` names a local model
  directory whose ``config.json`` differs from the served model's, or its weights (read from the
  safetensors header, no tensor loaded) target modules the model does not have or have shapes
  that do not fit the model's weights.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LoraModule

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the name peft gives the base model's rows in a mixed batch (never an adapter's name)
RESERVED_NAMES = frozenset({"__base__"})
_NAME = re.compile(r"^[^\s/]([^\s]*[^\s/])?$")
#: config.json keys that say nothing about the weights' layout
_CONFIG_NOISE = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"})


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    #: what the adapter's config names as its base model (None when it names none)
    base_model: str | None
    target_modules: tuple[str, ...]


def parse_module(spec: str) -> LoraModule:
    """One ``--lora-modules`` value: ``name=path`` or vLLM's JSON form
    ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"--lora-modules {spec!r} is not valid JSON ({exc.msg}); give name=path or a JSON object") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise AdapterError(f'--lora-modules {spec!r}: the JSON form needs "name" and "path" strings')
        extra = set(data) - {"name", "path", "base_model_name"}
        if extra:
            raise AdapterError(f"--lora-modules {spec!r}: unknown key {sorted(extra)[0]!r} (known: name, path, base_model_name)")
        base = data.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise AdapterError(f'--lora-modules {spec!r}: "base_model_name" must be a string')
        module = LoraModule(data["name"], data["path"], base)
    else:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise AdapterError(f"--lora-modules {spec!r} is not name=path (or vLLM's JSON form)")
        module = LoraModule(name.strip(), path.strip())
    check_name(module.name, flag="--lora-modules")
    return module


def check_name(name: str, *, flag: str = "lora_name") -> None:
    if not _NAME.match(name) or name in RESERVED_NAMES:
        raise AdapterError(f"{flag}: {name!r} cannot be an adapter's name; use letters, digits, '-', '_' or '.'")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise AdapterError(f"{what} cannot be read as JSON") from None


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The tensor names and shapes of a safetensors file, from its header (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("truncated safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("implausible safetensors header")
        header = json.loads(f.read(size))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _model_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """The model's weight shapes from its safetensors headers; None when it has no safetensors."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return safetensors_shapes(single)
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return None
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        shapes.update(safetensors_shapes(model_dir / shard))
    return shapes


def _layout(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _CONFIG_NOISE} if isinstance(config, dict) else {}


def check_adapter(
    module: LoraModule, *, max_rank: int, model_dir: Path | None, label: str | None = None
) -> AdapterInfo:
    """``module``'s adapter checked against the model in ``model_dir`` (None: a Hub model, whose
    files are not at hand: the base and shape checks are the backend's). Raises AdapterError."""
    what = label or f"LoRA adapter {module.name!r} ({module.path})"
    path = Path(module.path)
    if not path.is_dir():
        raise AdapterError(f"{what}: the directory does not exist; give the directory that holds adapter_config.json")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterError(f"{what} is not a LoRA adapter: it has no {ADAPTER_CONFIG} (save it with peft's save_pretrained)")
    config = _read_json(config_file, f"{what}: {ADAPTER_CONFIG}")
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{what} is not a LoRA adapter (peft_type {kind!r}); only peft LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"{what} is a DoRA adapter (use_dora); only plain LoRA adapters are served")
    try:
        ranks = [int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    except (TypeError, ValueError):
        raise AdapterError(f"{what}: its rank (r) is not a number") from None
    rank = max(ranks)
    if rank > max_rank:
        raise AdapterError(f"{what} has rank {rank}, above --max-lora-rank {max_rank}; raise --max-lora-rank to at least {rank}")
    base = config.get("base_model_name_or_path")
    base = base if isinstance(base, str) and base else None
    targets = config.get("target_modules")
    target_modules = tuple(sorted(targets)) if isinstance(targets, list) else ((targets,) if isinstance(targets, str) else ())
    if model_dir is not None:
        _check_base(what, base, model_dir)
        _check_shapes(what, path, model_dir)
    return AdapterInfo(module.name, str(path), rank, base, target_modules)


def _check_base(what: str, base: str | None, model_dir: Path) -> None:
    """A base model named by a local directory must be this model (or one with the same config.json)."""
    if base is None or not Path(base).is_dir():
        return  # a Hub id, or a directory of another machine: nothing to compare here (the shapes still are)
    if Path(base).resolve() == model_dir.resolve():
        return
    theirs = Path(base) / "config.json"
    ours = model_dir / "config.json"
    if theirs.is_file() and ours.is_file():
        if _layout(_read_json(theirs, f"{base}/config.json")) == _layout(_read_json(ours, "the model's config.json")):
            return
    raise AdapterError(
        f"{what} was made for another base model ({base}), not for the served model; serve it with its own base model"
    )


def _check_shapes(what: str, path: Path, model_dir: Path) -> None:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        return  # adapter_model.bin: checked when the backend loads it
    try:
        adapter = safetensors_shapes(weights)
        model = _model_shapes(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        raise AdapterError(f"{what}: {ADAPTER_WEIGHTS} cannot be read") from None
    if model is None:
        return
    for key, shape in sorted(adapter.items()):
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key or len(shape) != 2:
                continue
            module = key.split(part)[0].removeprefix("base_model.model.")
            target = model.get(f"{module}.weight")
            if target is None:
                raise AdapterError(f"{what} was made for another base model: it adapts {module}, which this model does not have")
            want = target[1] if dim == 1 else target[0]
            if shape[dim] != want:
                side = "input" if dim == 1 else "output"
                raise AdapterError(
                    f"{what} was made for another base model: its {module} has {side} size {shape[dim]}, the model's has {want}"
                )
