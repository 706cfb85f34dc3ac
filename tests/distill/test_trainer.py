"""Training on SentenceTransformerTrainer: losses decrease, accumulation, exact resume, export,
checkpoint integrity (SHA-256 manifest), orphaned temporaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optical_kernels.distill.losses import OTOptions
from optical_kernels.distill.trainer import (
    CHECKPOINTS,
    MANIFEST,
    MODEL_DIR,
    CheckpointError,
    TrainOptions,
    checkpoints,
    clean_orphans,
    distill,
    is_disk_full,
    verify_manifest,
)

FAST_OT = OTOptions(max_iter=30, tol=1e-3)


def _cfg(**kw) -> TrainOptions:
    base = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup": 0, "progress": False,
            "ckpt_every": 0}
    base.update(kw)
    return TrainOptions(**base)


def _run(toy_mod, tmp, cfg, pairs, *, seed=1, dropout=0.0, resume=None, **kw):
    student, teacher = toy_mod.toy_models(tmp / "m", student_seed=seed, dropout=dropout)
    res = distill(student, teacher, pairs, cfg, FAST_OT, out_dir=tmp / "run", resume=resume,
                  use_cpu=True, **kw)
    return res, student


@pytest.mark.parametrize("loss", ["ot", "kd", "kd-cosine", "kd-contrastive", "ot+kd"])
def test_training_decreases_the_loss_and_exports_the_model(toy_mod, tmp_path, loss):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    pairs = toy_mod.toy_pairs(8)  # full batch: every step sees the same pairs
    res, student = _run(toy_mod, tmp_path, _cfg(loss=loss, steps=3, lr=3e-3), pairs)
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    out = tmp_path / "run" / MODEL_DIR
    assert res.model_dir == out and (out / "model.safetensors").is_file()
    verify_manifest(out, ["model.safetensors"], must_exist=True)
    emb = SentenceTransformer(str(out), device="cpu").encode(["dog eht"], convert_to_tensor=True)
    torch.testing.assert_close(emb, student.encode(["dog eht"], convert_to_tensor=True))
    assert type(AutoModel.from_pretrained(str(out))).__name__ == "BertModel"
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist["config"]["loss"] == loss and len(hist["history"]) == 3


def test_gradient_accumulation_matches_the_full_batch(toy_mod, tmp_path, pairs):
    runs = []
    for accum in (1, 4):
        res, student = _run(toy_mod, tmp_path / str(accum), _cfg(grad_accum=accum, steps=2),
                            pairs)
        runs.append(([r["loss"] for r in res.history], student.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_batch_size_must_split_over_accumulation(toy_mod, tmp_path, pairs):
    with pytest.raises(ValueError, match="multiple of processes x grad_accum"):
        _run(toy_mod, tmp_path, _cfg(batch_size=6, grad_accum=4), pairs)


def test_resume_reproduces_the_uninterrupted_run(toy_mod, tmp_path, pairs):
    """4 steps with checkpoints at 2 and 4; drop checkpoint-4 (as if killed after step 2) and
    resume from checkpoint-2 with another initialisation: same loss curve, same weights."""
    cfg = _cfg(steps=4, ckpt_every=2, batch_size=8)
    full, student = _run(toy_mod, tmp_path / "a", cfg, pairs, dropout=0.1)
    want = [r["loss"] for r in full.history]
    want_state = {k: v.clone() for k, v in student.state_dict().items()}
    done = checkpoints(tmp_path / "a" / "run")
    assert [p.name for p in done] == ["checkpoint-2", "checkpoint-4"]

    import shutil

    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.rmtree(tmp_path / "b" / "run" / CHECKPOINTS / "checkpoint-4")
    res, student = _run(toy_mod, tmp_path / "b", cfg, pairs, seed=7, dropout=0.1,
                        resume="auto")
    got = [r["loss"] for r in res.history]
    assert got == want  # steps 1-2 from the checkpoint's log, 3-4 recomputed, bit for bit
    for k, v in want_state.items():
        assert torch.equal(student.state_dict()[k], v), k


def _damaged_run(toy_mod, tmp_path, pairs):
    _run(toy_mod, tmp_path, _cfg(steps=2, ckpt_every=1, save_limit=2), pairs)
    return checkpoints(tmp_path / "run")[-1]


@pytest.mark.parametrize("damage", ["flip", "missing_rng", "garbage", "no_manifest"])
def test_damaged_checkpoint_is_a_clear_error_before_loading(toy_mod, tmp_path, pairs, damage):
    ckpt = _damaged_run(toy_mod, tmp_path, pairs)
    if damage == "flip":  # 64 flipped bytes inside the optimizer state
        p = ckpt / "optimizer.pt"
        data = bytearray(p.read_bytes())
        for i in range(64):
            data[len(data) // 2 + i] ^= 0xFF
        p.write_bytes(bytes(data))
        match = r"optimizer\.pt is corrupt: its SHA-256"
    elif damage == "missing_rng":
        (ckpt / "rng_state.pth").unlink()
        match = r"rng_state\.pth is missing"
    elif damage == "garbage":
        (ckpt / "model.safetensors").write_bytes(b"\x00not a checkpoint" * 10)
        match = r"model\.safetensors is corrupt"
    else:
        (ckpt / MANIFEST).unlink()
        match = "has no sha256-manifest.json"
    with pytest.raises(CheckpointError, match=match) as e:
        _run(toy_mod, tmp_path, _cfg(steps=3), pairs, resume=ckpt)
    assert "weights_only" not in str(e.value)


def test_orphaned_temporaries_are_cleaned_at_the_next_start(toy_mod, tmp_path, pairs):
    ckpt = _damaged_run(toy_mod, tmp_path, pairs)
    run = tmp_path / "run"
    half = run / CHECKPOINTS / "checkpoint-9"  # killed mid-save: no manifest
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"x" * 100)
    (run / CHECKPOINTS / "tmp-checkpoint-5").mkdir()
    (run / f".{MODEL_DIR}.123.tmp").mkdir()
    (ckpt / f".{MANIFEST}.77.tmp").write_text("{}")
    gone = clean_orphans(run)
    assert sorted(p.name for p in gone) == [f".{MODEL_DIR}.123.tmp", "checkpoint-9",
                                            "tmp-checkpoint-5"]
    assert not half.exists() and ckpt.is_dir() and not (ckpt / f".{MANIFEST}.77.tmp").exists()
    verify_manifest(ckpt, must_exist=True)  # the complete checkpoint is untouched


def test_disk_full_detection():
    import errno

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:626] . unexpected "
                                     "pos 64 vs 0"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(wrapped)
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


def test_dev_evaluation_is_recorded(toy_mod, tmp_path, pairs):
    res, _ = _run(toy_mod, tmp_path, _cfg(steps=3, eval_every=2, eval_pool=10), pairs,
                  dev_pairs=toy_mod.toy_pairs(10, seed=5))
    dev_steps = [r["step"] for r in res.history if "dev" in r]
    assert dev_steps == [0, 2, 3]  # before training, every 2 steps and at the end
    assert "loss" not in res.history[0] and len(res.history) == 4
    assert set(res.history[-1]["dev"]) >= {"p@1", "mrr@10", "r@10"}


def test_config_validation():
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainOptions(loss="l2")
    with pytest.raises(ValueError, match="steps must be an integer"):
        TrainOptions(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainOptions(lr=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        OTOptions(eps=0)
    with pytest.raises(ValueError, match="eps_schedule must be two numbers"):
        OTOptions(eps_schedule=[1.0])
    assert OTOptions(eps_schedule=[1.0, 0.5]).eps_schedule == (1.0, 0.5)
    assert TrainOptions(steps=100, warmup=0.1).warmup_steps == 10
    assert TrainOptions(steps=100, warmup=7).warmup_steps == 7


def test_resume_with_other_options_is_refused(toy_mod, tmp_path, pairs):
    _run(toy_mod, tmp_path, _cfg(steps=1), pairs)
    with pytest.raises(CheckpointError, match=r"lr: 0.001 -> 0.0005.*new --out"):
        _run(toy_mod, tmp_path, _cfg(steps=1, lr=5e-4), pairs, resume="auto")
    # options that do not change the trajectory may differ
    _run(toy_mod, tmp_path, _cfg(steps=1, eval_pool=7), pairs, resume="auto")
