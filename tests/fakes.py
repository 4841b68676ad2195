"""A fake generator implementing :class:`bot.worker.Generator` (what the worker uses of :class:`core.MusicGen`),
for bot tests that must not load a model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core import Clip, GenerationRequest


class FakeGenerator:
    """Sine-wave clips of exactly ``round(seconds * sampling_rate)`` samples, one step per ``frame_rate``th second.

    It sleeps ``step_delay`` per step, calls ``on_progress`` and honours ``should_stop`` per row like the real model
    (a stopped row gives ``None``). Test hooks: ``fail_with`` (an exception to raise in the next call),
    ``hang`` (steps never advance, but ``should_stop`` is still polled), ``block`` (a :class:`threading.Event`
    the call waits on without polling anything, like a stuck native call). ``calls`` records each batch's requests
    and ``thread_ids`` the thread of every call (and of construction).
    """

    NUM_CODEBOOKS = 4
    BYTES_PER_SECOND = 1 << 20  # what the memory estimate counts per second of audio per row

    def __init__(self, *, sampling_rate: int = 8000, max_seconds: float = 30.0, channels: int = 1,
                 frame_rate: int = 50, step_delay: float = 0.0, steps: int | None = None,
                 is_melody: bool = False) -> None:
        self.sampling_rate = sampling_rate
        self.is_melody = is_melody
        self.max_seconds = max_seconds
        self.channels = channels
        self.frame_rate = frame_rate
        self.step_delay = step_delay
        self.steps = steps  # fixed number of steps per batch; default: frames of the longest row
        self.fail_with: BaseException | None = None
        self.hang = False
        self.block: threading.Event | None = None
        self.calls: list[list[GenerationRequest]] = []
        self.thread_ids: list[int] = [threading.get_ident()]

    def encode_audio(self, audio: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Codes ``(codebooks, frames)`` of the audio's whole frames (the first codebook holds the frame index)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim not in (1, 2) or audio.shape[0] == 0:
            raise ValueError("The audio is empty.")
        if audio.shape[0] / sampling_rate > self.max_seconds:
            raise ValueError(f"The audio is too long ({audio.shape[0] / sampling_rate:.1f} s; at most "
                             f"{self.max_seconds:g} s).")
        frames = int(audio.shape[0] * self.frame_rate // sampling_rate)
        codes = np.zeros((self.NUM_CODEBOOKS, frames), dtype=np.int32)
        codes[0] = np.arange(frames)
        return codes

    def estimate_batch_bytes(self, requests: Sequence[GenerationRequest]) -> int:
        return int(sum(r.seconds for r in requests) * self.BYTES_PER_SECOND)

    def generate_batch(self, requests: Sequence[GenerationRequest | dict], *,
                       on_progress: Callable[[int, int, int], Any] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]:
        self.thread_ids.append(threading.get_ident())
        requests = [GenerationRequest.coerce(r) for r in requests]
        for r in requests:
            r.validate(self.max_seconds)
            if r.melody is not None and not self.is_melody:
                raise ValueError("This model does not take a melody.")
        self.calls.append(requests)
        if self.block is not None:  # first: a test that blocks and then fails decides when the failure comes
            self.block.wait()
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        totals = [self.steps or max(1, round(r.seconds * self.frame_rate)) for r in requests]
        active = set(range(len(requests)))
        stopped: set[int] = set()
        step = 0
        while active:
            for row in sorted(active):
                if should_stop is not None and should_stop(row):
                    active.discard(row)
                    stopped.add(row)
            if not active:
                break
            if self.hang:
                time.sleep(0.005)
                continue
            step += 1
            if self.step_delay:
                time.sleep(self.step_delay)
            for row in sorted(active):
                if on_progress is not None:
                    on_progress(row, min(step, totals[row]), totals[row])
                if step >= totals[row]:
                    active.discard(row)
        return [None if row in stopped else self._clip(r) for row, r in enumerate(requests)]

    def _clip(self, request: GenerationRequest) -> Clip:
        n = round(request.seconds * self.sampling_rate)
        seed = request.seed if request.seed is not None else 0
        freq = 220.0 + seed % 440
        t = np.arange(n, dtype=np.float32) / self.sampling_rate
        wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
        frames = max(1, round(request.seconds * self.frame_rate))
        tokens = np.zeros((self.NUM_CODEBOOKS, frames), dtype=np.int32)
        if request.prompt_tokens is not None:  # a continuation starts with exactly its prompt's codes
            tokens[:, :request.prompt_tokens.shape[1]] = request.prompt_tokens
        return Clip(np.repeat(wave[:, None], self.channels, axis=1), self.sampling_rate, seed=seed, tokens=tokens)
