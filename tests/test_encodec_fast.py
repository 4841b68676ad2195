"""EnCodec's CPU fast paths against their plain MLX versions and against torch / transformers."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from core.cpu import blas
from core.cpu.encodec_numpy import elu_numpy, lstm_recurrence_numpy, numpy_blas_threads
from core.encodec import (
    LSTM,
    EncodecConvTranspose1d,
    EncodecLSTM,
    EncodecModel,
    elu_plain,
    receptive_radius,
)
from tests.tiny_models import build_encodec


@pytest.fixture(scope="module", params=["32khz", "24khz"])  # centred reflect padding; causal convolutions
def codec(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"encodec-{request.param}")
    hf = build_encodec(folder, request.param)
    model, _ = EncodecModel.from_pretrained(folder)
    return model, hf


@pytest.mark.parametrize("kernels", [True, False], ids=["C kernels", "NumPy"])
def test_elu_numpy_matches_plain_and_torch(kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(blas, "cpu_kernels", None)
    elif blas.cpu_kernels is None:
        pytest.fail("the C kernels are not loaded: build them (python setup.py build_ext --inplace)")
    x = np.concatenate([np.linspace(-100, 8, 20001), np.random.default_rng(0).standard_normal(5000) * 1e-3,
                        [0.0, -0.0, -1e-30, 1e-30]]).astype(np.float32)
    expected = torch.nn.functional.elu(torch.tensor(x, dtype=torch.float64)).numpy()
    fast, plain = np.array(elu_numpy(mx.array(x))), np.array(elu_plain(mx.array(x)))
    np.testing.assert_allclose(fast, expected, atol=2e-7, rtol=0)
    np.testing.assert_allclose(fast, plain, atol=2e-7, rtol=0)
    # a strided (sliced) input, as the chunked decoder passes them
    y = mx.array(np.random.default_rng(1).standard_normal((2, 30, 5)).astype(np.float32))[:, 7:19]
    np.testing.assert_allclose(np.array(elu_numpy(y)), np.array(elu_plain(y)), atol=2e-7, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_lstm_numpy_recurrence_matches_plain_and_torch(batch):
    torch.manual_seed(batch)
    reference = torch.nn.LSTM(16, 16, 2).eval()
    lstm = LSTM(16, 2)
    lstm.load_weights([(k, mx.array(v.numpy())) for k, v in reference.state_dict().items()], strict=True)
    x = np.random.default_rng(batch).standard_normal((batch, 21, 16)).astype(np.float32) * 3  # saturating gates
    with torch.no_grad():
        expected = reference(torch.tensor(x).transpose(0, 1))[0].transpose(0, 1).numpy()
    fast, plain = np.array(lstm(mx.array(x))), np.array(lstm(mx.array(x), fast=False))
    np.testing.assert_allclose(fast, expected, atol=1e-6)
    np.testing.assert_allclose(fast, plain, atol=1e-6)
    gates = np.random.default_rng(0).standard_normal((batch, 5, 64)).astype(np.float32)
    w_hh = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    plain = np.array(LSTM.recurrence_plain(mx.array(gates), mx.array(w_hh)))
    np.testing.assert_allclose(lstm_recurrence_numpy(gates, w_hh), plain, atol=1e-6)  # skinny kernel (≤ 8 rows)
    np.testing.assert_allclose(lstm_recurrence_numpy(gates, w_hh, kernel=False), plain, atol=1e-6)  # sgemv


def test_lstm_recurrence_through_the_kernel_at_real_size():
    """D = 1024 as in MusicGen's EnCodec (the kernel's threaded path): the same states as one sgemv per row."""
    rng = np.random.default_rng(5)
    gates = rng.standard_normal((4, 6, 4096)).astype(np.float32)
    w_hh = (rng.standard_normal((4096, 1024)) * 0.03).astype(np.float32)
    np.testing.assert_allclose(lstm_recurrence_numpy(gates, w_hh), lstm_recurrence_numpy(gates, w_hh, kernel=False),
                               atol=1e-6)


def test_numpy_blas_threads_restores_the_count():
    from core.cpu.encodec_numpy import _openblas_thread_functions

    functions = _openblas_thread_functions()
    assert functions is not None, "NumPy's bundled OpenBLAS was not found"
    get, _ = functions
    before = get()
    with numpy_blas_threads(1):
        assert get() == 1
    assert get() == before


@pytest.mark.parametrize("chunk_length", [16, 40, 200, 1000])
def test_chunked_decode_matches_plain_and_transformers(codec, chunk_length):
    """Chunks far smaller than the signal put many chunk edges (and both signal ends) in the output."""
    model, hf = codec
    decoder = model.decoder
    frames = 23
    codes = np.random.default_rng(chunk_length).integers(0, hf.config.codebook_size,
                                                         (2, hf.config.num_quantizers, frames))
    embeddings = model.quantizer.decode(mx.array(codes))
    plain = np.array(decoder.decode_plain(embeddings))
    chunked = np.array(decoder.decode_chunked(embeddings, chunk_length))
    assert chunked.shape == plain.shape == (2, frames * model.hop_length, model.channels)
    np.testing.assert_allclose(chunked, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf.decode(torch.tensor(codes)[None], [None])[0].numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(chunked, ref, atol=1e-4, rtol=0)


def test_decode_uses_the_chunked_path(codec, monkeypatch):
    model, _ = codec
    calls = []
    original = type(model.decoder).decode_chunked
    monkeypatch.setattr(type(model.decoder), "decode_chunked",
                        lambda self, x, n, first=0: calls.append(n) or original(self, x, n, first))
    model.decode(mx.zeros((1, 1, model.config.num_quantizers, 5), dtype=mx.int32))
    assert calls == [model.decoder.chunk_length]


def test_rows_decode_together_through_the_lstm_then_apart(codec, monkeypatch):
    """Several rows: the layers up to the LSTM run once on all of them, the rest row by row, and every row's audio
    is the audio it decodes to alone."""
    model, _ = codec
    codes = np.random.default_rng(1).integers(0, model.config.codebook_size, (3, 1, model.config.num_quantizers, 9))
    alone = [np.array(model.decode(mx.array(codes[i:i + 1]))) for i in range(3)]
    batches = []
    original = EncodecLSTM.__call__
    monkeypatch.setattr(EncodecLSTM, "__call__", lambda self, x: batches.append(x.shape[0]) or original(self, x))
    together = np.array(model.decode(mx.array(codes)))
    assert batches == [3]
    for i in range(3):
        np.testing.assert_allclose(together[i], alone[i][0], atol=1e-6)


def test_receptive_radius_bounds_the_dependence(codec):
    """Changing one input sample of the chunked tail changes outputs only within the computed radius."""
    model, _ = codec
    decoder = model.decoder
    tail = decoder.layers[decoder.tail_start:]
    radius = receptive_radius(tail)
    upsample = int(np.prod([layer.stride for layer in tail if isinstance(layer, EncodecConvTranspose1d)]))
    channels = tail[1].conv.weight.shape[2]
    x = np.random.default_rng(0).standard_normal((1, 60, channels)).astype(np.float32)
    y = x.copy()
    y[0, 30] += 1.0
    run = [mx.array(x), mx.array(y)]
    for layer in tail:
        run = [layer(v) for v in run]
    changed = np.nonzero(np.abs(np.array(run[0]) - np.array(run[1])).max(axis=(0, 2)) > 0)[0]
    assert changed.size > 0
    assert changed.min() >= (30 - radius) * upsample and changed.max() < (31 + radius) * upsample
    with pytest.raises(ValueError, match="not local"):
        receptive_radius(decoder.layers[:2])  # the LSTM


@pytest.mark.parametrize("batch,dilation,stride", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (2, 1, 2)])
def test_conv1d_as_matmuls_matches_mlx_conv1d(batch, dilation, stride):
    from core.encodec import conv1d

    rng = np.random.default_rng(batch * 10 + dilation)
    x = mx.array(rng.standard_normal((batch, 2100, 16)).astype(np.float32))  # long enough for the matmul path
    weight = mx.array(rng.standard_normal((5, 3, 16)).astype(np.float32))  # (Cout, K, Cin)
    ours = np.array(conv1d(x, weight, stride, dilation))
    plain = np.array(mx.conv1d(x, weight, stride=stride, dilation=dilation))
    assert ours.shape == plain.shape
    np.testing.assert_allclose(ours, plain, atol=1e-4, rtol=1e-5)
