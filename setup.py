"""Builds the one C file of the package on Linux: the CPU kernels core.blas loads (a few-row ``cblas_sgemm`` in
front of the BLAS, and the decoder's step attention; see core/cpu/_cpu_kernels.c). Everything else is configured in
pyproject.toml."""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    # optional: without a C compiler the package still installs and MLX uses the BLAS and its own attention
    extensions.append(Extension("core.cpu._cpu_kernels", ["core/cpu/_cpu_kernels.c"], depends=["core/cpu/_cpu_kernels_simd.h", "core/cpu/_cpu_kernels_int8.h"],
                                extra_compile_args=["-O3", "-Wno-psabi"],
                                libraries=["pthread", "dl"], optional=True))

setup(ext_modules=extensions)
