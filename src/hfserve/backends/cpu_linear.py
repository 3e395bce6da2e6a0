"""Linear layers with prepacked oneDNN weights, for generation on CPU.

``torch.nn.functional.linear`` multiplies by a weight in its plain row-major layout: in bfloat16
oneDNN re-blocks it for its (AMX / AVX-512 BF16) kernels on every call; in float32 MKL's product
runs, and on some CPUs (an AMD EPYC with AVX2) MKL takes a slow path for a decode step's few
rows. A weight reordered once into oneDNN's own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` does to frozen CPU
weights) skips both. Measured through the server on a ~110M Llama on 2 cores (docs/benchmarks.md):
bfloat16 generation 24 -> 30 tokens/s at concurrency 1, 165 -> 173 at 8, 282 -> 303 at 16.

float32 depends on the CPU. On a Xeon with AMX, packing made concurrency 1 slower (34 -> 21
tokens/s: MKL's matrix-vector product beats oneDNN's there) and 8 and 16 barely faster; on an
AVX2-only AMD EPYC, MKL's product of 8 rows by a 768 x 32000 weight took 54 ms against oneDNN's
14.5 (768 x 2048: 662 against 301 us), one row 7.2 against 7.9 ms. So float32 weights are packed
where it pays on the CPU at hand: at load, each distinct weight shape is timed both ways at one
row and at :data:`BATCH_HINT` rows, and a shape is packed when the geometric mean of the two
speed-ups is at least :data:`FLOAT32_GAIN` (:func:`float32_shapes_that_pay`). The timing runs on
one thread, the two products alternating, fastest of at least 9 rounds and of 50 ms: on a busy
machine a two-thread timing put oneDNN at 0.1x MKL in one run and 2x in the next (a threaded
product stalls whenever one of its threads waits for a core), a one-thread one needs only one free
core and gave the same ratios run after run (768 x 768 at 1 and 8 rows: 0.90-0.95x, 1.49-1.55x).

:func:`prepack` turns the large ``nn.Linear`` layers of a loaded model (bfloat16, and the float32
ones that pay) into :class:`PackedLinear` (the same object, its class swapped, so module paths
and ``weight.shape`` stay), each holding its packed weight. The plain weight's storage is
released (its parameter becomes a zero-strided view of one element, with the same
shape, dtype and device) unless another module shares it (tied embeddings), which then
keeps it. Small layers stay as they are: there the per-call overhead dominates. On a CPU
where oneDNN has no bfloat16 kernels (no AVX-512 BW/VL/DQ, no AVX-NE-CONVERT: e.g. an AVX2-only
CPU) no bfloat16 layer is packed and the model runs with its plain weights; :func:`supported`
finds that out once per dtype, by packing a small matrix.

On a CPU with AVX-512 BF16, bfloat16 layers may instead go to hfserve's own kernel
(:mod:`.bf16_kernel`), which streams the weights up to twice as fast as oneDNN's product at a decode
step's few rows there: each distinct bfloat16 weight shape is timed both ways at load (one row and
:data:`BATCH_HINT` rows, one thread, as above) and goes to the kernel when its product is at least
:data:`KERNEL_GAIN` times oneDNN's (:func:`bfloat16_shapes_for_the_kernel`); such a layer is a
:class:`BlockedLinear`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import bf16_kernel

logger = logging.getLogger("hfserve.backends.cpu_linear")

#: weight matrices with fewer elements are left alone (a 512 x 512 matrix and larger is packed)
MIN_ELEMENTS = 512 * 512
#: the row count oneDNN chooses its blocked layout for: a decode step's batch
BATCH_HINT = 8
#: the dtypes packed: bfloat16 always (where oneDNN has kernels), float32 where it pays (see above)
_DTYPES = (torch.bfloat16, torch.float32)
#: a float32 weight shape is packed when oneDNN's product is at least this much faster than the
#: plain one (the geometric mean of the speed-ups at one row and at BATCH_HINT rows, timed on one
#: thread: on the AVX2 EPYC the one-thread gains were the smaller, e.g. 768 x 768 1.2x against
#: 1.5x on two threads)
FLOAT32_GAIN = 1.05
#: a bfloat16 weight shape goes to hfserve's kernel when its product is at least this much faster
#: than oneDNN's packed one (geometric mean of the speed-ups at one row and BATCH_HINT rows, one
#: thread; on the AVX-512 EPYC of docs/benchmarks.md, ninth sitting, 768 x 2048 at 1 and 8 rows:
#: about 2x)
KERNEL_GAIN = 1.0


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
    bfloat16 products are emulated (though still reading half the memory of float32: on the AVX2
    EPYC of docs/benchmarks.md bfloat16 was faster at concurrency 1 and 8, not at 16)."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@functools.cache
def supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN can pack and multiply ``dtype`` weights on this CPU (probed once, on a small
    matrix: its bfloat16 kernels need AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if not available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=dtype), weight, None, "none", [], "")
    except RuntimeError as exc:
        logger.info("oneDNN cannot pack %s weights on this CPU (%s): linear layers keep their plain weights", dtype, exc)
        return False
    return True


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread: a timing that needs one free core, not all of them,
    is far less disturbed by other work on the machine (a threaded product stalls whenever any of
    its threads is descheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fastest_pair_us(
    first: Callable[[], object], second: Callable[[], object], rounds: int = 9, budget_s: float = 0.05, most: int = 500
) -> tuple[float, float]:
    """The fastest timed call of each (after one untimed call of each), in microseconds: at least
    ``rounds`` rounds, more (up to ``most``) until ``budget_s`` seconds are spent, so that a quick
    product is timed often enough for its fastest call to settle. The two calls alternate, so a
    disturbance by other work falls on both alike."""
    first(), second()
    best = [math.inf, math.inf]
    spent, done = 0.0, 0
    while done < rounds or (spent < budget_s and done < most):
        for i, call in enumerate((first, second)):
            started = time.perf_counter()
            call()
            took = time.perf_counter() - started
            best[i], spent = min(best[i], took), spent + took
        done += 1
    return best[0] * 1e6, best[1] * 1e6


def speedup(weight: torch.Tensor, packed: torch.Tensor, rows: int) -> float:
    """How many times faster oneDNN's product by ``packed`` is than the plain product by ``weight``,
    at ``rows`` rows (timed on one thread, the two alternating)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    with torch.no_grad(), _one_thread():
        plain, onednn = _fastest_pair_us(
            lambda: torch.nn.functional.linear(x, weight),
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        )
    return plain / onednn


def _first_weight_per_shape(layers: list[nn.Linear]) -> dict[tuple[int, int], torch.Tensor]:
    first: dict[tuple[int, int], torch.Tensor] = {}
    for layer in layers:
        first.setdefault((int(layer.weight.shape[0]), int(layer.weight.shape[1])), layer.weight.detach())
    return first


def _shapes_that_gain(
    layers: list[nn.Linear],
    speedups: Callable[[torch.Tensor], tuple[float, float]],
    threshold: float,
    names: tuple[str, str, str, str, str],
) -> set[tuple[int, int]]:
    """The weight shapes among ``layers`` where ``speedups(weight)`` (the candidate's product over
    the baseline's, at one row and at BATCH_HINT rows) has a geometric mean of at least
    ``threshold``; each shape's timing logged with ``names``: the dtype, the candidate, the
    baseline, what a shape gets when it gains and what it keeps otherwise."""
    dtype, candidate, baseline, chosen, other = names
    gaining: set[tuple[int, int]] = set()
    for shape, weight in _first_weight_per_shape(layers).items():
        one, many = speedups(weight)
        gain = math.sqrt(one * many)
        logger.info(
            "%s %dx%d weights: %s %.2fx %s at 1 row, %.2fx at %d rows: %s",
            dtype, shape[1], shape[0], candidate, one, baseline, many, BATCH_HINT, chosen if gain >= threshold else other,
        )  # fmt: skip
        if gain >= threshold:
            gaining.add(shape)
    return gaining


def float32_shapes_that_pay(layers: list[nn.Linear]) -> set[tuple[int, int]]:
    """The weight shapes among ``layers`` (float32) whose oneDNN product is, timed here and now, at
    least :data:`FLOAT32_GAIN` times faster than the plain one over one row and BATCH_HINT rows."""

    def speedups(weight: torch.Tensor) -> tuple[float, float]:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        return speedup(weight, packed, 1), speedup(weight, packed, BATCH_HINT)

    names = ("float32", "oneDNN's packed product", "the plain one", "packed", "left plain")
    return _shapes_that_gain(layers, speedups, FLOAT32_GAIN, names)


def kernel_speedup(weight: torch.Tensor, packed: torch.Tensor, blocked: torch.Tensor, rows: int) -> float:
    """How many times faster hfserve's bfloat16 kernel's product by ``blocked`` is than oneDNN's by
    ``packed`` (both holding ``weight``), at ``rows`` rows (timed on one thread, the two alternating)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    out_features = int(weight.shape[0])
    with torch.no_grad(), _one_thread():
        onednn, kernel = _fastest_pair_us(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            lambda: bf16_kernel.linear(x, blocked, None, out_features),
        )
    return onednn / kernel


def bfloat16_shapes_for_the_kernel(layers: list[nn.Linear]) -> set[tuple[int, int]]:
    """The weight shapes among ``layers`` (bfloat16) whose product by hfserve's kernel is, timed here
    and now, at least :data:`KERNEL_GAIN` times oneDNN's over one row and BATCH_HINT rows; none where
    the kernel is not available (:func:`.bf16_kernel.available`)."""
    if not layers or not bf16_kernel.available():
        return set()

    def speedups(weight: torch.Tensor) -> tuple[float, float]:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        blocked = bf16_kernel.pack(weight)
        return kernel_speedup(weight, packed, blocked, 1), kernel_speedup(weight, packed, blocked, BATCH_HINT)

    names = ("bfloat16", "hfserve's kernel", "oneDNN's packed product", "hfserve's kernel", "oneDNN")
    return _shapes_that_gain(layers, speedups, KERNEL_GAIN, names)


@torch.library.custom_op("hfserve::packed_linear", mutates_args=())
def packed_linear(input: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """oneDNN's product by a prepacked weight, as one operator a compiled graph calls as it is
    (inductor lowers ``mkldnn._linear_pointwise`` only for weights it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(input, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(input: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], out_features))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward pass multiplies by its prepacked oneDNN weight."""

    packed_weight: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(input, self.packed_weight, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(input, self.packed_weight, self.bias, "none", [], "")


class BlockedLinear(PackedLinear):
    """An ``nn.Linear`` (bfloat16) whose forward pass is hfserve's kernel (:mod:`.bf16_kernel`) by its
    weight blocked for it (``packed_weight``); an operator ``torch.compile`` keeps as it is."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return bf16_kernel.linear(input, self.packed_weight, self.bias, self.out_features)


def _packable(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.Linear
        and layer.weight.device.type == "cpu"
        and layer.weight.dtype in _DTYPES
        and layer.weight.numel() >= MIN_ELEMENTS
        and (layer.bias is None or layer.bias.dtype == layer.weight.dtype)
    )


def prepack(model: nn.Module) -> int:
    """Pack the large linear layers of ``model`` (on CPU; bfloat16, and float32 where it pays) in place;
    returns how many were packed (0 where oneDNN's operators are missing or cannot run on this CPU)."""
    layers: list[nn.Linear] = [
        m for m in model.modules() if isinstance(m, nn.Linear) and _packable(m) and supported(m.weight.dtype)
    ]
    float32 = [layer for layer in layers if layer.weight.dtype == torch.float32]
    if float32:
        pays = float32_shapes_that_pay(float32)
        layers = [layer for layer in layers if layer.weight.dtype != torch.float32 or tuple(layer.weight.shape) in pays]
    if not layers:
        return 0
    for_kernel = bfloat16_shapes_for_the_kernel([layer for layer in layers if layer.weight.dtype == torch.bfloat16])
    # a weight used anywhere but by its one linear layer (tied input and output embeddings)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    with torch.no_grad():
        for layer in layers:
            weight: torch.Tensor = layer.weight
            kernel = weight.dtype == torch.bfloat16 and (int(weight.shape[0]), int(weight.shape[1])) in for_kernel
            if kernel:
                layer.packed_weight = bf16_kernel.pack(weight)
            else:
                layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
            if owners[id(weight)] == 1:  # nobody else reads it: keep its shape, free its storage
                stub = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
                layer.weight = nn.Parameter(stub, requires_grad=False)
            layer.__class__ = BlockedLinear if kernel else PackedLinear
    blocked = sum(isinstance(layer, BlockedLinear) for layer in layers)
    logger.info(
        "prepacked %d linear layers for CPU generation: %d for hfserve's bfloat16 kernel, %d for oneDNN",
        len(layers), blocked, len(layers) - blocked,
    )  # fmt: skip
    return len(layers)
