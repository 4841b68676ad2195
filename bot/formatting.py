"""Cleaning what members type and fitting what the bot says into Discord's limits.

Prompts are cleaned before they are queued (what the model gets and what is stored), and escaped every time they
are shown (markdown and mentions); ``AllowedMentions`` on each message is the second guard against pings.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from discord.utils import escape_mentions

if TYPE_CHECKING:
    from .jobs import Job

MAX_PROMPT_CHARS = 300  # what /music accepts
MAX_THEME_CHARS = 200
MAX_MODEL_PROMPT_CHARS = 600  # theme + prompt as the model gets it (core accepts up to 2000)
MESSAGE_LIMIT = 2000
ELLIPSIS = "…"

# Categories removed from prompts: controls (Cc), format characters (Cf: zero-width, bidi marks and isolates,
# BOM, soft hyphen), surrogates (Cs), private use (Co) and unassigned code points (Cn).
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_SPACES = re.compile(r"\s+")


class PromptError(ValueError):
    """A prompt or option a member sent cannot be used; the message is fit to show them."""


def strip_unsafe(text: str) -> str:
    """Drop invisible and control characters and fold every run of whitespace into one space."""
    text = unicodedata.normalize("NFC", text)
    kept = "".join(" " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c) not in
                   _DROP_CATEGORIES)
    return _SPACES.sub(" ", kept).strip()


def clean_prompt(text: object, *, max_chars: int = MAX_PROMPT_CHARS, what: str = "prompt") -> str:
    """The prompt as it is queued: safe characters only, one line, at most ``max_chars``; PromptError if empty."""
    if not isinstance(text, str):
        raise PromptError(f"The {what} must be text.")
    cleaned = strip_unsafe(text)
    if len(cleaned) > max_chars:
        cleaned = cleaned[:max_chars].rstrip()
    if not cleaned:
        raise PromptError(f"The {what} is empty (after removing invisible characters): "
                          "describe the music you want in words.")
    return cleaned


def clean_theme(text: object | None) -> str:
    """A session theme (may be empty)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise PromptError("The theme must be text.")
    return strip_unsafe(text)[:MAX_THEME_CHARS].rstrip()


def model_prompt(prompt: str, theme: str = "") -> str:
    """What the model gets: the session theme combined with the member's prompt."""
    text = f"{theme}, {prompt}" if theme else prompt
    return text[:MAX_MODEL_PROMPT_CHARS].rstrip()


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, ending with an ellipsis when cut."""
    if limit < 1:
        return ""
    if len(text) <= limit:
        return text
    return text[:limit - 1].rstrip() + ELLIPSIS


def display(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Text a member typed, made safe to show in a message: cleaned, markdown and mentions escaped, within ``limit``.

    The text is cut before escaping, at a whole character, so an escape is never split.
    """
    if limit < 1:
        return ""
    cleaned = strip_unsafe(text)
    escaped = _escape(cleaned)
    if len(escaped) <= limit:
        return escaped
    lo, hi = 0, len(cleaned)
    while lo < hi:  # the longest prefix whose escaped form plus the ellipsis fits
        mid = (lo + hi + 1) // 2
        if len(_escape(cleaned[:mid].rstrip())) + 1 <= limit:
            lo = mid
        else:
            hi = mid - 1
    return _escape(cleaned[:lo].rstrip()) + ELLIPSIS


def fit_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A whole message cut to Discord's limit (the parts must already be escaped)."""
    return truncate(text, limit)


def format_seconds(seconds: float) -> str:
    """A short human duration: ``45 s``, ``2 min 5 s``, ``1 h 3 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s" if s else f"{m} min"
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if m else f"{h} h"


# Every character Discord's markdown gives a meaning to within a line (emphasis, spoilers, code, masked links,
# quotes, headers). Each is backslash-escaped wherever it is: discord.py's escape_markdown leaves some of them
# unescaped inside what looks like a masked link ("[**[x](https://example.com)").
_MARKDOWN_CHARS = re.compile(r"([\\*_~|`>#\[\]()])")


def _escape(text: str) -> str:
    # Markdown first, so the zero-width space escape_mentions inserts is not itself escaped.
    return escape_mentions(_MARKDOWN_CHARS.sub(r"\\\1", text))


def status_text(job: Job, state: str) -> str:
    """A job's status message: what was asked for (prompt, new seconds, seed), then ``state`` (position, progress,
    done)."""
    return fit_message(f"**{display(job.prompt, 300)}** · {job.new_seconds} s · seed `{job.seed}`\n{state}")


def progress_bar(percent: int, width: int = 10) -> str:
    filled = max(0, min(width, round(percent * width / 100)))
    return "▰" * filled + "▱" * (width - filled)
