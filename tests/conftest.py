"""Shared test configuration: one torch thread keeps the suite fast on the 2-core CI machine."""

import torch

torch.set_num_threads(1)
