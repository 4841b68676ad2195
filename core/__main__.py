"""Command line: ``python -m core "warm synthwave" --seconds 5 --model facebook/musicgen-small -o clip.mp3``.

Writes WAV (16-bit PCM), FLAC, Ogg Vorbis or MP3 (from the output's extension or ``--format``), peak-normalised to
-1 dBFS with a 50 ms fade-out as the bot does (``--no-normalize`` writes the samples as generated). ``-o FOLDER``
(the default is the current folder) writes a file named after the prompt and seed there, never replacing one;
``-o FILE`` refuses an existing file unless ``--overwrite``. The output and format are checked before the model
loads. The model is ``--model``, else ``MUSICGEN_MODEL``, else facebook/musicgen-small. A progress bar on stderr
(plain lines every 10 % when stderr is not a terminal). Bad input and unreadable checkpoints print one line and exit
with status 2.

Longer than the model's 30 s window: ``python -m core "ambient drone" --seconds 45 --extend-stride 18 -o long.wav``
(made window by window; at most ``--max-seconds``, default twice the window). Continue a recording:
``python -m core "add drums" --continue input.wav --seconds 10 -o out.wav`` writes the input (re-encoded) followed by
10 s of new music (any format and rate soundfile reads).

Melody models (e.g. ``--model facebook/musicgen-melody``) follow a tune as well as the prompt:
``python -m core "80s pop, synth lead" --melody tune.wav --seconds 8 -o out.wav`` (any format and rate soundfile
reads; its first 30 s count; a melody model makes at most 30 s). A plain model refuses ``--melody``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, TextIO

from . import audio_files, preload_backend
from .generation import GenerationRequest, GenerationStopped
from .options import DEFAULT_MODEL, blas_choice_problem, model_name

log = logging.getLogger("core")


def program_name(argv0: str | None = None) -> str:
    """``musicgen`` when run as the console script, ``python -m core`` when run as a module."""
    base = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "python -m core" if base in ("__main__.py", "", "-c") else base


def build_parser() -> argparse.ArgumentParser:
    """The command line's options (each with its help text)."""
    parser = argparse.ArgumentParser(
        prog=program_name(), description="Turn a text prompt into music (MusicGen on MLX).",
        epilog="Environment: MUSICGEN_MODEL (the model when --model is not given), MUSICGEN_BLAS (Linux: auto, "
               "openblas, blis, reference or a library path), HF_HOME / HF_HUB_OFFLINE (hub cache, offline use).")
    parser.add_argument("prompt", help="what the music should sound like")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="length of the clip, or with --continue of the part added (default 5)")
    parser.add_argument("--continue", dest="continue_from", type=Path, metavar="AUDIO",
                        help="continue this recording (WAV, FLAC, Ogg …) instead of starting from silence")
    parser.add_argument("--melody", type=Path, metavar="AUDIO",
                        help="a tune to follow (WAV, FLAC, Ogg …; its first 30 s count); needs a melody model such as "
                             "facebook/musicgen-melody")
    parser.add_argument("--extend-stride", type=float,
                        help="seconds each window moves past the one before when the clip is longer than the "
                             "model's window (default 60%% of the window: 18 s for 30 s)")
    parser.add_argument("--max-seconds", type=float,
                        help="longest clip allowed (default twice the model's window: 60 s)")
    parser.add_argument("--model", metavar="FOLDER_OR_HUB_ID",
                        help=f"checkpoint folder or hub id (default: $MUSICGEN_MODEL, else {DEFAULT_MODEL})")
    parser.add_argument("-o", "--output", type=Path, default=Path("."), metavar="FILE_OR_FOLDER",
                        help="file to write (.wav, .flac, .ogg or .mp3; a name without extension gets .wav or "
                             "--format's), or an existing folder to write PROMPT-SEED.FORMAT into (default: the "
                             "current folder)")
    parser.add_argument("--format", type=str.lower, metavar="|".join(audio_files.FORMATS),
                        help="audio format (default: from the output's extension, else wav)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="write the samples as generated (default: peak-normalise to -1 dBFS and fade the "
                             "last 50 ms out, as the bot does)")
    parser.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--top-k", type=int, default=250,
                        help="sample each token from the k most likely ones (default 250)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature: higher is more varied, lower more predictable (default 1.0)")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale: how closely to follow the prompt (default 3.0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="decoder weights dtype (default float32, the fastest on CPU)")
    parser.add_argument("--quantize", type=int, choices=[4, 8], metavar="4|8",
                        help="quantize the decoder's linear layers to 8 or 4 bits at load (faster on CPU, less "
                             "memory; see README, Quantized weights)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class ProgressBar:
    """Progress on stderr: a one-line bar redrawn in place on a terminal; elsewhere (a pipe, a log file) a plain
    line every 10 % or 5 s, so logs are not filled with carriage returns."""

    def __init__(self, width: int = 30, stream: TextIO | None = None, *, interval: float = 5.0):
        self.width, self.stream, self.start = width, stream or sys.stderr, time.perf_counter()
        self.interactive = self.stream.isatty()
        self.interval, self.last_time, self.last_tenth = interval, self.start, 0

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        rate = step / max(now - self.start, 1e-9)
        if self.interactive:
            filled = self.width * step // total
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} steps {rate:.1f}/s")
            if step == total:
                self.stream.write("\n")
        else:
            tenth = 10 * step // total
            if step != total and tenth <= self.last_tenth and now - self.last_time < self.interval:
                return
            self.last_tenth, self.last_time = tenth, now
            self.stream.write(f"{100 * step // total:3d}% {step}/{total} steps {rate:.1f}/s\n")
        self.stream.flush()


def read_audio(sf, path: Path) -> tuple:
    """``(samples (n, channels), sampling_rate)`` of an audio file, or a ValueError naming it."""
    try:
        return sf.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as e:  # soundfile's errors are RuntimeErrors
        raise ValueError(f"could not read {path}: {e}") from None


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m core`` and the ``musicgen`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    problem = blas_choice_problem(os.environ.get("MUSICGEN_BLAS"))
    if problem:
        fail(problem)
    # The output and its format are checked before anything slow: a typo must not cost a whole generation.
    try:
        target, fmt = audio_files.output_target(args.output, args.format, overwrite=args.overwrite)
    except ValueError as e:
        fail(str(e))
    backend = preload_backend()  # before anything imports MLX
    import soundfile as sf

    from .loading import CheckpointError
    from .pipeline import MusicGen

    log.info("BLAS: %s", backend)
    request = GenerationRequest(args.prompt, args.seconds, args.seed, args.top_k, args.temperature, args.guidance,
                                extend_stride=args.extend_stride)
    try:
        request.validate(math.inf)  # fail fast on bad input, before loading; the model checks its own maximum
        audio = None
        if args.continue_from is not None:
            audio, rate = read_audio(sf, args.continue_from)
        if args.melody is not None:
            request = dataclasses.replace(request, melody=read_audio(sf, args.melody))
            request.validate(math.inf)
        model = MusicGen.from_pretrained(model_name(args.model), dtype=args.dtype, quantize=args.quantize,
                                         max_seconds=args.max_seconds)
        progress = None if args.quiet else ProgressBar()
        if audio is None:
            clip = model.generate(**vars(request), on_progress=progress)
        else:
            options = {k: v for k, v in vars(request).items() if k not in ("prompt", "seconds", "prompt_tokens")}
            clip = model.continue_audio(audio, rate, args.prompt, args.seconds, **options, on_progress=progress)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    except (GenerationStopped, KeyboardInterrupt):
        print("stopped", file=sys.stderr)
        raise SystemExit(130) from None
    path = target or audio_files.name_in_folder(args.output, args.prompt, clip.seed, fmt)
    samples = audio_files.finish(clip.samples, clip.sampling_rate, normalize=args.normalize)
    try:
        audio_files.write(path, audio_files.encode(samples, clip.sampling_rate, fmt), overwrite=args.overwrite)
    except FileExistsError:
        fail(f"{path} appeared while the clip was made; not replaced (pass --overwrite)")
    except (OSError, ValueError) as e:
        fail(f"could not write {path}: {e}")
    log.info("wrote %s (%s): %.2f s, %d channel(s), seed %d", path, fmt, clip.seconds, clip.channels, clip.seed)


if __name__ == "__main__":
    main()
