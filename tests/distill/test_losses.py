"""Distillation losses: shapes, masking, the KD baseline, the ot+kd combination."""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
from optical_kernels.distill.evaluate import Encoder
from optical_kernels.distill.losses import DistillLoss, OTOptions, kd_loss, ot_loss
from optical_kernels.distill.models import mean_pool


def _batch(B=3, n=6, m=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, requires_grad=True)
    y = torch.randn(B, m, d, generator=g)
    xm = torch.ones(B, n, dtype=torch.bool)
    ym = torch.ones(B, m, dtype=torch.bool)
    xm[0, 4:] = False
    ym[1, 2:] = False
    return x, y, xm, ym


def test_encoder_token_mask_drops_padding_special_and_prefix_tokens(toy_mod):
    tok = toy_mod.toy_tokenizer()
    enc = Encoder(toy_mod.tiny_bert(), tok, prefix="the ", max_length=16)
    batch = enc.tokenize(["in the beginning", "god"])
    assert batch["token_mask"].tolist() == [
        [False, False, True, True, True, False],  # [CLS] the | in the beginning | [SEP]
        [False, False, True, False, False, False],  # [CLS] the | god | [SEP] [PAD] [PAD]
    ]
    h = enc(batch["input_ids"], batch["attention_mask"])
    assert h.shape == (2, 6, 32)


def test_mean_pool_ignores_padding():
    h = torch.arange(12.0).reshape(1, 4, 3)
    att = torch.tensor([[1, 1, 0, 0]])
    assert torch.allclose(mean_pool(h, att), h[0, :2].mean(0, keepdim=True))
    assert mean_pool(h, torch.zeros(1, 4)).abs().sum() == 0  # no token: zero, not NaN


def test_ot_loss_matches_sinkhorn_loss_and_options_pass_through():
    x, y, xm, ym = _batch()
    opts = OTOptions(eps=0.1, max_iter=50, tol=0.0, cost="sqeuclidean")
    got = ot_loss(x, y, xm, ym, opts)
    want = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, eps=0.1, max_iter=50, tol=0.0,
                            cost="sqeuclidean")
    assert got.shape == ()
    torch.testing.assert_close(got, want)
    assert got.item() != pytest.approx(ot_loss(x, y, xm, ym).item())  # options matter


def test_ot_loss_masked_tokens_get_no_gradient_and_do_not_change_the_value():
    x, y, xm, ym = _batch()
    loss = ot_loss(x, y, xm, ym)
    loss.backward()
    assert x.grad[0, 4:].abs().sum() == 0
    assert x.grad[0, :4].abs().sum() > 0
    # changing masked tokens changes nothing
    x2 = x.detach().clone()
    x2[0, 4:] = 100.0
    y2 = y.clone()
    y2[1, 2:] = -7.0
    torch.testing.assert_close(ot_loss(x2, y2, xm, ym), loss.detach())
    # teacher side is never differentiated
    y3 = y.clone().requires_grad_(True)
    ot_loss(x.detach().requires_grad_(True), y3, xm, ym).backward()
    assert y3.grad is None


def test_kd_loss_is_mse_of_mean_pooled_embeddings():
    x, y, xm, ym = _batch(m=6)
    att = torch.ones(3, 6)
    got = kd_loss(mean_pool(x, att), mean_pool(y, att))
    want = ((x.mean(1) - y.mean(1)) ** 2).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss", ["ot", "kd", "ot+kd"])
def test_distill_loss_combines_terms(loss):
    x, y, xm, ym = _batch(m=6)
    att_x, att_y = xm.long(), ym.long()
    fn = DistillLoss(loss, OTOptions(tol=0.0), kd_weight=0.5)
    total, parts = fn(x, att_x, xm, y, att_y, ym)
    assert total.shape == () and total.requires_grad
    assert set(parts) == {"ot", "kd"} & set(loss.split("+"))
    want = {"ot": parts.get("ot", 0), "kd": parts.get("kd", 0)}
    expected = want["ot"] + (0.5 if loss == "ot+kd" else 1.0) * want["kd"]
    torch.testing.assert_close(total.detach(), torch.as_tensor(expected, dtype=torch.float32))


def test_distill_loss_argument_errors():
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillLoss("mse")
    with pytest.raises(ValueError, match="kd_weight"):
        DistillLoss("ot+kd", kd_weight=-1)
    x, y, xm, ym = _batch()
    with pytest.raises(ValueError, match="projection"):
        DistillLoss("ot")(x, xm, xm, y[..., :4], ym, ym)


def test_bf16_embeddings_are_accepted():
    x, y, xm, ym = _batch()
    loss = ot_loss(x.bfloat16(), y.bfloat16(), xm, ym)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_empty_sentence_contributes_zero_not_nan():
    x, y, xm, ym = _batch()
    xm[2] = False
    loss = ot_loss(x, y, xm, ym)
    loss.backward()
    assert torch.isfinite(loss) and x.grad[2].abs().sum() == 0
