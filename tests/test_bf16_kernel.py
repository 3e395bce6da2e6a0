"""hfserve's bfloat16 kernels for AVX-512 BF16 CPUs (src/hfserve/backends/bf16_kernel.py and
bf16_kernel.cpp): the linear kernel's products equal ``torch.nn.functional.linear`` in float32 (the
independent reference) over the shapes a model and a server give it, a compiled graph calls it as
one operator, prepack sends a bfloat16 shape to it only where it is faster than oneDNN, and a
machine where it cannot be built keeps oneDNN; the decode attention equals SDPA in float32 over
padded, grouped and strided inputs, and refuses what it does not compute.

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
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 48, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(768, 768), (48, 512), (40, 33), (2050, 767), (17, 2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_products_equal_float32_linear(rows, out_features, in_features, with_bias):
    """Every tile shape (rows 1-4 by 4 blocks, 5-8 by 2, their remainders; on a CPU with AMX, tiles
    of up to 16 rows by 4 blocks and 32 rows by 2, and their remainders), outputs not a multiple of
    16, an odd number of inputs, inputs not a multiple of 32 (no AMX), with and without a bias: within bfloat16's rounding of the
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
def test_amx_tiles_wherever_the_cpu_and_linux_have_them():
    """The products above ran on AMX tiles exactly where PyTorch finds AMX usable (the CPU has it
    and Linux granted its state: oneDNN's own check), by ``vdpbf16ps`` elsewhere."""
    assert bf16_kernel.available()
    assert bf16_kernel.amx() == bool(torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx())


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


def _sdpa_reference(query, key, value, mask):
    """SDPA in float32 (the independent reference), key heads repeated for grouped queries; [rows, 1, heads, dim]."""
    group = query.shape[1] // key.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    attend = None if mask is None else mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(query.float(), k, v, attend, scale=0.1).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
@pytest.mark.parametrize("dim", [64, 48, 80, 128])
@pytest.mark.parametrize("mask_kind", ["none", "per_row", "shared"])
def test_decode_attention_equals_float32_sdpa(rows, heads, kv_heads, dim, mask_kind):
    """One query token per row over keys and values that are the filled part of longer buffers (as
    the KV cache hands them out), left padding masked per row or one mask for all rows, grouped
    query heads, head sizes that are and are not a multiple of 32: within bfloat16's rounding of
    SDPA over the same inputs in float32."""
    generator = torch.Generator().manual_seed(rows * 100 + heads + dim)
    positions = 37 + rows

    def cached() -> torch.Tensor:
        buffer = torch.randn(rows, kv_heads, positions + 20, dim, generator=generator).to(torch.bfloat16)
        buffer[..., positions:, :] = float("nan")  # beyond the filled positions: never read
        return buffer[..., :positions, :]

    key, value = cached(), cached()
    query = torch.randn(rows, 1, heads, dim, generator=generator).to(torch.bfloat16).transpose(1, 2)  # as the model's view
    mask = None
    if mask_kind == "per_row":
        mask = torch.ones(rows, positions, dtype=torch.bool)
        for r in range(rows):
            mask[r, : 3 * r] = False  # row r left-padded by 3r positions
    elif mask_kind == "shared":
        mask = torch.ones(1, positions, dtype=torch.bool)
        mask[0, :5] = False
    got = bf16_kernel.attention(query, key, value, mask, 0.1)
    expected = _sdpa_reference(query, key, value, None if mask is None else mask.expand(rows, -1))
    assert got.shape == (rows, 1, heads, dim) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.01, rtol=2**-7)


@needs_kernel
@pytest.mark.parametrize("positions", [1, 2, 1500])
def test_decode_attention_at_one_and_many_positions(positions):
    """A first decode step (one cached position), and a long context; a row that may attend to its
    last position only takes that position's values."""
    generator = torch.Generator().manual_seed(positions)
    query = torch.randn(2, 4, 1, 64, generator=generator).to(torch.bfloat16)
    key, value = (torch.randn(2, 2, positions, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, positions, dtype=torch.bool)
    mask[1, :-1] = False
    got = bf16_kernel.attention(query, key, value, mask, 0.1)
    torch.testing.assert_close(got.float(), _sdpa_reference(query, key, value, mask), atol=0.01, rtol=2**-7)
    torch.testing.assert_close(got[1, 0].float(), value[1, :, -1].repeat_interleave(2, 0).float())


@needs_kernel
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("float32", "takes bfloat16"),
        ("two_tokens", "one query token per row"),
        ("rows", "do not match the query's rows"),
        ("groups", "head sizes do not match"),
        ("mask", "the mask must be bool"),
    ],
)
def test_decode_attention_refuses_what_it_does_not_compute(change, message):
    query = torch.randn(2, 4, 1, 64).to(torch.bfloat16)
    key = value = torch.randn(2, 4, 10, 64).to(torch.bfloat16)
    mask = None
    if change == "float32":
        query = query.float()
    elif change == "two_tokens":
        query = torch.randn(2, 4, 2, 64).to(torch.bfloat16)
    elif change == "rows":
        key = value = torch.randn(3, 4, 10, 64).to(torch.bfloat16)
    elif change == "groups":
        key = value = torch.randn(2, 3, 10, 64).to(torch.bfloat16)
    else:
        mask = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=message):
        bf16_kernel.attention(query, key, value, mask, 0.1)
