"""Prompt tokenizer for the T5 text encoder, read from a checkpoint's ``tokenizer.json`` with ``tokenizers``.

transformers' ``T5Tokenizer`` does not run a ``tokenizer.json`` as stored: it keeps the vocabulary, the
post-processor's ``</s>`` and a SentencePiece ``Precompiled`` normalizer when there is one, and always splits on
whitespace before the ``▁`` metaspace. This class rebuilds the same pipeline so its ids equal the reference's for
any T5 tokenizer file (for the real t5-base file the pipeline is unchanged), ignores padding and truncation stored
in the file, and pads and truncates itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers, processors

from .loading import CheckpointError

log = logging.getLogger(__name__)

EOS = "</s>"


def _precompiled_normalizer(normalizer: dict | None) -> dict | None:
    """The SentencePiece ``Precompiled`` normalizer inside ``normalizer`` (alone or in a Sequence), if any."""
    if not isinstance(normalizer, dict):
        return None
    candidates = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for candidate in candidates:
        if isinstance(candidate, dict) and candidate.get("type") == "Precompiled":
            return candidate
    return None


class PromptTokenizer:
    """Turns a batch of prompts into right-padded ``(input_ids, attention_mask)`` for the T5 encoder."""

    def __init__(self, tokenizer: Tokenizer, pad_token_id: int = 0, max_length: int = 512):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    @classmethod
    def from_file(cls, path: str | Path, pad_token_id: int = 0, max_length: int = 512) -> PromptTokenizer:
        """Load ``tokenizer.json``; a missing or unreadable file raises :class:`CheckpointError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
                raise ValueError("it has no tokenizer model")
            spec["normalizer"] = _precompiled_normalizer(spec.get("normalizer"))
            spec["truncation"] = spec["padding"] = None
            tokenizer = Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # OSError, JSON errors, and the bare Exception tokenizers raises
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is None:
            raise CheckpointError(f"{path} has no {EOS} token; expected a T5 tokenizer")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)])
        # truncation accounts for the post-processor, so the final </s> survives it
        tokenizer.enable_truncation(max_length)
        log.debug("loaded %s (%d tokens)", path, tokenizer.get_vocab_size())
        return cls(tokenizer, pad_token_id=pad_token_id, max_length=max_length)

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``prompts``; return int32 ``input_ids`` and ``attention_mask``, both ``(B, L)``.

        Each row ends with ``</s>``; rows are right-padded with ``pad_token_id`` to the longest one.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a string")
        encodings = self.tokenizer.encode_batch(list(prompts))
        length = max((len(e.ids) for e in encodings), default=0)
        input_ids = np.full((len(encodings), length), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(encodings), length), dtype=np.int32)
        for row, encoding in enumerate(encodings):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = 1
        return input_ids, attention_mask
