"""Linear layers with prepacked oneDNN weights, for bfloat16 generation on CPU.

In bfloat16 on CPU, ``torch.nn.functional.linear`` hands oneDNN the weights in their plain
row-major layout, and oneDNN re-blocks them for its (AMX / AVX-512 BF16) kernels on every
call. A weight reordered once into oneDNN's own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` does to frozen CPU
weights) skips that. Measured through the server on a ~110M Llama on 2 cores (docs/benchmarks.md):
bfloat16 generation 24 -> 30 tokens/s at concurrency 1, 165 -> 173 at 8, 282 -> 303 at 16. In
float32 the same packing made concurrency 1 slower (34 -> 21 tokens/s: MKL's matrix-vector
product beats oneDNN's there) and 8 and 16 no faster, so float32 weights stay as they are.

:func:`prepack` turns the large bfloat16 ``nn.Linear`` layers of a loaded model into
:class:`PackedLinear` (the same object, its class swapped, so module paths and
``weight.shape`` stay), each holding its packed weight. The plain weight's storage is
released (its parameter becomes a zero-strided view of one element, with the same
shape, dtype and device) unless another module shares it (tied embeddings), which then
keeps it. Small layers stay as they are: there the per-call overhead dominates. On a CPU
where oneDNN has no bfloat16 kernels (no AVX-512 BW/VL/DQ, no AVX-NE-CONVERT: e.g. an AVX2-only
CPU) nothing is packed and the model runs with its plain weights; :func:`supported` finds that
out once, by packing a small matrix.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

logger = logging.getLogger("hfserve.backends.cpu_linear")

#: weight matrices with fewer elements are left alone (a 512 x 512 matrix and larger is packed)
MIN_ELEMENTS = 512 * 512
#: the row count oneDNN chooses its blocked layout for: a decode step's batch
BATCH_HINT = 8
#: where packing pays (see above)
_DTYPES = (torch.bfloat16,)


def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear operators."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (Intel AMX or AVX-512 BF16); elsewhere
    bfloat16 products are emulated and float32 is faster."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@functools.cache
def supported() -> bool:
    """Whether oneDNN can pack and multiply bfloat16 weights on this CPU (probed once, on a small
    matrix: its bfloat16 kernels need AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if not available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=torch.bfloat16), weight, None, "none", [], "")
    except RuntimeError as exc:
        logger.info("oneDNN cannot pack bfloat16 weights on this CPU (%s): linear layers keep their plain weights", exc)
        return False
    return True


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward pass multiplies by its prepacked oneDNN weight."""

    packed_weight: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(input, self.packed_weight, self.bias, "none", [], "")


def _packable(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.Linear
        and layer.weight.device.type == "cpu"
        and layer.weight.dtype in _DTYPES
        and layer.weight.numel() >= MIN_ELEMENTS
        and (layer.bias is None or layer.bias.dtype == layer.weight.dtype)
    )


def prepack(model: nn.Module) -> int:
    """Pack the large linear layers of ``model`` (on CPU, in bfloat16) in place;
    returns how many were packed (0 where oneDNN's operators are missing or cannot run on this CPU)."""
    layers: list[nn.Linear] = [m for m in model.modules() if isinstance(m, nn.Linear) and _packable(m)]
    if not layers or not supported():
        return 0
    # a weight used anywhere but by its one linear layer (tied input and output embeddings)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    with torch.no_grad():
        for layer in layers:
            weight: torch.Tensor = layer.weight
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
            if owners[id(weight)] == 1:  # nobody else reads it: keep its shape, free its storage
                stub = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
                layer.weight = nn.Parameter(stub, requires_grad=False)
            layer.__class__ = PackedLinear
    logger.info("prepacked %d linear layers for oneDNN (CPU generation)", len(layers))
    return len(layers)
