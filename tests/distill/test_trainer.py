"""Trainer: a step decreases the loss, accumulation, exact resume, checkpoint errors."""

from __future__ import annotations

import math

import pytest
import torch

from optical_kernels.distill.losses import OTOptions
from optical_kernels.distill.trainer import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_student_weights,
    lr_factor,
)

FAST_OT = OTOptions(max_iter=30, tol=1e-3)


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup": 0, "progress": False,
            "ot": FAST_OT}
    base.update(kw)
    return TrainConfig(**base)


def _curve(history, key="loss"):
    return [r[key] for r in history]


@pytest.mark.parametrize("loss", ["ot", "kd", "ot+kd"])
def test_one_step_decreases_the_loss(toy_mod, loss):
    student, teacher = toy_mod.toy_encoders()
    pairs = toy_mod.toy_pairs(8)
    # full batch: every step sees the same 8 pairs, so the logged losses are comparable
    tr = Trainer(student, teacher, pairs, _cfg(loss=loss, steps=2, batch_size=8, lr=3e-3))
    hist = tr.fit()
    assert len(hist) == 2 and all(math.isfinite(r["loss"]) for r in hist)
    assert hist[1]["loss"] < hist[0]["loss"]
    assert ("ot" in hist[0]) == (loss != "kd") and ("kd" in hist[0]) == (loss != "ot")


def test_projection_head_for_a_narrower_student(toy_mod, pairs):
    student, teacher = toy_mod.toy_encoders(student_hidden=16)
    assert student.proj is not None and student.dim == teacher.dim == 32
    hist = Trainer(student, teacher, pairs, _cfg(steps=1)).fit()
    assert math.isfinite(hist[0]["loss"])
    assert student.proj.weight.grad is None  # zeroed after the step (set_to_none)


def test_gradient_accumulation_matches_the_full_batch(toy_mod, pairs):
    runs = []
    for accum in (1, 4):
        student, teacher = toy_mod.toy_encoders()
        tr = Trainer(student, teacher, pairs, _cfg(grad_accum=accum, steps=2))
        runs.append((_curve(tr.fit()), student.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-5, rtol=1e-5)


def test_data_order_covers_each_epoch_and_depends_only_on_the_step(toy_mod, encoders, pairs):
    tr = Trainer(*encoders, pairs, _cfg(batch_size=16))
    epoch = sum((tr.global_batch(s) for s in range(3)), [])  # 48 pairs = 3 steps
    assert sorted(epoch) == list(range(len(pairs)))
    assert tr.global_batch(4) == Trainer(*toy_mod.toy_encoders(), pairs,
                                          _cfg(batch_size=16)).global_batch(4)
    with pytest.raises(ValueError, match="multiple of world_size"):
        Trainer(*encoders, pairs, _cfg(batch_size=6, grad_accum=4))


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 2, 6) for s in range(7)]
    assert f[0] < f[1] < f[2] == 1.0 and f[6] == 0.0
    assert f[3] > f[4] > f[5] > f[6]


def test_resume_is_exact(toy_mod, pairs, tmp_path):
    """Interrupt after step 2 (checkpoint at 2), resume to 4: identical to one run of 4."""
    cfg = dict(steps=4, ckpt_every=2, batch_size=8)

    student, teacher = toy_mod.toy_encoders(dropout=0.1)  # dropout: the RNG must be restored
    full = Trainer(student, teacher, pairs, _cfg(**cfg), out_dir=tmp_path / "full")
    want = _curve(full.fit())
    want_state = student.state_dict()

    student, teacher = toy_mod.toy_encoders(dropout=0.1)
    part = Trainer(student, teacher, pairs, _cfg(**cfg), out_dir=tmp_path / "part")
    real_step = part.train_step

    def interrupted():
        if part.step == 2:
            raise KeyboardInterrupt
        return real_step()

    part.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    ckpt = tmp_path / "part" / CHECKPOINT_NAME
    assert load_checkpoint(ckpt)["step"] == 2
    # atomic writes: no temporary file left behind
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [CHECKPOINT_NAME, "history.json"]

    student, teacher = toy_mod.toy_encoders(student_seed=7, dropout=0.1)  # other init: restored
    resumed = Trainer(student, teacher, pairs, _cfg(**cfg), out_dir=tmp_path / "part")
    got = _curve(resumed.fit(resume="auto"))
    assert got == want  # bit for bit
    for k, v in want_state.items():
        assert torch.equal(student.state_dict()[k], v), k

    fresh, _ = toy_mod.toy_encoders(student_seed=9)
    load_student_weights(fresh, ckpt)  # the final checkpoint (step 4)
    for k, v in want_state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_resume_with_other_options_is_refused(encoders, pairs, tmp_path):
    tr = Trainer(*encoders, pairs, _cfg(steps=1), out_dir=tmp_path)
    tr.fit()
    other = Trainer(*encoders, pairs, _cfg(steps=1, lr=5e-4), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"lr: 0.001 -> 0.0005.*new --out"):
        other.fit(resume="auto")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_ours", "missing"])
def test_corrupt_checkpoint_gives_a_clear_error(encoders, pairs, tmp_path, damage):
    tr = Trainer(*encoders, pairs, _cfg(steps=1), out_dir=tmp_path)
    tr.fit()
    path = tmp_path / CHECKPOINT_NAME
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        match = "corrupt or truncated.*delete it"
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
        match = "corrupt or truncated"
    elif damage == "not_ours":
        torch.save({"weights": torch.zeros(2)}, path)
        match = "not an optical_kernels distillation checkpoint"
    else:
        path.unlink()
        match = "does not exist"
    with pytest.raises(CheckpointError, match=match):
        Trainer(*encoders, pairs, _cfg(steps=1), out_dir=tmp_path).fit(resume=path)


def test_config_validation():
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="l2")
    with pytest.raises(ValueError, match="steps must be an integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    assert TrainConfig(steps=100, warmup=0.1).warmup_steps == 10
    assert TrainConfig(steps=100, warmup=7).warmup_steps == 7


def test_dev_evaluation_is_recorded(encoders, pairs, toy_mod, tmp_path):
    tr = Trainer(*encoders, pairs, _cfg(steps=2, eval_every=1), dev_pairs=toy_mod.toy_pairs(10),
                 out_dir=tmp_path)
    hist = tr.fit()
    assert all("dev" in r for r in hist)
    assert set(hist[0]["dev"]) >= {"p@1", "mrr@10", "r@10"}
    assert (tmp_path / "history.json").is_file()
