"""A tiny random BERT pair and a toy bitext, for the distillation tests (no download).

The "foreign" language spells every English word backwards; both sides share one WordPiece
vocabulary. Load this file by path (``load_toy()``) so that the tests and the torchrun worker
import the same code whatever the test package layout.
"""

from __future__ import annotations

import random

import torch
from transformers import BertConfig, BertModel, BertTokenizer

WORDS = (
    "in the beginning god created heaven and earth was without form void darkness upon face "
    "of deep spirit moved waters said let there be light saw that it good divided from day "
    "night evening morning first firmament midst"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_tokenizer() -> BertTokenizer:
    vocab = SPECIALS + sorted(set(WORDS) | {w[::-1] for w in WORDS})
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_bert(
    seed: int = 0, dropout: float = 0.0, vocab_size: int = 128, hidden: int = 32
) -> BertModel:
    """Random ``BertModel``: hidden 32, 2 layers, 2 heads."""
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    return BertModel(cfg).eval()


def toy_pairs(n: int = 48, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (foreign, english) pairs of 2..9 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        out.append((" ".join(w[::-1] for w in words), " ".join(words)))
    return out


def toy_encoders(student_seed: int = 1, dropout: float = 0.0, student_hidden: int = 32):
    """``(student, teacher)`` :class:`Encoder` pair on the toy tokenizer.

    A student narrower than the teacher (hidden 32) gets a projection to 32 features.
    """
    from optical_kernels.distill.evaluate import Encoder

    tok = toy_tokenizer()
    teacher = Encoder(tiny_bert(0), tok, max_length=16)
    torch.manual_seed(student_seed)
    student = Encoder(
        tiny_bert(student_seed, dropout, hidden=student_hidden), tok, max_length=16, out_dim=32
    )
    return student, teacher
