"""Quantized decoders (``MusicGen.from_pretrained(quantize=8|4)``): their error measured against transformers' fp32
logits, next to torch's dynamic int8 on the same checkpoint, on a tiny model and on a musicgen-small-shaped layer
stack; the CPU kernels' step against MLX's own quantized layers; generation paths that must keep working
(batches, continuation, stereo, windows past the model's limit); loading layer by layer and saved folders.

The errors are relative RMS of teacher-forced logits over every position and codebook: ``rms(ours - fp32) /
rms(fp32)``, both sides from the same checkpoint, the reference being transformers' float32 model. Each test prints
what it measured (``pytest -s``); README's *Quantized weights* quotes them.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

from core import GenerationRequest, MusicGen
from core.cpu import blas, quantized
from core.cpu import cache as cpu_cache
from tests import tiny_models

PROMPTS = ["warm synthwave with a driving bassline", "jazz"]
POSITIONS = 12


def teacher_forced_reference(reference, model: MusicGen, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' logits ``(B, K, T, V)`` for ``codes``, in float32 and with dynamic int8 decoder linears."""
    ids, mask = model.tokenizer(PROMPTS)
    B, K, T = codes.shape
    int8 = copy.deepcopy(reference)
    with warnings.catch_warnings():  # deprecated in favour of torchao, but what users run today
        warnings.simplefilter("ignore")
        int8.decoder = torch.ao.quantization.quantize_dynamic(int8.decoder, {torch.nn.Linear}, dtype=torch.qint8)
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantized tensors are deprecated
        for model_ in (reference, int8):
            logits = model_(input_ids=torch.tensor(ids, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long),
                            decoder_input_ids=torch.tensor(codes, dtype=torch.long).reshape(-1, T)).logits
            out.append(logits.numpy().reshape(B, K, T, -1))
    return out[0], out[1]


def stepped_logits(model: MusicGen, codes: np.ndarray, host: bool | None = None) -> np.ndarray:
    """Our logits for ``codes`` one position at a time through the caches (what generation runs)."""
    cross_kv, cross_mask = model._encode_text(PROMPTS, guided=False)
    text = model.decoder.make_cross(cross_kv, cross_mask, host=host)
    cache = model.decoder.make_cache(codes.shape[0], codes.shape[2], host=host)
    steps = [model.decoder(mx.array(codes[:, :, t:t + 1]), text, cache) for t in range(codes.shape[2])]
    return np.array(mx.concatenate(steps, axis=2))


def relative_rms(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - reference) ** 2)) / np.sqrt(np.mean(reference ** 2)))


def build(folder, decoder: str, seed: int, stereo: bool = False):
    return tiny_models.build_musicgen(folder, decoder=decoder, seed=seed, stereo=stereo)


@pytest.fixture(scope="module", params=["tiny-64", "small-2-layers"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = build(folder, request.param, seed=7).eval()
    codes = np.random.default_rng(0).integers(0, 2048, size=(2, 4, POSITIONS)).astype(np.int32)
    fp32 = MusicGen.from_pretrained(folder)
    torch_fp32, torch_int8 = teacher_forced_reference(reference, fp32, codes)
    return request.param, folder, codes, torch_fp32, torch_int8, stepped_logits(fp32, codes)


def test_8_bit_error_is_no_worse_than_torch_dynamic_int8(checkpoint):
    name, folder, codes, torch_fp32, torch_int8, ours_fp32 = checkpoint
    assert relative_rms(ours_fp32, torch_fp32) < 1e-4  # the reference is the same model
    model = MusicGen.from_pretrained(folder, quantize=8)
    assert model.quantization == {"bits": 8, "group_size": 64}
    before = blas.kernel_counters()["quantized"]
    ours = stepped_logits(model, codes)
    if sys.platform.startswith("linux"):
        assert blas.kernel_counters()["quantized"] > before  # the CPU kernels ran it
    ours_error, torch_error = relative_rms(ours, torch_fp32), relative_rms(torch_int8, torch_fp32)
    print(f"\n{name}: logits rel. RMS error vs fp32: ours 8-bit {ours_error:.3%}, torch dynamic int8 "
          f"{torch_error:.3%}")
    assert 0 < ours_error <= torch_error


def test_8_bit_greedy_tokens_equal_fp32_where_the_margin_is_clear(checkpoint):
    name, folder, codes, torch_fp32, _, _ = checkpoint
    ours = stepped_logits(MusicGen.from_pretrained(folder, quantize=8), codes)
    top2 = np.sort(torch_fp32, axis=-1)[..., -2:]
    margin = (top2[..., 1] - top2[..., 0]) / torch_fp32.std(axis=-1)  # in standard deviations of the logits
    clear = margin > 0.05
    assert clear.mean() > 0.5, f"too few clear positions to test ({clear.mean():.0%})"
    same = ours.argmax(-1) == torch_fp32.argmax(-1)
    print(f"\n{name}: 8-bit greedy tokens equal fp32 at {same[clear].mean():.1%} of {clear.sum()} clear positions, "
          f"{same.mean():.1%} of all {same.size}")
    assert same[clear].all()


def test_4_bit_error_is_stated(checkpoint):
    """No bar beyond being measured (README quotes it): it must be a real, bounded error."""
    name, folder, codes, torch_fp32, torch_int8, _ = checkpoint
    ours = stepped_logits(MusicGen.from_pretrained(folder, quantize=4), codes)
    error = relative_rms(ours, torch_fp32)
    same = (ours.argmax(-1) == torch_fp32.argmax(-1)).mean()
    print(f"\n{name}: logits rel. RMS error vs fp32: ours 4-bit {error:.3%} (torch dynamic int8 "
          f"{relative_rms(torch_int8, torch_fp32):.3%}); greedy tokens equal at {same:.1%}")
    assert 0 < error < 0.3


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernel_step_agrees_with_mlx_quantized_layers(checkpoint, bits, monkeypatch):
    """The CPU kernels' host-memory step, MLX's ``nn.QuantizedLinear`` (what Metal runs) over MLX's caches, and
    the whole sequence in one call: the same quantized model, the same logits to float rounding (with float
    activations and float32 caches: rounding activations to int8 or keys and values to float16 turns float
    rounding into a step of their grid, tested below)."""
    _, folder, codes, _, _, _ = checkpoint
    monkeypatch.setattr(quantized, "int8_activations", False)
    monkeypatch.setattr(cpu_cache, "half_when_quantized", False)
    model = MusicGen.from_pretrained(folder, quantize=bits)
    kernel = stepped_logits(model, codes)
    plain = stepped_logits(model, codes, host=False)
    cross_kv, cross_mask = model._encode_text(PROMPTS, guided=False)
    whole = np.array(model.decoder(mx.array(codes), model.decoder.make_cross(cross_kv, cross_mask, host=False)))
    scale = np.abs(kernel).max()
    np.testing.assert_allclose(plain, kernel, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(whole, kernel, rtol=0, atol=2e-5 * scale)


def test_a_quantized_decoder_attends_float16_caches(checkpoint, monkeypatch):
    """On the CPU kernels a quantized decoder's self-attention caches hold float16 (half the bytes the attention
    reads), a float32 decoder's stay float32; rounding keys and values to float16 moves the logits by far less than
    the quantization does."""
    name, folder, codes, torch_fp32, _, _ = checkpoint
    monkeypatch.setattr(quantized, "int8_activations", False)
    assert all(c.keys.dtype == np.float32 for c in MusicGen.from_pretrained(folder).decoder.make_cache(2, 8))
    model = MusicGen.from_pretrained(folder, quantize=8)
    caches = model.decoder.make_cache(2, 8)
    assert all(c.keys.dtype == np.float16 and c.values.dtype == np.float16 for c in caches)
    half = stepped_logits(model, codes)
    monkeypatch.setattr(cpu_cache, "half_when_quantized", False)
    assert model.decoder.make_cache(2, 8)[0].keys.dtype == np.float32
    full = stepped_logits(model, codes)
    error, quantization = relative_rms(half, full), relative_rms(full, torch_fp32)
    print(f"\n{name}: float16 caches move the 8-bit logits by {error:.3%} (8-bit vs fp32: {quantization:.3%})")
    assert 0 < error < quantization / 5


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activations_agree_across_paths_and_save_as_mlx_layout(checkpoint, tmp_path, bits):
    """Where the CPU has an int8-activation kernel (AVX2, VNNI) the quantized layers are rearranged for it on first
    use, and then every path runs it: the host step, the layers over MLX's caches, the whole sequence (16 rows at a
    time). Those agree to well under the quantization error (an input's float rounding can move an activation by one
    step of the int8 grid), and the model saves MLX's layout, the same bytes as before the first step."""
    name, folder, codes, torch_fp32, _, _ = checkpoint
    model = MusicGen.from_pretrained(folder, quantize=bits)
    model.save_quantized(tmp_path / "before")
    before = blas.kernel_counters()["quantized"]
    kernel = stepped_logits(model, codes)
    assert blas.kernel_counters()["quantized"] > before
    fc1 = model.decoder.layers[0].fc1
    assert fc1.packed == bool(blas.cpu_kernels.packed_fast())
    plain = stepped_logits(model, codes, host=False)
    cross_kv, cross_mask = model._encode_text(PROMPTS, guided=False)
    whole = np.array(model.decoder(mx.array(codes), model.decoder.make_cross(cross_kv, cross_mask, host=False)))
    print(f"\n{name}, {bits} bits: int8 activations ({fc1.packed}): host step vs MLX caches "
          f"{relative_rms(plain, kernel):.3%}, vs the whole sequence {relative_rms(whole, kernel):.3%}; vs fp32 {relative_rms(kernel, torch_fp32):.3%}")
    assert relative_rms(plain, kernel) < 0.01 and relative_rms(whole, kernel) < 0.01
    model.save_quantized(tmp_path / "after")
    saved = [mx.load(str(tmp_path / side / "model.safetensors")) for side in ("before", "after")]
    assert saved[0].keys() == saved[1].keys()
    for key, value in saved[0].items():
        assert mx.array_equal(value, saved[1][key]).item(), key


def test_loading_quantizes_layer_by_layer_and_saves(tmp_path):
    """Only the decoder's linear layers are quantized (T5, EnCodec and the embeddings stay float32); the memory
    estimate counts the smaller weights; a saved quantized folder loads as it was saved."""
    build(tmp_path / "fp32", "tiny-64", seed=1)
    fp32 = MusicGen.from_pretrained(tmp_path / "fp32")
    model = MusicGen.from_pretrained(tmp_path / "fp32", quantize=8)
    fc1 = model.decoder.layers[0].fc1
    assert fc1.weight.dtype == mx.uint32 and fc1.scales.dtype == mx.float32 and fc1.bits == 8
    assert model.decoder.embed_tokens[0].weight.dtype == mx.float32
    assert model.text_encoder.parameters()["shared"]["weight"].dtype == mx.float32
    request = [GenerationRequest("jazz", 1.0)]
    assert model.estimate_batch_bytes(request) < fp32.estimate_batch_bytes(request)
    model.save_quantized(tmp_path / "q8")
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8}
    saved = MusicGen.from_pretrained(tmp_path / "q8")
    assert saved.quantization == {"bits": 8, "group_size": 64}
    a = model.generate("jazz", 0.3, seed=3, top_k=1).tokens
    np.testing.assert_array_equal(saved.generate("jazz", 0.3, seed=3, top_k=1).tokens, a)
    with pytest.raises(ValueError, match="saved with 8-bit weights"):
        MusicGen.from_pretrained(tmp_path / "q8", quantize=4)
    with pytest.raises(ValueError, match="quantize must be 4 or 8"):
        MusicGen.from_pretrained(tmp_path / "fp32", quantize=16)


def test_generation_paths_work_quantized(tmp_path):
    """Batches (a row's tokens as alone), continuation, stereo, and clips past the model's window."""
    build(tmp_path / "stereo", "tiny-64", seed=2, stereo=True)
    generation = json.loads((tmp_path / "stereo" / "generation_config.json").read_text())
    generation["max_length"] = 25  # a 0.5 s window, so that a short clip takes two
    (tmp_path / "stereo" / "generation_config.json").write_text(json.dumps(generation))
    model = MusicGen.from_pretrained(tmp_path / "stereo", quantize=8)
    assert model.channels == 2
    requests = [GenerationRequest("jazz", 0.3, top_k=1), GenerationRequest(PROMPTS[0], 0.2, seed=5)]
    batched = model.generate_batch(requests)
    for request, clip in zip(requests, batched, strict=True):
        np.testing.assert_array_equal(clip.tokens, model.generate_batch([request])[0].tokens)
    continued = model.continue_tokens(batched[0].tokens, "jazz", 0.2, seed=1)
    np.testing.assert_array_equal(continued.tokens[:, :batched[0].tokens.shape[1]], batched[0].tokens)
    window = model.window_seconds
    long = model.generate("jazz", window + 0.3, seed=2)
    assert long.tokens.shape[1] == model.frames_for(window + 0.3)


def test_melody_decoder_steps_quantized(tmp_path, monkeypatch):
    """A melody decoder (no cross-attention, a prefix in the caches) steps in host memory too, with the greedy
    tokens of the same quantized model run by MLX's own layers."""
    from core.cpu import host_step

    tiny_models.build_musicgen_melody(tmp_path, decoder="tiny-64", seed=3)
    melody = (np.sin(np.linspace(0, 400, 32000)).astype(np.float32), 32000)
    monkeypatch.setattr(quantized, "int8_activations", False)  # MLX's layers compute with float activations
    model = MusicGen.from_pretrained(tmp_path, quantize=8)
    steps = []
    step = host_step.step
    monkeypatch.setattr(host_step, "step", lambda *args: steps.append(1) or step(*args))
    clip = model.generate("jazz", 0.3, seed=1, top_k=1, melody=melody)
    assert steps or not sys.platform.startswith("linux")
    monkeypatch.setattr(quantized.FewRowQuantizedLinear, "_host", lambda self: None)  # MLX's layers only
    monkeypatch.setattr(host_step, "usable", lambda *args: False)
    taken = len(steps)
    plain = model.generate("jazz", 0.3, seed=1, top_k=1, melody=melody)
    assert len(steps) == taken
    np.testing.assert_array_equal(clip.tokens, plain.tokens)


def test_melody_decoder_with_int8_activations(tmp_path):
    """The melody prefix (many rows) goes through the int8-activation kernel 16 rows at a time where it is used,
    and the clip comes out whole (its tokens are compared with float activations' only in print: greedy decoding
    of a random model diverges at the first near-tie)."""
    tiny_models.build_musicgen_melody(tmp_path, decoder="tiny-64", seed=3)
    melody = (np.sin(np.linspace(0, 400, 32000)).astype(np.float32), 32000)
    clips = []
    for int8 in (False, True):
        quantized.int8_activations = int8
        try:
            model = MusicGen.from_pretrained(tmp_path, quantize=8)
            before = blas.kernel_counters()["quantized"]
            clips.append(model.generate("jazz", 0.5, seed=1, top_k=1, melody=melody))
            assert blas.kernel_counters()["quantized"] > before
        finally:
            quantized.int8_activations = True
        assert model.decoder.layers[0].fc1.packed == (int8 and bool(blas.cpu_kernels.packed_fast()))
    for clip in clips:
        assert clip.tokens.shape == clips[0].tokens.shape and clip.samples.shape[0] == model.samples_for(0.5)
        assert np.isfinite(clip.samples).all() and np.abs(clip.samples).max() > 0
    same = (clips[0].tokens == clips[1].tokens).mean()
    print(f"\nmelody, 8-bit greedy tokens with int8 activations equal float activations' at {same:.1%}")
