"""The contract suite's own tables are consistent (a typo in a kind or a feature would make a
skip, an xfail or a tolerance silently never apply)."""

from __future__ import annotations

import pytest
import torch

from tests.backends import contract
from tests.backends.contract import KINDS, KNOWN_BUGS, SKIPS, TOL, Backend, require, thin

QUANTITIES = ("value", "potential", "err", "grad")


def test_every_table_names_known_kinds() -> None:
    for feature, kinds in SKIPS.items():
        assert set(kinds) <= set(KINDS), (feature, set(kinds) - set(KINDS))
        assert all(reason.strip() for reason in kinds.values()), feature
    for kind, key in KNOWN_BUGS:
        assert kind in KINDS and key, (kind, key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_has_every_compared_quantity(dtype: torch.dtype) -> None:
    for quantity in QUANTITIES:
        rtol, atol = TOL[(dtype, quantity)]
        assert 0 <= rtol < 0.1 and 0 <= atol < 0.1 and rtol + atol > 0, (dtype, quantity)
    assert dtype in contract.SOLVE_TOL


def test_require_and_thin_skip_only_listed_kinds() -> None:
    listed = Backend("torch", "cpu", "torch")
    other = Backend("cpu", "cpu", "cpu")
    with pytest.raises(pytest.skip.Exception, match="oracle compared with itself"):
        require(listed, "vs-oracle")
    require(other, "vs-oracle")  # no skip
    interp = Backend("triton", "cpu", "triton-interp")
    thin(interp, "reduced-grid", True)  # kept
    with pytest.raises(pytest.skip.Exception, match="Triton interpreter budget"):
        thin(interp, "reduced-grid", False)
    thin(other, "reduced-grid", False)  # every other kind runs every case
