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

from core import GenerationRequest, MusicGen
from core.chroma import ChromaConfig, chroma_features, chroma_filter_bank, normalized_chroma, resample
from core.melody import fit_chroma, is_melody_config
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


# --------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module", params=["mono", "stereo"])
def melody_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-melody-{request.param}")
    reference = tiny_models.build_musicgen_melody(folder, stereo=request.param == "stereo", seed=3)
    return reference, MusicGen.from_pretrained(folder), folder


def _features(extractor, audio: np.ndarray, rate: int):
    import torch

    samples = torch.from_numpy(audio.T.copy() if audio.ndim == 2 else audio)
    return extractor(samples[None] if audio.ndim == 2 else samples, sampling_rate=rate,
                     return_tensors="pt")["input_features"]


def _logits(model: MusicGen, prompts: list[str], codes: np.ndarray, melodies, guided: bool, host: bool):
    """Teacher-forced logits of ``codes`` ``(B, K, T)`` the way generation computes them: the prefix prefilled into
    the caches, then the codes (the first one alone, the rest in one call)."""
    import mlx.core as mx

    requests = [GenerationRequest(p, 1.0, melody=m) for p, m in zip(prompts, melodies, strict=True)]
    prefix = model._melody_prefix(requests, guided)
    codes = mx.array(codes.astype(np.int32))
    if guided:
        codes = mx.concatenate([codes, codes])
    cache = model.decoder.make_cache(codes.shape[0], prefix.shape[1] + codes.shape[2], host=host)
    model.decoder.prefill(prefix, cache)
    first = model.decoder(codes[:, :, :1], None, cache)
    rest = model.decoder(codes[:, :, 1:], None, cache)
    return np.array(mx.concatenate([first, rest], axis=2))


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
    """The prefix (chroma, text; the null melody and zero text for guidance's other half) prefilled into the MLX
    caches and, on Linux, the C kernels' host caches gives transformers' logits."""
    reference, model, folder = melody_pair
    K = reference.decoder.num_codebooks
    codes = np.random.default_rng(K).integers(0, 2048, (1, K, 9))
    codes[:, :, 0] = 2048  # the bos column, as generation starts
    audio = _tone(3.0, 44100, channels=2, seed=K)
    features = _features(extractor, audio, 44100)
    for host in (False, True) if sys.platform.startswith("linux") else (False,):
        results = {}
        for name, melody, feats in (("none", None, None), ("melody", (audio, 44100), features)):
            expected = _reference_logits(reference, folder, codes, feats, guided)
            ours = _logits(model, [PROMPT], codes, [melody], guided, host)
            assert ours.shape == expected.shape == ((2 if guided else 1), K, 9, 2048)
            np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
            results[name] = ours
        # the melody moves the conditional logits far beyond the tolerance; the unconditional half ignores it
        assert np.abs(results["melody"][0] - results["none"][0]).max() > 1e-2
        if guided:
            np.testing.assert_allclose(results["melody"][1], results["none"][1], atol=1e-6)


def test_prefix_layout(melody_pair):
    _, model, _ = melody_pair
    length = model.melody.config.chroma_length
    dims = model.decoder.config.hidden_size
    text_len = model.tokenizer([PROMPT])[0].shape[1]
    prefix = model._melody_prefix([GenerationRequest(PROMPT, 1.0)] * 2, guided=True)
    assert prefix.shape == (4, length + text_len, dims)
    assert np.abs(np.array(prefix[2:, length:])).max() == 0  # unconditional text: zeros
    import mlx.core as mx

    states = fit_chroma(model.melody.chroma_states(np.eye(12, dtype=np.float32)[None, :5], mx.float32), 12)
    np.testing.assert_array_equal(np.array(states[0, 5:10]), np.array(states[0, :5]))  # tiled, then cut


def test_one_api_for_both_kinds(tmp_path, melody_pair):
    """from_pretrained chooses the decoder by the config; a melody given to a plain model is a ValueError."""
    _, model, folder = melody_pair
    from core.loading import read_config

    assert is_melody_config(read_config(folder)) and model.is_melody
    assert not hasattr(model.decoder.layers[0], "encoder_attn")
    plain = tmp_path / "plain"
    tiny_models.build_musicgen(plain)
    assert not is_melody_config(read_config(plain))
    plain_model = MusicGen.from_pretrained(plain)
    assert not plain_model.is_melody
    melody = (_tone(1.0, 16000), 16000)
    with pytest.raises(ValueError, match="does not take a melody"):
        plain_model.generate(PROMPT, 0.2, melody=melody)
    with pytest.raises(ValueError, match="does not take a melody"):
        plain_model.generate_batch([GenerationRequest(PROMPT, 0.2, melody=melody)])
    # one window at most, and a bad melody is a clear ValueError
    assert model.max_seconds == model.window_seconds
    with pytest.raises(ValueError, match="at most"):
        model.generate(PROMPT, model.window_seconds + 1, melody=melody)
    for bad in ((np.zeros(0), 16000), (np.zeros(100), 0), (np.full(100, np.nan), 16000), "tune.wav"):
        with pytest.raises(ValueError, match="melody"):
            model.generate(PROMPT, 0.2, melody=bad)


def _reference_generate(reference, folder, frames, melody_features, guidance_scale, prompt=PROMPT):
    """transformers' greedy generation: the codes it decodes ``(K, F)`` and its audio ``(samples, channels)``."""
    import torch
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder)([prompt], return_tensors="pt")
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
    """generate_tokens and generate (public API) give transformers' greedy codes and audio, exact lengths."""
    reference, model, folder = melody_pair
    frames = 10
    audio = _tone(2.0, 16000, seed=5)
    results = []
    for melody in (None, (audio, 16000)):
        feats = None if melody is None else _features(extractor, audio, 16000)
        expected_codes, expected_audio = _reference_generate(reference, folder, frames, feats, guidance_scale)
        tokens = model.generate_tokens(PROMPT, frames, melody=melody, top_k=1, guidance_scale=guidance_scale)
        assert tokens.shape == (model.num_codebooks, frames)
        np.testing.assert_array_equal(tokens, expected_codes)
        clip = model.generate(PROMPT, frames / model.frame_rate, melody=melody, top_k=1,
                              guidance_scale=guidance_scale, seed=1)
        np.testing.assert_array_equal(clip.tokens, expected_codes)
        assert clip.samples.shape == expected_audio.shape == (frames * 640, model.channels)
        np.testing.assert_allclose(clip.samples, expected_audio, atol=1e-4)
        results.append(tokens)
    assert not np.array_equal(results[0], results[1])  # the melody changes what is generated


def test_batch_rows_equal_their_solo_results(melody_pair, extractor):
    """generate_batch: rows with and without melodies, prompts of different lengths (never batched together, since
    transformers attends the zero text padding) and a sampled row each give their solo result; the greedy rows
    are transformers' codes."""
    reference, model, folder = melody_pair
    frames = 8
    seconds = frames / model.frame_rate
    tune = _tone(1.5, 22050, channels=2, seed=9)
    short = "drums"
    requests = [GenerationRequest(PROMPT, seconds, seed=1, top_k=1, melody=(tune, 22050)),
                GenerationRequest(short, seconds, seed=2, top_k=1),
                GenerationRequest(PROMPT, seconds, seed=3, top_k=1),
                GenerationRequest(short, 5 / model.frame_rate, seed=4, top_k=50, melody=(tune, 22050))]
    assert model.tokenizer([PROMPT])[1].sum() != model.tokenizer([short])[1].sum()
    batch = model.generate_batch(requests)
    for request, clip in zip(requests, batch, strict=True):
        solo = model.generate_batch([request])[0]
        np.testing.assert_array_equal(clip.tokens, solo.tokens)
        np.testing.assert_allclose(clip.samples, solo.samples, atol=1e-5)
        assert clip.samples.shape == (model.samples_for(request.seconds), model.channels)
    for request, clip in zip(requests[:3], batch[:3], strict=True):
        feats = None if request.melody is None else _features(extractor, tune, 22050)
        expected, _ = _reference_generate(reference, folder, frames, feats, 3.0, prompt=request.prompt)
        np.testing.assert_array_equal(clip.tokens, expected)


# --------------------------------------------------------------------------------------------------- command line


def test_cli_follows_a_melody_file(melody_pair, tmp_path):
    """``python -m core PROMPT --melody tune.flac``: the exact length, the clip generate() makes with that melody
    (as read from the file) and seed; a plain model refuses --melody with one line."""
    import soundfile as sf

    from tests.test_cli import run

    _, model, folder = melody_pair
    tune = _tone(1.2, 44100, channels=2, seed=4)
    sf.write(tmp_path / "tune.flac", tune, 44100)
    out = tmp_path / "out.wav"
    result = run(PROMPT, "--melody", "tune.flac", "--seconds", "0.3", "--seed", "7", "--no-normalize", "--model",
                 str(folder), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out, dtype="float32", always_2d=True)
    assert rate == 32000 and audio.shape == (9600, model.channels)
    melody = sf.read(tmp_path / "tune.flac", dtype="float32", always_2d=True)
    expected = model.generate(PROMPT, 0.3, seed=7, melody=melody).samples
    np.testing.assert_allclose(audio, expected, atol=2 / 32768)
    plain = tmp_path / "plain"
    tiny_models.build_musicgen(plain)
    result = run(PROMPT, "--melody", "tune.flac", "--seconds", "0.3", "--model", str(plain), "-q", "-o",
                 str(tmp_path / "plain.wav"), cwd=tmp_path)
    assert result.returncode == 2 and "does not take a melody" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_continuation_with_a_melody_keeps_the_greedy_path(melody_pair):
    """Prompt tokens after the prefix (prefilled at positions past it): greedy codes continued from their own first
    frames are the same codes, with a melody and guidance; the prompt frames are kept exactly."""
    _, model, _ = melody_pair
    melody = (_tone(1.0, 32000, seed=2), 32000)
    whole = model.generate_tokens(PROMPT, 12, melody=melody, top_k=1)
    continued = model.generate_tokens(PROMPT, 12, melody=melody, top_k=1, prompt_tokens=whole[:, :5])
    np.testing.assert_array_equal(continued, whole)
    other = model.generate_tokens(PROMPT, 12, top_k=1, prompt_tokens=whole[:, :5])  # text alone
    np.testing.assert_array_equal(other[:, :5], whole[:, :5])
