"""Prompt cleaning and display escaping under hostile input (property-based with hypothesis)."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bot.formatting import (
    MAX_MODEL_PROMPT_CHARS,
    MAX_PROMPT_CHARS,
    PromptError,
    clean_prompt,
    clean_theme,
    display,
    format_seconds,
    model_prompt,
    truncate,
)

INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad",  # zero-width, BOM, soft hyphen
             "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",  # bidi marks and embeddings
             "\u2066", "\u2067", "\u2068", "\u2069", "\u061c"]  # bidi isolates, Arabic letter mark
CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\ud83d", "\ue000", "\U000e0001"]
HOSTILE = ["@everyone", "@here", "<@123456789012345678>", "<@!123456789012345678>", "<@&123456789012345678>",
           "**", "__", "~~", "||", "`", "```", "> ", "# ", "[x](https://example.com)", "\\"]

# Text built from hostile pieces mixed with arbitrary characters, up to and beyond Discord's 6000.
hostile_text = st.lists(
    st.one_of(st.sampled_from(INVISIBLE + CONTROLS + HOSTILE), st.text(max_size=20),
              st.characters(codec="utf-8")), max_size=400).map("".join)
long_text = st.builds(lambda s, n: (s * n)[:6500], st.text(min_size=1, max_size=10), st.integers(600, 6500))
any_text = st.one_of(hostile_text, long_text)

_MENTION = re.compile(r"@(everyone|here)|<@[!&]?\d{17,20}>")
_MARKDOWN = "*_~|`"


def _bad_char(c: str) -> bool:
    return unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn"} or (c.isspace() and c != " ")


@settings(max_examples=300, deadline=None)
@given(any_text)
@example("\u200b\u202e\u200f  \n\t\x00")
@example("@everyone " * 700)
def test_a_cleaned_prompt_is_never_empty_never_holds_unsafe_characters_and_fits(text):
    try:
        cleaned = clean_prompt(text)
    except PromptError as err:
        assert "empty" in str(err)
        # Only refused when nothing visible was left.
        assert not any(not _bad_char(c) and not c.isspace() for c in unicodedata.normalize("NFC", text))
        return
    assert cleaned and cleaned == cleaned.strip()
    assert len(cleaned) <= MAX_PROMPT_CHARS
    assert not any(_bad_char(c) for c in cleaned)
    assert not any(c in cleaned for c in INVISIBLE + CONTROLS)
    assert "  " not in cleaned


@settings(max_examples=300, deadline=None)
@given(any_text, st.integers(1, 2000))
@example("@everyone **hi** <@&123456789012345678>", 12)
@example("\\" * 3000, 2000)
def test_displayed_text_cannot_ping_or_break_the_layout_and_fits(text, limit):
    shown = display(text, limit)
    assert len(shown) <= limit
    assert not _MENTION.search(shown)
    assert "\n" not in shown
    for i, c in enumerate(shown):
        if c in _MARKDOWN:
            backslashes = len(shown[:i]) - len(shown[:i].rstrip("\\"))
            assert backslashes % 2 == 1, f"unescaped {c!r} at {i} in {shown!r}"


def test_display_escapes_and_truncates_with_an_ellipsis():
    assert display("**bold** @everyone") == "\\*\\*bold\\*\\* @\u200beveryone"
    shown = display("a" * 5000, 100)
    assert len(shown) == 100 and shown.endswith("…")
    assert display("anything", 0) == ""


@given(st.one_of(st.none(), any_text))
def test_a_theme_is_cleaned_and_may_be_empty(theme):
    cleaned = clean_theme(theme)
    assert len(cleaned) <= 200 and not any(_bad_char(c) for c in cleaned)


@given(st.text(min_size=1, max_size=300).filter(str.strip), st.text(max_size=200))
def test_the_model_prompt_combines_theme_and_prompt_within_the_limit(prompt, theme):
    combined = model_prompt(prompt, theme)
    assert len(combined) <= MAX_MODEL_PROMPT_CHARS
    assert combined.startswith(f"{theme}, " if theme else prompt[:1])


def test_non_text_prompts_are_refused():
    for value in (None, 5, b"bytes", ["list"]):
        with pytest.raises(PromptError, match="must be text"):
            clean_prompt(value)


def test_truncate_and_durations():
    assert truncate("hello", 10) == "hello"
    assert truncate("hello world", 6) == "hello…"
    assert [format_seconds(s) for s in (0, 45, 60, 125, 3600, 3780)] == ["0 s", "45 s", "1 min", "2 min 5 s",
                                                                          "1 h", "1 h 3 min"]
