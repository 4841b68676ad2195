"""One side of the benchmark, run in its own process so its peak memory is its own.

``python -m bench.worker ours|transformers MODEL_DIR [options]`` prints one JSON object with the timings.
The driver (``python -m bench``) runs both sides and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings

PROMPT = "warm synthwave with a driving bassline"


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args) -> dict:
    import core

    backend = core.preload_backend()  # before mlx: the CPU kernels and a fast BLAS
    import mlx.core as mx
    import numpy as np

    start = time.perf_counter()
    model = core.MusicGen.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    frames = model.frames_for(args.seconds)
    result: dict = {"side": "ours", "blas": backend, "dtype": args.dtype, "quantize": args.quantize,
                    "load_s": time.perf_counter() - start, "load_peak_rss_mib": peak_rss_mib()}

    def encode():
        ids, mask = model.tokenizer([PROMPT])
        mx.eval(model.text_encoder(mx.array(ids), mx.array(mask)))

    result["t5_ms"] = 1000 * median_time(encode, args.repeats)

    step_times: list[float] = []

    def on_progress(step, total):
        step_times.append(time.perf_counter())

    def tokens():
        step_times.clear()
        model.generate_tokens(PROMPT, frames, seed=0, on_progress=on_progress)

    tokens()
    intervals = np.diff(step_times[1:])  # the first step also runs the prompt's cross-attention set-up
    result["step_ms"] = 1000 * float(np.median(intervals))

    codes = np.random.default_rng(0).integers(0, 2048, size=(model.num_codebooks, frames))
    result["encodec_decode_ms"] = 1000 * median_time(lambda: model.decode_tokens(codes), args.repeats)
    result["end_to_end_s"] = median_time(lambda: model.generate(PROMPT, args.seconds, seed=0), max(1, args.repeats - 2))

    result["peak_rss_mib"] = peak_rss_mib()  # one clip at a time, as transformers is measured
    if args.batch_sizes:
        table = []
        for n in args.batch_sizes:
            requests = [core.GenerationRequest(f"{PROMPT} #{i}", args.seconds, seed=i) for i in range(n)]
            start = time.perf_counter()
            model.generate_batch(requests)
            batched = time.perf_counter() - start
            sequential = None
            if not args.batched_only:
                start = time.perf_counter()
                for request in requests:
                    model.generate_batch([request])
                sequential = time.perf_counter() - start
            table.append({"n": n, "batched_s": batched, "sequential_s": sequential})
        result["batches"] = table
        result["batch_peak_rss_mib"] = peak_rss_mib()
    result["step_bytes"] = decoder_step_bytes(model)
    result["read_gbps"] = read_bandwidth_gbps(args.threads)
    result["bound_ms"] = 1000 * result["step_bytes"] / (result["read_gbps"] * 1e9)
    return result


def decoder_step_bytes(model) -> int:
    """Bytes of weights one decoder step must read: every decoder weight but the embedding tables (one row each is
    read) and the cross-attention K/V projections (computed once per generation)."""
    from mlx.utils import tree_flatten

    skipped = ("embed_tokens", "encoder_attn.k_proj", "encoder_attn.v_proj")
    return sum(v.nbytes for k, v in tree_flatten(model.decoder.parameters()) if not any(s in k for s in skipped))


def read_bandwidth_gbps(threads: int) -> float:
    """Memory read bandwidth of this machine: ``threads`` threads summing their share of 1 GiB with NumPy
    (which releases the GIL), best of 5."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = [np.ones(2**28 // threads, dtype=np.float32) for _ in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return sum(p.nbytes for p in parts) / best / 1e9


def run_transformers(args) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoTokenizer,
        LogitsProcessor,
        LogitsProcessorList,
        MusicgenForConditionalGeneration,
    )

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = MusicgenForConditionalGeneration.from_pretrained(args.model).eval()
    if args.int8:  # what a CPU user of transformers runs today: dynamic int8 on every nn.Linear
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of torchao
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    inputs = tokenizer([PROMPT], return_tensors="pt", padding=True)
    num_codebooks = model.decoder.num_codebooks
    delays = num_codebooks // model.decoder.config.audio_channels - 1
    frames = round(args.seconds * model.config.audio_encoder.frame_rate)
    result: dict = {"side": "transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "int8": args.int8, "load_s": load_s}

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's dynamically quantized layers warn (deprecated) on every call
        result["t5_ms"] = 1000 * median_time(lambda: model.text_encoder(**inputs), args.repeats)

        class StepClock(LogitsProcessor):
            """Called once per decoder step with that step's logits: records when."""

            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        clock = StepClock()
        model.generate(**inputs, do_sample=True, top_k=250, guidance_scale=3.0, max_new_tokens=frames + delays,
                       logits_processor=LogitsProcessorList([clock]))
        result["step_ms"] = 1000 * float(np.median(np.diff(clock.times[1:])))

        codes = torch.randint(0, 2048, (1, 1, num_codebooks, frames))
        if model.decoder.config.audio_channels == 1:
            decode = lambda: model.audio_encoder.decode(codes, [None])  # noqa: E731
        else:
            decode = lambda: (model.audio_encoder.decode(codes[:, :, ::2], [None]),  # noqa: E731
                              model.audio_encoder.decode(codes[:, :, 1::2], [None]))
        result["encodec_decode_ms"] = 1000 * median_time(decode, args.repeats)
        result["end_to_end_s"] = median_time(
            lambda: model.generate(**inputs, do_sample=True, top_k=250, guidance_scale=3.0,
                                   max_new_tokens=frames + delays),
            max(1, args.repeats - 2))
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["ours", "transformers"])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=lambda s: [int(n) for n in s.split(",") if n], default=[])
    parser.add_argument("--batched-only", action="store_true", help="time the batches only, not one after another")
    parser.add_argument("--int8", action="store_true", help="transformers: torch dynamic int8 on every nn.Linear")
    args = parser.parse_args()
    result = run_ours(args) if args.side == "ours" else run_transformers(args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
