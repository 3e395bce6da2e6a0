"""A bfloat16 linear layer and decode attention for CPUs with AVX-512 BF16, where oneDNN leaves half the memory's speed unused.

A decode step of a small model on CPU is its weights streaming from memory: each product reads its
whole weight for a few rows of input. On a 2-core AMD EPYC with AVX-512 BF16 (no AMX), one thread
summing a 200 MB tensor reads 22.7 GB/s, but oneDNN's prepacked bfloat16 product
(``brg_matmul:avx512_core_bf16``, what :mod:`.cpu_linear` packs for) streams 768 x 2048 weights at
8.8 GB/s on one thread and 13-17 on two, at 1 to 16 rows, and the ~110M Llama's decode step spent
half its time there (docs/benchmarks.md, ninth sitting). The kernel in ``bf16_kernel.cpp`` blocks
the weight once as ``[N/16][K/2][16][2]`` (one 64-byte vector of 16 outputs by 2 inputs, what
``vdpbf16ps`` multiplies by a broadcast pair of inputs) and streams it front to back with every
row's float32 sums in registers: 20.7 GB/s on one thread, 24-31 on two, at 1 to 8 rows; at 64 rows
(a prefill) it is as fast as oneDNN (both bound by the ``vdpbf16ps`` throughput).

On a CPU with AMX (Intel Xeon, Sapphire Rapids and later) the same blocked weight is what an AMX
tile of weights holds (16 pairs of inputs by 16 outputs, 64 contiguous bytes a row), so from two rows
on the kernel sums tiles of rows by ``tdpbf16ps`` instead: there oneDNN's product runs on AMX too, and
``vdpbf16ps`` alone was 0.57-0.67x oneDNN at 8 rows (a 2-core Xeon, the ~110M Llama's shapes); with
the tiles 1.2-1.6x at 8 and 16 rows and 1.2-1.9x at one row (docs/benchmarks.md, eleventh sitting).

The same extension computes a decode step's attention (one query token per row):
``torch.ops.hfserve_bf16.decode_attention(query, keys, values, mask, scale)`` takes each row and
query head in turn, its scores against the row's cached keys read in place from the KV cache's
strided views, a float32 softmax and the values weighted in float32, in one call per layer where
the batched products of :mod:`.decode_attention` took a dozen small operators: on the ~110M Llama
at 8 rows that was a fifth of the decode step (docs/benchmarks.md, tenth sitting).

They are PyTorch operators, ``torch.ops.hfserve_bf16.linear(input, blocked_weight, bias,
out_features)`` and the attention above, built from the C++ source beside this module by
``torch.utils.cpp_extension.load`` the first time a process needs it on a machine (about 40 s; the
build is cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and
rebuilt when the source changes), with a fake implementation so that ``torch.compile`` puts it in
its graphs as it is. :func:`available` says whether it can run here: the CPU has AVX-512 BF16, the
build succeeded (it needs a C++ compiler and ninja) and the built operator computes what
``torch.nn.functional.linear`` computes on a small matrix. Where not, :mod:`.cpu_linear` packs
for oneDNN as before. Which of the two a model's layers use is timed at load (cpu_linear).
"""

from __future__ import annotations

import functools
import logging
import pathlib

import torch

logger = logging.getLogger("hfserve.backends.bf16_kernel")

SOURCE = pathlib.Path(__file__).with_name("bf16_kernel.cpp")
#: the extension's name (its build directory under TORCH_EXTENSIONS_DIR)
NAME = "hfserve_bf16_kernel"
BLOCK = 16
#: AVX-512 BF16 everywhere; the AMX instructions only run where the CPU and Linux allow them (checked in C++)
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp"]


def cpu_has_avx512_bf16() -> bool:
    return bool(getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", lambda: False)())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ([out_features, in_features], bfloat16) blocked for the kernel: [N/16][K/2][16][2],
    outputs padded with zeros to a multiple of 16 and inputs to an even count."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, k % 2, 0, -n % BLOCK))
    return padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(input: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``input @ weight.T + bias`` by the kernel (:func:`available` must have said yes)."""
    return torch.ops.hfserve_bf16.linear(input, blocked, bias, out_features)


def amx() -> bool:
    """Whether the kernel's products of several rows run on AMX tiles here (:func:`available` must
    have said yes): a CPU with AMX (Intel Sapphire Rapids and later) and a Linux that grants the
    tile state; else every product is ``vdpbf16ps``'s."""
    return bool(torch.ops.hfserve_bf16.amx())


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of one query token per row, by the kernel (:func:`available` must have said
    yes): ``query`` [rows, heads, 1, dim], ``key`` and ``value`` [rows, kv_heads, positions, dim]
    (bfloat16, any strides but a contiguous last dimension; ``heads`` a multiple of ``kv_heads``),
    ``mask`` None or bool [rows or 1, positions] (True: attend); returns [rows, 1, heads, dim]."""
    return torch.ops.hfserve_bf16.decode_attention(query, key, value, mask, scale)


def _output_shape(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], out_features))


def _attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))


@functools.cache
def build() -> None:
    """Compile the kernel for this machine (or load the cached build) and register its operator."""
    from torch.utils import cpp_extension

    logger.info("building hfserve's bfloat16 linear kernel for this CPU (once per machine and source; cached)")
    cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False, verbose=False)
    torch.library.register_fake("hfserve_bf16::linear")(_output_shape)
    torch.library.register_fake("hfserve_bf16::decode_attention")(_attention_shape)


def _computes_right() -> bool:
    generator = torch.Generator().manual_seed(0)
    # one row; AMX's tiles where the CPU has them: 7 and 9 rows, 20 rows (two tiles of rows) by 5
    # blocks of outputs (a group of 4 and one); 33 inputs (odd: no AMX)
    for rows, out_features, in_features in ((1, 40, 33), (7, 48, 64), (9, 33, 32), (20, 80, 96), (3, 40, 33)):
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        bias = torch.randn(out_features, generator=generator).to(torch.bfloat16)
        expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        got = linear(x, pack(weight), bias, out_features).float()
        if not torch.allclose(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0):
            return False
    # two rows, 4 query heads on 2 key heads, 40 positions (the first row's last 9 masked), head size 48
    q = torch.randn(2, 4, 1, 48, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, 48, generator=generator).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 31:] = False
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), mask[:, None, None, :]
    ).transpose(1, 2)
    got = attention(q, k, v, mask, 48**-0.5).float()
    return bool(torch.allclose(got, expected, atol=0.02 * float(expected.abs().max()), rtol=0))


@functools.cache
def available() -> bool:
    """Whether the kernel runs on this machine (built once, checked once per process)."""
    if not cpu_has_avx512_bf16():
        return False
    try:
        build()
        right = _computes_right()
    except Exception as exc:  # noqa: BLE001 - a missing compiler or ninja, a failed build, a library that will not load: oneDNN instead
        logger.warning("hfserve's bfloat16 linear kernel is not available here (%s); bfloat16 layers use oneDNN", exc)
        return False
    if not right:
        logger.warning("hfserve's bfloat16 linear kernel computed wrong products on this machine; bfloat16 layers use oneDNN")
    return right


if __name__ == "__main__":  # ``python -m hfserve.backends.bf16_kernel``: build ahead (the CPU image does)
    logging.basicConfig(level=logging.INFO)
    build()
