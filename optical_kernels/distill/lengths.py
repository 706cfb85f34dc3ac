"""Token-length statistics: how much of each side a maximum length cuts off.

A WordPiece / SentencePiece vocabulary built mostly from English fragments Bantu words into
many pieces, so one ``max_length`` truncates the two sides of a bitext very unequally. The
experiment's lengths (train 128, evaluate 256; docs/experiment.md) are chosen from these
numbers: :func:`token_length_stats` on each side of each corpus with the tokenizer that reads
it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

DEFAULT_MAX_LENGTHS = (64, 128, 256)
# Words are separated by white space or by the Ethiopic wordspace U+1361 (Amharic, Tigrinya
# texts often use it instead of a space).
_WORD = re.compile(r"[^\s\u1361]+")


def count_words(text: str) -> int:
    """Number of words of ``text`` (separated by white space or the Ethiopic wordspace ``፡``)."""
    return len(_WORD.findall(text))


def token_length_stats(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_lengths: Iterable[int] = DEFAULT_MAX_LENGTHS,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Pieces per word and the share of texts a ``max_length`` truncates.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(list_of_texts)``, returning
            ``input_ids``).
        texts: the texts of one side of a corpus.
        prefix: text prepended to every input by the encoder (e5: ``"query: "``); it counts
            towards the length, as it does in the model.
        max_lengths: lengths to report; a text is *truncated* at ``L`` when its full input
            (prefix and special tokens included) is longer than ``L`` tokens.
        batch_size: texts per tokenizer call.

    Returns:
        ``{"n_texts", "words", "pieces", "pieces_per_word", "mean_tokens", "median_tokens",
        "max_tokens", "truncated": {L: fraction}}``; ``pieces`` counts the content pieces of
        the texts alone (no prefix, no special tokens), ``words`` the words
        (:func:`count_words`).
        An empty ``texts`` gives zeros.
    """
    lengths = sorted({int(x) for x in max_lengths})
    if any(x < 1 for x in lengths):
        raise ValueError(f"max_lengths must be >= 1, got {lengths}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    full: list[int] = []
    pieces = 0
    for s in range(0, len(texts), batch_size):
        chunk = texts[s : s + batch_size]
        full += [len(x) for x in tokenizer([prefix + t for t in chunk])["input_ids"]]
        pieces += sum(len(x) for x in
                      tokenizer(chunk, add_special_tokens=False)["input_ids"])
    words = sum(count_words(t) for t in texts)
    n = np.asarray(full, dtype=np.int64)
    return {
        "n_texts": len(texts),
        "words": words,
        "pieces": pieces,
        "pieces_per_word": pieces / words if words else 0.0,
        "mean_tokens": float(n.mean()) if n.size else 0.0,
        "median_tokens": float(np.median(n)) if n.size else 0.0,
        "max_tokens": int(n.max()) if n.size else 0,
        "truncated": {L: float((n > L).mean()) if n.size else 0.0 for L in lengths},
    }
