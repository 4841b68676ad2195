"""A small PNG picture of a clip: its waveform (min/max per pixel column), duration and prompt.

Drawn with numpy and Pillow only (no GUI stack, no matplotlib), so it works on a headless server.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 640, 200
BACKGROUND = (30, 31, 34)
WAVE = (88, 101, 242)
AXIS = (78, 80, 88)
TEXT = (230, 230, 235)
MUTED = (160, 162, 170)
CAPTION = 28  # pixels at the bottom for the prompt and duration


def _envelope(samples: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the (channel-averaged) signal in each of ``columns`` equal slices."""
    mono = np.asarray(samples, dtype=np.float32)
    if mono.ndim == 2:
        mono = mono.mean(axis=1)
    mono = np.nan_to_num(mono)
    if mono.size == 0:
        return np.zeros(columns, np.float32), np.zeros(columns, np.float32)
    if mono.size < columns:  # fewer samples than pixels: each column shows the sample under it
        picked = mono[(np.arange(columns) * mono.size) // columns]
        return picked, picked
    starts = (np.arange(columns) * mono.size) // columns  # strictly increasing: every slice is non-empty
    lows, highs = np.minimum.reduceat(mono, starts), np.maximum.reduceat(mono, starts)
    return lows.astype(np.float32), highs.astype(np.float32)


def waveform_png(samples: np.ndarray, sampling_rate: int, prompt: str = "", *, width: int = WIDTH,
                 height: int = HEIGHT) -> bytes:
    """A ``width`` × ``height`` PNG of the waveform of ``samples`` ``(n, channels)``, with the duration and the
    prompt (shortened to fit) written underneath."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    plot = height - CAPTION
    middle = plot / 2
    lows, highs = _envelope(samples, width)
    scale = max(float(np.abs(lows).max(initial=0)), float(np.abs(highs).max(initial=0)), 1e-6)
    draw.line([(0, middle), (width, middle)], fill=AXIS)
    for x, (low, high) in enumerate(zip(lows, highs, strict=True)):
        top = middle - (high / scale) * (middle - 6)
        bottom = middle - (low / scale) * (middle - 6)
        draw.line([(x, top), (x, max(bottom, top + 1))], fill=WAVE)
    seconds = np.asarray(samples).shape[0] / sampling_rate if sampling_rate else 0.0
    font = ImageFont.load_default()
    duration = f"{seconds:.1f} s"
    right = draw.textlength(duration, font=font)
    draw.text((width - right - 8, plot + 8), duration, fill=MUTED, font=font)
    text = " ".join(prompt.split())
    room = width - right - 24
    if draw.textlength(text, font=font) > room:
        while text and draw.textlength(text + "…", font=font) > room:
            text = text[:-1]
        text += "…"
    draw.text((8, plot + 8), text, fill=TEXT, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
