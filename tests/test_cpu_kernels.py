"""The CPU kernels (core/cpu/_cpu_kernels.c) against NumPy: the skinny matmul called as MLX calls it (``cblas_sgemm``),
and the decoder's step attention (``decode_attention``, ``cross_attention``), in every instruction set the CPU has."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from core.cpu import blas
from core.cpu.blas import NO_TRANS, ROW_MAJOR, TRANS

COL_MAJOR = 102


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        pytest.skip("the skinny kernel is built on Linux only")
    assert blas.cpu_kernels is not None, f"the skinny kernel is not loaded: {blas.active_blas}"
    return blas.cpu_kernels


INSTRUCTION_SETS = ["avx512", "avx2", "baseline"]


@pytest.fixture(params=INSTRUCTION_SETS)
def isa(kernel, request):
    """Run one test with the kernels of each instruction set this CPU has; put back the widest afterwards."""
    if kernel.kernel_select(request.param.encode()) != 0:
        pytest.skip(f"this CPU has no {request.param}")  # CI's x86-64 runners have AVX-512 or AVX2, and baseline
    yield request.param
    kernel.kernel_select(None)


def test_the_widest_instruction_set_is_chosen(kernel):
    chosen = kernel.kernel_instruction_set().decode()
    assert chosen in INSTRUCTION_SETS
    assert all(kernel.kernel_select(name.encode()) != 0 for name in INSTRUCTION_SETS[:INSTRUCTION_SETS.index(chosen)])
    kernel.kernel_select(None)
    assert kernel.kernel_instruction_set().decode() == chosen
    assert kernel.kernel_select(b"sse9") == -1 and kernel.kernel_instruction_set().decode() == chosen


@pytest.fixture
def threads(kernel):
    """Set the kernel's threads for one test (``threads(n)``); put back to what core.cpu.blas chose afterwards."""
    chosen = blas._cpu_count()
    yield kernel.skinny_set_threads
    kernel.skinny_set_threads(chosen)


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def sgemm(kernel, a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None, pad=0, order=ROW_MAJOR):
    """``alpha · op(a) op(b) + beta · c`` through the kernel; operands stored with ``pad`` extra columns
    (leading dimensions larger than the rows) to check the strides. ``a``/``b`` are op(a)/op(b) as matrices."""
    M, K = a.shape
    N = b.shape[1]

    def stored(x, transposed):
        x = x.T if transposed else x
        buffer = np.zeros((x.shape[0], x.shape[1] + pad), np.float32)
        buffer[:, : x.shape[1]] = x
        return buffer

    sa, sb = stored(a, trans_a), stored(b, trans_b)
    out = np.zeros((M, N + pad), np.float32)
    if c is not None:
        out[:, :N] = c
    if order == COL_MAJOR:  # C^T = B^T A^T in column-major is the same memory as C = A B in row-major
        kernel.cblas_sgemm(COL_MAJOR, TRANS if trans_b else NO_TRANS, TRANS if trans_a else NO_TRANS, N, M, K,
                           alpha, ptr(sb), sb.shape[1], ptr(sa), sa.shape[1], beta, ptr(out), out.shape[1])
    else:
        kernel.cblas_sgemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, M, N, K,
                           alpha, ptr(sa), sa.shape[1], ptr(sb), sb.shape[1], beta, ptr(out), out.shape[1])
    assert not out[:, N:].any(), "wrote past the columns of C"
    return out[:, :N]


def check(result, a, b, alpha=1.0, beta=0.0, c=None):
    expected = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    if c is not None:
        expected += beta * c
    scale = np.sqrt(a.shape[1]) + 1
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * scale)


SHAPES = [(1, 1, 1), (1, 17, 3), (2, 1024, 1024), (3, 15, 100), (4, 16, 64), (5, 33, 130), (6, 64, 200),
          (7, 1000, 257), (8, 4096, 40), (8, 100, 4099), (1, 64, 1500), (2, 1500, 64), (8, 3, 5), (9, 1024, 1030),
          (12, 77, 333), (13, 2048, 100), (16, 1024, 4096), (16, 5, 49), (11, 300, 97)]


@pytest.mark.parametrize("trans_b", [True, False], ids=["B^T", "B"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_products_match_numpy(kernel, isa, threads, trans_b, n_threads):
    threads(n_threads)
    rng = np.random.default_rng(n_threads)
    for M, K, N in SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        check(sgemm(kernel, a, b, trans_b=trans_b), a, b)


def test_a_row_does_not_depend_on_the_other_rows(kernel, isa, threads):
    """Every row's product is summed in the same order whatever the rows around it (what makes a batched job's
    output equal to the same job alone)."""
    threads(2)
    rng = np.random.default_rng(4)
    for K, N in [(1024, 1024), (4096, 1000), (100, 4099)]:
        a = rng.standard_normal((16, K), dtype=np.float32)
        w = rng.standard_normal((K, N), dtype=np.float32)
        for trans_b in (True, False):
            every = sgemm(kernel, a, w, trans_b=trans_b)
            for m in range(1, 17):
                np.testing.assert_array_equal(sgemm(kernel, a[:m], w, trans_b=trans_b), every[:m])
            np.testing.assert_array_equal(sgemm(kernel, a[5:6], w, trans_b=trans_b), every[5:6])


@pytest.mark.parametrize("trans_a", [True, False], ids=["A^T", "A"])
def test_strides_transposes_alpha_beta(kernel, threads, trans_a):
    threads(2)
    rng = np.random.default_rng(1)
    for M, K, N in [(1, 64, 200), (3, 257, 1031), (8, 1024, 3000)]:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        c = rng.standard_normal((M, N), dtype=np.float32)
        for trans_b in (False, True):
            check(sgemm(kernel, a, b, trans_a=trans_a, trans_b=trans_b, pad=5), a, b)
            result = sgemm(kernel, a, b, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0, c=c, pad=3)
            check(result, a, b, alpha=0.5, beta=2.0, c=c)


def test_other_products_go_to_the_blas(kernel):
    """More rows than the kernel takes, and column-major calls, are the fallback BLAS's, and still right."""
    rng = np.random.default_rng(2)
    rows = kernel.skinny_max_rows()
    for M, K, N in [(rows + 1, 100, 300), (64, 1024, 512)]:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        check(sgemm(kernel, a, b, trans_b=True), a, b)
    a = rng.standard_normal((4, 300), dtype=np.float32)
    b = rng.standard_normal((300, 700), dtype=np.float32)
    check(sgemm(kernel, a, b, order=COL_MAJOR), a, b)


def test_concurrent_callers(kernel, threads):
    """Two threads multiplying at once (one gets the pool, the other computes alone): both right."""
    threads(2)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1024, 4096), dtype=np.float32)
    inputs = [rng.standard_normal((r, 1024), dtype=np.float32) for r in (2, 8)]
    errors: list[BaseException] = []

    def work(x):
        try:
            for _ in range(20):
                check(sgemm(kernel, x, w), x, w)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(x,)) for x in inputs]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a multiplication hung"
    assert not errors, errors[0]


FORK_PROBE = """
import os, sys, numpy as np
sys.path.insert(0, {root!r})
from tests.test_cpu_kernels import sgemm
import core
core.preload_backend()
from core.cpu import blas
kernel = blas.cpu_kernels
kernel.skinny_set_threads(2)
x, w = np.ones((2, 1024), np.float32), np.ones((1024, 4096), np.float32)
assert sgemm(kernel, x, w).max() == 1024.0  # starts the thread pool
pid = os.fork()
if pid == 0:  # the child has none of the parent's pool threads: the kernel must start its own
    os._exit(0 if sgemm(kernel, 2 * x, w).max() == 2048.0 else 1)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_fork_after_the_pool_started(kernel):
    probe = FORK_PROBE.format(root=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "child 0"


# --------------------------------------------------------------------------------------------------- attention


def attention_reference(q, k, v, scale, mask=None):
    """softmax(q kᵀ · scale) v in float64, per (row, head); q (BH, D), k/v (BH, L, D), mask (BH, L) or None; a row
    masked everywhere attends everywhere (as an additive mask gives)."""
    scores = np.einsum("bd,btd->bt", q.astype(np.float64), k.astype(np.float64)) * scale
    if mask is not None:
        scores = np.where(mask | ~mask.any(-1, keepdims=True), scores, -np.inf)
        scores = np.where(mask.any(-1, keepdims=True), scores, 0.0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bt,btd->bd", p / p.sum(-1, keepdims=True), v.astype(np.float64))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_decode_attention_matches_numpy(kernel, isa, threads, n_threads):
    threads(n_threads)
    rng = np.random.default_rng(5)
    for B, H, D, capacity, L in [(2, 16, 64, 260, 1), (2, 16, 64, 260, 125), (8, 16, 64, 260, 260), (1, 2, 16, 9, 7),
                                 (3, 4, 24, 40, 33), (2, 1, 7, 5000, 4500), (1, 3, 256, 20, 20)]:
        keys = rng.standard_normal((B, H, capacity, D), dtype=np.float32)
        values = rng.standard_normal((B, H, capacity, D), dtype=np.float32)
        q, k_new, v_new = (rng.standard_normal((B, H, D), dtype=np.float32) * 3 for _ in range(3))
        before = keys.copy()
        out = np.full((B, H, D), np.nan, np.float32)
        assert kernel.decode_attention(B * H, L, D, D ** -0.5, q.ctypes.data, k_new.ctypes.data, v_new.ctypes.data,
                                       keys.ctypes.data, values.ctypes.data, capacity, out.ctypes.data) == 0
        np.testing.assert_array_equal(keys[:, :, L - 1], k_new)  # this step's key and value were written
        np.testing.assert_array_equal(values[:, :, L - 1], v_new)
        np.testing.assert_array_equal(np.delete(keys, L - 1, axis=2), np.delete(before, L - 1, axis=2))
        expected = attention_reference(q.reshape(B * H, D), keys[:, :, :L].reshape(B * H, L, D),
                                       values[:, :, :L].reshape(B * H, L, D), D ** -0.5)
        np.testing.assert_allclose(out.reshape(B * H, D), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_decode_attention_f16_matches_numpy(kernel, isa, threads, n_threads):
    """The float16-cache attention: this step's key and value are written rounded as NumPy rounds them, and the
    output is the attention over the float16 values (computed in float64), on every instruction set (its vector
    conversions, and the portable one), head sizes off the vector width included."""
    threads(n_threads)
    rng = np.random.default_rng(15)
    for B, H, D, capacity, L in [(2, 16, 64, 260, 1), (2, 16, 64, 260, 125), (8, 16, 64, 260, 260), (1, 2, 16, 9, 7),
                                 (3, 4, 24, 40, 33), (2, 1, 7, 5000, 4500), (1, 3, 256, 20, 20)]:
        keys = rng.standard_normal((B, H, capacity, D)).astype(np.float16)
        values = rng.standard_normal((B, H, capacity, D)).astype(np.float16)
        q, k_new, v_new = (rng.standard_normal((B, H, D), dtype=np.float32) * 3 for _ in range(3))
        k_new[0, 0, 0], v_new[0, 0, -1] = 1 + 2 ** -11, 65520.0  # a tie (to even: 1.0) and past the range (inf)
        before = keys.copy()
        out = np.full((B, H, D), np.nan, np.float32)
        assert kernel.decode_attention_f16(B * H, L, D, D ** -0.5, q.ctypes.data, k_new.ctypes.data,
                                           v_new.ctypes.data, keys.ctypes.data, values.ctypes.data, capacity,
                                           out.ctypes.data) == 0
        with np.errstate(over="ignore"):  # NumPy warns where a value rounds to infinity
            np.testing.assert_array_equal(keys[:, :, L - 1], k_new.astype(np.float16))
            np.testing.assert_array_equal(values[:, :, L - 1], v_new.astype(np.float16))
        assert keys[0, 0, L - 1, 0] == 1.0 and np.isinf(values[0, 0, L - 1, -1])
        np.testing.assert_array_equal(np.delete(keys, L - 1, axis=2), np.delete(before, L - 1, axis=2))
        values[0, 0, L - 1, -1] = 0.0  # the infinite value only checked the rounding: attend over finite ones
        v_new[0, 0, -1] = 0.0
        assert kernel.decode_attention_f16(B * H, L, D, D ** -0.5, q.ctypes.data, k_new.ctypes.data,
                                           v_new.ctypes.data, keys.ctypes.data, values.ctypes.data, capacity,
                                           out.ctypes.data) == 0
        expected = attention_reference(q.reshape(B * H, D), keys[:, :, :L].reshape(B * H, L, D),
                                       values[:, :, :L].reshape(B * H, L, D), D ** -0.5)
        np.testing.assert_allclose(out.reshape(B * H, D), expected, rtol=2e-5, atol=2e-5)


def test_cross_attention_masks_keys(kernel, isa, threads):
    threads(2)
    rng = np.random.default_rng(6)
    B, H, S, D = 4, 16, 12, 64
    q = rng.standard_normal((B, H, D), dtype=np.float32)
    k, v = (rng.standard_normal((B, H, S, D), dtype=np.float32) for _ in range(2))
    mask = np.ones((B, S), np.uint8)
    mask[0, 5:] = 0  # a short prompt
    mask[1, ::2] = 0  # not only padding at the end
    mask[2] = 0  # attends nowhere: uniformly everywhere
    for m in (mask, None):
        out = np.full((B, H, D), np.nan, np.float32)
        assert kernel.cross_attention(B, H, S, D, 0.125, q.ctypes.data, k.ctypes.data, v.ctypes.data,
                                      m.ctypes.data if m is not None else None, out.ctypes.data) == 0
        per_head = None if m is None else np.repeat(m.astype(bool), H, axis=0)
        expected = attention_reference(q.reshape(B * H, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D), 0.125,
                                       per_head)
        np.testing.assert_allclose(out.reshape(B * H, D), expected, rtol=2e-5, atol=2e-5)
        if m is not None:  # the row masked everywhere averages its values
            np.testing.assert_allclose(out[2], v[2].mean(axis=1), rtol=1e-5, atol=1e-5)


def test_attention_refuses_what_it_cannot_do(kernel):
    x = np.zeros((1, 300 * 4), np.float32)
    assert kernel.decode_attention(1, 5, 300, 1.0, *[x.ctypes.data] * 5, 4, x.ctypes.data) == -1  # head too big
    assert kernel.decode_attention(1, 5, 16, 1.0, *[x.ctypes.data] * 5, 4, x.ctypes.data) == -1  # past the cache
    assert kernel.cross_attention(1, 1, 4, 300, 1.0, *[x.ctypes.data] * 3, None, x.ctypes.data) == -1
    assert kernel.decode_attention_f16(1, 5, 300, 1.0, *[x.ctypes.data] * 5, 4, x.ctypes.data) == -1
    assert kernel.decode_attention_f16(1, 5, 16, 1.0, *[x.ctypes.data] * 5, 4, x.ctypes.data) == -1


def test_exp_of_the_softmax_is_accurate(kernel, isa):
    """The vectorised exp over its whole range (scores minus their maximum, down to underflow): one position with
    score 0 and one with score s give weights 1 / (1 + e^s) and e^s / (1 + e^s)."""
    s = np.concatenate([-np.geomspace(1e-6, 120, 3000), [0.0, -87.3, -87.4, -103.0]]).astype(np.float32)
    n = len(s)
    keys = np.zeros((n, 2, 1), np.float32)
    keys[:, 1, 0] = s
    values = np.zeros((n, 2, 1), np.float32)
    values[:, 1, 0] = 1.0  # the output is the second position's weight
    q = np.ones((n, 1), np.float32)
    out = np.empty((n, 1), np.float32)
    assert kernel.cross_attention(n, 1, 2, 1, 1.0, q.ctypes.data, keys.ctypes.data, values.ctypes.data, None,
                                  out.ctypes.data) == 0
    e = np.exp(s.astype(np.float64))
    # below -87.3 (where float32 underflows to subnormals) the weight is 0 instead of at most 1.2e-38
    np.testing.assert_allclose(out[:, 0], e / (1 + e), rtol=1e-6, atol=1.2e-38)
