"""Builds the C++ extension `rankfast._C` (top-K selection) with pybind11.

The build needs only setuptools and pybind11 (no torch). A failed build fails
the install; `RANKFAST_SKIP_EXT=1` installs the pure-Python package instead,
where `rankfast.topk` falls back to a slower torch implementation.
"""

import os
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.errors import CompileError


def _compiler_accepts(compiler, flags):
    """Whether `compiler` compiles and links an OpenMP-using program with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:  # noqa: BLE001 - any failure means "no OpenMP here"
            return False
    return True


class BuildExtWithOpenMP(build_ext):
    """Adds OpenMP flags when the compiler supports them; builds serially otherwise."""

    def build_extensions(self):
        omp_flags = ["-fopenmp"]
        if self.compiler.compiler_type == "msvc":
            omp_flags = ["/openmp"]
        has_openmp = _compiler_accepts(self.compiler, omp_flags)
        if not has_openmp:
            print("rankfast: compiler has no OpenMP; the top-K selector will run on one thread")
        for ext in self.extensions:
            if self.compiler.compiler_type != "msvc":
                ext.extra_compile_args += ["-O3"]
            if has_openmp:
                ext.extra_compile_args += omp_flags
                ext.extra_link_args += omp_flags
        try:
            super().build_extensions()
        except CompileError as err:
            raise CompileError(
                f"rankfast: building the C++ extension failed ({err}). "
                "Set RANKFAST_SKIP_EXT=1 to install without it (slower top-K)."
            ) from err


ext_modules = []
if os.environ.get("RANKFAST_SKIP_EXT") != "1":
    ext_modules.append(
        Pybind11Extension(
            "rankfast._C",
            sources=["csrc/topk.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
        )
    )

setup(
    # `kernels/` ships as `rankfast.kernels`; no top-level `kernels` package is installed.
    packages=find_packages(include=["rankfast", "rankfast.*"]) + ["rankfast.kernels"],
    package_dir={"rankfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
