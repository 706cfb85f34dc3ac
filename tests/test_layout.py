"""The package's structure promises (docs/design.md §5, §6), checked on the source tree.

* ``optical_kernels/ops.py`` is the one custom-op layer: no other module calls
  ``torch.library.custom_op`` / ``register_fake`` / ``register_autograd``;
* a backend module imports neither another backend nor the layers above it (ops, api);
* the registry refuses a module that does not implement the backend contract, naming what is
  missing (:func:`optical_kernels.backends.contract.check_module`), and every shipped backend
  implements it;
* ``optical_kernels.distill`` uses only the public API (``optical_kernels`` names and
  ``optical_kernels.integrations``);
* no backend file is longer than 600 lines.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import contract
from optical_kernels.config import SolverConfig, SolverOut

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "optical_kernels"
BACKENDS = PKG / "backends"
registry = importlib.import_module("optical_kernels.backends")  # ok.backends is a function


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from x import y`` gives x and x.y)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)
    return names


def test_ops_is_the_only_custom_op_layer() -> None:
    calls = ("custom_op", "register_fake", "register_autograd")
    offenders = sorted(
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if p.name != "ops.py" and any(c in p.read_text() for c in calls)
    )
    assert offenders == [], f"custom ops registered outside optical_kernels/ops.py: {offenders}"


_BACKEND_PACKAGES = dict(importlib.import_module("optical_kernels.backends")._MODULES)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in BACKENDS.rglob("*.py") if p.name not in ("contract.py",)
           and p != BACKENDS / "__init__.py"),
    ids=lambda p: str(p.relative_to(BACKENDS)),
)
def test_backend_modules_do_not_import_other_backends_or_upper_layers(path: Path) -> None:
    own = _module_name(path)
    mine = next(m for m in _BACKEND_PACKAGES.values() if own == m or own.startswith(m + "."))
    bad = set()
    for name in _imports(path):
        if name in ("optical_kernels.ops", "optical_kernels.api") or name.startswith(
            ("optical_kernels.ops.", "optical_kernels.api.")
        ):
            bad.add(name)
        for other in _BACKEND_PACKAGES.values():
            if other != mine and (name == other or name.startswith(other + ".")):
                bad.add(name)
    assert not bad, f"{own} imports {sorted(bad)}"


def test_shipped_backends_implement_the_contract() -> None:
    for name, path in _BACKEND_PACKAGES.items():
        mod = registry.load(name)
        if mod is None:  # not importable here (e.g. triton missing): nothing to check
            continue
        contract.check_module(mod, path)
        assert isinstance(mod, contract.Backend), name
    assert not isinstance(registry.load("torch"), contract.FusedBackend)
    assert not isinstance(registry.load("cpu"), contract.FusedBackend)
    assert isinstance(importlib.import_module(_BACKEND_PACKAGES["cuda"]), contract.FusedBackend)


def _fake_backend(**members: object) -> types.ModuleType:
    mod = types.ModuleType("fake_backend")
    for key, value in members.items():
        setattr(mod, key, value)
    return mod


def _fn(*args: object, **kwargs: object) -> None:
    return None


def test_check_module_names_what_is_missing() -> None:
    with pytest.raises(TypeError, match=r"missing backward\(\)"):
        contract.check_module(_fake_backend(forward=_fn, is_available=_fn), "fake")
    with pytest.raises(TypeError, match=r"forward_sample\(\) but not backward_sample\(\)"):
        contract.check_module(
            _fake_backend(forward=_fn, backward=_fn, is_available=_fn, forward_sample=_fn),
            "fake",
        )
    with pytest.raises(TypeError, match="MAX_SIZE"):
        contract.check_module(
            _fake_backend(forward=_fn, backward=_fn, is_available=_fn, MAX_SIZE=0), "fake"
        )
    with pytest.raises(TypeError, match="supports is not callable"):
        contract.check_module(
            _fake_backend(forward=_fn, backward=_fn, is_available=_fn, supports=True), "fake"
        )
    contract.check_module(_fake_backend(forward=_fn, backward=_fn, is_available=_fn), "fake")


def test_registry_refuses_a_module_without_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    path = "tests._fake_backend_without_backward"
    monkeypatch.setitem(sys.modules, path, _fake_backend(forward=_fn, is_available=_fn))
    monkeypatch.setitem(registry._MODULES, "cpu", path)
    with pytest.raises(TypeError, match=r"_fake_backend_without_backward .*missing backward\(\)"):
        registry.load("cpu")


# --------------------------------------------------------------------------- shared helpers
def test_contract_helpers() -> None:
    assert contract.compute_dtype(torch.bfloat16) == torch.float32
    assert contract.compute_dtype(torch.float32, torch.float64) == torch.float64
    assert contract.upcast(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    gv, gl = contract.grad_weights(None, torch.ones(3, 1), 3, torch.float64, torch.device("cpu"))
    assert gv.tolist() == [0.0] * 3 and gl.shape == (3,) and gl.dtype == torch.float64
    cfg = SolverConfig(eps=0.1, max_iter=4, grad="unrolled")
    out = contract.empty_out(2, 3, 5, torch.float32, torch.device("cpu"), cfg)
    assert out.history[0].shape == (4, 2, 3) and out.n_iters.dtype == torch.int32
    assert contract.history(out, cfg, 2, 3, 5, torch.float64)[1].dtype == torch.float64
    assert contract.history(out, SolverConfig(eps=0.1), 2, 3, 5, torch.float64) is None
    bad = SolverOut(*out[:6], history=(torch.zeros(4, 2, 3), torch.zeros(4, 2, 4)))
    with pytest.raises(ValueError, match="out.history must be"):
        contract.history(bad, cfg, 2, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="cost must be one of"):
        contract.check_cost("l1")
    with pytest.raises(ValueError, match="grad must be one of"):
        contract.check_grad(SolverConfig(eps=0.1, grad="autodiff"))
    with pytest.raises(ValueError, match="disagree on B or d"):
        contract.check_points(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


# --------------------------------------------------------------------------- distill
def test_distill_uses_only_the_public_api() -> None:
    public = set(ok.__all__)
    bad = []
    for path in sorted((PKG / "distill").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                bad.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "optical_kernels":
                    bad.extend(f"{path.name}: from optical_kernels import {a.name}"
                               for a in node.names if a.name not in public)
                names = [node.module]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ("optical_kernels", "ok")
                    and node.attr not in public | {"integrations", "distill", "__file__",
                                                   "__version__"}):
                bad.append(f"{path.name}: {node.value.id}.{node.attr}")
            for name in names:
                if name.startswith("optical_kernels.") and not name.startswith(
                    ("optical_kernels.distill", "optical_kernels.integrations")
                ):
                    bad.append(f"{path.name}: {name}")
    assert bad == [], f"distill reaches past the public API: {bad}"


def test_no_backend_file_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in BACKENDS.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}, long
