"""torchrun worker of test_ddp.py: train the toy student with the engine; rank 0 writes the
losses and the weights.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT GRAD_ACCUM
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="backend='auto'", category=RuntimeWarning)
_spec = importlib.util.spec_from_file_location("distill_toy", Path(__file__).with_name("toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

from optical_kernels.distill.losses import OTOptions  # noqa: E402
from optical_kernels.distill.trainer import TrainOptions, distill  # noqa: E402

DDP_CONFIG = {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup": 0, "progress": False,
              "loss": "ot+kd", "ckpt_every": 0}


def run(out: Path, grad_accum: int) -> tuple[list[float], dict]:
    rank = int(os.environ.get("RANK", "0"))
    student, teacher = toy.toy_models(out / f"models-{rank}")
    res = distill(student, teacher, toy.toy_pairs(), TrainOptions(grad_accum=grad_accum,
                                                                   **DDP_CONFIG),
                  OTOptions(max_iter=30, tol=1e-3), out_dir=out / "run", resume=None,
                  use_cpu=True)
    return [r["loss"] for r in res.history], student.state_dict()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    losses, state = run(out, accum)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, out / "state.pt")
        (out / "losses.json").write_text(json.dumps(losses))
