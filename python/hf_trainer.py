"""Recipe: the OT distillation loss in a Hugging Face ``Trainer`` (subclass, no patching).

    python python/hf_trainer.py [--steps 5]

``OTDistillTrainer`` overrides ``compute_loss`` — the documented extension point — to run the
frozen teacher on the English side and return ``sinkhorn_loss`` between the student's and the
teacher's content tokens. The data collator tokenizes both sides; ``remove_unused_columns``
is off because the batch carries the teacher's inputs too. Needs ``accelerate`` (a
requirement of ``transformers.Trainer``).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import optical_kernels as ok
from optical_kernels.distill.data import load_bible_split
from optical_kernels.distill.models import load_student, load_teacher, tokenize


class OTDistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the token-level OT loss against a teacher.

    Args:
        teacher: frozen English encoder (``last_hidden_state`` output).
        ot_kwargs: keyword arguments of :func:`optical_kernels.sinkhorn_loss`
            (``eps``, ``cost``, ``rho``, ``max_iter``, ...).
        All other arguments go to ``transformers.Trainer``.
    """

    def __init__(self, *args, teacher: torch.nn.Module, ot_kwargs: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.teacher = teacher.eval().requires_grad_(False)
        self.ot_kwargs = ot_kwargs or {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x = model(input_ids=inputs["input_ids"],
                  attention_mask=inputs["attention_mask"]).last_hidden_state
        self.teacher.to(x.device)
        with torch.no_grad():
            y = self.teacher(input_ids=inputs["teacher_input_ids"],
                             attention_mask=inputs["teacher_attention_mask"]).last_hidden_state
        loss = ok.sinkhorn_loss(x.float(), y.float(), x_mask=inputs["token_mask"],
                                y_mask=inputs["teacher_token_mask"], **self.ot_kwargs)
        return (loss, {"student_tokens": x}) if return_outputs else loss


class BitextCollator:
    """Tokenizes ``{"foreign", "english"}`` examples for the student and the teacher."""

    def __init__(self, student_tok, teacher_tok, max_length: int = 64):
        self.s_tok, self.t_tok, self.max_length = student_tok, teacher_tok, max_length

    def __call__(self, examples: list[dict]) -> dict:
        s = tokenize(self.s_tok, [e["foreign"] for e in examples], max_length=self.max_length)
        t = tokenize(self.t_tok, [e["english"] for e in examples], max_length=self.max_length)
        return {**s, **{f"teacher_{k}": v for k, v in t.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    teacher, t_tok = load_teacher()
    student, s_tok = load_student("teacher-copy")
    data = [{"foreign": p.foreign, "english": p.english}
            for p in load_bible_split("train", limit=8 * args.steps)]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
            learning_rate=5e-5, warmup_steps=1, logging_steps=1, save_strategy="no",
            report_to=[], remove_unused_columns=False, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = OTDistillTrainer(
            model=student, args=targs, train_dataset=data,
            data_collator=BitextCollator(s_tok, t_tok), teacher=teacher,
            ot_kwargs={"eps": 0.05, "cost": "cosine"},
        )
        result = trainer.train()
    print(f"trained {result.global_step} steps, mean OT loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
