"""Convert a checkpoint that ships only ``pytorch_model.bin`` to ``model.safetensors``, once.

    python -m core.convert PATH_OR_HUB_ID [--out FOLDER]

Needs torch (the only place outside tests and benchmarks that imports it); running the model never does. Sharded
``pytorch_model-*.bin`` files with their index are read too. The configs and tokenizer are copied along when the
output folder differs from the input.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from .loading import CheckpointError, resolve

log = logging.getLogger(__name__)

COPIED = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def torch_weight_files(folder: Path) -> list[Path]:
    """The ``pytorch_model*.bin`` files of ``folder``, from the index when there is one."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    return sorted(folder.glob("pytorch_model-*.bin"))


def convert(source: str | Path, out: str | Path | None = None) -> Path:
    """Write ``model.safetensors`` (to ``out``, default the checkpoint folder) from its PyTorch weights."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("converting needs torch: pip install torch (running the model does not)") from None
    folder = resolve(source, allow_patterns=(*COPIED, "pytorch_model*.bin", "pytorch_model.bin.index.json"))
    files = torch_weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder} has no pytorch_model.bin to convert")
    target = Path(out) if out is not None else folder
    target.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{file} could not be read: {e}") from None
        # tied tensors (T5's shared/embed_tokens) share storage, which safetensors refuses: give each its own
        tensors.update({k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)})
        log.info("read %s (%d tensors)", file, len(state))
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    if target.resolve() != folder.resolve():
        for name in COPIED:
            if (folder / name).is_file():
                shutil.copy(folder / name, target / name)
    log.info("wrote %s (%d tensors)", target / "model.safetensors", len(tensors))
    return target / "model.safetensors"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m core.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint folder or hub id with pytorch_model.bin")
    parser.add_argument("--out", type=Path, help="output folder (default: the checkpoint folder itself)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = convert(args.source, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path)


if __name__ == "__main__":
    main()
