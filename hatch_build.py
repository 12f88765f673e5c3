"""Hatch build hook: compile funcopt's native fused CPU kernels at install time.

`pip install .` / `pip install -e .` run `funcopt/_native/build.py` (standard
library only, so it works under pip's build isolation, against the vendored
XLA FFI headers). Without a C++ compiler, or if the build fails, the install
still succeeds and funcopt runs its pure JAX path. The library needs no
Python ABI: a wheel that carries it is tagged `py3-none-<platform>`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = pathlib.Path(__file__).resolve().parent
BUILD_SCRIPT = ROOT / "funcopt" / "_native" / "build.py"


def build_native() -> str | None:
    """The built library's path, or None; never raises."""
    try:
        spec = importlib.util.spec_from_file_location(
            "_funcopt_native_build", BUILD_SCRIPT
        )
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build(quiet=False)
    except Exception as e:  # never fail an install
        sys.stderr.write(f"funcopt: native kernels not built: {e}\n")
        return None


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        path = build_native()
        if path is None:
            sys.stderr.write("funcopt: no native kernels; the pure JAX path runs\n")
            return
        if version == "editable":
            return  # the library sits in the source tree the install points to
        build_data.setdefault("force_include", {})[path] = (
            "funcopt/_native/_fused_cpu.so"
        )
        build_data["pure_python"] = False
        try:
            from packaging.tags import sys_tags

            build_data["tag"] = f"py3-none-{next(iter(sys_tags())).platform}"
        except Exception:
            build_data["infer_tag"] = True
