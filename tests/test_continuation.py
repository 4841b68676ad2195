"""Continuation from tokens or audio, and clips longer than the model's window, on tiny random checkpoints.

The checkpoints get a 1 s window (``generation_config.json`` ``max_length`` 50 frames) so that several windows
are cheap. Prompted generation is checked against transformers' ``generate(decoder_input_ids=…)``, the prompt
audio's codes against transformers' EnCodec, and each window of a long greedy clip against transformers prompted
with the end of the window before.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core import GenerationStopped, MusicGen
from core.generation import GenerationRequest
from core.pipeline import resample
from tests import tiny_models

PROMPT = "warm synthwave with a driving bassline"
WINDOW = 50  # frames: a 1 s window


def build(folder, **kwargs):
    """A tiny checkpoint with a 1 s window whose decoder also listens to its past codes: the random init (and
    ``make_sensitive``, which boosts the text) leaves the history nearly silent, so a wrong prompt would pass."""
    reference = tiny_models.build_musicgen(folder, **kwargs)
    with torch.no_grad():
        decoder = reference.decoder.model.decoder
        for embedding in decoder.embed_tokens:
            embedding.weight.mul_(50)
        for layer in decoder.layers:
            layer.self_attn.v_proj.weight.mul_(5)
            layer.self_attn.out_proj.weight.mul_(5)
    reference.save_pretrained(str(folder))
    config = json.loads((folder / "generation_config.json").read_text())
    config["max_length"] = WINDOW
    (folder / "generation_config.json").write_text(json.dumps(config))
    return reference


@pytest.fixture(scope="module")
def mono(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mono")
    reference = build(folder, seed=21)
    return reference, MusicGen.from_pretrained(folder, max_seconds=3)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stereo")
    reference = build(folder, stereo=True, decoder="tiny-same-width", seed=22)
    return reference, MusicGen.from_pretrained(folder, max_seconds=3)


def reference_codes(reference, model: MusicGen, prompt: str, frames: int, guidance_scale: float,
                    prompt_tokens: np.ndarray | None = None) -> np.ndarray:
    """transformers' greedy codes ``(K, frames)`` for one prompt, optionally continuing ``prompt_tokens``."""
    ids, mask = model.tokenizer([prompt])
    given = 0 if prompt_tokens is None else prompt_tokens.shape[1]
    kwargs = {} if prompt_tokens is None else {"decoder_input_ids": torch.tensor(prompt_tokens, dtype=torch.long)}
    captured = []
    decode = reference.audio_encoder.decode

    def spy(codes, *args, **kw):
        captured.append(codes.clone())
        return decode(codes, *args, **kw)

    reference.audio_encoder.decode = spy
    try:
        with torch.no_grad():
            reference.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                               guidance_scale=guidance_scale,
                               max_new_tokens=frames + model.decoder.config.channel_codebooks - 1 - given, **kwargs)
    finally:
        reference.audio_encoder.decode = decode
    if len(captured) == 1:
        return captured[0][0, 0].numpy()
    left, right = captured[0][0, 0], captured[1][0, 0]  # stereo: interleave L0, R0, L1, R1 …
    return torch.stack([left, right], dim=1).reshape(-1, left.shape[-1]).numpy()


def random_tokens(model: MusicGen, frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, size=(model.num_codebooks, frames)).astype(np.int32)


def spy_windows(model: MusicGen, monkeypatch) -> list[dict]:
    """Record every call of the decoding loop: its frames, prompts and results."""
    calls = []
    inner = model._generate_codes

    def spy(requests, frames, seeds, on_progress, should_stop, prompts=None):
        result = inner(requests, frames, seeds, on_progress, should_stop, prompts)
        calls.append(dict(frames=list(frames), prompts=list(prompts or [None] * len(frames)), result=result))
        return result

    monkeypatch.setattr(model, "_generate_codes", spy)
    return calls


# ------------------------------------------------------------------------------------------- configuration


def test_window_and_max_seconds(mono, tmp_path):
    folder = tmp_path / "m"
    build(folder, seed=23)
    model = MusicGen.from_pretrained(folder)
    assert model.window_frames == WINDOW and model.window_seconds == 1.0
    assert model.max_seconds == 2.0  # twice the window by default
    assert model.default_extend_stride == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at most 2 seconds"):
        model.generate("jazz", 2.1)
    limited = MusicGen.from_pretrained(folder, max_seconds=1.5)
    assert limited.max_seconds == 1.5
    with pytest.raises(ValueError, match="at most 1.5 seconds"):
        limited.generate("jazz", 1.6)
    for bad in (0, -1, float("nan"), float("inf"), "60"):
        with pytest.raises(ValueError):
            MusicGen.from_pretrained(folder, max_seconds=bad)


# ------------------------------------------------------------------------------------------- prompt tokens


@pytest.mark.parametrize("fixture", ["mono", "stereo"])
@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_prompt_tokens_match_transformers(fixture, guidance_scale, request):
    reference, model = request.getfixturevalue(fixture)
    prompt_tokens = random_tokens(model, 7, seed=1)
    expected = reference_codes(reference, model, PROMPT, 20, guidance_scale, prompt_tokens)
    tokens = model.generate_tokens(PROMPT, 20, top_k=1, guidance_scale=guidance_scale, prompt_tokens=prompt_tokens)
    assert tokens.shape == expected.shape == (model.num_codebooks, 20)
    np.testing.assert_array_equal(tokens[:, :7], prompt_tokens)
    np.testing.assert_array_equal(tokens, expected)
    unprompted = model.generate_tokens(PROMPT, 20, top_k=1, guidance_scale=guidance_scale)
    assert not np.array_equal(tokens[:, 7:], unprompted[:, 7:])  # the prompt changed what follows


def test_prompted_clip_has_total_length_and_keeps_the_prompt(mono):
    _, model = mono
    prompt_tokens = random_tokens(model, 11, seed=2)
    clip = model.generate("lofi", 0.37, seed=4, prompt_tokens=prompt_tokens)
    assert clip.samples.shape == (round(0.37 * 32000), 1)
    assert clip.tokens.shape == (4, 19)
    np.testing.assert_array_equal(clip.tokens[:, :11], prompt_tokens)
    # a dict request (as the bot stores it) with the prompt as nested lists gives the same clip
    again = model.generate_batch([dict(prompt="lofi", seconds=0.37, seed=4, prompt_tokens=prompt_tokens.tolist())])
    np.testing.assert_array_equal(again[0].tokens, clip.tokens)


@pytest.mark.parametrize("top_k", [1, 50])
def test_prompted_rows_batched_equal_alone(mono, top_k):
    _, model = mono
    requests = [GenerationRequest("jazz", 0.4, seed=1, top_k=top_k),
                GenerationRequest(PROMPT, 0.5, seed=2, top_k=top_k, prompt_tokens=random_tokens(model, 5, 3)),
                GenerationRequest("jazz", 0.3, seed=3, top_k=top_k, prompt_tokens=random_tokens(model, 12, 4),
                                  guidance_scale=1.0)]
    batched = model.generate_batch(requests)
    for request, clip in zip(requests, batched, strict=True):
        alone = model.generate_batch([request])[0]
        np.testing.assert_array_equal(clip.tokens, alone.tokens)
        if request.prompt_tokens is not None:
            np.testing.assert_array_equal(clip.tokens[:, :request.prompt_tokens.shape[1]], request.prompt_tokens)
    # only prompted rows: the shorter prompt is prefilled for both, the longer one steps through its rest
    both = model.generate_batch(requests[1:])
    for clip, single in zip(both, batched[1:], strict=True):
        np.testing.assert_array_equal(clip.tokens, single.tokens)


def test_progress_of_a_prompted_clip(mono):
    _, model = mono
    calls = []
    model.generate("lofi", 0.3, seed=0, prompt_tokens=random_tokens(model, 6, 5),
                   on_progress=lambda step, total: calls.append((step, total)))
    steps = 15 + 3 - 6  # the prompt is prefilled in one call; only the rest is stepped
    assert calls == [(i, steps) for i in range(1, steps + 1)]


# ------------------------------------------------------------------------------------------- longer than the window


def test_long_greedy_clip_is_transformers_window_by_window(mono, monkeypatch):
    reference, model = mono
    calls = spy_windows(model, monkeypatch)
    clip = model.generate(PROMPT, 1.7, top_k=1, extend_stride=0.6)
    assert clip.samples.shape == (round(1.7 * 32000), 1)
    assert clip.tokens.shape == (4, 85)
    assert [c["frames"] for c in calls] == [[50], [50], [25]]
    assert calls[0]["prompts"] == [None]
    expected = reference_codes(reference, model, PROMPT, 50, 3.0)
    np.testing.assert_array_equal(calls[0]["result"][0], expected)
    for before, after in zip(calls, calls[1:], strict=False):
        # the re-prompt is the real suffix: the last window − stride = 20 frames of the window before
        np.testing.assert_array_equal(after["prompts"][0], before["result"][0][:, 30:])
        np.testing.assert_array_equal(after["result"][0][:, :20], after["prompts"][0])
        expected = reference_codes(reference, model, PROMPT, after["frames"][0], 3.0, after["prompts"][0])
        np.testing.assert_array_equal(after["result"][0], expected)
    # the clip is the first window followed by the new frames of every later window
    joined = np.concatenate([calls[0]["result"][0]] + [c["result"][0][:, 20:] for c in calls[1:]], axis=1)
    np.testing.assert_array_equal(clip.tokens, joined)


@pytest.mark.parametrize("fixture", ["mono", "stereo"])
def test_long_clips_have_exact_lengths(fixture, request):
    _, model = request.getfixturevalue(fixture)
    seconds = [1.37, 0.5, 1.001]
    clips = model.generate_batch([dict(prompt="ambient", seconds=s, seed=i, extend_stride=0.45)
                                  for i, s in enumerate(seconds)])
    assert [c.samples.shape for c in clips] == [(round(s * 32000), model.channels) for s in seconds]
    assert [c.tokens.shape[1] for c in clips] == [math.ceil(s * 50 - 1e-9) for s in seconds]
    assert all(np.isfinite(c.samples).all() and np.abs(c.samples).max() > 0 for c in clips)


def test_first_window_of_a_seeded_long_clip_is_the_window_clip(mono):
    _, model = mono
    long = model.generate("techno", 1.3, seed=9)
    window = model.generate("techno", 1.0, seed=9)
    np.testing.assert_array_equal(long.tokens[:, :50], window.tokens)
    np.testing.assert_array_equal(model.generate("techno", 1.3, seed=9).tokens, long.tokens)
    other_stride = model.generate("techno", 1.3, seed=9, extend_stride=0.3)
    np.testing.assert_array_equal(other_stride.tokens[:, :50], window.tokens)
    assert not np.array_equal(other_stride.tokens, long.tokens)


def test_progress_is_monotonic_across_windows(mono):
    _, model = mono
    calls = []
    model.generate("lofi", 1.9, seed=0, extend_stride=0.5,
                   on_progress=lambda step, total: calls.append((step, total)))
    # windows (start, length, prompt): (0, 50, 0), (25, 50, 25), (50, 45, 25); a prompt is prefilled, not stepped
    total = (50 + 3) + (50 + 3 - 25) + (45 + 3 - 25)
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_stop_in_the_second_window(mono):
    _, model = mono
    calls = []
    with pytest.raises(GenerationStopped):
        model.generate("lofi", 1.5, seed=0, on_progress=lambda step, total: calls.append(step),
                       should_stop=lambda: len(calls) >= 60)  # the first window takes 53 steps
    assert calls == list(range(1, 61))

    # in a batch, the stopped long row gives None and the others still come
    seen: dict[int, int] = {}

    def progress(row, step, total):
        seen[row] = step

    clips = model.generate_batch([dict(prompt="a", seconds=0.3, seed=1), dict(prompt="b", seconds=1.6, seed=2),
                                  dict(prompt="c", seconds=1.2, seed=3)],
                                 on_progress=progress, should_stop=lambda row: row == 1 and seen.get(1, 0) >= 70)
    assert clips[1] is None and seen[1] == 70
    assert clips[0].samples.shape == (9600, 1) and clips[2].samples.shape == (38400, 1)


# ------------------------------------------------------------------------------------------- continue audio


def tone(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    cols = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(t.shape)
            for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def reference_encode(reference, audio: np.ndarray) -> np.ndarray:
    """transformers' EnCodec codes ``(Q, F)`` of mono audio ``(samples,)``."""
    with torch.no_grad():
        codes = reference.audio_encoder.encode(torch.tensor(audio)[None, None]).audio_codes
    return codes[0, 0].numpy()


def test_continue_audio_keeps_the_input_codes(mono):
    reference, model = mono
    audio = tone(0.43, 32000, 1)
    audio = np.concatenate([audio, audio], axis=1)  # two equal channels: the mix is exact
    clip = model.continue_audio(audio, 32000, "jazz", 0.31, seed=3)
    frames = round(0.43 * 32000) // 640  # 21 whole frames; the last 16 ms are dropped
    assert clip.samples.shape == (frames * 640 + round(0.31 * 32000), 1)
    assert clip.tokens.shape == (4, frames + 16)
    np.testing.assert_array_equal(clip.tokens[:, :frames], reference_encode(reference, audio[: frames * 640, 0]))


def test_continue_audio_other_rate_and_channels(mono):
    reference, model = mono
    audio = tone(0.5, 44100, 2, seed=1)
    clip = model.continue_audio(audio, 44100, "jazz", 0.25, seed=1)
    resampled = resample(audio, 44100, 32000).mean(axis=1)
    assert resampled.shape == (16000,)
    frames = 16000 // 640
    assert clip.samples.shape == (frames * 640 + 8000, 1)
    np.testing.assert_array_equal(clip.tokens[:, :frames], reference_encode(reference, resampled[: frames * 640]))


def test_continue_mono_audio_on_a_stereo_model(stereo):
    reference, model = stereo
    audio = tone(0.3, 16000, 1, seed=2)[:, 0]  # (samples,)
    clip = model.continue_audio(audio, 16000, "jazz", 0.2, seed=2)
    frames = 9600 // 640
    assert clip.samples.shape == (frames * 640 + 6400, 2)
    expected = reference_encode(reference, resample(audio[:, None], 16000, 32000)[: frames * 640, 0])
    np.testing.assert_array_equal(clip.tokens[0::2, :frames], expected)  # left
    np.testing.assert_array_equal(clip.tokens[1::2, :frames], expected)  # right: the same, duplicated


def test_continue_audio_past_the_window(mono, monkeypatch):
    _, model = mono
    calls = spy_windows(model, monkeypatch)
    audio = tone(0.9, 32000, 1, seed=3)
    clip = model.continue_audio(audio, 32000, "jazz", 1.3, seed=4)
    assert clip.samples.shape == (45 * 640 + round(1.3 * 32000), 1)
    assert clip.tokens.shape == (4, 45 + 65)
    encoded = model.encode_audio(audio, 32000)
    np.testing.assert_array_equal(clip.tokens[:, :45], encoded)
    # the model sees the last window − stride = 20 frames of the input, then windows move by the stride
    assert [c["frames"] for c in calls] == [[50], [50], [25]]
    np.testing.assert_array_equal(calls[0]["prompts"][0], encoded[:, 25:])
    for before, after in zip(calls, calls[1:], strict=False):
        np.testing.assert_array_equal(after["prompts"][0], before["result"][0][:, 30:])


def test_continue_tokens_of_a_clip(mono):
    _, model = mono
    first = model.generate("lofi", 0.4, seed=5)
    more = model.continue_tokens(first.tokens, "lofi", 0.3, seed=6)
    assert more.samples.shape == (20 * 640 + 9600, 1)
    np.testing.assert_array_equal(more.tokens[:, :20], first.tokens)


def test_resample_is_band_limited():
    t = np.arange(44100) / 44100
    down = resample(np.sin(2 * np.pi * 440 * t)[:, None], 44100, 32000)
    assert down.shape == (32000, 1) and down.dtype == np.float32
    expected = np.sin(2 * np.pi * 440 * np.arange(32000) / 32000)
    np.testing.assert_allclose(down[1000:-1000, 0], expected[1000:-1000], atol=1e-3)
    high = resample(np.sin(2 * np.pi * 20000 * np.arange(48000) / 48000)[:, None], 48000, 32000)
    assert np.abs(high[1000:-1000]).max() < 1e-2  # above the new Nyquist frequency: removed, not aliased
    up = resample(np.stack([np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)] * 2, axis=1), 16000, 32000)
    assert up.shape == (32000, 2)
    np.testing.assert_allclose(up[2000:-2000, 1], np.sin(2 * np.pi * 300 * np.arange(32000) / 32000)[2000:-2000],
                               atol=1e-3)


# ------------------------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize("audio, rate, match", [
    (np.zeros((0,), np.float32), 32000, "empty"),
    (np.full((6400,), np.nan, np.float32), 32000, "invalid samples"),
    (np.zeros((300,), np.float32), 32000, "too short"),
    (np.zeros((6400,), np.float32), 0, "sampling rate"),
    (np.zeros((6400,), np.float32), 44100.0, "sampling rate"),
    (np.zeros((2, 6400, 1), np.float32), 32000, "shape"),
    (np.zeros((4 * 32000,), np.float32), 32000, "too long"),
    (np.array(["a", "b"]), 32000, "array of samples"),
])
def test_continue_audio_refuses_bad_audio(mono, audio, rate, match):
    _, model = mono
    with pytest.raises(ValueError, match=match) as error:
        model.continue_audio(audio, rate, "jazz", 0.5)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seconds=0.5, prompt_tokens=np.zeros((3, 5), np.int32)), "shape"),
    (dict(seconds=0.5, prompt_tokens=np.full((4, 5), 2048, np.int32)), "0 to 2047"),
    (dict(seconds=0.5, prompt_tokens=np.full((4, 5), -1, np.int32)), "negative"),
    (dict(seconds=0.5, prompt_tokens=np.zeros((4, 5), np.float32)), "whole-number"),
    (dict(seconds=0.5, prompt_tokens=np.zeros((4, 0), np.int32)), "at least one frame"),
    (dict(seconds=0.1, prompt_tokens=np.zeros((4, 5), np.int32)), "longer than the audio prompt"),
    (dict(seconds=1.5, extend_stride=0), "more than 0"),
    (dict(seconds=1.5, extend_stride=-1), "more than 0"),
    (dict(seconds=1.5, extend_stride=float("nan")), "finite"),
    (dict(seconds=1.5, extend_stride=1.0), "less than the model's window of 1 s"),
    (dict(seconds=3.5), "at most 3 seconds"),
])
def test_invalid_continuation_options(mono, kwargs, match):
    _, model = mono
    with pytest.raises(ValueError, match=match) as error:
        model.generate("jazz", **kwargs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=match):
        model.generate_batch([dict(prompt="fine", seconds=0.5), dict(prompt="jazz", **kwargs)])


def test_invalid_continue_tokens(mono):
    _, model = mono
    with pytest.raises(ValueError, match="at most 3 seconds"):
        model.continue_tokens(random_tokens(model, 10, 0), "jazz", 3.5)
    with pytest.raises(ValueError, match="too long"):
        model.continue_tokens(random_tokens(model, 151, 0), "jazz", 0.5)
    with pytest.raises(ValueError, match="shape"):
        model.continue_tokens(random_tokens(model, 10, 0)[:2], "jazz", 0.5)
    with pytest.raises(ValueError, match="empty"):
        model.continue_tokens(random_tokens(model, 10, 0), " ", 0.5)
