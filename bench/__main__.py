"""Benchmark: this project's MLX MusicGen against transformers + torch, side by side in one run.

    python -m bench --seconds 5 --shape small            # fp32, both sides, ratios
    python -m bench --dtype float16 --quantize 8         # our other modes (transformers stays fp32)
    python -m bench --batch-sizes 1,2,4,8 --skip-transformers   # batched vs one-after-another throughput
    python -m bench --modes ours,ours-8,ours-4,transformers,transformers-int8 --batch-sizes 1,4
                                                         # quantized modes side by side, and their goals

Weights are random but shaped like the real checkpoints (musicgen-small: T5-base, 1024×24 decoder, the real 32 kHz
EnCodec), written once in the Hugging Face format to ``--cache`` so no download is needed. Each side runs in its own
process, so its peak memory (max RSS) is its own. Numbers are medians; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Goals of the performance issue, as ratios ours / transformers (lower is better).
GOALS = {"step_ms": 0.5, "encodec_decode_ms": 1.0, "end_to_end_s": 0.5, "peak_rss_mib": 1.0}
ROWS = [("t5_ms", "T5 encode (ms)"), ("step_ms", "decoder step, CFG batch 2 (ms)"),
        ("encodec_decode_ms", "EnCodec decode (ms)"), ("end_to_end_s", "end-to-end clip (s)"),
        ("peak_rss_mib", "peak memory (MiB)")]


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


# Modes of --modes: the side that runs it and its options.
MODES = {"ours": ("ours", []), "ours-8": ("ours", ["--quantize", "8"]), "ours-4": ("ours", ["--quantize", "4"]),
         "transformers": ("transformers", []), "transformers-int8": ("transformers", ["--int8"])}
MODE_ROWS = [("step_ms", "decoder step, CFG batch 2 (ms)"), ("end_to_end_s", "end-to-end clip (s)"),
             ("peak_rss_mib", "peak memory (MiB)"), ("load_s", "load (s)"), ("t5_ms", "T5 encode (ms)"),
             ("encodec_decode_ms", "EnCodec decode (ms)")]


def quantized_goals(results: dict[str, dict]) -> list[tuple[str, float, float, bool]]:
    """The quantization issue's goals that ``results`` can check: (what, measured, goal, met)."""
    goals = []
    fp32, q8, q4, int8 = (results.get(m) for m in ("ours", "ours-8", "ours-4", "transformers-int8"))
    if fp32 and q8:
        goals.append(("8-bit step / our fp32 step", q8["step_ms"] / fp32["step_ms"], 0.5))
        goals.append(("8-bit peak memory / our fp32", q8["peak_rss_mib"] / fp32["peak_rss_mib"], 0.6))
    if fp32 and q4:
        goals.append(("4-bit step / our fp32 step", q4["step_ms"] / fp32["step_ms"], 0.35))
    if q8 and int8:
        goals.append(("8-bit clip / transformers int8 clip", q8["end_to_end_s"] / int8["end_to_end_s"], 1.0))
    batches = {row["n"]: row["batched_s"] for row in (q8 or {}).get("batches", [])}
    if 1 in batches and 4 in batches:
        goals.append(("8-bit: 4 clips batched / 1 clip", batches[4] / batches[1], 1.5))
    return [(what, value, goal, value <= goal) for what, value, goal in goals]


def run_modes(modes: list[str], folder: Path, args) -> None:
    """Every mode in its own process, one after another; a table of them side by side, and the goals."""
    results = {}
    for mode in modes:
        side, options = MODES[mode]
        extra = list(options)
        if side == "ours":
            extra += ["--dtype", args.dtype]
            if args.batch_sizes:
                extra += ["--batch-sizes", args.batch_sizes, "--batched-only"]
        print(f"running {mode}…", file=sys.stderr)
        results[mode] = run_side(side, folder, args, extra)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; threads {args.threads}; "
          f"musicgen-{args.shape} shapes, {args.seconds:g} s clips; load average at the end "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'':34}" + "".join(f" {mode:>17}" for mode in modes))
    for key, label in MODE_ROWS:
        print(f"{label:34}" + "".join(f" {results[m][key]:17.1f}" for m in modes))
    for mode in modes:
        for row in results[mode].get("batches", []):
            print(f"{mode}: batch of {row['n']} clips: {row['batched_s']:.1f} s")
    for what, value, goal, met in quantized_goals(results):
        print(f"{what:40} {value:6.2f}  goal ≤ {goal:g}  {'ok' if met else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--shape", choices=["small", "medium"], default="small")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="", help="e.g. 1,2,4,8: batched vs sequential throughput")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--modes", help="comma-separated, side by side in one run: " + ", ".join(MODES))
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "musicgen-bench")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--model", type=Path, help="benchmark this checkpoint folder instead of random weights")
    args = parser.parse_args()

    folder = args.model or build_checkpoint(args.shape, args.cache)
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            parser.error(f"unknown mode {unknown[0]!r}: choose from {', '.join(MODES)}")
        run_modes(modes, folder, args)
        return
    extra = ["--dtype", args.dtype] + (["--quantize", str(args.quantize)] if args.quantize else [])
    if args.batch_sizes:
        extra += ["--batch-sizes", args.batch_sizes]
    ours = run_side("ours", folder, args, extra)
    theirs = None if args.skip_transformers else run_side("transformers", folder, args, [])

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; threads {args.threads}; "
          f"musicgen-{args.shape} shapes, {args.seconds:g} s clips")
    mode = args.dtype + (f", {args.quantize}-bit decoder" if args.quantize else "")
    print(f"ours: MLX, {mode}, BLAS {ours['blas']}" + (f"; transformers: torch {theirs['torch']} fp32"
                                                      if theirs else ""))
    header = f"{'':34} {'ours':>10}" + (f" {'transformers':>13} {'ratio':>7} {'goal':>6}" if theirs else "")
    print(header)
    for key, label in ROWS:
        line = f"{label:34} {ours[key]:10.1f}"
        if theirs:
            ratio = ours[key] / theirs[key]
            goal = GOALS.get(key)
            mark = "" if goal is None else ("  ok" if ratio <= goal else "  MISS")
            line += f" {theirs[key]:13.1f} {ratio:7.2f} {'' if goal is None else f'≤{goal:g}':>6}{mark}"
        print(line)
    print(f"decoder weights read per step: {ours['step_bytes'] / 1e6:.0f} MB; measured read bandwidth "
          f"{ours['read_gbps']:.1f} GB/s → bound {ours['bound_ms']:.1f} ms/step; ours is "
          f"{ours['step_ms'] / ours['bound_ms']:.2f}× the bound (goal ≤ 3)")
    for row in ours.get("batches", []):
        speedup = row["sequential_s"] / row["batched_s"]
        print(f"batch of {row['n']}: batched {row['batched_s']:.1f} s, one after another {row['sequential_s']:.1f} s, "
              f"throughput ×{speedup:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "transformers": theirs}, indent=2))


if __name__ == "__main__":
    main()
