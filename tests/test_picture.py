"""The PNG picture of a clip is a valid image of the expected size that shows the waveform's shape."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bot.picture import BACKGROUND, CAPTION, HEIGHT, WIDTH, waveform_png


def load(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.verify()  # checks the chunks and CRCs
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_png_of_the_expected_size() -> None:
    t = np.arange(32000 * 2) / 32000
    samples = (0.5 * np.sin(2 * np.pi * 3 * t))[:, None].astype(np.float32)
    image = load(waveform_png(samples, 32000, "lo-fi hip hop with warm piano " * 20))
    assert image.size == (WIDTH, HEIGHT)
    small = load(waveform_png(samples, 32000, "x", width=200, height=80))
    assert small.size == (200, 80)


def test_the_picture_follows_the_loudness() -> None:
    # silence for the first half, a loud tone for the second: only the right half of the plot has a tall wave
    n = 32000
    samples = np.zeros((n, 2), np.float32)
    samples[n // 2:] = np.sin(np.arange(n - n // 2) * 0.3)[:, None]
    pixels = np.asarray(load(waveform_png(samples, 32000, "half")))[: HEIGHT - CAPTION]
    drawn = np.any(pixels != np.array(BACKGROUND), axis=2).sum(axis=0)  # coloured pixels per column
    left, right = drawn[: WIDTH // 2 - 5], drawn[WIDTH // 2 + 5:]
    assert left.max() <= 2  # the centre line only
    assert right.min() > (HEIGHT - CAPTION) // 2


def test_empty_and_stereo_and_odd_input() -> None:
    assert load(waveform_png(np.zeros((0, 1), np.float32), 32000)).size == (WIDTH, HEIGHT)
    weird = np.full((10, 1), np.nan, np.float32)
    assert load(waveform_png(weird, 32000, "nan")).size == (WIDTH, HEIGHT)
    assert load(waveform_png(np.ones(5, np.float32), 8000, "\u202e bidi \n new line")).size == (WIDTH, HEIGHT)
