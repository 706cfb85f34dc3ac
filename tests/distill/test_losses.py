"""The sentence-transformers losses: OPTICALLoss (OT, OT+KD) and TeacherKDLoss (MSE, cosine,
in-batch contrastive) against their definitions, masks, other tokenizers, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import optical_kernels as ok
from optical_kernels.integrations.sentence_transformers import (
    OPTICALLoss,
    TeacherKDLoss,
    content_mask,
)

OT = {"max_iter": 50, "tol": 1e-4}


def _features(model, texts, prompt=None):
    return dict(model.preprocess(texts, prompt=prompt) if prompt else model.preprocess(texts))


def _batch(models, pairs):
    student, teacher = models
    return [_features(student, [p[0] for p in pairs]), _features(student, [p[1] for p in pairs])]


def test_content_mask_drops_special_padding_and_prompt_tokens(models):
    student, _ = models
    feats = _features(student, ["dog eht", "dog eht ni gninnigeb"])
    mask = content_mask(feats, student.tokenizer)
    assert mask.tolist() == [[False, True, True, False, False, False],
                             [False, True, True, True, True, False]]
    feats = _features(student, ["dog eht"], prompt="ni ")
    assert feats["prompt_length"] == 2  # [CLS] ni
    assert content_mask(feats, student.tokenizer).tolist() == [[False, False, True, True, False]]


def test_optical_loss_is_sinkhorn_loss_between_content_tokens(models, pairs):
    student, teacher = models
    feats = _batch(models, pairs[:6])
    loss = OPTICALLoss(student, teacher, eps=0.1, cost="sqeuclidean", **OT)
    got = loss(feats, None)
    x = student(dict(feats[0]))["token_embeddings"]
    with torch.no_grad():
        y = teacher(dict(feats[1]))["token_embeddings"]
    want = ok.sinkhorn_loss(x, y, x_mask=content_mask(feats[0], student.tokenizer),
                            y_mask=content_mask(feats[1], teacher.tokenizer), eps=0.1,
                            cost="sqeuclidean", **OT)
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())  # frozen teacher
    assert any(p.grad is not None for p in student.parameters())
    cfg = loss.get_config_dict()
    assert {"cost", "eps", "objective", "grad", "rho", "max_iter", "tol", "check_every",
            "eps_schedule", "backend", "kd_weight"} <= set(cfg)


def test_ot_plus_kd_adds_the_weighted_mse(models, pairs):
    student, teacher = models
    feats = _batch(models, pairs[:4])
    ot = OPTICALLoss(student, teacher, **OT)(feats, None)
    both = OPTICALLoss(student, teacher, kd_weight=0.5, **OT)(feats, None)
    s = student(dict(feats[0]))["sentence_embedding"]
    t = teacher(dict(feats[1]))["sentence_embedding"]
    torch.testing.assert_close(both, ot + 0.5 * F.mse_loss(s, t))


def test_teacher_kd_losses_match_their_definitions(models, pairs):
    student, teacher = models
    feats = _batch(models, pairs[:5])
    s = student(dict(feats[0]))["sentence_embedding"]
    t = teacher(dict(feats[1]))["sentence_embedding"]
    torch.testing.assert_close(TeacherKDLoss(student, teacher, "mse")(feats, None),
                               F.mse_loss(s, t))
    torch.testing.assert_close(TeacherKDLoss(student, teacher, "cosine")(feats, None),
                               (1 - F.cosine_similarity(s, t)).mean())
    logits = 20.0 * F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T
    torch.testing.assert_close(TeacherKDLoss(student, teacher, "contrastive")(feats, None),
                               F.cross_entropy(logits, torch.arange(5)))


def test_teacher_with_another_tokenizer_gets_the_raw_text(models, pairs, tmp_path, toy_mod):
    """A teacher whose vocabulary differs: the English column is decoded and re-tokenized."""
    from transformers import BertTokenizer

    student, teacher = models
    vocab = list(toy_mod.toy_tokenizer().get_vocab())
    shuffled = vocab[:5] + vocab[5:][::-1]  # same words, other ids
    other = toy_mod.toy_st(tmp_path / "other", seed=3,
                           tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(shuffled)}))
    english = [p[1] for p in pairs[:4]]
    loss = OPTICALLoss(student, other.requires_grad_(False), **OT)
    assert not loss._reuse_ids
    feats = _batch(models, pairs[:4])
    got = loss.teacher_features(feats[1])
    want = other.preprocess(english)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert not torch.equal(got["input_ids"], feats[1]["input_ids"])
    assert OPTICALLoss(student, teacher, **OT)._reuse_ids  # same vocabulary: ids reused
    assert torch.isfinite(loss(feats, None))


def test_argument_errors(models, pairs, toy_mod, tmp_path):
    student, teacher = models
    with pytest.raises(TypeError, match="teacher must be a SentenceTransformer"):
        OPTICALLoss(student, teacher[0])
    with pytest.raises(ValueError, match="kd_weight must be a number >= 0"):
        OPTICALLoss(student, teacher, kd_weight=-1)
    with pytest.raises(ValueError, match="kind must be one of"):
        TeacherKDLoss(student, teacher, "l1")
    narrow = toy_mod.toy_st(tmp_path / "narrow", seed=2, hidden=16)
    with pytest.raises(ValueError, match="16 features but the teacher's have 32"):
        OPTICALLoss(narrow, teacher)
    feats = _batch(models, pairs[:2])
    with pytest.raises(ValueError, match="expects 2 text columns"):
        OPTICALLoss(student, teacher)([*feats, feats[0]], None)


def test_empty_sentence_contributes_zero_not_nan(models):
    student, teacher = models
    feats = [_features(student, ["dog eht", "ni"]), _features(student, ["god the", "in"])]
    feats[0]["input_ids"][1, 1] = 0  # a foreign sentence with only special tokens
    feats[0]["attention_mask"][1, 1:] = 0
    loss = OPTICALLoss(student, teacher, **OT)(feats, None)
    assert torch.isfinite(loss)


def test_import_optical_kernels_does_not_import_sentence_transformers():
    code = ("import sys, optical_kernels, optical_kernels.integrations as i; "
            "print('sentence_transformers' in sys.modules, 'OPTICALLoss' in i.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True"]


def _maxsim_reference(x, y, xm, ym, t):
    """Loop over pairs on the content tokens only (BERTScore-style soft P/R)."""
    out = []
    for b in range(x.shape[0]):
        xs, ys = x[b][xm[b]], y[b][ym[b]]
        if len(xs) == 0 or len(ys) == 0:
            out.append(x.new_zeros(()))
            continue
        s = F.normalize(xs, dim=-1) @ F.normalize(ys, dim=-1).T
        p = (torch.softmax(s / t, dim=1) * s).sum(1).mean()
        r = (torch.softmax(s / t, dim=0) * s).sum(0).mean()
        out.append(1 - (p + r) / 2)
    return torch.stack(out).mean()


def test_soft_maxsim_loss_matches_its_definition_on_content_tokens(models, pairs):
    from optical_kernels.integrations.sentence_transformers import SoftMaxSimLoss

    student, teacher = models
    feats = _batch(models, pairs[:6])
    feats[0]["input_ids"][2, 1] = 0  # one sentence with a single content token fewer
    loss = SoftMaxSimLoss(student, teacher, temperature=0.1)
    got = loss(feats, None)
    x = student(dict(feats[0]))["token_embeddings"]
    with torch.no_grad():
        y = teacher(dict(feats[1]))["token_embeddings"]
    want = _maxsim_reference(x, y, content_mask(feats[0], student.tokenizer),
                             content_mask(feats[1], teacher.tokenizer), 0.1)
    torch.testing.assert_close(got, want)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="temperature"):
        SoftMaxSimLoss(student, teacher, temperature=0)


def test_soft_maxsim_empty_sentence_contributes_zero_not_nan(models):
    from optical_kernels.integrations.sentence_transformers import SoftMaxSimLoss

    student, teacher = models
    feats = [_features(student, ["dog eht", "ni"]), _features(student, ["god the", "in"])]
    feats[0]["attention_mask"][1, 1:] = 0  # only special tokens left in the second sentence
    loss = SoftMaxSimLoss(student, teacher)(feats, None)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
