"""Fixtures of the distillation tests: tiny random BERT models and a toy bitext (toy.py)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("distill_toy", Path(__file__).with_name("toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


@pytest.fixture(autouse=True)
def _quiet_backend_fallback():
    # backend="auto" warns once that the C++ backend is not built; irrelevant here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="backend='auto'", category=RuntimeWarning)
        yield


@pytest.fixture
def toy_mod():
    return toy


@pytest.fixture
def models(tmp_path):
    """``(student, teacher)``: tiny random ``SentenceTransformer`` models, no dropout."""
    return toy.toy_models(tmp_path / "models")


@pytest.fixture
def pairs():
    return toy.toy_pairs()
