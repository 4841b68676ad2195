"""Milliseconds per product of a few rows by one weight matrix: the CPU kernel's quantized product at 8 and 4 bits
(``quantized_matmul``), the fp32 skinny kernel (``cblas_sgemm``), and MLX's own ``mx.quantized_matmul`` on the
CPU; then what one call from Python costs around the kernel (evaluate the MLX input, view it in NumPy, call,
wrap the output in an MLX array).

    python -m bench.quantized_kernel [--repeats 50] [--rows 2,8,16]

Each product cycles through enough copies of its weights (> 3x a 32 MiB L3) that they come from memory, as in a
decoder step, which reads ~150 different matrices. Medians; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import core

core.preload_backend()

import mlx.core as mx  # noqa: E402  (after the preload)
import numpy as np  # noqa: E402

from core.cpu import blas  # noqa: E402

SHAPES = [(1024, 4096), (4096, 1024)]  # (out_features, in_features): a decoder's fc2 and fc1 in musicgen-small
GROUP = 64
CYCLE_BYTES = 96 << 20


def timed(calls: dict[str, tuple[Callable[[int], object], int]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each ``call(i)`` over ``repeats`` calls, i cycling through its copies; the calls take
    turns, so that a load on the machine falls on all of them alike (one warm round first)."""
    for call, copies in calls.values():
        for i in range(copies):
            call(i)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name, (call, copies) in calls.items():
            start = time.perf_counter()
            call(r % copies)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def bench_shape(kernel: ctypes.CDLL, rows_list: list[int], out_features: int, in_features: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_features, in_features), dtype=np.float32) * 0.02
    fp32_copies = max(2, CYCLE_BYTES // weight.nbytes)
    fp32 = [weight.copy() for _ in range(fp32_copies)]
    quantized = {}
    for bits in (8, 4):
        q, s, b = (np.array(a) for a in mx.quantize(mx.array(weight), group_size=GROUP, bits=bits))
        copies = max(2, CYCLE_BYTES // (q.nbytes + s.nbytes + b.nbytes))
        quantized[bits] = [(q.copy(), s.copy(), b.copy()) for _ in range(copies)]
    mlx_copies = [tuple(mx.array(a) for a in quantized[8][i]) for i in range(len(quantized[8]))]
    mx.eval(mlx_copies)
    for rows in rows_list:
        x = rng.standard_normal((rows, in_features), dtype=np.float32)
        out = np.zeros((rows, out_features), np.float32)
        calls = {}
        for bits in (8, 4):
            copies = quantized[bits]

            def call(i, bits=bits, copies=copies):
                q, s, b = copies[i]
                kernel.quantized_matmul(rows, out_features, in_features, bits, GROUP, x.ctypes.data, q.ctypes.data,
                                        s.ctypes.data, b.ctypes.data, out.ctypes.data)

            calls[f"ours {bits}-bit"] = (call, len(copies))

        def fp32_call(i):
            kernel.cblas_sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.TRANS, rows, out_features, in_features, 1.0,
                               x.ctypes.data, in_features, fp32[i].ctypes.data, in_features, 0.0, out.ctypes.data,
                               out_features)

        calls["fp32 skinny"] = (fp32_call, len(fp32))
        results = timed(calls, repeats)
        xm = mx.array(x)

        def mlx_call(i):
            q, s, b = mlx_copies[i]
            mx.eval(mx.quantized_matmul(xm, q, s, b, transpose=True, group_size=GROUP, bits=8))

        results |= timed({"mlx 8-bit": (mlx_call, len(mlx_copies))}, max(5, repeats // 5))
        fp = results["fp32 skinny"]
        line = ", ".join(f"{name} {ms:.3f} ms ({fp / ms:.2f}x fp32)" for name, ms in results.items())
        print(f"{out_features}x{in_features} rows {rows}: {line}", flush=True)


def bench_overhead(kernel: ctypes.CDLL, repeats: int) -> None:
    """One 2-row product of a 1024x1024 8-bit matrix from Python: the kernel alone, and with the MLX crossings."""
    rng = np.random.default_rng(1)
    weight = mx.array(rng.standard_normal((1024, 1024), dtype=np.float32))
    q, s, b = (np.array(a) for a in mx.quantize(weight, group_size=GROUP, bits=8))
    x = mx.random.normal((2, 1024))
    mx.eval(x)
    out = np.zeros((2, 1024), np.float32)
    xn = np.asarray(x)

    def bare(_: int) -> None:
        kernel.quantized_matmul(2, 1024, 1024, 8, GROUP, xn.ctypes.data, q.ctypes.data, s.ctypes.data,
                                b.ctypes.data, out.ctypes.data)

    def crossing(_: int) -> mx.array:
        y = x * 1.0  # a fresh lazy input, as a layer receives it
        mx.eval(y)
        yn = np.asarray(y)
        result = np.empty((2, 1024), np.float32)
        kernel.quantized_matmul(2, 1024, 1024, 8, GROUP, yn.ctypes.data, q.ctypes.data, s.ctypes.data,
                                b.ctypes.data, result.ctypes.data)
        return mx.array(result)

    def mlx_only(_: int) -> None:
        mx.eval(x * 1.0)

    results = timed({"bare": (bare, 1), "crossing": (crossing, 1), "eval": (mlx_only, 1)}, repeats * 20)
    kernel_ms, crossing_ms, eval_ms = results["bare"], results["crossing"], results["eval"]
    print(f"2-row 1024x1024 8-bit from Python: kernel call {kernel_ms * 1e3:.0f} us, with eval + np.asarray + "
          f"mx.array {crossing_ms * 1e3:.0f} us (an MLX eval of a trivial op alone {eval_ms * 1e3:.0f} us); "
          f"overhead {(crossing_ms - kernel_ms) * 1e3:.0f} us per product, x150 products = "
          f"{(crossing_ms - kernel_ms) * 150:.1f} ms per decoder step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rows", default="2,8,16")
    args = parser.parse_args()
    kernel = blas.quantized_kernel()
    if kernel is None:
        raise SystemExit(f"the CPU kernels are not loaded: {blas.active_blas}")
    print(f"{blas.active_blas}; group size {GROUP}", flush=True)
    rows_list = [int(r) for r in args.rows.split(",")]
    for out_features, in_features in SHAPES:
        bench_shape(kernel, rows_list, out_features, in_features, args.repeats)
    bench_overhead(kernel, args.repeats)


if __name__ == "__main__":
    main()
