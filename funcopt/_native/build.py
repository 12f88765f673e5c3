"""Build the fused CPU kernels' shared library (`python -m funcopt._native.build`).

Standard library only: this runs under pip's build isolation (the hatch
build hook, `hatch_build.py`) as well as from `make venv`. It compiles
`fused_cpu.cc` against the vendored XLA FFI headers (`include/`) with g++
(`$CXX` if set) and returns the library's path, or None when there is no
compiler or the build fails: funcopt then runs its pure JAX path. It never
raises.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "fused_cpu.cc"
LIBRARY = HERE / "_fused_cpu.so"
FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    # only the explicit std::fma calls fuse (torch's rounding, op by op)
    "-ffp-contract=off",
    # lets sqrt vectorise (no errno): same results
    "-fno-math-errno",
    "-w",
]


def compiler() -> str | None:
    """The C++ compiler to use, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build(output: pathlib.Path | str | None = None, quiet: bool = True) -> str | None:
    """Compile the library to `output` (default: next to this file); its
    path, or None (no compiler, unsupported platform, failed build)."""
    try:
        cxx = compiler()
        if cxx is None or sysconfig.get_platform().startswith("win"):
            return None
        out = pathlib.Path(output) if output is not None else LIBRARY
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        cmd = [cxx, *FLAGS, "-I", str(HERE / "include"), str(SOURCE), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            if not quiet:
                sys.stderr.write(done.stderr[-4000:])
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, out)  # atomic: a loaded old library stays valid
        return str(out)
    except Exception as e:  # never fail an install
        if not quiet:
            sys.stderr.write(f"funcopt: native kernels not built: {e}\n")
        return None


def main() -> int:
    path = build(quiet=False)
    if path is None:
        print("funcopt: native fused kernels not built (pure JAX fallback)")
    else:
        print(f"funcopt: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
