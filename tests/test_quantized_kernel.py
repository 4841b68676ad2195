"""The CPU kernels' quantized products (``quantized_matmul`` in core/cpu/_cpu_kernels.c) against NumPy products of
the weights MLX's ``mx.quantize`` packs, dequantised here from the packed bits (rows 1..16, 4 and 8 bits, odd
shapes, several matrices in one call, every instruction set the CPU has); the int8-activation product
(``quantized_matmul_packed``, 8 and 4 bits, VNNI, AVX2 or portable C) against the same product of activations
rounded in NumPy; the exact GELU against ``math.erf``; EnCodec's ELU against ``expm1``."""

from __future__ import annotations

import ctypes
import math

import mlx.core as mx
import numpy as np
import pytest

from core.cpu import blas
from core.cpu.quantized import pack, unpack
from tests import test_cpu_kernels

# the kernel, each instruction set the CPU has, and the kernel's threads: the fixtures of the float32 kernels' tests
kernel, isa, threads = test_cpu_kernels.kernel, test_cpu_kernels.isa, test_cpu_kernels.threads


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int) -> np.ndarray:
    """MLX's layout read independently of the kernel: element i of each little-endian uint32 at bits i·bits."""
    words = packed.astype(np.uint64)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * bits
    q = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1).astype(np.float64)
    N, K = q.shape
    return (q.reshape(N, K // group, group) * scales[..., None] + biases[..., None]).reshape(N, K)


def quantized(rng: np.random.Generator, N: int, K: int, bits: int, group: int):
    w = rng.standard_normal((N, K)).astype(np.float32)
    packed, scales, biases = (np.ascontiguousarray(np.asarray(a)) for a in mx.quantize(mx.array(w), group, bits))
    return packed, scales, biases


def run(kernel, a: np.ndarray, mats: list, bits: int, group: int) -> tuple[int, np.ndarray]:
    count = len(mats)
    widths = [m[0].shape[0] for m in mats]
    out = np.full((a.shape[0], sum(widths)), np.nan, dtype=np.float32)
    pointers = ctypes.c_void_p * count
    status = kernel.quantized_matmul(a.shape[0], a.shape[1], bits, group, count, (ctypes.c_int * count)(*widths),
                                     a.ctypes.data, pointers(*(m[0].ctypes.data for m in mats)),
                                     pointers(*(m[1].ctypes.data for m in mats)),
                                     pointers(*(m[2].ctypes.data for m in mats)), out.ctypes.data)
    return status, out


def reference(a: np.ndarray, mats: list, bits: int, group: int) -> np.ndarray:
    return np.concatenate([a.astype(np.float64) @ dequantize(*m, bits, group).T for m in mats], axis=1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(37, 64, 64), (100, 192, 64), (64, 128, 32), (50, 256, 128), (1, 64, 64),
                                   (131, 320, 64)])
def test_products_match_numpy_for_every_row_count(kernel, isa, bits, shape):
    N, K, group = shape
    rng = np.random.default_rng(N * K + bits)
    mats = [quantized(rng, N, K, bits, group)]
    for rows in range(1, 17):
        a = rng.standard_normal((rows, K)).astype(np.float32)
        status, out = run(kernel, a, mats, bits, group)
        assert status == 0
        expected = reference(a, mats, bits, group)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * scale * math.sqrt(K),
                                   err_msg=f"{isa} {bits} bits, {rows} rows, {shape}")


@pytest.mark.parametrize("bits", [8, 4])
def test_several_matrices_side_by_side_on_threads(kernel, threads, bits):
    """q, k and v (or the heads of logits) in one call, split between threads across the matrices' borders; each
    row's result is the same whatever the rows and threads around it."""
    rng = np.random.default_rng(bits)
    K, group = 256, 64
    mats = [quantized(rng, n, K, bits, group) for n in (200, 17, 333, 64)]
    a = rng.standard_normal((16, K)).astype(np.float32)
    results = []
    for count in (1, 2):
        threads(count)
        status, out = run(kernel, a, mats, bits, group)
        assert status == 0
        results.append(out)
        np.testing.assert_allclose(out, reference(a, mats, bits, group), rtol=0, atol=1e-4 * np.abs(out).max())
    np.testing.assert_array_equal(results[0], results[1])
    for rows in (1, 3, 9):
        _, alone = run(kernel, np.ascontiguousarray(a[:rows]), mats, bits, group)
        np.testing.assert_array_equal(alone, results[0][:rows])


def test_the_result_is_mlx_quantized_matmul(kernel):
    """The layout the kernel reads is MLX's own: its product equals ``mx.quantized_matmul`` to float rounding."""
    rng = np.random.default_rng(5)
    for bits in (8, 4):
        w = mx.array(rng.standard_normal((96, 128)).astype(np.float32))
        packed, scales, biases = mx.quantize(w, 64, bits)
        a = rng.standard_normal((4, 128)).astype(np.float32)
        expected = np.asarray(mx.quantized_matmul(mx.array(a), packed, scales, biases, transpose=True, group_size=64,
                                                  bits=bits))
        mats = [tuple(np.ascontiguousarray(np.asarray(x)) for x in (packed, scales, biases))]
        status, out = run(kernel, a, mats, bits, 64)
        assert status == 0
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("args", [dict(rows=17), dict(bits=3), dict(group=48), dict(group=16), dict(K=96),
                                  dict(count=9), dict(count=0)])
def test_refuses_what_it_does_not_take(kernel, args):
    rows, K, bits, group, count = (args.get(k, d) for k, d in (("rows", 2), ("K", 64), ("bits", 8), ("group", 64),
                                                               ("count", 1)))
    a = np.ones((rows, K), np.float32)
    out = np.zeros((rows, 8), np.float32)
    dummy = np.zeros(4096, np.float32)
    n = max(count, 1)
    pointers = ctypes.c_void_p * n
    status = kernel.quantized_matmul(rows, K, bits, group, count, (ctypes.c_int * n)(*[1] * n), a.ctypes.data,
                                     pointers(*[dummy.ctypes.data] * n), pointers(*[dummy.ctypes.data] * n),
                                     pointers(*[dummy.ctypes.data] * n), out.ctypes.data)
    assert status == -1
    assert not out.any()


def test_counted(kernel):
    before = blas.kernel_counters()["quantized"]
    rng = np.random.default_rng(0)
    run(kernel, rng.standard_normal((2, 64)).astype(np.float32), [quantized(rng, 8, 64, 8, 64)], 8, 64)
    assert blas.kernel_counters()["quantized"] == before + 1


def test_gelu_is_the_exact_one(kernel, isa):
    """Within float32 rounding of the exact GELU (far left, where it is below 1e-6, as the fused MLX one rounds)."""
    x = np.concatenate([np.linspace(-12, 12, 20001), [0.0, -0.0, 1e-30, 88.0, -88.0]]).astype(np.float32)
    y = x.copy()
    kernel.gelu_inplace(y.size, y.ctypes.data)
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-6)


def test_elu_is_expm1_below_zero(kernel, isa, threads):
    """The ELU of EnCodec within a few float32 ulp of ``expm1`` (relatively, near 0 too), on one thread and on
    two (a long array is split between them), with NaN and the infinities as torch gives them."""
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-100, 8, 20001), rng.standard_normal(5000) * 1e-3, -np.logspace(-30, 1, 3001),
                        [0.0, -0.0, -0.5, -0.4999999, -0.5000001, 1e-30, -np.inf, np.inf, np.nan]]).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal(300_000).astype(np.float32) * 4])
    x64 = x.astype(np.float64)
    expected = np.where(x64 > 0, x64, np.expm1(np.minimum(x64, 0)))
    for count in (1, 2):
        threads(count)
        y = x.copy()
        kernel.elu_inplace(y.size, y.ctypes.data)
        np.testing.assert_allclose(y, expected, rtol=6e-7, atol=0, err_msg=f"{isa}, {count} thread(s)")
        assert np.isnan(y[np.isnan(x)]).all()


def test_layer_norm_rows(kernel, isa):
    rng = np.random.default_rng(2)
    for rows, width in ((1, 64), (3, 1024), (16, 100)):
        x = (rng.standard_normal((rows, width)) * 3 + 1).astype(np.float32)
        w, b = rng.standard_normal(width).astype(np.float32), rng.standard_normal(width).astype(np.float32)
        out = np.empty_like(x)
        kernel.layer_norm_rows(rows, width, x.ctypes.data, w.ctypes.data, b.ctypes.data, 1e-5, out.ctypes.data)
        x64 = x.astype(np.float64)
        expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


# ------------------------------------------------------------- 8- and 4-bit weights times int8 activations (VNNI)


def run_packed(kernel, a: np.ndarray, mats: list, group: int, bits: int = 8) -> tuple[int, np.ndarray]:
    """``quantized_matmul_packed`` on MLX-layout matrices, rearranged here by :func:`pack`."""
    packed = [pack(*m) for m in mats]
    count = len(mats)
    widths = [m[0].shape[0] for m in mats]
    out = np.full((a.shape[0], sum(widths)), np.nan, dtype=np.float32)
    pointers = ctypes.c_void_p * count
    status = kernel.quantized_matmul_packed(a.shape[0], a.shape[1], bits, group, count,
                                            (ctypes.c_int * count)(*widths), a.ctypes.data,
                                            pointers(*(m[0].ctypes.data for m in packed)),
                                            pointers(*(m[1].ctypes.data for m in packed)),
                                            pointers(*(m[2].ctypes.data for m in packed)), out.ctypes.data)
    return status, out


def reference_int8(a: np.ndarray, mats: list, group: int, bits: int = 8) -> np.ndarray:
    """The int8-activation product computed independently: each row's groups rounded to int8 (scale max|a| / 127,
    float32 arithmetic, ties to even), then the exact product of those values with the dequantised weights."""
    rows, K = a.shape
    g = a.reshape(rows, K // group, group)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.rint((g * inv).astype(np.float32))
    assert np.abs(q).max() <= 127
    rounded = (q * (amax.astype(np.float64) / 127)).reshape(rows, K)
    return np.concatenate([rounded @ dequantize(*m, bits, group).T for m in mats], axis=1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(64, 64, 64), (96, 192, 64), (128, 256, 32), (48, 256, 128), (16, 1024, 64)])
def test_int8_activation_products_match_numpy_for_every_row_count(kernel, isa, shape, bits):
    """VNNI where the CPU has it (AVX-512 with VNNI), vpmaddubsw on nibbles with AVX2 (and AVX-512 without VNNI),
    portable C with the baseline set."""
    N, K, group = shape
    rng = np.random.default_rng(N + K + group + bits)
    mats = [quantized(rng, N, K, bits, group)]
    for rows in range(1, 17):
        a = rng.standard_normal((rows, K)).astype(np.float32)
        a[0, :group] *= 0  # an all-zero group
        status, out = run_packed(kernel, a, mats, group, bits)
        assert status == 0
        expected = reference_int8(a, mats, group, bits)
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * np.abs(expected).max() * math.sqrt(K),
                                   err_msg=f"{isa}, {bits} bits, {rows} rows, {shape}")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sign", [1, -1])
def test_int8_activation_products_at_the_largest_weights_and_activations(kernel, isa, bits, sign):
    """Every weight at its top code and every activation at ±127 in one group of 256: the largest integer sums any
    kernel sees (where an int16 partial sum would overflow if it were kept too long)."""
    N, K, group = 32, 512, 256
    packed = np.full((N, K * bits // 32), 0xFFFFFFFF, dtype=np.uint32)
    scales = np.full((N, K // group), 0.5, dtype=np.float32)
    biases = np.zeros((N, K // group), dtype=np.float32)
    mats = [(packed, scales, biases)]
    a = np.full((8, K), 2.0 * sign, dtype=np.float32)
    status, out = run_packed(kernel, a, mats, group, bits)
    assert status == 0
    np.testing.assert_allclose(out, np.full_like(out, sign * K * 2.0 * ((1 << bits) - 1) * 0.5), rtol=1e-6,
                               err_msg=f"{isa}, {bits} bits")


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activation_products_side_by_side_on_threads(kernel, threads, bits):
    rng = np.random.default_rng(11)
    K, group = 256, 64
    mats = [quantized(rng, n, K, bits, group) for n in (192, 16, 336, 64)]
    a = rng.standard_normal((16, K)).astype(np.float32)
    results = []
    for count in (1, 2):
        threads(count)
        status, out = run_packed(kernel, a, mats, group, bits)
        assert status == 0
        np.testing.assert_allclose(out, reference_int8(a, mats, group, bits), rtol=0, atol=1e-4 * np.abs(out).max())
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    for rows in (1, 3, 9):
        _, alone = run_packed(kernel, np.ascontiguousarray(a[:rows]), mats, group, bits)
        np.testing.assert_array_equal(alone, results[0][:rows])


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activation_error_against_the_float_product(kernel, bits):
    """What rounding the activations costs, on a 1024-wide matrix: well under a percent of the product."""
    rng = np.random.default_rng(3)
    mats = [quantized(rng, 1024, 1024, bits, 64)]
    a = rng.standard_normal((8, 1024)).astype(np.float32)
    _, out = run_packed(kernel, a, mats, 64, bits)
    exact = reference(a, mats, bits, 64)
    error = np.sqrt(np.mean((out - exact) ** 2) / np.mean(exact ** 2))
    assert 1e-4 < error < 1e-2, error


@pytest.mark.parametrize("args", [dict(rows=17), dict(rows=0), dict(N=24), dict(group=6), dict(group=0),
                                  dict(K=96), dict(count=9), dict(count=0), dict(bits=2), dict(bits=16),
                                  dict(bits=4, group=4), dict(bits=4, group=12)])
def test_int8_activation_product_refuses_what_it_does_not_take(kernel, args):
    rows, K, N, group, count, bits = (args.get(k, d) for k, d in (("rows", 2), ("K", 64), ("N", 16), ("group", 64),
                                                                  ("count", 1), ("bits", 8)))
    a = np.ones((max(rows, 1), K), np.float32)
    out = np.zeros((max(rows, 1), 16), np.float32)
    dummy = np.zeros(4096, np.float32)
    n = max(count, 1)
    pointers = ctypes.c_void_p * n
    status = kernel.quantized_matmul_packed(rows, K, bits, group, count, (ctypes.c_int * n)(*[N] * n),
                                            a.ctypes.data, pointers(*[dummy.ctypes.data] * n),
                                            pointers(*[dummy.ctypes.data] * n), pointers(*[dummy.ctypes.data] * n),
                                            out.ctypes.data)
    assert status == -1
    assert not out.any()


def test_the_int8_activation_kernel_is_used_where_the_cpu_has_one(kernel):
    """VNNI on AVX-512 CPUs that have it, vpmaddubsw on nibbles on any other AVX2 (or AVX-512) CPU; only the
    baseline set falls back to the portable C, which is not faster than the float kernel."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    vnni = "avx512_vnni" in flags and "avx512bw" in flags
    kernel.kernel_select(None)
    assert kernel.packed_fast() == (2 if vnni else 1 if "avx2" in flags and "fma" in flags else 0)
    if kernel.kernel_select(b"avx512") == 0:
        assert kernel.packed_fast() == (2 if vnni else 1)
    if kernel.kernel_select(b"avx2") == 0:
        assert kernel.packed_fast() == 1
    kernel.kernel_select(b"baseline")
    assert kernel.packed_fast() == 0
    kernel.kernel_select(None)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_keeps_shapes_and_undoes_exactly(bits):
    rng = np.random.default_rng(4)
    mats = quantized(rng, 48, 192, bits, 64)
    packed = pack(*mats)
    assert [p.shape for p in packed] == [m.shape for m in mats] and [p.dtype for p in packed] == [m.dtype for m in mats]
    assert not np.array_equal(packed[0], mats[0])
    for back, original in zip(unpack(*packed), mats, strict=True):
        np.testing.assert_array_equal(back, original)
