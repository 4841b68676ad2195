"""Loading real-format checkpoints in their variants, and clear errors for broken ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from core import CheckpointError, MusicGen
from core.convert import main as convert_main
from tests.test_musicgen import build

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["lofi hip hop beat", "jazz"]
CODES = np.random.default_rng(0).integers(0, 2048, size=(4, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    reference = build(folder, seed=6)
    return folder, reference


def fingerprint(model: MusicGen) -> tuple[np.ndarray, np.ndarray]:
    """Decoder logits for two prompts (text encoder, projection, decoder) and decoded audio (EnCodec)."""
    cross_kv, cross_mask = model._encode_text(PROMPTS, guided=True)
    tokens = mx.array(np.broadcast_to(CODES[None, :, :5], (4, 4, 5)).copy())
    logits = model.decoder(tokens, model.decoder.make_cross(cross_kv, cross_mask))
    return np.array(logits.astype(mx.float32)), model.decode_tokens(CODES)


def reference_logits(reference, model: MusicGen) -> np.ndarray:
    ids, mask = model.tokenizer(PROMPTS)
    with torch.no_grad():
        logits = reference.float()(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long),
                                   decoder_input_ids=torch.tensor(np.tile(CODES[:, :5], (2, 1)), dtype=torch.long)
                                   ).logits
    return logits.numpy().reshape(2, 4, 5, -1)


def copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(folder, target)
    return target


def test_single_file_matches_transformers(base):
    folder, reference = base
    model = MusicGen.from_pretrained(folder)
    logits, _ = fingerprint(model)
    np.testing.assert_allclose(logits[:2], reference_logits(reference, model), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors(base, tmp_path):
    folder = copy(base[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: weights[k] for k in names}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = fingerprint(MusicGen.from_pretrained(base[0]))
    for got, want in zip(fingerprint(MusicGen.from_pretrained(folder)), expected, strict=True):
        np.testing.assert_array_equal(got, want)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        MusicGen.from_pretrained(folder)


def test_old_style_weight_norm_keys(base, tmp_path):
    folder = copy(base[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in weights.items()}
    assert any(k.endswith(".weight_g") for k in renamed) and renamed.keys() != weights.keys()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    expected = fingerprint(MusicGen.from_pretrained(base[0]))
    for got, want in zip(fingerprint(MusicGen.from_pretrained(folder)), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_float16_checkpoint(tmp_path):
    reference = build(tmp_path / "fp16", seed=7, dtype=torch.float16)
    assert load_file(tmp_path / "fp16" / "model.safetensors")["decoder.lm_heads.0.weight"].dtype == np.float16
    model = MusicGen.from_pretrained(tmp_path / "fp16")
    assert model.decoder.lm_heads[0].weight.dtype == mx.float32
    logits, _ = fingerprint(model)
    np.testing.assert_allclose(logits[:2], reference_logits(reference, model), atol=1e-4, rtol=1e-4)

    half = MusicGen.from_pretrained(tmp_path / "fp16", dtype="float16")
    assert half.decoder.lm_heads[0].weight.dtype == mx.float16
    clip = half.generate("jazz", 0.3, seed=1)
    assert clip.samples.shape == (9600, 1) and np.isfinite(clip.samples).all()


def test_pytorch_only_repo_gives_convert_hint_and_converts(base, tmp_path):
    folder, reference = base
    target = copy(folder, tmp_path)
    (target / "model.safetensors").unlink()
    torch.save(reference.state_dict(), target / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*python -m core\.convert"):
        MusicGen.from_pretrained(target)

    convert_main([str(target), "--out", str(tmp_path / "converted")])
    assert (tmp_path / "converted" / "tokenizer.json").is_file()
    convert_main([str(target)])  # in place
    expected = fingerprint(MusicGen.from_pretrained(folder))
    for path in (target, tmp_path / "converted"):
        for got, want in zip(fingerprint(MusicGen.from_pretrained(path)), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_truncated_safetensors(base, tmp_path):
    folder = copy(base[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MusicGen.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MusicGen.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file(base, tmp_path, missing):
    folder = copy(base[0], tmp_path)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        MusicGen.from_pretrained(folder)


@pytest.mark.parametrize("edit", [
    lambda c: c["decoder"].update(num_hidden_layers=3),
    lambda c: c["decoder"].update(hidden_size=64, ffn_dim=128),
    lambda c: c["decoder"].update(num_codebooks=8, audio_channels=2),
    lambda c: c["text_encoder"].update(num_layers=1),
    lambda c: c["audio_encoder"].update(num_filters=8),
    lambda c: c.pop("decoder"),
    lambda c: c["decoder"].update(num_attention_heads="many"),
    lambda c: c["decoder"].update(num_attention_heads=5),
    lambda c: c["decoder"].update(audio_channels=3),
])
def test_config_that_mismatches_the_weights(base, tmp_path, edit):
    folder = copy(base[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json|model\.safetensors"):
        MusicGen.from_pretrained(folder)


def test_broken_json(base, tmp_path):
    folder = copy(base[0], tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        MusicGen.from_pretrained(folder)
    folder = copy(base[0], tmp_path / "other")
    (folder / "tokenizer.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        MusicGen.from_pretrained(folder)


def test_unknown_hub_id_offline(tmp_path):
    code = ("import core\n"
            "try:\n    core.MusicGen.from_pretrained('nobody-here/no-such-musicgen')\n"
            "except core.CheckpointError as e:\n    print('CheckpointError', e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CheckpointError") and "nobody-here/no-such-musicgen" in result.stdout
