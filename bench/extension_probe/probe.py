"""Measure the step attention as MLX primitives against today's ctypes crossings (see README.md here).

Build first (``bench/extension_probe/build.sh``), then from the repository root::

    python bench/extension_probe/probe.py [--rows 2,8] [--rounds 5] [--steps 10]

Three ways to run the same musicgen-small-shaped decoder step (core.musicgen's decoder, random weights, 24 layers,
1024 dims, 16 heads, ~250 cached positions, 12 text positions), taking turns step by step so that load on the
shared machine falls on all of them alike (each keeps its own cache; all see the same tokens):

- ``ctypes``: today's path, core.musicgen's HostKVCache/HostCrossKV: per layer ``mx.eval(q, k, v)``, the C kernel
  through ctypes on NumPy buffers, ``mx.array(out)``; one more ``mx.eval`` for the logits.
- ``primitive``: the same C kernels as MLX primitives (``_step_attention``), one ``mx.eval`` per step.
- ``mlx``: MLX's own attention (``mx.fast.scaled_dot_product_attention`` over an MLX KV cache), for reference.

Then the per-call cost of one crossing each way, with shapes so small that the kernel's work is negligible.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import core

core.preload_backend()  # before MLX: the kernels' cblas_sgemm and decode_attention must be global

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from core.cpu import blas  # noqa: E402
from core.musicgen import (DecoderConfig, HostCrossKV, HostKVCache, KVCache, MusicgenDecoder,  # noqa: E402
                           _host_float32)

sys.path.insert(0, str(Path(__file__).resolve().parent / "build"))
import _step_attention as ext  # noqa: E402


class PrimitiveKVCache(HostKVCache):
    """HostKVCache's interface (so core.musicgen's Attention takes its C-kernel branch), its memory MLX arrays that
    the ``StepAttention`` primitive writes in place, its step a lazy graph node."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, offset: int):
        self.keys, self.values = mx.array(keys), mx.array(values)
        mx.eval(self.keys, self.values)
        self.offset = offset

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        self.offset += 1
        return ext.step_attention(q, k, v, self.keys, self.values, self.offset, scale)


class PrimitiveCrossKV(HostCrossKV):
    """HostCrossKV's interface, attended by the ``CrossAttention`` primitive."""

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array):
        self.arrays, self.mask = (keys, values), mask
        self.flat_mask = mask.reshape(mask.shape[0], -1)

    def attend(self, q: mx.array, scale: float) -> mx.array:
        keys, values = self.arrays
        return ext.cross_attention(q, keys, values, self.flat_mask, scale)


def make_state(decoder: MusicgenDecoder, kind: str, rows: int, cached: int, capacity: int,
               keys: list[np.ndarray], values: list[np.ndarray], cross: list[tuple[mx.array, mx.array]],
               mask: mx.array) -> tuple[list, list]:
    """Caches holding ``cached`` positions of the given contents, and the cross-attention inputs, for ``kind``."""
    heads = decoder.config.num_attention_heads
    head_dim = decoder.config.hidden_size // heads
    if kind == "ctypes":
        caches = []
        for k, v in zip(keys, values):
            cache = HostKVCache(rows, heads, head_dim, capacity)
            cache.keys[:], cache.values[:] = k, v
            cache.offset = cached
            caches.append(cache)
        return caches, [HostCrossKV(k, v, mask) for k, v in cross]
    if kind == "primitive":
        return ([PrimitiveKVCache(k, v, cached) for k, v in zip(keys, values)],
                [PrimitiveCrossKV(k, v, mask) for k, v in cross])
    caches = []
    for k, v in zip(keys, values):
        cache = KVCache(rows, heads, head_dim, capacity, mx.float32)
        cache.keys, cache.values = mx.array(k), mx.array(v)
        cache.offset = cached
        caches.append(cache)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches, cross


def step(decoder: MusicgenDecoder, caches: list, cross: list, mask: mx.array,
         tokens: mx.array) -> tuple[float, float, mx.array]:
    """Seconds for one decoder step (built and evaluated), seconds of it spent in building the graph (for the
    ctypes path that includes its per-layer evaluations), and its logits."""
    start = time.perf_counter()
    logits = decoder(tokens, cross, mask, caches)
    built = time.perf_counter()
    mx.eval(logits)
    return time.perf_counter() - start, built - start, logits


def step_benchmark(rows_list: list[int], rounds: int, steps: int, cached: int, text: int) -> None:
    config = DecoderConfig()  # musicgen-small's decoder
    decoder = MusicgenDecoder(config)
    mx.eval(decoder.parameters())
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    total = rounds * steps
    capacity = cached + total + 1
    print(f"decoder step, musicgen-small shapes, {cached}+ cached positions, {text} text positions; "
          f"{total} steps each, the three ways taking turns step by step (ms)")
    for rows in rows_list:
        rng = np.random.default_rng(rows)
        shape = (rows, heads, capacity, head_dim)
        keys = [rng.standard_normal(shape, dtype=np.float32) for _ in decoder.layers]
        values = [rng.standard_normal(shape, dtype=np.float32) for _ in decoder.layers]
        states = mx.array(rng.standard_normal((rows, text, config.hidden_size), dtype=np.float32))
        cross = decoder.cross_kv(states)
        mx.eval(cross)
        mask_np = np.ones((rows, 1, 1, text), dtype=bool)
        mask_np[1::2, ..., text // 2:] = False  # some rows with a shorter prompt
        mask = mx.array(mask_np)
        kinds = ("ctypes", "primitive", "mlx")
        state = {kind: make_state(decoder, kind, rows, cached, capacity, keys, values, cross, mask) for kind in kinds}
        del keys, values
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        build: dict[str, list[float]] = {kind: [] for kind in kinds}
        error = {kind: 0.0 for kind in kinds}
        for _ in range(total):
            tokens = mx.array(rng.integers(0, 2048, (rows, config.num_codebooks, 1)), dtype=mx.int32)
            mx.eval(tokens)
            logits = {}
            for kind in kinds:
                seconds, building, logits[kind] = step(decoder, *state[kind], mask, tokens)
                times[kind].append(seconds)
                build[kind].append(building)
            for kind in kinds:  # the same inputs, the same caches: the same logits up to float32 rounding
                error[kind] = max(error[kind], float(mx.abs(logits[kind] - logits["mlx"]).max()))
        for kind in kinds:
            t = sorted(times[kind])
            print(f"  {rows} rows  {kind:9s}  median {1e3 * statistics.median(t):6.1f}  "
                  f"quartiles {1e3 * t[len(t) // 4]:6.1f} {1e3 * t[3 * len(t) // 4]:6.1f}  min {1e3 * t[0]:6.1f}  "
                  f"graph built in {1e3 * statistics.median(build[kind]):5.1f}  (max |logits - mlx| {error[kind]:.1e})")
        # the two C-kernel ways ran back to back on the same step: their difference is less exposed to the load
        paired = [c - p for c, p in zip(times["ctypes"], times["primitive"])]
        print(f"  {rows} rows  ctypes - primitive, same step: median {1e3 * statistics.median(paired):+6.1f}, "
              f"primitive faster in {sum(d > 0 for d in paired)} of {len(paired)} steps")
        del state


def per_call(fn: Callable[[], object], count: int) -> float:
    """Median over 5 repeats of the microseconds per call of ``fn`` called ``count`` times."""
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        samples.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(samples)


def overhead_benchmark(count: int) -> None:
    """Per-call costs with negligible work: 1 row, 16 heads of 64, 1 position."""
    B, H, D = 1, 16, 64
    kernel = blas.cpu_kernels
    q_np = np.ones((B, 1, H * D), np.float32)
    cache_np = np.zeros((B, H, 4, D), np.float32)
    out_np = np.empty_like(q_np)
    scale = D ** -0.5

    def ctypes_call() -> None:
        kernel.decode_attention(B * H, 1, D, scale, q_np.ctypes.data, q_np.ctypes.data, q_np.ctypes.data,
                                cache_np.ctypes.data, cache_np.ctypes.data, 4, out_np.ctypes.data)

    x = mx.ones((B, 1, H * D))
    mx.eval(x)

    def crossing() -> mx.array:  # what a layer of the ctypes path pays: evaluate, hand over, wrap the result
        q, k, v = x + 1, x + 2, x + 3
        q, k, v = _host_float32(q, k, v)
        out = np.empty_like(q)
        kernel.decode_attention(B * H, 1, D, scale, q.ctypes.data, k.ctypes.data, v.ctypes.data,
                                cache_np.ctypes.data, cache_np.ctypes.data, 4, out.ctypes.data)
        return mx.array(out) + 1

    k_cache, v_cache = mx.zeros((B, H, 4, D)), mx.zeros((B, H, 4, D))
    mx.eval(k_cache, v_cache)

    def primitive_in_graph() -> mx.array:  # the same ops, the kernel a graph node: nothing evaluated here
        q, k, v = x + 1, x + 2, x + 3
        return ext.step_attention(q, k, v, k_cache, v_cache, 1, scale) + 1

    def chain(make: Callable[[], mx.array]) -> Callable[[], None]:
        def run() -> None:  # 24 layers' worth, one evaluation
            mx.eval([make() for _ in range(24)])
        return run

    def eval_each(make: Callable[[], mx.array]) -> Callable[[], None]:
        def run() -> None:
            mx.eval(make())
        return run

    def plain_ops() -> mx.array:  # the same element-wise ops without any attention: the floor
        return (x + 1) + (x + 2) + (x + 3) + 1

    print(f"per-call overhead (1 row, 16 heads x 64, 1 position: the kernel's work is negligible), median of 5 x {count}")
    print(f"  bare ctypes call of decode_attention on NumPy buffers        {per_call(ctypes_call, count):7.1f} us")
    print(f"  ctypes crossing as a layer pays it (eval, ctypes, mx.array)   "
          f"{per_call(lambda: mx.eval(crossing()), count):7.1f} us")
    print(f"  primitive + the same ops, one eval per call                   "
          f"{per_call(eval_each(primitive_in_graph), count):7.1f} us")
    print(f"  primitive + the same ops, 24 per eval (per call)              "
          f"{per_call(chain(primitive_in_graph), count // 24 or 1) / 24:7.1f} us")
    print(f"  the same ops without attention, 24 per eval (per call)        "
          f"{per_call(chain(plain_ops), count // 24 or 1) / 24:7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="2,8", help="batch rows per step (2 = one prompt with guidance)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cached", type=int, default=250, help="positions already in the KV cache")
    parser.add_argument("--text", type=int, default=12, help="text positions attended by cross-attention")
    parser.add_argument("--calls", type=int, default=2400, help="calls per overhead sample")
    args = parser.parse_args()
    print(f"backend: {blas.preload_blas()}")
    overhead_benchmark(args.calls)
    step_benchmark([int(r) for r in args.rows.split(",")], args.rounds, args.steps, args.cached, args.text)


if __name__ == "__main__":
    main()
