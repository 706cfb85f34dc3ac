"""Backend registry: lazy import, availability, and the ``auto`` choice (docs/design.md §5)."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType

# ``torch`` under another name: importing the submodule optical_kernels.backends.torch (the
# oracle backend) sets the package attribute ``torch``, i.e. this module's global of that name.
import torch as _torch

from . import contract

BACKENDS = ("torch", "cpu", "triton", "cuda", "online")
_MODULES = {
    "torch": "optical_kernels.backends.torch",
    "cpu": "optical_kernels.backends.cpu",
    "triton": "optical_kernels.backends.triton",
    "cuda": "optical_kernels.backends.cuda",
    "online": "optical_kernels.backends.online",
}
_INSTALL_HINT = {
    "cpu": "build the C++ extension: `pip install -e .` with a C++ compiler (g++/clang) present",
    "triton": "install the `triton` extra (`pip install optical-kernels[triton]`) and use CUDA "
    "tensors (or set TRITON_INTERPRET=1 before importing triton for the CPU interpreter)",
    "cuda": "build with nvcc present (`pip install -e .`, OPTICAL_KERNELS_SKIP_CUDA unset) and "
    "use CUDA tensors on a machine with an NVIDIA GPU",
}
_warned: set[str] = set()


_import_errors: dict[str, str] = {}


_loaded: dict[str, ModuleType | None] = {}


def load(name: str) -> ModuleType | None:
    """The backend module (imported once, then cached), or ``None`` if it cannot be imported.

    A module that imports but does not implement the backend contract raises ``TypeError``
    naming what it lacks (:func:`optical_kernels.backends.contract.check_module`): that is a
    defect of the package, not a missing install, and is never reported as "unavailable"."""
    path = _MODULES[name]  # the cache is keyed by module path (tests swap _MODULES entries)
    if path in _loaded:
        return _loaded[path]
    try:
        mod: ModuleType | None = importlib.import_module(path)
    except ImportError as exc:
        _import_errors[name] = str(exc)
        mod = None
    if mod is not None:
        contract.check_module(mod, path)
    _loaded[path] = mod
    return mod


def status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend."""
    mod = load(name)
    if mod is None:
        return False, (
            f"module {_MODULES[name]} cannot be imported ({_import_errors.get(name, '?')}); "
            f"{_INSTALL_HINT[name]}"
        )
    try:
        ok, why = mod.is_available()
    except Exception as exc:  # a probe must never break the caller
        return False, f"availability check failed: {exc!r}"
    return bool(ok), str(why)


def backends() -> dict[str, dict[str, object]]:
    """Every backend with ``{"available": bool, "reason": str}``.

    Example: ``optical_kernels.backends()["cpu"]["available"]``.
    """
    return {name: dict(zip(("available", "reason"), status(name))) for name in BACKENDS}


def resolve(backend: str, device: _torch.device, dtype: _torch.dtype) -> tuple[str, ModuleType]:
    """Pick the backend for ``backend`` (``auto`` or a name) on ``device``; no size argument.

    ``auto``: CUDA tensors -> ``triton`` (then ``cuda``), CPU tensors -> ``cpu``; falls back to
    ``torch`` with a one-time warning when the preferred backend is unavailable. Set
    ``OPTICAL_KERNELS_QUIET=1`` to silence the warning. An explicitly named backend that is
    unavailable raises ``ValueError`` naming what to install.

    The choice never depends on the problem size, so that ``torch.compile`` can treat it as a
    constant while n and m are symbolic. An ``auto`` pick with a ``MAX_SIZE`` (the resident
    ``cuda`` kernels) is returned as the *route* ``"cuda>torch"``: the custom op decides, on
    the concrete sizes it runs with, whether the problem fits or goes to ``torch``
    (:func:`route`). The module returned is the primary one.
    """
    if backend == "auto":
        prefs = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
        for name in prefs:
            ok, why = status(name)
            if ok and _supports(name, device, dtype):
                mod = load(name)
                if getattr(mod, "MAX_SIZE", None) is not None:
                    return f"{name}>torch", mod  # type: ignore[return-value]
                return name, mod  # type: ignore[return-value]
        _warn_fallback(f"{device.type}:{prefs[0]}", (
            f"backend='auto': {prefs[0]!r} is unavailable for {device.type} tensors "
            f"({status(prefs[0])[1]}); falling back to the pure-PyTorch 'torch' backend"
        ))
        return "torch", load("torch")  # type: ignore[return-value]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    ok, why = status(backend)
    if not ok:
        hint = _INSTALL_HINT.get(backend, "")
        raise ValueError(
            f"backend={backend!r} is not available: {why}"
            + ("" if hint in why else f". To enable it: {hint}")
        )
    if not _supports(backend, device, dtype):
        raise ValueError(
            f"backend={backend!r} does not support {device.type} tensors of dtype {dtype}"
        )
    return backend, load(backend)  # type: ignore[return-value]


def _warn_fallback(key: str, message: str, stacklevel: int = 4) -> None:
    if key not in _warned and not os.environ.get("OPTICAL_KERNELS_QUIET"):
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def resolve_name(backend: str, device_type: str, dtype: _torch.dtype) -> str:
    """Name (or ``"primary>fallback"`` route) of the backend :func:`resolve` picks.

    Independent of the problem size; under ``torch.compile`` the API calls it through
    :mod:`optical_kernels._traced`, which marks it as a constant for tracing.
    """
    return resolve(backend, _torch.device(device_type), dtype)[0]


def route(name: str, n: int, m: int) -> str:
    """The backend that runs a problem of padded sizes ``n``, ``m`` (concrete ints: called
    inside the custom ops): ``name`` itself, or for a route ``"primary>fallback"`` the primary
    when ``max(n, m)`` fits its ``MAX_SIZE`` and the fallback (with a one-time warning)
    otherwise."""
    primary, _, fallback = name.partition(">")
    if not fallback or _fits(primary, max(n, m)):
        return primary
    limit = getattr(load(primary), "MAX_SIZE", None)
    _warn_fallback(f"size:{primary}", (
        f"backend='auto': {primary!r} handles n, m <= {limit} but got n={n}, m={m}; this "
        f"problem runs on the {fallback!r} backend"
    ), stacklevel=2)
    return fallback


def _fits(name: str, max_side: int) -> bool:
    limit = getattr(load(name), "MAX_SIZE", None)
    return limit is None or max_side <= limit


def fuses_cost(name: str) -> bool:
    """Whether backend (or route) ``name`` takes points: its primary provides
    ``forward_sample``/``backward_sample`` (a fallback without them gets the cost materialised
    inside the op, :mod:`optical_kernels.ops`)."""
    return hasattr(load(name.partition(">")[0]), "forward_sample")


def point_cost_backend(name: str) -> ModuleType | None:
    """The module of backend (or route) ``name``'s primary when it computes cost matrices
    from points itself (:class:`~optical_kernels.backends.contract.PointCostBackend`), else
    ``None``."""
    mod = load(name.partition(">")[0])
    return mod if callable(getattr(mod, "point_cost_forward", None)) else None


def _supports(name: str, device: _torch.device, dtype: _torch.dtype) -> bool:
    mod = load(name)
    check = getattr(mod, "supports", None)
    if check is not None:
        return bool(check(device, dtype))
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return True


class _Registry(ModuleType):
    """This package's module type: calling the module is :func:`backends`, so that
    ``optical_kernels.backends()`` (the public function) and ``optical_kernels.backends.cpu``
    (a backend module) are both reachable under the one name."""

    def __call__(self) -> dict[str, dict[str, object]]:
        return backends()


sys.modules[__name__].__class__ = _Registry

