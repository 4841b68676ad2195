"""MusicGen on MLX against transformers' MusicgenForConditionalGeneration on tiny random checkpoints."""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from core import GenerationStopped, MusicGen
from core.generate import sample, top_k_mask
from tests import tiny_models

PROMPTS = ["warm synthwave with a driving bassline", "jazz"]

def build(folder, *, seed: int = 0, **kwargs):
    """A tiny random checkpoint (codebooks and cross-attention made to matter: see ``tiny_models.make_sensitive``)."""
    return tiny_models.build_musicgen(folder, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def mono(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mono")
    reference = build(folder, seed=1)
    return reference, MusicGen.from_pretrained(folder)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stereo")
    reference = build(folder, stereo=True, decoder="tiny-same-width", seed=2)
    return reference, MusicGen.from_pretrained(folder)


def reference_generate(reference, model: MusicGen, prompts: list[str], frames: int, guidance_scale: float):
    """Greedy generation with transformers; returns the codes it decodes ``(B, K, F)`` and its audio."""
    ids, mask = model.tokenizer(prompts)
    captured = []
    decode = reference.audio_encoder.decode

    def spy(codes, *args, **kwargs):
        captured.append(codes.clone())
        return decode(codes, *args, **kwargs)

    reference.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            audio = reference.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                       attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                                       guidance_scale=guidance_scale,
                                       max_new_tokens=frames + model.decoder.config.channel_codebooks - 1)
    finally:
        reference.audio_encoder.decode = decode
    if len(captured) == 1:
        codes = captured[0][0]
    else:  # stereo: left codebooks [::2], right [1::2]
        left, right = captured[0][0], captured[1][0]
        codes = torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])
    return codes.numpy(), audio.numpy().transpose(0, 2, 1)  # (B, K, F), (B, samples, channels)


def test_config_and_properties(mono, stereo):
    _, model = mono
    assert (model.sampling_rate, model.frame_rate, model.channels, model.num_codebooks) == (32000, 50, 1, 4)
    assert model.window_seconds == 30  # generation_config.json max_length 1500 / 50 Hz
    assert model.max_seconds == 60  # default: two windows (longer clips are made window by window)
    assert model.enc_to_dec_proj is not None
    _, model = stereo
    assert (model.channels, model.num_codebooks) == (2, 8)
    assert model.enc_to_dec_proj is None  # same width as the text encoder: transformers has no projection either


def test_decoder_logits_match_transformers(mono):
    reference, model = mono
    ids, mask = model.tokenizer(PROMPTS)
    assert mask[1].sum() < mask[0].sum()  # the second prompt is padded
    codes = np.random.default_rng(0).integers(0, 2049, size=(2, model.num_codebooks, 7)).astype(np.int32)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             decoder_input_ids=torch.tensor(codes, dtype=torch.long).reshape(-1, 7)).logits
    expected = expected.numpy().reshape(2, model.num_codebooks, 7, -1)
    cross_kv, cross_mask = model._encode_text(PROMPTS, guided=False)
    logits = model.decoder(mx.array(codes), model.decoder.make_cross(cross_kv, cross_mask, host=False))
    np.testing.assert_allclose(np.array(logits), expected, atol=1e-4, rtol=1e-4)

    # the same positions one at a time through the KV cache: MLX's, and the C kernel's in host memory
    from core.cache import CrossKV, KVCache

    assert isinstance(model.decoder.make_cache(2, 7)[0], KVCache) != sys.platform.startswith("linux")
    # (and the text's keys/values in host memory too)
    for host in (False, True) if sys.platform.startswith("linux") else (False,):
        text = model.decoder.make_cross(cross_kv, cross_mask, host=host)
        assert (type(text[0]) is CrossKV) != host
        cache = model.decoder.make_cache(2, 7, host=host)
        stepped = [model.decoder(mx.array(codes[:, :, t:t + 1]), text, cache) for t in range(7)]
        np.testing.assert_allclose(np.array(mx.concatenate(stepped, axis=2)), expected, atol=1e-4, rtol=1e-4)
        # a prefill of 3 positions, then steps
        cache = model.decoder.make_cache(2, 7, host=host)
        first = model.decoder(mx.array(codes[:, :, :3]), text, cache)
        stepped = [first] + [model.decoder(mx.array(codes[:, :, t:t + 1]), text, cache)
                             for t in range(3, 7)]
        np.testing.assert_allclose(np.array(mx.concatenate(stepped, axis=2)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["mono", "stereo"])
@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_greedy_generation_matches_transformers(fixture, guidance_scale, request):
    reference, model = request.getfixturevalue(fixture)
    frames = 12
    expected_codes, expected_audio = reference_generate(reference, model, [PROMPTS[0]], frames, guidance_scale)
    tokens = model.generate_tokens(PROMPTS[0], frames, top_k=1, guidance_scale=guidance_scale)
    assert tokens.shape == (model.num_codebooks, frames)
    np.testing.assert_array_equal(tokens, expected_codes[0])
    audio = model.decode_tokens(tokens)
    assert audio.shape == expected_audio[0].shape == (frames * 640, model.channels)
    np.testing.assert_allclose(audio, expected_audio[0], atol=1e-4)

    clip = model.generate(PROMPTS[0], frames / 50, top_k=1, guidance_scale=guidance_scale)
    np.testing.assert_array_equal(clip.tokens, expected_codes[0])
    np.testing.assert_allclose(clip.samples, expected_audio[0], atol=1e-4)


def test_greedy_batch_of_two_prompts_matches_transformers(mono):
    reference, model = mono
    expected_codes, _ = reference_generate(reference, model, PROMPTS, 10, 3.0)
    clips = model.generate_batch([dict(prompt=p, seconds=0.2, top_k=1) for p in PROMPTS])
    for clip, codes in zip(clips, expected_codes, strict=True):
        np.testing.assert_array_equal(clip.tokens, codes)


@pytest.mark.parametrize("seconds", [0.5, 1.01, 1 / 3, 0.02, 0.58, 0.001])
def test_exact_sample_counts(mono, seconds):
    _, model = mono
    clip = model.generate("lofi", seconds, seed=0, guidance_scale=1.0)
    assert clip.samples.shape == (round(seconds * 32000), 1)
    assert clip.samples.dtype == np.float32
    assert clip.tokens.shape == (4, math.ceil(seconds * 50 - 1e-9))
    assert clip.sampling_rate == 32000


def test_stereo_clip_shape(stereo):
    _, model = stereo
    clip = model.generate("lofi", 0.25, seed=3)
    assert clip.samples.shape == (8000, 2)
    assert clip.tokens.shape == (8, 13)
    assert not np.array_equal(clip.tokens[0::2], clip.tokens[1::2])
    assert not np.allclose(clip.samples[:, 0], clip.samples[:, 1], atol=1e-3)


def test_progress_counts(mono, stereo):
    for (_, model), steps in ((mono, 10 + 3), (stereo, 10 + 3)):
        calls = []
        model.generate("lofi", 0.2, seed=0, on_progress=lambda step, total: calls.append((step, total)))  # noqa: B023
        assert calls == [(i, steps) for i in range(1, steps + 1)]


def test_should_stop_ends_within_one_step(mono):
    _, model = mono
    calls = []
    with pytest.raises(GenerationStopped):
        model.generate("lofi", 1.0, seed=0, on_progress=lambda step, total: calls.append(step),
                       should_stop=lambda: len(calls) >= 3)
    assert calls == [1, 2, 3]
    with pytest.raises(GenerationStopped):
        model.generate_tokens("lofi", 50, should_stop=lambda: True)


@pytest.mark.parametrize("kwargs", [
    dict(prompt="", seconds=1), dict(prompt="   ", seconds=1), dict(prompt="x", seconds=0),
    dict(prompt="x", seconds=-1), dict(prompt="x", seconds=float("nan")), dict(prompt="x", seconds=float("inf")),
    dict(prompt="x", seconds=60.5), dict(prompt="x", seconds="5"), dict(prompt="x", seconds=1, top_k=0),
    dict(prompt="x", seconds=1, top_k=2.5), dict(prompt="x", seconds=1, temperature=0),
    dict(prompt="x", seconds=1, temperature=float("nan")), dict(prompt="x", seconds=1, guidance_scale=-1),
    dict(prompt="x", seconds=1, seed=-1), dict(prompt="x", seconds=1, seed=1.5), dict(prompt=None, seconds=1),
    dict(prompt="x" * 5000, seconds=1),
])
def test_invalid_input_raises_value_error(mono, kwargs):
    _, model = mono
    with pytest.raises(ValueError) as error:
        model.generate(**kwargs)
    assert str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError):
        model.generate_batch([dict(prompt="fine", seconds=1), kwargs])


def test_invalid_frames_and_tokens(mono):
    _, model = mono
    for frames in (0, -1, 1.5, 3001):
        with pytest.raises(ValueError):
            model.generate_tokens("x", frames)
    with pytest.raises(ValueError):
        model.decode_tokens(np.zeros((3, 5), np.int32))


def test_seeds(mono):
    _, model = mono
    a = model.generate("techno", 0.3, seed=7)
    b = model.generate("techno", 0.3, seed=7)
    c = model.generate("techno", 0.3, seed=8)
    assert a.seed == 7
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.allclose(a.samples, c.samples, atol=1e-3)
    drawn = model.generate("techno", 0.3)
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**63
    np.testing.assert_array_equal(model.generate("techno", 0.3, seed=drawn.seed).tokens, drawn.tokens)


def test_top_k_keeps_exactly_k():
    logits = mx.array(np.random.default_rng(0).normal(size=(3, 4, 2048)).astype(np.float32))
    k = mx.array([1, 250, 2048])
    keep = np.array(top_k_mask(logits, k[:, None]))
    order = np.argsort(-np.array(logits), axis=-1)
    for row, kk in enumerate([1, 250, 2048]):
        assert (keep[row].sum(-1) == kk).all()
        for codebook in range(4):
            assert set(np.flatnonzero(keep[row, codebook])) == set(order[row, codebook, :kk])
    for k_max in (None, 2048, 4096):  # a bound on k, or none: the same mask
        np.testing.assert_array_equal(np.array(top_k_mask(logits, k[:, None], k_max)), keep)
    ties = np.array(top_k_mask(mx.zeros((2, 10)), mx.array([3, 7])))
    assert ties.tolist() == [[True] * 3 + [False] * 7, [True] * 7 + [False] * 3]  # lowest index first
    some = np.array(top_k_mask(mx.array([[0.0, 2.0, 1.0, 2.0, 1.0, 1.0]]), mx.array([3]), 3))
    assert some.tolist() == [[False, True, True, True, False, False]]


def test_sampler_follows_the_tempered_top_k_distribution():
    rows = 4000
    base = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    logits = mx.array(np.broadcast_to(base, (rows, 1, 5)).copy())
    keys = list(mx.random.split(mx.random.key(0), rows))
    draws = np.array(sample(logits, mx.full((rows,), 2.0), mx.full((rows,), 3, dtype=mx.int32), keys))[:, 0]
    assert set(draws) == {0, 1, 2}
    expected = np.exp(base[:3] / 2.0) / np.exp(base[:3] / 2.0).sum()
    observed = np.bincount(draws, minlength=5)[:3] / rows
    np.testing.assert_allclose(observed, expected, atol=0.03)
    greedy = np.array(sample(logits[:8], mx.ones((8,)), mx.ones((8,), dtype=mx.int32), keys[:8]))
    assert (greedy == 0).all()
