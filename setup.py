"""Builds the one C file of the package: the few-row ``cblas_sgemm`` that core.blas puts in front of the BLAS
on Linux (see core/_skinny_gemm.c). Everything else is configured in pyproject.toml."""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    # optional: without a C compiler the package still installs and MLX uses the BLAS alone
    extensions.append(Extension("core._skinny_gemm", ["core/_skinny_gemm.c"], extra_compile_args=["-O3", "-Wno-psabi"],
                                libraries=["pthread", "dl"], optional=True))

setup(ext_modules=extensions)
