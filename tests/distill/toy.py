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


def toy_st(folder, seed: int = 0, dropout: float = 0.0, max_length: int = 16, tokenizer=None,
           hidden: int = 32):
    """A tiny random BERT as a ``SentenceTransformer`` (Transformer + mean pooling), saved in
    ``folder`` (sentence-transformers builds its Transformer module from a folder)."""
    from pathlib import Path

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    folder = Path(folder)
    tiny_bert(seed, dropout, hidden=hidden).save_pretrained(folder)
    (tokenizer or toy_tokenizer()).save_pretrained(folder)
    body = Transformer(str(folder), max_seq_length=max_length)
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), "mean")],
                               device="cpu")


def toy_models(folder, student_seed: int = 1, dropout: float = 0.0):
    """``(student, teacher)`` toy ``SentenceTransformer`` pair (the teacher frozen)."""
    from pathlib import Path

    folder = Path(folder)
    teacher = toy_st(folder / "teacher", 0).eval().requires_grad_(False)
    student = toy_st(folder / f"student-{student_seed}", student_seed, dropout)
    for m in student.modules():  # the BERT pooler is unused by mean pooling (as models.py)
        if isinstance(getattr(m, "pooler", None), torch.nn.Module):
            m.pooler.requires_grad_(False)
    return student, teacher
