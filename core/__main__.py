"""Command line: ``python -m core "warm synthwave" --seconds 5 --model facebook/musicgen-small -o clip.wav``.

Writes a WAV with soundfile and shows a one-line progress bar on stderr. Bad input and unreadable checkpoints
print one line and exit with status 2.

Longer than the model's 30 s window: ``python -m core "ambient drone" --seconds 45 --extend-stride 18 -o long.wav``
(made window by window; at most ``--max-seconds``, default twice the window). Continue a recording:
``python -m core "add drums" --continue input.wav --seconds 10 -o out.wav`` writes the input (re-encoded) followed by
10 s of new music (any format and rate soundfile reads).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from . import preload_backend
from .generation import GenerationRequest, GenerationStopped

log = logging.getLogger("core")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core", description="Turn a text prompt into music (MusicGen on MLX).")
    parser.add_argument("prompt", help="what the music should sound like")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="length of the clip, or with --continue of the part added (default 5)")
    parser.add_argument("--continue", dest="continue_from", type=Path, metavar="AUDIO",
                        help="continue this recording (WAV, FLAC, Ogg …) instead of starting from silence")
    parser.add_argument("--extend-stride", type=float,
                        help="seconds each window moves past the one before when the clip is longer than the "
                             "model's window (default 60%% of the window: 18 s for 30 s)")
    parser.add_argument("--max-seconds", type=float,
                        help="longest clip allowed (default twice the model's window: 60 s)")
    parser.add_argument("--model", default="facebook/musicgen-small", help="checkpoint folder or hub id")
    parser.add_argument("-o", "--output", type=Path, default=Path("clip.wav"), help="WAV file to write")
    parser.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="decoder weights dtype")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    return parser.parse_args(argv)


class ProgressBar:
    """A one-line bar on stderr, redrawn in place."""

    def __init__(self, width: int = 30, stream=sys.stderr):
        self.width, self.stream, self.start = width, stream, time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        filled = self.width * step // total
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {step}/{total} steps {rate:.1f}/s")
        if step == total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m core`` and the ``musicgen`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
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
            try:
                audio, rate = sf.read(str(args.continue_from), dtype="float32", always_2d=True)
            except (OSError, RuntimeError) as e:  # soundfile's errors are RuntimeErrors
                raise ValueError(f"could not read {args.continue_from}: {e}") from None
        model = MusicGen.from_pretrained(args.model, dtype=args.dtype, max_seconds=args.max_seconds)
        progress = None if args.quiet else ProgressBar()
        if audio is None:
            clip = model.generate(**vars(request), on_progress=progress)
        else:
            options = {k: v for k, v in vars(request).items() if k not in ("prompt", "seconds", "prompt_tokens")}
            clip = model.continue_audio(audio, rate, args.prompt, args.seconds, **options, on_progress=progress)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (GenerationStopped, KeyboardInterrupt):
        print("stopped", file=sys.stderr)
        raise SystemExit(130) from None
    try:
        sf.write(str(args.output), clip.samples, clip.sampling_rate, subtype="PCM_16")
    except (OSError, RuntimeError) as e:
        print(f"error: could not write {args.output}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("wrote %s: %.2f s, %d channel(s), seed %d", args.output, clip.seconds, clip.channels, clip.seed)


if __name__ == "__main__":
    main()
