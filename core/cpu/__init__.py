"""The CPU backend: every fast path that only a Linux CPU run takes (BLAS preload, C kernels, host caches, fused
ops). A Metal run never imports anything below this package except through :func:`core.preload_backend`."""
