"""The CPU backend: every fast path that only a CPU run takes.

- :mod:`.blas`: the preload (the C kernels and an optimised BLAS in the global symbol scope before MLX), the
  kernels' ctypes signatures, their counters, errors (:class:`.blas.KernelError`) and the generation bracket.
- :mod:`.cache`: host-memory KV caches the C kernels attend (same interface as :mod:`core.cache`).
- :mod:`.linear`: the decoder's few-row ``Linear`` that follows the BLAS in use.
- :mod:`.quantized`: the decoder's quantized ``Linear`` (MLX's 4/8-bit layout) whose few-row products run in the
  kernels; :mod:`.host_step`: a quantized decoder's one-position step through every layer in host memory.
- :mod:`.encodec_numpy`: EnCodec's ELU and LSTM recurrence in NumPy; :mod:`.fast_ops`: fused GELU and layer norm.

The model never imports these directly (but for the fused ops, which are plain MLX): :mod:`core.backend` is the
one place that asks which device runs and hands the model what this package offers. A Metal run never imports
anything below this package except through :func:`core.preload_backend`. Nothing here imports MLX at package
import, so the preload can run before it.
"""
