"""EnCodec on MLX against the transformers reference, on tiny random checkpoints saved as the hub repos are."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import EncodecFeatureExtractor
from transformers import EncodecModel as HFEncodec
from transformers.models.encodec.modeling_encodec import EncodecConv1d as HFConv1d

from core.encodec import (
    LSTM,
    EncodecConfig,
    EncodecModel,
    conv_transpose1d_fast,
    conv_transpose1d_plain,
    pad1d,
)
from core.loading import CheckpointError
from tests.tiny_models import build_encodec, encodec_config

KINDS = ["24khz", "32khz", "48khz", "24khz-trim"]


def _build(folder: Path, kind: str) -> HFEncodec:
    if kind != "24khz-trim":
        return build_encodec(folder, kind)
    # causal model whose transposed convs trim on both sides (trim_right_ratio != 1)
    torch.manual_seed(1)
    config = encodec_config("24khz")
    config.trim_right_ratio = 0.5
    model = HFEncodec(config).eval()
    model.save_pretrained(str(folder))
    EncodecFeatureExtractor(feature_size=1, sampling_rate=24000).save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, HFEncodec]]:
    root = tmp_path_factory.mktemp("encodec")
    return {kind: (root / kind, _build(root / kind, kind)) for kind in KINDS}


def _audio(config, seconds: float, seed: int = 0) -> np.ndarray:
    """Music-like test audio (a chord plus some noise): codes are far from quantizer ties."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * config.sampling_rate)) / config.sampling_rate
    wave = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in
               zip((0.3, 0.15, 0.1), rng.uniform(100, 2000, 3), rng.uniform(0, 6, 3), strict=True))
    wave = wave + 0.03 * rng.standard_normal(len(t))
    if config.audio_channels == 2:
        wave = np.stack([wave, 0.6 * wave + 0.03 * rng.standard_normal(len(t))], axis=1)
    return wave.astype(np.float32)


def _hf_decode(hf: HFEncodec, codes: np.ndarray, scales, pad: int = 0, padding_mask=None) -> np.ndarray:
    """transformers' decode of our-layout codes (B, chunks, Q, F); returns channels-last audio."""
    hf_scales = [None if s is None else torch.tensor(np.array(s)).reshape(-1, 1) for s in scales]
    with torch.no_grad():
        audio = hf.decode(torch.tensor(codes).transpose(0, 1), hf_scales, padding_mask,
                          last_frame_pad_length=pad)[0]
    return audio.numpy().transpose(0, 2, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_config_matches_transformers(checkpoints, kind):
    _, hf = checkpoints[kind]
    config = EncodecConfig.from_dict(hf.config.to_dict())  # to_dict has many keys EnCodec does not use
    for name in ("frame_rate", "hop_length", "chunk_length", "chunk_stride", "num_quantizers", "codebook_dim",
                 "trim_right_ratio", "norm_type", "use_causal_conv"):
        assert getattr(config, name) == getattr(hf.config, name), name


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_transformers(checkpoints, kind):
    folder, hf = checkpoints[kind]
    model, _ = EncodecModel.from_pretrained(folder)
    config = hf.config
    rng = np.random.default_rng(1)
    chunks = 2 if config.chunk_length else 1
    frames = config.chunk_length // config.hop_length if config.chunk_length else 37
    codes = rng.integers(0, config.codebook_size, (2, chunks, config.num_quantizers, frames))
    scales = ([mx.array(rng.uniform(0.2, 2.0, (2, 1, 1)).astype(np.float32)) for _ in range(chunks)]
              if config.normalize else [None] * chunks)
    ours = np.array(model.decode(mx.array(codes), scales))
    ref = _hf_decode(hf, codes, scales)
    assert ours.shape == ref.shape
    assert ours.shape[2] == model.channels
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_transformers(checkpoints, kind):
    """Processor, codes, scales and the decoded round trip of a padded batch of two clips of different lengths."""
    folder, hf = checkpoints[kind]
    model, processor = EncodecModel.from_pretrained(folder)
    config = hf.config
    long = _audio(config, 1.3 if config.chunk_length else 0.4)
    waves = [long, _audio(config, 0.55 if config.chunk_length else 0.23, seed=1)]
    bandwidth = config.target_bandwidths[-1]  # every codebook, so residual quantizers are checked too

    feature_extractor = EncodecFeatureExtractor.from_pretrained(str(folder))
    hf_inputs = feature_extractor([w.T for w in waves], sampling_rate=config.sampling_rate, return_tensors="pt")
    inputs = processor(waves, sampling_rate=config.sampling_rate)
    np.testing.assert_array_equal(np.array(inputs["input_values"]), hf_inputs["input_values"].numpy().transpose(0, 2, 1))
    np.testing.assert_array_equal(np.array(inputs["padding_mask"]), hf_inputs["padding_mask"].numpy().astype(bool))

    with torch.no_grad():
        hf_codes, hf_scales, hf_pad = hf.encode(hf_inputs["input_values"], hf_inputs["padding_mask"], bandwidth,
                                                return_dict=False)
    codes, scales, pad = model.encode(inputs["input_values"], inputs["padding_mask"], bandwidth,
                                      return_pad_length=True)
    assert codes.dtype == mx.int32
    np.testing.assert_array_equal(np.array(codes), hf_codes.numpy().transpose(1, 0, 2, 3))
    assert pad == hf_pad
    assert len(scales) == len(hf_scales)
    for ours, ref in zip(scales, hf_scales, strict=True):
        if ref is None:
            assert ours is None
        else:
            np.testing.assert_allclose(np.array(ours).reshape(-1), ref.numpy().reshape(-1), rtol=1e-6)

    ref_audio = _hf_decode(hf, np.array(codes), scales, pad, hf_inputs["padding_mask"])
    audio = np.array(model.decode(codes, scales, inputs["padding_mask"], last_frame_pad_length=pad))
    assert audio.shape == ref_audio.shape == tuple(inputs["input_values"].shape)
    np.testing.assert_allclose(audio, ref_audio, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["24khz", "32khz"])
def test_encode_input_shorter_than_padding(checkpoints, kind):
    """A few samples leave one or two frames deep in the encoder, shorter than the reflect padding."""
    folder, hf = checkpoints[kind]
    model, _ = EncodecModel.from_pretrained(folder)
    wave = _audio(hf.config, 0.003)[None, :, None]  # 72 / 96 samples: under one hop
    with torch.no_grad():
        ref = hf.encode(torch.tensor(wave).permute(0, 2, 1), return_dict=False)[0].numpy()
    codes, _ = model.encode(mx.array(wave))
    np.testing.assert_array_equal(np.array(codes), ref.transpose(1, 0, 2, 3))


@pytest.mark.parametrize("length,left,right", [(10, 3, 3), (3, 3, 3), (1, 3, 3), (2, 6, 1), (4, 0, 5), (9, 2, 0)])
@pytest.mark.parametrize("mode", ["reflect", "constant", "replicate"])
def test_pad1d_matches_transformers(length, left, right, mode):
    x = np.random.default_rng(length).standard_normal((2, 3, length)).astype(np.float32)
    expected = HFConv1d._pad1d(torch.tensor(x), (left, right), mode=mode).numpy()
    ours = np.array(pad1d(mx.array(x.transpose(0, 2, 1)), left, right, mode))
    np.testing.assert_array_equal(ours, expected.transpose(0, 2, 1))


def test_old_style_weight_norm_keys(checkpoints, tmp_path):
    """Checkpoints from older transformers store weight norm as weight_g / weight_v."""
    folder, hf = checkpoints["32khz"]
    weights = mx.load(str(folder / "model.safetensors"))
    assert any(".parametrizations.weight.original0" in k for k in weights)
    renamed = {k.replace(".parametrizations.weight.original0", ".weight_g")
               .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in weights.items()}
    assert any(k.endswith(".weight_g") for k in renamed) and not any("parametrizations" in k for k in renamed)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), renamed, metadata={"format": "pt"})

    model, _ = EncodecModel.from_pretrained(tmp_path)
    codes = np.random.default_rng(2).integers(0, 2048, (1, 1, 4, 25))
    np.testing.assert_allclose(np.array(model.decode(mx.array(codes))), _hf_decode(hf, codes, [None]), atol=1e-4)


def test_loads_the_codec_of_a_musicgen_checkpoint(tmp_path):
    from tests.tiny_models import build_musicgen

    hf = build_musicgen(tmp_path).audio_encoder
    model, processor = EncodecModel.from_pretrained(tmp_path)
    assert (model.sampling_rate, model.channels, model.frame_rate, model.chunk_length) == (32000, 1, 50, None)
    assert processor.sampling_rate == 32000
    codes = np.random.default_rng(3).integers(0, 2048, (2, 1, 4, 20))
    np.testing.assert_allclose(np.array(model.decode(mx.array(codes))), _hf_decode(hf, codes, [None]), atol=1e-4)


def test_mismatched_weights_give_a_checkpoint_error(checkpoints, tmp_path):
    folder, _ = checkpoints["24khz"]
    weights = mx.load(str(folder / "model.safetensors"))
    weights.pop(next(k for k in weights if k.endswith("lstm.weight_hh_l1")))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="missing"):
        EncodecModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("stride", [2, 3, 4, 5, 8])
def test_fast_transposed_conv_matches_plain(stride):
    rng = np.random.default_rng(stride)
    x = mx.array(rng.standard_normal((2, 11, 6)).astype(np.float32))
    weight = mx.array(rng.standard_normal((5, 2 * stride, 6)).astype(np.float32))  # (Cout, K, Cin)
    bias = mx.array(rng.standard_normal(5).astype(np.float32))
    fast = np.array(conv_transpose1d_fast(x, weight, bias, stride))
    plain = np.array(conv_transpose1d_plain(x, weight, bias, stride))
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-5)
    # and both are torch's ConvTranspose1d
    ref = torch.nn.functional.conv_transpose1d(torch.tensor(np.array(x)).permute(0, 2, 1),
                                               torch.tensor(np.array(weight)).permute(2, 0, 1),
                                               torch.tensor(np.array(bias)), stride=stride)
    np.testing.assert_allclose(fast, ref.numpy().transpose(0, 2, 1), atol=1e-5, rtol=1e-5)


def test_fast_transposed_conv_refuses_other_kernels():
    with pytest.raises(ValueError, match="kernel == 2"):
        conv_transpose1d_fast(mx.zeros((1, 4, 3)), mx.zeros((2, 7, 3)), mx.zeros(2), 3)


def test_lstm_matches_torch():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(8, 8, 2).eval()
    lstm = LSTM(8, 2)
    lstm.load_weights([(k, mx.array(v.numpy())) for k, v in reference.state_dict().items()], strict=True)
    x = np.random.default_rng(0).standard_normal((3, 13, 8)).astype(np.float32)  # (B, T, D)
    with torch.no_grad():
        expected = reference(torch.tensor(x).transpose(0, 1))[0].transpose(0, 1).numpy()
    np.testing.assert_allclose(np.array(lstm(mx.array(x))), expected, atol=1e-6)


def test_processor_checks_its_input(checkpoints):
    _, processor = EncodecModel.from_pretrained(checkpoints["32khz"][0])
    wave = np.zeros(1000, dtype=np.float32)
    with pytest.raises(ValueError, match="32000 Hz"):
        processor(wave, sampling_rate=44100)
    with pytest.raises(ValueError, match="shape"):
        processor(np.zeros((1000, 2), dtype=np.float32), sampling_rate=32000)
    one = processor(wave[:, None], sampling_rate=32000)
    assert one["input_values"].shape == (1, 1000, 1) and bool(mx.all(one["padding_mask"]))
    _, stereo = EncodecModel.from_pretrained(checkpoints["48khz"][0])
    with pytest.raises(ValueError, match=r"\(samples, 2\)"):
        stereo(np.zeros(1000, dtype=np.float32), sampling_rate=48000)


def test_encode_rejects_unknown_bandwidth(checkpoints):
    model, _ = EncodecModel.from_pretrained(checkpoints["32khz"][0])
    with pytest.raises(ValueError, match="bandwidth"):
        model.encode(mx.zeros((1, 640, 1)), bandwidth=6.0)
