"""The CPU kernels' quantized product (``quantized_matmul`` in core/cpu/_cpu_kernels.c, core/cpu/_quantized_simd.h)
against ``mx.dequantize`` + NumPy: weights as ``mx.quantize`` packs them, 4 and 8 bits, groups of 32, 64 and 128,
1 to 16 rows, in every instruction set the CPU has."""

from __future__ import annotations

import ctypes
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from core.cpu import blas

INSTRUCTION_SETS = ["avx512", "avx2", "baseline"]


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU kernels are built on Linux only")
    loaded = blas.quantized_kernel()
    assert loaded is not None, f"the CPU kernels are not loaded: {blas.active_blas}"
    return loaded


@pytest.fixture(params=INSTRUCTION_SETS)
def isa(kernel, request):
    """Run one test with the kernels of each instruction set this CPU has; put back the widest afterwards."""
    if kernel.kernel_select(request.param.encode()) != 0:
        pytest.skip(f"this CPU has no {request.param}")  # CI's x86-64 runners have AVX-512 or AVX2, and baseline
    yield request.param
    kernel.kernel_select(None)


@pytest.fixture
def threads(kernel):
    """Set the kernel's threads for one test; put back to what core.cpu.blas chose afterwards."""
    yield kernel.skinny_set_threads
    kernel.skinny_set_threads(blas._cpu_count())


class Quantized:
    """One random weight matrix quantized by MLX, as NumPy arrays the kernel reads, and its dequantized float64."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        weight = mx.array(rng.standard_normal((out_features, in_features), dtype=np.float32))
        q, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
        self.dequantized = np.array(mx.dequantize(q, scales, biases, group_size=group_size, bits=bits)).astype(np.float64)
        self.q, self.scales, self.biases = np.array(q), np.array(scales), np.array(biases)
        assert self.q.dtype == np.uint32 and self.scales.dtype == np.float32 and self.biases.dtype == np.float32
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = out_features, in_features

    def matmul(self, kernel, x: np.ndarray) -> tuple[int, np.ndarray]:
        """The kernel's status and ``x @ dequantize(w)ᵀ`` (NaN where it wrote nothing)."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.full((x.shape[0], self.out_features), np.nan, np.float32)
        status = kernel.quantized_matmul(x.shape[0], self.out_features, self.in_features, self.bits, self.group_size,
                                         x.ctypes.data, self.q.ctypes.data, self.scales.ctypes.data,
                                         self.biases.ctypes.data, out.ctypes.data)
        return status, out

    def check(self, kernel, x: np.ndarray) -> None:
        status, out = self.matmul(kernel, x)
        assert status == 0
        expected = x.astype(np.float64) @ self.dequantized.T
        # float32 sums of K products: allow a few rounding steps of the largest partial sums there can be
        bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(self.dequantized).T) + 1e-30
        assert np.all(np.abs(out - expected) <= bound), np.max(np.abs(out - expected) / bound)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1024, 1024), (4096, 1024), (1024, 4096), (2048, 1024)])
def test_decoder_shapes_match_dequantize(kernel, isa, threads, bits, shape):
    threads(2)
    weights = Quantized(*shape, bits, 64)
    rng = np.random.default_rng(1)
    for rows in (1, 2, 5, 8, 9, 16):
        weights.check(kernel, rng.standard_normal((rows, shape[1]), dtype=np.float32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_every_row_count_and_group_size(kernel, isa, threads, bits, group_size, n_threads):
    threads(n_threads)
    rng = np.random.default_rng(2)
    # 4 * 128 values in: whole blocks of every width; 37 columns out: an odd last one, and a split between threads
    weights = Quantized(37, 512, bits, group_size)
    for rows in range(1, 17):
        weights.check(kernel, rng.standard_normal((rows, 512), dtype=np.float32) * 3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_inputs_shorter_than_a_block(kernel, isa, bits, group_size):
    """in_features not a multiple of a vector block (up to 128 values): the rest is summed one by one."""
    rng = np.random.default_rng(3)
    for in_features in (group_size, 3 * group_size, 5 * group_size):
        weights = Quantized(19, in_features, bits, group_size, seed=in_features)
        for rows in (1, 3, 16):
            weights.check(kernel, rng.standard_normal((rows, in_features), dtype=np.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_the_other_rows(kernel, isa, threads, bits):
    threads(2)
    weights = Quantized(1024, 1024, bits, 64)
    x = np.random.default_rng(4).standard_normal((16, 1024), dtype=np.float32)
    _, together = weights.matmul(kernel, x)
    for rows in ([0], [3], [15], [2, 7, 11], list(range(9, 16))):
        _, apart = weights.matmul(kernel, x[rows])
        np.testing.assert_array_equal(apart, together[rows])


def test_refuses_what_it_cannot_do(kernel):
    weights = Quantized(16, 128, 8, 64)
    x = np.ones((17, 128), np.float32)
    out = np.zeros((17, 16), np.float32)

    def call(rows=2, out_features=16, in_features=128, bits=8, group_size=64, **pointers):
        ptrs = {"x": x.ctypes.data, "w": weights.q.ctypes.data, "scales": weights.scales.ctypes.data,
                "biases": weights.biases.ctypes.data, "out": out.ctypes.data} | pointers
        return kernel.quantized_matmul(rows, out_features, in_features, bits, group_size, *ptrs.values())

    assert call() == 0 and np.all(out[:2] != 0)
    out[:] = 0
    for bad in (dict(rows=0), dict(rows=17), dict(out_features=0), dict(in_features=0), dict(bits=3), dict(bits=2),
                dict(bits=16), dict(group_size=48), dict(group_size=16), dict(in_features=100),
                dict(x=None), dict(w=None), dict(scales=None), dict(biases=None), dict(out=None)):
        assert call(**bad) == -1, bad
    assert np.all(out == 0)  # a refused call writes nothing
    assert kernel.quantized_max_rows() == 16


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_matches_mlx(kernel, bits):
    """The layer of core.cpu.quantized: the kernel for up to 16 rows, mx.quantized_matmul beyond; the same
    parameters as nn.QuantizedLinear, and the same results."""
    from core.cpu.quantized import QuantizedLinear

    linear = nn.Linear(512, 96, bias=True)
    layer, reference = QuantizedLinear.from_linear(linear, bits=bits), nn.QuantizedLinear.from_linear(linear, 64, bits)
    assert sorted(k for k, _ in tree_flatten(layer.parameters())) == sorted(k for k, _ in tree_flatten(reference.parameters()))
    for shape in ((1, 512), (2, 1, 512), (4, 4, 512), (20, 512)):
        x = mx.random.normal(shape, key=mx.random.key(len(shape)))
        y, expected = layer(x), reference(x)
        assert y.shape == expected.shape
        np.testing.assert_allclose(np.array(y), np.array(expected), rtol=1e-4, atol=1e-4)


def test_quantize_weights_in_place():
    from core.quantize import quantize_weights

    rng = np.random.default_rng(6)
    weights = {"fc1.weight": mx.array(rng.standard_normal((128, 64), dtype=np.float32)),
               "norm.weight": mx.ones((64,)), "head.weight": mx.array(rng.standard_normal((32, 64), dtype=np.float32))}
    expected = mx.quantize(weights["fc1.weight"], 64, 4)
    quantize_weights(weights, ["fc1"], bits=4)
    assert sorted(weights) == ["fc1.biases", "fc1.scales", "fc1.weight", "head.weight", "norm.weight"]
    for got, want in zip((weights["fc1.weight"], weights["fc1.scales"], weights["fc1.biases"]), expected):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    assert weights["head.weight"].dtype == mx.float32 and weights["norm.weight"].shape == (64,)
    model = nn.QuantizedLinear(64, 128, bias=False, group_size=64, bits=4)
    model.load_weights([(k.removeprefix("fc1."), v) for k, v in weights.items() if k.startswith("fc1.")])
