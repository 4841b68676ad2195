"""The backend seam: ``import core`` loads nothing, a late preload warns once, the CPU kernels prove they ran
(counters), refuse a stale build and report errors instead of ending the process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
    assert result.returncode == 0, result.stderr
    return result


def test_import_core_maps_no_new_shared_library():
    code = """
import json, sys
def libraries():
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if ".so" in line.rsplit("/", 1)[-1]}
before = libraries()
import core
after = libraries()
print(json.dumps({"new": sorted(after - before), "mlx": [m for m in sys.modules if m.startswith("mlx")],
                  "numpy": "numpy" in sys.modules}))
"""
    if not Path("/proc/self/maps").exists():
        pytest.fail("this test reads /proc/self/maps (Linux)")
    result = json.loads(run_python(code).stdout)
    assert result == {"new": [], "mlx": [], "numpy": False}


def test_a_model_loaded_after_mlx_came_first_warns_once(tiny_model):
    code = f"""
import warnings
import mlx.core
import core
print(core.preload_backend())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    core.MusicGen.from_pretrained({str(tiny_model)!r})
    core.MusicGen.from_pretrained({str(tiny_model)!r})
print(len(caught), caught[0].category.__name__ if caught else "", caught[0].message if caught else "")
"""
    lines = run_python(code).stdout.splitlines()
    if sys.platform.startswith("linux"):
        assert "too late" in lines[0]
        count, category, message = lines[1].split(" ", 2)
        assert (count, category) == ("1", "RuntimeWarning") and "core.preload_backend()" in message
    else:
        assert lines[1].startswith("0 ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU kernels are a Linux backend")
def test_counters_move_during_a_tiny_generation(tiny_model, caplog):
    """MLX's products and the step attention really go through the C kernels (not only the test's own calls)."""
    from core import MusicGen
    from core.cpu.blas import kernel_counters

    model = MusicGen.from_pretrained(tiny_model)
    before = kernel_counters()
    with caplog.at_level(logging.DEBUG, logger="core.cpu.blas"):
        model.generate("drums", 0.2, seed=1, top_k=1)
    after = kernel_counters()
    steps = model.frames_for(0.2) + model.decoder.config.channel_codebooks - 1
    layers = model.decoder.config.num_hidden_layers
    assert after["attention"] - before["attention"] >= 2 * layers * (steps - 1)  # self + cross, every step
    assert after["products"] - before["products"] >= 6 * layers * (steps - 1)  # q, k, v, out, fc1, fc2
    assert any("CPU kernels during the generation" in r.getMessage() for r in caplog.records)


def test_a_stale_kernel_build_is_refused():
    code = """
import core.cpu.blas as blas
blas.KERNEL_ABI = 999
import core
print(core.preload_backend())
print(blas.cpu_kernels is None)
"""
    result = run_python(code, MUSICGEN_BLAS="auto")
    description, refused = result.stdout.splitlines()
    assert refused == "True" and "skinny kernel" not in description
    assert "stale build" in result.stderr and "999" in result.stderr


def test_a_product_without_a_blas_is_an_error_not_an_abort():
    """Without a BLAS behind it a large product cannot be computed: the process lives on, Python raises."""
    code = """
import ctypes
import numpy as np
from core.cpu import blas
kernel = ctypes.CDLL(str(blas.cpu_kernels_path()), mode=ctypes.RTLD_LOCAL)
kernel.cblas_sgemm.argtypes = blas.SGEMM_ARGTYPES
a, w, out = np.ones((32, 8), np.float32), np.ones((8, 8), np.float32), np.zeros((32, 8), np.float32)
kernel.cblas_sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.TRANS, 32, 8, 8, 1.0, a.ctypes.data, 8, w.ctypes.data, 8,
                   0.0, out.ctypes.data, 8)
blas.cpu_kernels = kernel
try:
    blas.check(0, "products")
except blas.KernelError as e:
    print("raised:", e)
print("alive")
"""
    lines = run_python(code).stdout.splitlines()
    assert lines == ["raised: the CPU kernel's products had no BLAS to hand products to", "alive"]


def test_decoder_layers_never_ask_for_the_device():
    """The decoder and generation ask core.backend, never the device (one place chooses the backend)."""
    for name in ("decoder.py", "generate.py", "pipeline.py", "encodec.py", "cache.py"):
        text = (ROOT / "core" / name).read_text()
        assert "default_device" not in text and "HostKVCache" not in text and "cpu_kernels" not in text, name


def test_the_loader_takes_this_interpreters_build(tmp_path):
    import importlib.machinery

    from core.cpu.blas import cpu_kernels_path

    assert cpu_kernels_path(tmp_path) is None
    other = tmp_path / "_cpu_kernels.cpython-30-x86_64-linux-gnu.so"  # sorts first: a glob took it
    other.write_bytes(b"")
    assert cpu_kernels_path(tmp_path) is None
    ours = tmp_path / f"_cpu_kernels{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    ours.write_bytes(b"")
    assert cpu_kernels_path(tmp_path) == ours
