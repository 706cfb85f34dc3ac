"""Shared bitext I/O of the distillation data modules: pairs, TSV files, the cache folder.

:mod:`.data` (the Bible) and :mod:`.data_udhr` (the UDHR) both import from here, so neither
imports the other at module level (``data.build_data`` imports ``data_udhr`` lazily).
Everything here is re-exported by :mod:`.data` for backward compatibility.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

_SPACES = re.compile(r"\s+")


class BitextPair(NamedTuple):
    """One aligned pair: ``foreign`` (student side), ``english`` (teacher side), an ``id``."""

    foreign: str
    english: str
    id: str = ""


# --------------------------------------------------------------------------- cache helpers


def default_cache_dir() -> Path:
    """``$OPTICAL_KERNELS_CACHE`` if set, else ``~/.cache/optical_kernels``."""
    env = os.environ.get("OPTICAL_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "optical_kernels"


def resolve_cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` (``~`` expanded) or :func:`default_cache_dir` when it is ``None``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def clean_text(text: str) -> str:
    """Collapse whitespace (tabs and newlines included) to single spaces and strip."""
    return _SPACES.sub(" ", text).strip()


def write_tsv(path: str | os.PathLike[str], pairs: Iterable[BitextPair]) -> int:
    """Write pairs as ``id\\tforeign\\tenglish`` rows (atomic). Returns the row count."""
    lines = ["# id\tforeign\tenglish"]
    for p in pairs:
        lines.append(f"{clean_text(p.id)}\t{clean_text(p.foreign)}\t{clean_text(p.english)}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(lines) - 1


# --------------------------------------------------------------------------- user bitext


def _fmt_lines(nums: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in nums[:limit])
    return shown + (f", … ({len(nums)} in all)" if len(nums) > limit else "")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not valid UTF-8 (line {line})") from e
    text = text.lstrip("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # final newline
    return [ln.rstrip("\r") for ln in lines]


def read_bitext(
    path: str | os.PathLike[str],
    english_path: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
) -> list[BitextPair]:
    """Load user bitext; bad input raises ``ValueError`` naming the file and line numbers.

    Two forms:

    * ``read_bitext(foreign.txt, english.txt)``: two parallel plain-text files, line ``i`` of
      one aligned with line ``i`` of the other. Both must have the same number of lines and
      no empty (whitespace-only) line. Ids are ``"<line number>"``.
    * ``read_bitext(pairs.tsv)``: one pair per line, ``foreign<TAB>english`` or
      ``id<TAB>foreign<TAB>english``; lines starting with ``#`` are comments (the cache files
      written by :func:`write_tsv` start with one). Every row must have the same number of
      fields (2 or 3) and no empty field.

    ``limit`` keeps the first ``limit`` pairs. Returns ``list[BitextPair]``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"bitext file not found: {p}")
    if english_path is not None:
        q = Path(english_path)
        if not q.is_file():
            raise FileNotFoundError(f"bitext file not found: {q}")
        fl, el = _read_lines(p), _read_lines(q)
        problems = []
        if len(fl) != len(el):
            problems.append(
                f"line counts differ: {p} has {len(fl)} lines, {q} has {len(el)} lines"
                f" (first unmatched line: {min(len(fl), len(el)) + 1})"
            )
        for f, lines in ((p, fl), (q, el)):
            empty = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
            if empty:
                problems.append(f"{f}: empty line(s) at line {_fmt_lines(empty)}")
        if problems:
            raise ValueError("bad bitext input: " + "; ".join(problems))
        pairs = [BitextPair(clean_text(a), clean_text(b), str(i + 1))
                 for i, (a, b) in enumerate(zip(fl, el))]
        return pairs[:limit] if limit is not None else pairs

    lines = _read_lines(p)
    rows: list[tuple[int, list[str]]] = []
    for i, ln in enumerate(lines, 1):
        if ln.startswith("#"):
            continue
        rows.append((i, ln.split("\t")))
    bad_count = [i for i, r in rows if len(r) not in (2, 3)]
    width = next((len(r) for _, r in rows if len(r) in (2, 3)), 2)
    mixed = [i for i, r in rows if len(r) in (2, 3) and len(r) != width]
    empty = [i for i, r in rows if len(r) in (2, 3) and any(not x.strip() for x in r)]
    problems = []
    if bad_count:
        problems.append(
            f"{p}: expected 2 or 3 tab-separated fields (foreign, english or id, foreign, "
            f"english) at line {_fmt_lines(bad_count)}"
        )
    if mixed:
        problems.append(f"{p}: rows with a different field count than the first ({width}) "
                        f"at line {_fmt_lines(mixed)}")
    if empty:
        problems.append(f"{p}: empty field(s) at line {_fmt_lines(empty)}")
    if problems:
        raise ValueError("bad bitext input: " + "; ".join(problems))
    out = []
    for i, r in rows:
        if width == 3:
            out.append(BitextPair(clean_text(r[1]), clean_text(r[2]), r[0].strip()))
        else:
            out.append(BitextPair(clean_text(r[0]), clean_text(r[1]), str(i)))
        if limit is not None and len(out) >= limit:
            break
    return out


def log(progress: bool, msg: str) -> None:
    """Print ``[optical_kernels data] msg`` to stderr when ``progress``."""
    if progress:
        print(f"[optical_kernels data] {msg}", file=sys.stderr, flush=True)
