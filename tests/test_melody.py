"""Melody conditioning against transformers: the chroma of ``MusicgenMelodyFeatureExtractor`` (and the torchaudio
resampler it uses) and the teacher-forced logits of ``MusicgenMelodyForConditionalGeneration``, on tiny random
melody checkpoints (mono and stereo) saved in the Hugging Face format.

The reference extractor needs torchaudio (test-only, like torch): ``pip install --no-deps torchaudio==2.11.1``, then
remove its compiled extensions (``torchaudio/lib/*.so``), which the CPU-only torch here cannot load; without them
torchaudio falls back to the plain torch code these tests use.
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest

from core.chroma import ChromaConfig, chroma_features, chroma_filter_bank, normalized_chroma, resample
from core.loading import CheckpointError
from core.melody import MusicgenMelody, fit_chroma, is_melody_config
from tests import tiny_models

PROMPT = "lofi hip hop beat to study to"


def _torchaudio():
    try:
        return importlib.import_module("torchaudio")
    except ImportError as e:  # a failure, not a skip: CI must install it (see the module docstring)
        pytest.fail(f"torchaudio is needed for the reference feature extractor: {e}")


@pytest.fixture(scope="module")
def extractor():
    _torchaudio()
    from transformers import MusicgenMelodyFeatureExtractor

    return MusicgenMelodyFeatureExtractor()


def _tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A few notes plus a little noise, ``(n,)`` or ``(n, channels)`` float32 (channels differ)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    notes = rng.choice([220.0, 261.63, 329.63, 392.0, 493.88], size=max(1, int(seconds * 4)))
    freq = notes[np.minimum((t * 4).astype(int), len(notes) - 1)]
    columns = [0.5 * np.sin(2 * np.pi * freq * t * (1 + 0.5 * c)) + 0.05 * rng.standard_normal(t.shape)
               for c in range(channels)]
    audio = np.stack(columns, axis=1).astype(np.float32)
    return audio[:, 0] if channels == 1 else audio


# --------------------------------------------------------------------------------------------------- resampling


# the usual rates, and rates that share no factor with the target (sparse kernel rows: 1009 -> 32000 is
# 32000 phases, 3001 -> 2000 downsamples with 2000)
@pytest.mark.parametrize("rate,target", [(8000, 32000), (16000, 32000), (22050, 32000), (24000, 32000),
                                         (44100, 32000), (48000, 32000), (96000, 32000), (1009, 32000),
                                         (3001, 2000)])
def test_resample_matches_torchaudio(rate, target):
    import torch

    torchaudio = _torchaudio()
    audio = np.random.default_rng(rate).standard_normal((rate // 2 + 7, 2)).astype(np.float32)
    reference = torchaudio.functional.resample(torch.from_numpy(audio.T.copy()), rate, target, rolloff=0.945,
                                               lowpass_filter_width=24).numpy().T
    ours = resample(audio, rate, target)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    np.testing.assert_allclose(resample(audio[:, 1], rate, target), reference[:, 1], atol=1e-5, rtol=0)


def test_resample_same_rate_is_identity_and_rejects_bad_rates():
    audio = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(resample(audio, 32000, 32000), audio)
    for rate in (0, -1, 44100.5, True):
        with pytest.raises(ValueError):
            resample(audio, rate, 32000)


# --------------------------------------------------------------------------------------------------- chroma


def test_filter_bank_matches_transformers():
    from transformers.audio_utils import chroma_filter_bank as reference

    for rate, n_fft in ((32000, 16384), (16000, 2048)):
        expected = reference(sampling_rate=rate, num_frequency_bins=n_fft, tuning=0, num_chroma=12)
        np.testing.assert_allclose(chroma_filter_bank(rate, n_fft, 12), expected, rtol=1e-6, atol=1e-7)


CASES = {  # name: (seconds, rate, channels)
    "mono-32k": (3.0, 32000, 1),
    "mono-16k": (2.5, 16000, 1),
    "mono-44k1": (4.0, 44100, 1),
    "stereo-44k1": (3.0, 44100, 2),
    "stereo-48k": (2.0, 48000, 2),
    "short-under-one-fft": (0.2, 32000, 1),
    "short-stereo-22k05": (0.3, 22050, 2),
    "long-cut-at-30s": (31.0, 32000, 1),
    "long-stereo-44k1-cut-at-30s": (33.0, 44100, 2),
    "long-8k-cut-at-30s": (32.0, 8000, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chroma_matches_feature_extractor(case, extractor):
    import torch

    seconds, rate, channels = CASES[case]
    audio = _tone(seconds, rate, channels, seed=len(case))
    # transformers resamples torch tensors only, and takes stereo as a batch of (channels, n)
    tensor = torch.from_numpy(audio.T.copy() if channels == 2 else audio)
    inputs = tensor[None] if channels == 2 else tensor
    reference = extractor(inputs, sampling_rate=rate, return_tensors="np")["input_features"][0]
    ours = chroma_features(audio, rate)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert ours.shape[0] == ChromaConfig().frames_for(math.ceil(audio.shape[0] * 32000 / rate))
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    assert (ours.sum(axis=1) == 1).all()
    if seconds > 30:
        assert ours.shape[0] == 235


def test_normalized_chroma_matches_before_the_argmax(extractor):
    """The continuous chroma (before the one-hot) agrees too, so an argmax near a tie is not luck."""
    import torch

    torchaudio = _torchaudio()
    audio = _tone(2.0, 44100, seed=3)
    resampled = torchaudio.functional.resample(torch.from_numpy(audio), 44100, 32000, rolloff=0.945,
                                               lowpass_filter_width=24)
    spec = extractor.spectrogram(resampled[None]).squeeze(1)
    raw = torch.einsum("cf,...ft->...ct", extractor.chroma_filters, spec)
    expected = torch.nn.functional.normalize(raw, p=float("inf"), dim=-2, eps=1e-6)[0].T.numpy()
    np.testing.assert_allclose(normalized_chroma(audio, 44100), expected, atol=1e-5, rtol=0)


def test_chroma_rejects_bad_melodies():
    for bad in (np.zeros(0, np.float32), np.zeros((4, 2, 2), np.float32), np.array([np.nan] * 100)):
        with pytest.raises(ValueError):
            chroma_features(bad, 32000)


# --------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module", params=["mono", "stereo"])
def melody_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-melody-{request.param}")
    reference = tiny_models.build_musicgen_melody(folder, stereo=request.param == "stereo", seed=3)
    return reference, MusicgenMelody.from_pretrained(folder), folder


def _reference_logits(reference, folder, codes, melody_features, guided):
    """transformers' logits for ``codes`` ``(B, K, T)`` after the prefix its ``generate`` builds."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    tokens = AutoTokenizer.from_pretrained(folder)([PROMPT], return_tensors="pt")
    B, K, T = codes.shape
    decoder_ids = torch.from_numpy(codes.reshape(B * K, T).astype(np.int64))
    with torch.no_grad():
        if not guided:  # the plain forward
            out = reference(**tokens, input_features=melody_features, decoder_input_ids=decoder_ids).logits
            return out.reshape(B, K, -1, out.shape[-1])[:, :, -T:].numpy()
        kwargs = {"attention_mask": tokens["attention_mask"]}
        if melody_features is not None:
            kwargs["input_features"] = melody_features
        kwargs = reference._prepare_encoder_hidden_states_kwargs_for_generation(
            tokens["input_ids"], kwargs, "input_ids", GenerationConfig(guidance_scale=3.0))
        out = reference.decoder(input_ids=decoder_ids.repeat(2, 1),
                                encoder_hidden_states=kwargs["encoder_hidden_states"]).logits
        return out.reshape(2 * B, K, -1, out.shape[-1])[:, :, -T:].numpy()


@pytest.mark.parametrize("guided", [False, True], ids=["cond", "guided"])
def test_teacher_forced_logits_match_transformers(melody_pair, guided, extractor):
    import torch

    reference, model, folder = melody_pair
    K = reference.decoder.num_codebooks
    codes = np.random.default_rng(K).integers(0, 2048, (1, K, 9))
    codes[:, :, 0] = 2048  # the bos column, as generation starts
    audio = _tone(3.0, 44100, channels=2, seed=K)
    features = extractor(torch.from_numpy(audio.T.copy())[None], sampling_rate=44100,
                         return_tensors="pt")["input_features"]
    results = {}
    for name, melody in (("none", None), ("melody", features)):
        expected = _reference_logits(reference, folder, codes, melody, guided)
        chroma = None if melody is None else [model.melody_chroma((audio, 44100))]
        ours = np.array(model.logits([PROMPT], codes, chroma, guided=guided))
        assert ours.shape == expected.shape == ((2 if guided else 1), K, 9, 2048)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
        results[name] = ours
    # the melody moves the conditional logits far beyond the tolerance; the unconditional half ignores it
    assert np.abs(results["melody"][0] - results["none"][0]).max() > 1e-2
    if guided:
        np.testing.assert_allclose(results["melody"][1], results["none"][1], atol=1e-6)


def test_prefix_layout(melody_pair):
    _, model, _ = melody_pair
    length = model.melody_config.chroma_length
    dims = model.decoder.config.hidden_size
    text_len = model.tokenizer([PROMPT])[0].shape[1]
    prefix = model.prefix([PROMPT, PROMPT], guided=True)
    assert prefix.shape == (4, length + text_len, dims)
    assert np.abs(np.array(prefix[2:, length:])).max() == 0  # unconditional text: zeros
    states = fit_chroma(model.chroma_states(np.eye(12, dtype=np.float32)[None, :5]), 12)
    np.testing.assert_array_equal(np.array(states[0, 5:10]), np.array(states[0, :5]))  # tiled, then cut


def test_loader_tells_melody_from_plain(tmp_path, melody_pair):
    _, _, folder = melody_pair
    from core.loading import read_config

    assert is_melody_config(read_config(folder))
    plain = tmp_path / "plain"
    tiny_models.build_musicgen(plain)
    assert not is_melody_config(read_config(plain))
    with pytest.raises(CheckpointError, match="not a MusicGen-Melody"):
        MusicgenMelody.from_pretrained(plain)


def _reference_generate(reference, folder, frames, melody_features, guidance_scale):
    """transformers' greedy generation: the codes it decodes ``(K, F)`` and its audio ``(samples, channels)``."""
    import torch
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder)([PROMPT], return_tensors="pt")
    captured = []
    decode = reference.audio_encoder.decode

    def spy(codes, *args, **kwargs):
        captured.append(codes.clone())
        return decode(codes, *args, **kwargs)

    reference.audio_encoder.decode = spy
    channel_codebooks = reference.decoder.num_codebooks // reference.config.decoder.audio_channels
    try:
        with torch.no_grad():
            audio = reference.generate(**tokens, input_features=melody_features, do_sample=False,
                                       guidance_scale=guidance_scale, max_new_tokens=frames + channel_codebooks - 1)
    finally:
        reference.audio_encoder.decode = decode
    if len(captured) == 1:
        codes = captured[0][0, 0]
    else:  # stereo: left codebooks [::2], right [1::2]
        left, right = captured[0][0, 0], captured[1][0, 0]
        codes = torch.stack([left, right], dim=1).reshape(-1, left.shape[-1])
    return codes.numpy(), audio[0].numpy().T


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_greedy_generation_matches_transformers(melody_pair, guidance_scale, extractor):
    import torch

    reference, model, folder = melody_pair
    frames = 10
    audio = _tone(2.0, 16000, seed=5)
    features = extractor(torch.from_numpy(audio), sampling_rate=16000, return_tensors="pt")["input_features"]
    results = []
    for melody, feats in ((None, None), ((audio, 16000), features)):
        expected_codes, expected_audio = _reference_generate(reference, folder, frames, feats, guidance_scale)
        tokens = model.generate_tokens(PROMPT, frames, melody=melody, top_k=1, guidance_scale=guidance_scale)
        assert tokens.shape == (model.decoder.config.num_codebooks, frames)
        np.testing.assert_array_equal(tokens, expected_codes)
        samples = model.decode_tokens(tokens)
        assert samples.shape == expected_audio.shape == (frames * 640, model.decoder.config.audio_channels)
        np.testing.assert_allclose(samples, expected_audio, atol=1e-4)
        results.append(tokens)
    assert not np.array_equal(results[0], results[1])  # the melody changes what is generated


@pytest.mark.parametrize("rate", [8000, 44100, 96000, 1009])
def test_long_melody_cut_before_resampling_is_exact(rate):
    """normalized_chroma cuts a long melody before resampling; the first 30 s at 32 kHz must be untouched."""
    config = ChromaConfig(chunk_length=1)  # 1 s keeps the test quick; the bound scales the same
    audio = np.random.default_rng(rate).standard_normal(5 * rate + 3)
    full = resample(audio, rate, 32000)[: config.max_samples]
    keep = math.ceil(config.max_samples * rate / 32000) + rate + 64 * math.ceil(rate / 32000) + 64
    np.testing.assert_array_equal(resample(audio[:keep], rate, 32000)[: config.max_samples], full)
    np.testing.assert_array_equal(normalized_chroma(audio, rate, config),
                                  normalized_chroma(audio[:keep + rate], rate, config))


def test_cached_steps_match_one_forward(melody_pair):
    """Prefix + first code prefilled, then one code per step through the KV cache (MLX's and, on Linux, the C
    kernel's host cache), as generation runs, give the logits of one forward pass."""
    import mlx.core as mx

    _, model, _ = melody_pair
    K = model.decoder.config.num_codebooks
    codes = mx.array(np.random.default_rng(1).integers(0, 2049, (1, K, 6)).astype(np.int32))
    prefix = model.prefix([PROMPT], [chroma_features(_tone(1.0, 32000), 32000)], guided=True)
    codes = mx.concatenate([codes, codes])
    expected = np.array(model.decoder(codes, prefix))
    for host in (False, True) if sys.platform.startswith("linux") else (False,):
        cache = model.decoder.make_cache(2, prefix.shape[1] + 6, host=host)
        stepped = [model.decoder(codes[:, :, :1], prefix, cache)]
        stepped += [model.decoder(codes[:, :, t:t + 1], None, cache) for t in range(1, 6)]
        np.testing.assert_allclose(np.array(mx.concatenate(stepped, axis=2)), expected, atol=1e-4, rtol=1e-4)
