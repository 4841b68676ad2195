"""The BLAS preload (core.cpu.blas): every choice, with and without the skinny kernel in front, computes the same
products as the reference BLAS alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.cpu.blas import LIBRARIES, cpu_flags, openblas_core_type

PROBE = """
import json, numpy as np
{first}
import core
core.preload_backend()
import mlx.core as mx
rng = np.random.default_rng(0)
out = {{}}
for m, k, n in [(1, 64, 200), (2, 1024, 3072), (8, 4096, 1024), (9, 512, 1024), (37, 300, 53)]:
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    out[f"{{m}}x{{k}}x{{n}}"] = np.array(mx.array(a) @ mx.array(w).T).tolist()
    out[f"{{m}}x{{k}}x{{n}} W^T"] = np.array(mx.array(a) @ mx.array(w.T.copy())).tolist()
q, k = rng.standard_normal((3, 4, 1, 16)).astype(np.float32), rng.standard_normal((3, 4, 50, 16)).astype(np.float32)
out["attention"] = np.array(mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(k),
                                                                  scale=0.25)).tolist()
from core.cpu.linear import FewRowLinear as Linear
import os
print(json.dumps({{"blas": core.cpu.blas.active_blas, "transposed_rows": Linear.transposed_rows, "products": out,
                  "coretype": os.environ.get("OPENBLAS_CORETYPE")}}))
"""


def run_probe(choice: str, first: str = "", skinny: str = "on", **environ: str) -> dict:
    env = dict(os.environ, MUSICGEN_BLAS=choice, MUSICGEN_SKINNY_GEMM=skinny, **environ)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def installed(name: str) -> bool:
    return any(os.path.exists(p) for p in LIBRARIES[name])


@pytest.fixture(scope="module")
def reference() -> dict:
    result = run_probe("reference")
    assert result["blas"].startswith("reference BLAS")
    return result


@pytest.mark.parametrize("skinny", ["on", "off"])
@pytest.mark.parametrize("choice", ["blis", "openblas"])
def test_fast_blas_matches_reference(choice, skinny, reference):
    if sys.platform.startswith("linux") and not installed(choice):
        pytest.fail(f"{choice} is not installed: .ci/run installs it (apt-get install "
                    f"{'libblis4-pthread' if choice == 'blis' else 'libopenblas0-pthread'})")
    result = run_probe(choice, skinny=skinny)
    kernel, _, library = result["blas"].rpartition(" + ")
    assert library.startswith(f"{choice} ("), result["blas"]
    assert kernel.startswith("skinny kernel (") if skinny == "on" else kernel == "", result["blas"]
    # the decoder's projections take W @ xᵀ only where that BLAS streams weights faster so: BLIS past the kernel
    expected_rows = None if choice == "openblas" else [17 if skinny == "on" else 4, 64]
    assert result["transposed_rows"] == expected_rows
    import numpy as np

    for shape, product in result["products"].items():
        expected = np.array(reference["products"][shape])
        np.testing.assert_allclose(np.array(product), expected, rtol=1e-4, atol=1e-3, err_msg=shape)


def test_auto_prefers_openblas_and_reports_late_import():
    kernel, _, library = run_probe("auto")["blas"].rpartition(" + ")
    assert kernel.startswith("skinny kernel (") and library.startswith("openblas ("), (kernel, library)
    late = run_probe("auto", first="import mlx.core")
    assert "too late" in late["blas"]


def test_openblas_core_type_follows_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512cd "
                       "avx512bw avx512dq avx512vl\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(str(cpuinfo))
    assert {"avx2", "avx512vl"} <= flags and "flags" not in flags
    assert openblas_core_type(flags, "x86_64") == "SkylakeX"
    assert openblas_core_type(flags - {"avx512bw"}, "x86_64") == "Haswell"  # AVX-512 without its integer half
    assert openblas_core_type({"sse2", "avx", "avx2"}, "x86_64") is None  # no FMA: OpenBLAS decides
    assert openblas_core_type(flags, "aarch64") is None
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_openblas_takes_kernels_for_this_cpu():
    """Debian's OpenBLAS falls back to SSE3 kernels on CPUs newer than it: the preload names the kernels from the
    CPU's flags while OpenBLAS loads (and only then: the variable is gone after), and a user's choice stands."""
    if not installed("openblas"):
        pytest.fail("openblas is not installed: .ci/run installs it (apt-get install libopenblas0-pthread)")
    expected = openblas_core_type(cpu_flags(), os.uname().machine)
    result = run_probe("openblas")
    assert result["coretype"] is None
    if expected is not None:
        assert result["blas"].endswith(f", {expected} kernels)"), result["blas"]
    else:
        assert result["blas"].endswith(" kernels)"), result["blas"]
    chosen = run_probe("openblas", OPENBLAS_CORETYPE="Prescott")
    assert chosen["blas"].endswith(", Prescott kernels)") and chosen["coretype"] == "Prescott", chosen["blas"]
