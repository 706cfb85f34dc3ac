"""Recipe: the OPTICAL token-level OT loss inside your own PyTorch training loop.

    python python/own_training_loop.py [--steps 5]

The student encodes the foreign sentence, the frozen teacher the English one; the loss is the
entropic-OT cost ``<P, C>`` between their content tokens (special and padding tokens masked).
Everything else is a plain PyTorch loop: swap in your own models, data and optimizer.
Runs offline on CPU (the models come from PyPI wheels, the bitext from the project cache).
"""

from __future__ import annotations

import argparse

import torch

import optical_kernels as ok
from optical_kernels.distill.data import load_bible_split
from optical_kernels.distill.models import load_student, load_teacher, tokenize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    teacher, t_tok = load_teacher()  # frozen: eval mode, requires_grad=False
    student, s_tok = load_student("teacher-copy")
    student.train()
    pairs = load_bible_split("train", limit=args.steps * args.batch_size)  # (foreign, english)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5)

    for step in range(args.steps):
        batch = pairs[step * args.batch_size : (step + 1) * args.batch_size]
        s = tokenize(s_tok, [p.foreign for p in batch], max_length=64)  # + "token_mask"
        t = tokenize(t_tok, [p.english for p in batch], max_length=64)
        with torch.no_grad():
            y = teacher(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        x = student(input_ids=s["input_ids"], attention_mask=s["attention_mask"])
        loss = ok.sinkhorn_loss(
            x.last_hidden_state,  # [B, n, d]  student tokens (foreign)
            y.last_hidden_state,  # [B, m, d]  teacher tokens (English)
            x_mask=s["token_mask"],  # [B, n] True = content token
            y_mask=t["token_mask"],  # [B, m]
            cost="cosine", eps=0.05, objective="linear", grad="auto",  # the OPTICAL loss
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step + 1}: OT loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
