"""hfserve's bfloat16 linear kernel for AVX-512 BF16 CPUs (src/hfserve/backends/bf16_kernel.py and
bf16_kernel.cpp): its products equal ``torch.nn.functional.linear`` in float32 (the independent
reference) over the shapes a model and a server give it, a compiled graph calls it as one operator,
prepack sends a bfloat16 shape to it only where it is faster than oneDNN, and a machine where it
cannot be built keeps oneDNN.

The tests that run the kernel skip on a CPU without AVX-512 BF16 (where the kernel is never used)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hfserve.backends import bf16_kernel, cpu_linear
from tests.test_cpu_linear import compiled_run, two_linear_layers

needs_kernel = pytest.mark.skipif(
    not (bf16_kernel.cpu_has_avx512_bf16() and cpu_linear.supported()), reason="this CPU has no AVX-512 BF16: the kernel is never used here"
)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


@needs_kernel
def test_the_kernel_builds_here_and_checks_itself():
    assert bf16_kernel.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(768, 768), (48, 512), (40, 33), (2050, 767), (17, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_equal_float32_linear(rows, out_features, in_features, with_bias):
    """Every tile shape (rows 1-4 by 4 blocks, 5-8 by 2, their remainders), outputs not a multiple
    of 16, an odd number of inputs, with and without a bias: within bfloat16's rounding of the
    output of the float32 product, and no output left unwritten."""
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=generator).to(torch.bfloat16) if with_bias else None
    expected = _reference(x, weight, bias)
    got = bf16_kernel.linear(x, bf16_kernel.pack(weight), bias, out_features)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # the sums are float32 (the order differs from the reference's), then rounded once to bfloat16
    torch.testing.assert_close(got.float(), expected, atol=1e-3 * in_features**0.5, rtol=2**-8)


@needs_kernel
def test_leading_dimensions_views_and_empty_batches():
    """A [batch, sequence, features] input, a non-contiguous view of one, and no rows at all."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(96, 64, generator=generator).to(torch.bfloat16)
    blocked = bf16_kernel.pack(weight)
    x = torch.randn(3, 5, 64, generator=generator).to(torch.bfloat16)
    torch.testing.assert_close(bf16_kernel.linear(x, blocked, None, 96).float(), _reference(x, weight, None), atol=0.03, rtol=2**-8)
    view = torch.randn(64, 6, generator=generator).to(torch.bfloat16).t()  # [6, 64], strided
    assert not view.is_contiguous()
    torch.testing.assert_close(bf16_kernel.linear(view, blocked, None, 96).float(), _reference(view, weight, None), atol=0.03, rtol=2**-8)
    assert bf16_kernel.linear(torch.empty(0, 64, dtype=torch.bfloat16), blocked, None, 96).shape == (0, 96)
    assert bf16_kernel.linear(torch.empty(2, 0, 64, dtype=torch.bfloat16), blocked, None, 96).shape == (2, 0, 96)


@needs_kernel
def test_a_weight_of_another_shape_is_refused():
    blocked = bf16_kernel.pack(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="input features 48 do not match"):
        bf16_kernel.linear(torch.zeros(1, 48, dtype=torch.bfloat16), blocked, None, 32)
    with pytest.raises(RuntimeError, match="out_features does not match"):
        bf16_kernel.linear(torch.zeros(1, 64, dtype=torch.bfloat16), blocked, None, 40)


@needs_kernel
def test_prepack_sends_the_shapes_that_pay_to_the_kernel(monkeypatch, caplog):
    """Each distinct bfloat16 shape is timed against oneDNN at load; the ones at least KERNEL_GAIN
    times faster go to the kernel (BlockedLinear), the others stay with oneDNN, and the packed model
    computes what the plain one does."""
    timed = []

    def speedup(weight, packed, blocked, rows):  # the 512 -> 1024 shape pays, the 1024 -> 512 one not
        timed.append((tuple(weight.shape), rows))
        return 1.5 if tuple(weight.shape) == (1024, 512) else 0.8

    monkeypatch.setattr(cpu_linear, "kernel_speedup", speedup)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(512, 1024, bias=False), torch.nn.SiLU(), torch.nn.Linear(1024, 512), torch.nn.Linear(512, 1024)
    ).to(torch.bfloat16)
    model = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="hfserve.backends.cpu_linear"):
        assert cpu_linear.prepack(model) == 3
    assert [type(m) for m in model] == [cpu_linear.BlockedLinear, torch.nn.SiLU, cpu_linear.PackedLinear, cpu_linear.BlockedLinear]
    assert sorted(timed) == sorted({(shape, rows) for shape in ((1024, 512), (512, 1024)) for rows in (1, cpu_linear.BATCH_HINT)})
    assert "hfserve's kernel 1.50x oneDNN's packed product at 1 row, 1.50x at 8 rows: hfserve's kernel" in caplog.text
    assert "2 for hfserve's bfloat16 kernel, 1 for oneDNN" in caplog.text
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, got = plain(x).float(), model(x).float()
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@needs_kernel
def test_the_timing_compares_the_two_real_products():
    weight = torch.randn(1024, 512).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, cpu_linear.BATCH_HINT)
    for rows in (1, cpu_linear.BATCH_HINT):
        assert 0 < cpu_linear.kernel_speedup(weight, packed, bf16_kernel.pack(weight), rows) < float("inf")


@needs_kernel
def test_a_compiled_graph_calls_the_kernel():
    """Under torch.compile (freezing, as backends/compiled.py compiles) each kernel layer is one call
    of the operator in the generated code, with no graph break."""
    plain = two_linear_layers(torch.bfloat16)
    model = copy.deepcopy(plain)
    for layer in (model[0], model[2]):
        layer.packed_weight = bf16_kernel.pack(layer.weight)
        layer.__class__ = cpu_linear.BlockedLinear
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    got, code = compiled_run(model, x)
    assert sum(c.count("torch.ops.hfserve_bf16.linear.default(") for c in code) == 2, code
    with torch.inference_mode():
        expected = plain(x)
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


def _no_compiler():
    raise RuntimeError("Ninja is required to load C++ extensions")


@needs_kernel
@pytest.mark.parametrize(
    ("build", "right", "warning"),
    [
        (_no_compiler, True, "kernel is not available here (Ninja is required to load C++ extensions); bfloat16 layers use oneDNN"),
        (lambda: None, False, "kernel computed wrong products on this machine; bfloat16 layers use oneDNN"),
    ],
)
def test_a_machine_that_cannot_build_it_keeps_onednn(build, right, warning, monkeypatch, caplog):
    """No compiler (or any failed build), or a build whose products are wrong: a warning, and
    bfloat16 layers packed for oneDNN."""
    monkeypatch.setattr(bf16_kernel, "build", build)
    monkeypatch.setattr(bf16_kernel, "_computes_right", lambda: right)
    bf16_kernel.available.cache_clear()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024, bias=False)).to(torch.bfloat16)
        with caplog.at_level(logging.WARNING, logger="hfserve.backends.bf16_kernel"):
            assert cpu_linear.prepack(model) == 1
        assert type(model[0]) is cpu_linear.PackedLinear
        assert warning in caplog.text
    finally:
        monkeypatch.undo()
        bf16_kernel.available.cache_clear()


def test_a_cpu_without_avx512_bf16_never_builds_it(monkeypatch):
    def build():
        raise AssertionError("built on a CPU without AVX-512 BF16")

    monkeypatch.setattr(bf16_kernel, "cpu_has_avx512_bf16", lambda: False)
    monkeypatch.setattr(bf16_kernel, "build", build)
    bf16_kernel.available.cache_clear()
    try:
        assert not bf16_kernel.available()
        assert cpu_linear.bfloat16_shapes_for_the_kernel([torch.nn.Linear(512, 512).to(torch.bfloat16)]) == set()
    finally:
        monkeypatch.undo()
        bf16_kernel.available.cache_clear()
