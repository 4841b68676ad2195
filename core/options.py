"""Settings shared by the command line and the bot, checked without loading MLX or any library."""

from __future__ import annotations

import os

DEFAULT_MODEL = "facebook/musicgen-small"
BLAS_CHOICES = ("auto", "openblas", "blis", "reference")


def blas_choice_problem(value: str | None) -> str | None:
    """None when ``value`` is a valid ``MUSICGEN_BLAS`` (unset, one of :data:`BLAS_CHOICES` or the path of an
    existing library file); otherwise a one-line message saying what is accepted."""
    choice = (value or "").strip()
    if not choice or choice in BLAS_CHOICES or os.path.isfile(choice):
        return None
    return (f"MUSICGEN_BLAS must be one of {', '.join(BLAS_CHOICES)} or the path of a BLAS library file "
            f"(got {choice!r}).")


def model_name(flag: str | None, environ: dict[str, str] | None = None) -> str:
    """The checkpoint to load: ``--model`` if given, else ``MUSICGEN_MODEL``, else :data:`DEFAULT_MODEL`."""
    env = os.environ if environ is None else environ
    return flag or (env.get("MUSICGEN_MODEL") or "").strip() or DEFAULT_MODEL
