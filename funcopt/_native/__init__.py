"""The fused CPU optimizer kernels' shared library (`fused_cpu.cc`), if built.

The library holds XLA FFI handlers and no Python code (no Python ABI): it is
loaded with `ctypes` and each handler registered with
`jax.ffi.register_ffi_target` for the CPU platform. `load()` returns the
registered target names, or a string saying why there are none (no compiler
at install time, a library that cannot be loaded); funcopt then runs its pure
JAX path.
Build it with `python -m funcopt._native.build` (`make venv` does).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parent / "_fused_cpu.so"

# handler symbol -> FFI target name
TARGETS = {
    "FuncoptAdam": "funcopt_adam",
    "FuncoptAdamAms": "funcopt_adam_amsgrad",
    "FuncoptSgd": "funcopt_sgd",
    "FuncoptSgdMomentum": "funcopt_sgd_momentum",
    "FuncoptAdamMany": "funcopt_adam_many",
    "FuncoptAdamAmsMany": "funcopt_adam_amsgrad_many",
    "FuncoptSgdMany": "funcopt_sgd_many",
    "FuncoptSgdMomentumMany": "funcopt_sgd_momentum_many",
    "FuncoptAdagradMany": "funcopt_adagrad_many",
    "FuncoptRmspropMany": "funcopt_rmsprop_many",
    "FuncoptRmspropCenteredMany": "funcopt_rmsprop_centered_many",
    "FuncoptRmspropMomentumMany": "funcopt_rmsprop_momentum_many",
    "FuncoptRmspropCenteredMomentumMany": "funcopt_rmsprop_centered_momentum_many",
    "FuncoptAdagrad": "funcopt_adagrad",
    "FuncoptRmsprop": "funcopt_rmsprop",
    "FuncoptRmspropCentered": "funcopt_rmsprop_centered",
    "FuncoptRmspropMomentum": "funcopt_rmsprop_momentum",
    "FuncoptRmspropCenteredMomentum": "funcopt_rmsprop_centered_momentum",
    "FuncoptAdamax": "funcopt_adamax",
    "FuncoptAdadelta": "funcopt_adadelta",
    "FuncoptRadam": "funcopt_radam",
    "FuncoptRprop": "funcopt_rprop",
    "FuncoptNadam": "funcopt_nadam",
    "FuncoptAsgd": "funcopt_asgd",
    "FuncoptPack": "funcopt_pack",
    "FuncoptUnpack": "funcopt_unpack",
}


# FUNCOPT_NATIVE values that select the pure JAX path
_OFF = ("0", "false", "off", "no")


def enabled_by_environment() -> bool:
    """False where `FUNCOPT_NATIVE` is 0/false/off/no: no native code runs."""
    return os.environ.get("FUNCOPT_NATIVE", "1").strip().lower() not in _OFF


def usable() -> bool:
    """The library is loaded and the environment does not turn it off."""
    return enabled_by_environment() and isinstance(load(), tuple)


@functools.cache
def load() -> tuple[str, ...] | str:
    """The registered target names, or a string saying why there are none."""
    if not LIBRARY.exists():
        return f"{LIBRARY.name} not built"
    try:
        import jax

        lib = ctypes.CDLL(str(LIBRARY))
        for symbol, name in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as e:  # a stale or foreign library: the JAX path
        return f"{LIBRARY.name} failed to load: {e}"
    return tuple(TARGETS.values())
