"""The skinny matmul kernel (core/_cpu_kernels.c) against NumPy, called as MLX calls it: ``cblas_sgemm``."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from core import blas
from core.blas import NO_TRANS, ROW_MAJOR, TRANS

COL_MAJOR = 102


@pytest.fixture(scope="module")
def kernel() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        pytest.skip("the skinny kernel is built on Linux only")
    assert blas.cpu_kernels is not None, f"the skinny kernel is not loaded: {blas.active_blas}"
    return blas.cpu_kernels


@pytest.fixture
def threads(kernel):
    """Set the kernel's threads for one test (``threads(n)``); put back to what core.blas chose afterwards."""
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
          (7, 1000, 257), (8, 4096, 40), (8, 100, 4099), (1, 64, 1500), (2, 1500, 64), (8, 3, 5)]


@pytest.mark.parametrize("trans_b", [True, False], ids=["B^T", "B"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_products_match_numpy(kernel, threads, trans_b, n_threads):
    threads(n_threads)
    rng = np.random.default_rng(n_threads)
    for M, K, N in SHAPES:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        check(sgemm(kernel, a, b, trans_b=trans_b), a, b)


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
from core import blas
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
