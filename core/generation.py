"""What a generation is asked for and what it returns, shared by the model, the command line and the bot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np

MAX_PROMPT_CHARS = 2000


class GenerationStopped(Exception):
    """Raised when ``should_stop()`` asked a generation to end; nothing was produced."""


@dataclass(frozen=True)
class Clip:
    """A generated waveform: ``samples`` is float32 ``(n, channels)``, exactly the requested length.

    ``seed`` is the seed the clip was sampled with (drawn at random when the request gave none), so a clip can
    always be made again; ``tokens`` are its EnCodec codes ``(codebooks, frames)`` when the model kept them.
    """

    samples: np.ndarray
    sampling_rate: int
    seed: int | None = None
    tokens: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.sampling_rate

    @property
    def channels(self) -> int:
        return self.samples.shape[1]


@dataclass(frozen=True)
class GenerationRequest:
    """One row of a (batched) generation; every field may differ between rows.

    ``seconds`` is the total length of the clip. ``prompt_tokens`` (EnCodec codes ``(codebooks, frames)``, e.g. a
    previous clip's ``tokens``) makes the clip a continuation: its first frames are exactly these codes and only the
    rest is generated, so ``seconds`` must be longer than the prompt. ``extend_stride`` (seconds, default: the model's
    ``default_extend_stride``) is how far each window moves when the clip is longer than the model's window.
    ``melody`` ``(samples, sampling_rate)`` (samples ``(n,)`` or ``(n, channels)``) conditions a melody model on a
    tune (its first 30 s); a plain model refuses it.
    """

    prompt: str
    seconds: float
    seed: int | None = None
    top_k: int = 250
    temperature: float = 1.0
    guidance_scale: float = 3.0
    prompt_tokens: np.ndarray | None = field(default=None, compare=False, repr=False)
    extend_stride: float | None = None
    melody: tuple[np.ndarray, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt_tokens is not None and not isinstance(self.prompt_tokens, np.ndarray):
            try:  # lists from a dict or JSON; anything unusable is reported by validate()
                object.__setattr__(self, "prompt_tokens", np.asarray(self.prompt_tokens))
            except (TypeError, ValueError):
                pass

    @classmethod
    def coerce(cls, request: GenerationRequest | Mapping) -> GenerationRequest:
        """Accept a request or a plain dict with the same keys; unknown keys are a ValueError."""
        if isinstance(request, GenerationRequest):
            return request
        if not isinstance(request, Mapping):
            raise ValueError(f"a generation request must be a GenerationRequest or a dict, got {type(request).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(request) - known
        if unknown:
            raise ValueError(f"unknown generation option(s): {', '.join(sorted(map(str, unknown)))}")
        if "prompt" not in request or "seconds" not in request:
            raise ValueError("a generation request needs a prompt and seconds")
        return cls(**request)

    def validate(self, max_seconds: float) -> None:
        """Raise ValueError with a message fit to show a user if any option is out of range."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("The prompt is empty: describe the music you want.")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt is too long ({len(self.prompt)} characters; at most {MAX_PROMPT_CHARS}).")
        _check_number("seconds", self.seconds)
        if not self.seconds > 0:
            raise ValueError("The length must be more than 0 seconds.")
        if self.seconds > max_seconds:
            raise ValueError(f"The length must be at most {max_seconds:g} seconds (got {self.seconds:g}).")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2**63):
            raise ValueError("The seed must be a whole number from 0 to 2**63 - 1.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError("top_k must be a whole number of at least 1.")
        _check_number("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError("The temperature must be more than 0.")
        _check_number("guidance_scale", self.guidance_scale)
        if self.guidance_scale < 0:
            raise ValueError("The guidance scale must be 0 or more.")
        if self.extend_stride is not None:
            _check_number("extend_stride", self.extend_stride)
            if not self.extend_stride > 0:
                raise ValueError("The extend stride must be more than 0 seconds.")
        if self.prompt_tokens is not None:
            tokens = self.prompt_tokens
            if (not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or tokens.shape[1] < 1
                    or not np.issubdtype(tokens.dtype, np.integer)):
                raise ValueError("The prompt tokens must be whole-number codes of shape (codebooks, frames), "
                                 "with at least one frame.")
            if tokens.min() < 0:
                raise ValueError("The prompt tokens must not be negative.")
        if self.melody is not None:
            if not isinstance(self.melody, (tuple, list)) or len(self.melody) != 2:
                raise ValueError("The melody must be (samples, sampling_rate).")
            samples, rate = self.melody
            if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
                raise ValueError(f"The melody's sampling rate must be a whole number of hertz, got {rate!r}.")
            try:
                samples = np.asarray(samples, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError("The melody must be an array of samples.") from None
            if samples.ndim not in (1, 2) or samples.shape[0] == 0 or (samples.ndim == 2 and samples.shape[1] < 1):
                raise ValueError(f"The melody must have shape (samples,) or (samples, channels), got {samples.shape}.")
            if not np.isfinite(samples).all():
                raise ValueError("The melody contains invalid samples (NaN or infinity).")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
