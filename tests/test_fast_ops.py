"""The decoder's fused CPU functions (core.cpu.fast_ops) against MLX's built-ins."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from core.cpu.fast_ops import LayerNorm, erf_rational, gelu, layer_norm


def test_erf_and_gelu_match_the_exact_functions():
    x = mx.concatenate([mx.linspace(-12, 12, 200_001), mx.array([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    np.testing.assert_allclose(np.array(erf_rational(x)), np.array(mx.erf(x)), atol=5e-7, rtol=0)
    fast, exact = np.array(gelu(x)), np.array(nn.gelu(x))
    np.testing.assert_allclose(fast, exact, atol=2e-6, rtol=2e-6)
    assert fast[-2] == 40.0 and fast[-1] == 0.0  # saturates exactly
    for shape in [(2, 1, 4096), (8, 1, 4096), (3, 7)]:  # one compiled kernel for every shape
        y = mx.random.normal(shape, key=mx.random.key(shape[0])) * 3
        np.testing.assert_allclose(np.array(gelu(y)), np.array(nn.gelu(y)), atol=2e-6, rtol=2e-6)


def test_layer_norm_matches_mx_fast():
    for shape, eps in [((2, 1, 1024), 1e-5), ((8, 1, 1024), 1e-5), ((3, 5, 64), 1e-3), ((1, 1, 7), 1e-5)]:
        key = mx.random.key(shape[-1])
        x = mx.random.normal(shape, key=key) * 4 + 2
        w, b = mx.random.normal(shape[-1:], key=mx.random.key(1)), mx.random.normal(shape[-1:], key=mx.random.key(2))
        np.testing.assert_allclose(np.array(layer_norm(x, w, b, eps)), np.array(mx.fast.layer_norm(x, w, b, eps)),
                                   atol=1e-5, rtol=1e-5)
    module, plain = LayerNorm(32, eps=1e-5), nn.LayerNorm(32, eps=1e-5)
    module.update({"weight": mx.arange(32) / 8.0, "bias": mx.ones((32,))})
    plain.update(module.parameters())
    x = mx.random.normal((4, 32), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(module(x)), np.array(plain(x)), atol=1e-5, rtol=1e-5)
    assert sorted(module.parameters()) == ["bias", "weight"]  # the checkpoint's names
