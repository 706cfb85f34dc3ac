"""Data-parallel training through the engine (2 gloo processes under torchrun, accelerate) equals
one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def test_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(HERE / "ddp_worker.py"), str(tmp_path), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())
    ddp_state = torch.load(tmp_path / "state.pt", weights_only=True)

    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    losses, state = ddp_worker.run(tmp_path / "single", grad_accum=1)  # same global batch 8
    assert len(losses) == len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(losses, abs=1e-6, rel=0)
    for k, v in state.items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-5, rtol=1e-5, msg=k)
