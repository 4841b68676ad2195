"""Benchmark: this project's MLX MusicGen against transformers + torch, side by side in one run.

    python -m bench --seconds 5 --shape small            # ours fp32 against transformers fp32, ratios
    python -m bench --modes ours,ours-8,ours-4,transformers,transformers-int8 --rounds 2   # the quantized modes
    python -m bench --dtype float16 --quantize 8         # our other modes (transformers stays fp32)
    python -m bench --batch-sizes 1,2,4,8 --skip-transformers   # batched vs one-after-another throughput

Weights are random but shaped like the real checkpoints (musicgen-small: T5-base, 1024×24 decoder, the real 32 kHz
EnCodec), written once in the Hugging Face format to ``--cache`` so no download is needed. Each side runs in its own
process, so its peak memory (max RSS) is its own. Numbers are medians; the machine is shared and noisy, so with
``--rounds N`` the modes take turns N times (one process each per round) and the table shows each mode's median
over the rounds.

Modes: ``ours`` (``--dtype``, ``--quantize``), ``ours-8`` and ``ours-4`` (8- and 4-bit decoder),
``transformers`` (fp32) and ``transformers-int8`` (torch's dynamic int8 on every ``nn.Linear``, what CPU users of
transformers run for speed). ``--batch-sizes`` applies to the first of ours, and ``ours-8``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# Goals of the performance issue, as ratios ours / transformers (lower is better).
GOALS = {"step_ms": 0.5, "encodec_decode_ms": 1.0, "end_to_end_s": 0.5, "peak_rss_mib": 1.0}
# Goals of the quantization issue (14): (mode, key, against mode, key, ratio at most).
QUANT_GOALS = [("ours-8", "step_ms", "ours", "step_ms", 0.5), ("ours-4", "step_ms", "ours", "step_ms", 0.35),
               ("ours-8", "end_to_end_s", "transformers-int8", "end_to_end_s", 1.0),
               ("ours-8", "peak_rss_mib", "ours", "peak_rss_mib", 0.6),
               ("ours-8", "batch4_s", "ours-8", "end_to_end_s", 1.5)]
ROWS = [("t5_ms", "T5 encode (ms)"), ("step_ms", "decoder step, CFG batch 2 (ms)"),
        ("encodec_decode_ms", "EnCodec decode (ms)"), ("end_to_end_s", "end-to-end clip (s)"),
        ("peak_rss_mib", "peak memory (MiB)"), ("load_peak_rss_mib", "peak memory after loading (MiB)"),
        ("batch4_s", "4 clips batched (s)")]


def build_checkpoint(shape: str, cache: Path) -> Path:
    folder = cache / f"musicgen-{shape}-random"
    if (folder / "model.safetensors").is_file():
        return folder
    print(f"building random musicgen-{shape}-shaped weights in {folder} (once)…", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "tests.tiny_models", str(folder), "--decoder", shape,
                    "--text-encoder", "t5-base", "--codec", "real"], check=True, stdout=subprocess.DEVNULL)
    return folder


def run_side(side: str, folder: Path, args, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "bench.worker", side, str(folder), "--seconds", str(args.seconds),
               "--threads", str(args.threads), "--repeats", str(args.repeats), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               BLIS_NUM_THREADS=str(args.threads))
    env.setdefault("MUSICGEN_GEMM_THREADS", str(args.threads))  # the kernels' default leaves a core to a bot
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def mode_command(mode: str, args, first_ours: bool) -> tuple[str, list[str]]:
    """The worker side and options of one mode."""
    if mode.startswith("transformers"):
        return "transformers", ["--int8"] if mode == "transformers-int8" else []
    quantize = {"ours": args.quantize, "ours-8": 8, "ours-4": 4}[mode]
    extra = ["--dtype", args.dtype] + (["--quantize", str(quantize)] if quantize else [])
    sizes = [n for n in args.batch_sizes.split(",") if n] if first_ours else []
    if mode == "ours-8" and "4" not in sizes:  # the goal: 4 clips batched at 8 bits
        sizes.append("4")
    return "ours", extra + (["--batch-sizes", ",".join(sizes)] if sizes else [])


def median_result(results: list[dict]) -> dict:
    """Each number's median over the rounds (the rest from the first round)."""
    out = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
    for n, row in enumerate(out.get("batches", [])):
        out["batches"][n] = {k: statistics.median(r["batches"][n][k] for r in results) for k in row}
        if row["n"] == 4:
            out["batch4_s"] = out["batches"][n]["batched_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--shape", choices=["small", "medium"], default="small")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    parser.add_argument("--modes", default="ours,transformers",
                        help="comma-separated: ours, ours-8, ours-4, transformers, transformers-int8")
    parser.add_argument("--rounds", type=int, default=1, help="the modes take turns this many times (medians)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="", help="e.g. 1,2,4,8: batched vs sequential throughput")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "musicgen-bench")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--model", type=Path, help="benchmark this checkpoint folder instead of random weights")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m and not (args.skip_transformers and m.startswith("transformers"))]
    unknown = set(modes) - {"ours", "ours-8", "ours-4", "transformers", "transformers-int8"}
    if unknown or not modes:
        parser.error(f"unknown modes {sorted(unknown)}" if unknown else "no modes to run")

    folder = args.model or build_checkpoint(args.shape, args.cache)
    first_ours = next((m for m in modes if m.startswith("ours")), None)
    raw: dict[str, list[dict]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            side, extra = mode_command(mode, args, mode == first_ours)
            print(f"round {round_ + 1}/{args.rounds}: {mode}…", file=sys.stderr)
            raw[mode].append(run_side(side, folder, args, extra))
    results = {m: median_result(r) for m, r in raw.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; threads {args.threads}; "
          f"musicgen-{args.shape} shapes, {args.seconds:g} s clips; medians of {args.rounds} round(s)")
    ours = results.get(first_ours) if first_ours else None
    theirs = results.get("transformers")
    if ours:
        print(f"ours: MLX, {args.dtype}, BLAS {ours['blas']}")
    if theirs:
        print(f"transformers: torch {theirs['torch']}")
    print(f"{'':34}" + "".join(f" {m:>17}" for m in modes))
    for key, label in ROWS:
        if any(key in r for r in results.values()):
            print(f"{label:34}" + "".join(f" {results[m][key]:17.1f}" if key in results[m] else f" {'':>17}"
                                          for m in modes))
    if first_ours == "ours" and theirs:  # the performance issue's goals: ours fp32 / transformers fp32
        for key, goal in GOALS.items():
            ratio = ours[key] / theirs[key]
            print(f"goal {key}: ours / transformers {ratio:.2f} (≤ {goal:g}) {'ok' if ratio <= goal else 'MISS'}")
    for mode, key, base_mode, base_key, goal in QUANT_GOALS:
        if key in results.get(mode, {}) and base_key in results.get(base_mode, {}):
            ratio = results[mode][key] / results[base_mode][base_key]
            print(f"goal {mode} {key} / {base_mode} {base_key}: {ratio:.2f} (≤ {goal:g}) "
                  f"{'ok' if ratio <= goal else 'MISS'}")
    if ours:
        print(f"decoder weights read per step: {ours['step_bytes'] / 1e6:.0f} MB; measured read bandwidth "
              f"{ours['read_gbps']:.1f} GB/s → bound {ours['bound_ms']:.1f} ms/step; ours is "
              f"{ours['step_ms'] / ours['bound_ms']:.2f}× the bound (goal ≤ 3)")
        for row in ours.get("batches", []):
            speedup = row["sequential_s"] / row["batched_s"]
            print(f"batch of {row['n']}: batched {row['batched_s']:.1f} s, one after another "
                  f"{row['sequential_s']:.1f} s, throughput ×{speedup:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"modes": raw, "medians": results}, indent=2))


if __name__ == "__main__":
    main()
