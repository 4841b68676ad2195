"""Finding and reading Hugging Face checkpoints: local folders or hub ids, configs, safetensors weights.

Every failure here is raised as :class:`CheckpointError` with a message that names the file, so callers
never see a traceback from deep inside MLX, safetensors or huggingface_hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

# What a MusicGen or EnCodec repo needs at run time; everything else (pytorch_model.bin, state_dict.bin …) is skipped.
DEFAULT_PATTERNS = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json")

WHAT_TO_DO = ("name a local checkpoint folder with --model FOLDER or MUSICGEN_MODEL=FOLDER, or connect once so the "
              "hub id is downloaded into the cache (HF_HOME); HF_HUB_OFFLINE=1 then runs from the cache without "
              "network")

CONVERT_HINT = ("convert it once with `python -m core.convert {path}` (needs torch; running the model never does), "
                "or use a repo that ships model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint could not be found or read; the message names the file and what to do."""


def resolve(name_or_path: str | Path, allow_patterns: Sequence[str] = DEFAULT_PATTERNS) -> Path:
    """Return a local folder for ``name_or_path``: the folder itself, or a hub snapshot (only ``allow_patterns``).

    Downloads go through ``huggingface_hub.snapshot_download`` and so honour ``HF_HOME``, ``HF_HUB_CACHE`` and
    ``HF_HUB_OFFLINE``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name} is a file; expected a checkpoint folder or a hub id like facebook/musicgen-small")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint folder at {name}, and it is not a hub id like facebook/musicgen-small: "
                              "pass --model FOLDER (or set MUSICGEN_MODEL) to a folder holding config.json and "
                              "model.safetensors, or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=list(allow_patterns)))
    except GatedRepoError as e:
        raise CheckpointError(f"hub repo {name} is gated: accept its license on the hub and log in ({e})") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub repo {name} does not exist (or is private): check the id, or pass --model FOLDER "
                              "(or MUSICGEN_MODEL) for a local checkpoint") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"hub repo {name} is not in the local cache and the hub cannot be reached "
                              f"(offline mode or no network): {WHAT_TO_DO}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not download {name} ({_first_line(e)}): {WHAT_TO_DO}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class BaseConfig:
    """Base of the config dataclasses: ``from_dict`` keeps the keys that are fields and ignores the rest, since a
    checkpoint's ``config.json`` carries many keys a port does not use."""

    @classmethod
    def from_dict(cls, params: Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


def read_config(folder: Path, filename: str = "config.json") -> dict:
    """Read a JSON config from ``folder``, raising :class:`CheckpointError` naming the file on any problem."""
    file = folder / filename
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return config


def _load_safetensors(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file), format="safetensors")
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for truncated or garbled files
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None


def load_safetensors(folder: Path) -> dict[str, mx.array]:
    """Load every tensor of the checkpoint in ``folder``: ``model.safetensors`` or its sharded form."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = read_config(folder, index.name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        weights: dict[str, mx.array] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / shard} is missing (listed in {index.name})")
            weights.update(_load_safetensors(folder / shard))
        missing = set(weight_map) - set(weights)
        if missing:
            raise CheckpointError(f"{index} lists {len(missing)} tensors the shards lack, e.g. {sorted(missing)[0]}")
        return weights
    if (folder / "pytorch_model.bin").is_file() or list(folder.glob("pytorch_model-*.bin")):
        raise CheckpointError(f"{folder} has only pytorch_model.bin; " + CONVERT_HINT.format(path=folder))
    raise CheckpointError(f"{folder} has no model.safetensors (nor model.safetensors.index.json); if the repo "
                          "ships only pytorch_model.bin (as facebook/musicgen-medium does), "
                          + CONVERT_HINT.format(path="HUB_ID_OR_FOLDER --out FOLDER") + ", then load FOLDER")


def fold_weight_norm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace weight-norm pairs with plain ``weight`` tensors, whichever way the checkpoint stored them.

    Older transformers save ``weight_g``/``weight_v``; newer ones
    ``parametrizations.weight.original0``/``original1``. Both mean ``weight = g * v / ||v||`` with the norm taken
    over every axis but the first.
    """
    out: dict[str, mx.array] = {}
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        for g_suffix, v_suffix in ((".weight_g", ".weight_v"),
                                   (".parametrizations.weight.original0", ".parametrizations.weight.original1")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            out[key] = value
    for prefix, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise CheckpointError(f"weight norm of {prefix} is stored incompletely (have only {sorted(pair)})")
        g, v = pair["g"].astype(mx.float32), pair["v"].astype(mx.float32)
        norm = mx.sqrt(mx.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
        out[prefix + ".weight"] = (g * v / norm).astype(pair["v"].dtype)
    return out


def check_weights(module, weights: dict[str, mx.array], source: str) -> None:
    """Load ``weights`` into ``module`` strictly, turning name or shape mismatches into :class:`CheckpointError`."""
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} does not match its config: " + ", ".join(parts) + " tensors")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"its config implies {tuple(expected[name].shape)}")
    module.load_weights(list(weights.items()), strict=True)


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """``"float32"``/``"float16"``/``"bfloat16"`` (or an ``mx.Dtype``) to an ``mx.Dtype``; ValueError otherwise."""
    if isinstance(dtype, mx.Dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
