"""8- and 4-bit decoders (core/quantize.py, core.cpu.quantized): quality against fp32, measured the same way as
torch's dynamic int8 against torch fp32 on the same checkpoint; the CPU kernel's layer against MLX's; loading
quantized; generation paths (batch, windows, continuation, stereo) on a quantized decoder.

The error of a mode is the relative RMS of its teacher-forced decoder logits against its own framework's fp32
logits, on a tiny checkpoint and on a stack of musicgen-small-shaped layers (random weights)."""

from __future__ import annotations

import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from core import MusicGen
from core.quantize import check_quantization, quantize_layers
from tests import tiny_models

PROMPTS = ["warm synthwave with a driving bassline", "jazz"]
POSITIONS = 12
ON_LINUX = sys.platform.startswith("linux")


def torch_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with torch's dynamic int8 on every ``nn.Linear`` (what CPU users of transformers run)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao, and its qint8 tensors
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((logits - reference) ** 2) / np.mean(reference ** 2)))


class Checkpoint:
    """One random checkpoint: transformers fp32 and dynamic int8, ours fp32 / 8 / 4 bits, and teacher-forced
    logits ``(2, K, POSITIONS, vocab)`` of each on the same prompts and codes."""

    def __init__(self, folder, decoder: str, seed: int):
        self.folder = folder
        self.reference = tiny_models.build_musicgen(folder, decoder=decoder, seed=seed)
        self.models = {bits: MusicGen.from_pretrained(folder, quantize=bits) for bits in (None, 8, 4)}
        model = self.models[None]
        self.ids, self.mask = model.tokenizer(PROMPTS)
        rng = np.random.default_rng(seed)
        self.codes = rng.integers(0, 2048, size=(2, model.num_codebooks, POSITIONS)).astype(np.int32)
        self.torch_logits = {"fp32": self.torch_forward(self.reference),
                             "int8": self.torch_forward(torch_dynamic_int8(self.reference))}

    def torch_forward(self, reference) -> np.ndarray:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's quantized tensors are deprecated
            logits = reference(input_ids=torch.tensor(self.ids, dtype=torch.long),
                               attention_mask=torch.tensor(self.mask, dtype=torch.long),
                               decoder_input_ids=torch.tensor(self.codes, dtype=torch.long).reshape(-1, POSITIONS)).logits
        return logits.numpy().reshape(2, -1, POSITIONS, logits.shape[-1])

    def logits(self, bits: int | None, stepped: bool) -> np.ndarray:
        """Ours: the whole sequence at once, or position by position through the backend's caches (a decoder
        step: on Linux the CPU kernel's quantized products and host attention)."""
        model = self.models[bits]
        cross_kv, cross_mask = model._encode_text(PROMPTS, guided=False)
        text = model.decoder.make_cross(cross_kv, cross_mask)
        if not stepped:
            return np.array(model.decoder(mx.array(self.codes), model.decoder.make_cross(cross_kv, cross_mask,
                                                                                            host=False)))
        cache = model.decoder.make_cache(2, POSITIONS)
        steps = [model.decoder(mx.array(self.codes[:, :, t:t + 1]), text, cache) for t in range(POSITIONS)]
        return np.array(mx.concatenate(steps, axis=2))


@pytest.fixture(scope="module", params=["tiny-64", "small-2"])
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    return Checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=3)


def test_fp32_matches_transformers(checkpoint):
    np.testing.assert_allclose(checkpoint.logits(None, stepped=True), checkpoint.torch_logits["fp32"],
                               atol=2e-4, rtol=2e-4)


def test_8_bit_error_is_no_worse_than_torch_dynamic_int8(checkpoint):
    reference = checkpoint.logits(None, stepped=False)
    torch_error = relative_error(checkpoint.torch_logits["int8"], checkpoint.torch_logits["fp32"])
    errors = {(bits, stepped): relative_error(checkpoint.logits(bits, stepped), reference)
              for bits in (8, 4) for stepped in (False, True)}
    print(f"\nrelative RMS logit error: torch dynamic int8 {torch_error:.2e}, "
          + ", ".join(f"{bits}-bit{' stepped' if stepped else ''} {e:.2e}" for (bits, stepped), e in errors.items()))
    assert errors[8, False] <= torch_error and errors[8, True] <= torch_error
    assert 0 < errors[8, True] < errors[4, True]  # quantized at all, and 4 bits coarser than 8
    assert errors[4, True] < 0.25  # no bar on 4 bits but this sanity check: the README states the figures


def test_8_bit_argmax_equals_fp32_where_the_margin_is_clear(checkpoint):
    reference = checkpoint.logits(None, stepped=True)
    quantized = checkpoint.logits(8, stepped=True)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    clear = margin > 4 * np.abs(quantized - reference).max(axis=-1)
    assert clear.mean() > 0.5, f"too few clear positions to test ({clear.mean():.0%})"
    np.testing.assert_array_equal(quantized.argmax(-1)[clear], reference.argmax(-1)[clear])


def test_layers_the_backend_quantizes(checkpoint):
    model = checkpoint.models[8]
    expected = "core.cpu.quantized" if ON_LINUX else "mlx.nn.layers.quantized"
    layers = [model.decoder.layers[0].self_attn.q_proj, model.decoder.layers[0].fc2, model.decoder.lm_heads[0]]
    assert all(type(layer).__module__ == expected and layer.bits == 8 and layer.group_size == 64 for layer in layers)
    assert model.decoder.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    # T5 and EnCodec stay float; the packed decoder weighs about a quarter (8-bit) and an eighth (4-bit)
    assert all(v.dtype == mx.float32 for v in _leaves(model.text_encoder))
    sizes = {bits: sum(v.nbytes for v in _leaves(m.decoder)) for bits, m in checkpoint.models.items()}
    linear = sum(v.nbytes for name, v in tree_flatten(checkpoint.models[None].decoder.parameters())
                 if v.ndim == 2 and not name.startswith("embed_tokens"))
    assert sizes[None] - sizes[8] >= 0.7 * linear and sizes[None] - sizes[4] >= 0.8 * linear
    assert model.estimate_batch_bytes([dict(prompt="x", seconds=1.0)]) < \
        checkpoint.models[None].estimate_batch_bytes([dict(prompt="x", seconds=1.0)])


def _leaves(module) -> list[mx.array]:
    return [v for _, v in tree_flatten(module.parameters())]


def load_peak_rss(folder, bits: int | None) -> int:
    """Peak RSS (bytes) of a fresh process that loads ``folder`` and nothing else."""
    import subprocess

    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's (this test process's) peak
    code = ("import core; core.preload_backend(); import mlx.core as mx; "
            f"core.MusicGen.from_pretrained({str(folder)!r}, quantize={bits!r}); "
            "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("checkpoint", ["small-2"], indirect=True)  # large enough to show in the peak memory
def test_loading_never_holds_the_float_decoder_beside_the_quantized_one(checkpoint):
    """Quantized one tensor at a time: the peak of an 8-bit load stays below the float32 load's by a good part of
    the float32 linear weights (had it held them all beside their 8-bit copies, 28 % of their size, it would exceed
    the float32 peak)."""
    model = checkpoint.models[None]
    linear = sum(v.nbytes for name, v in tree_flatten(model.decoder.parameters())
                 if v.ndim == 2 and not name.startswith("embed_tokens"))
    fp32, q8 = load_peak_rss(checkpoint.folder, None), load_peak_rss(checkpoint.folder, 8)
    assert q8 < fp32 - 0.4 * linear, (fp32 / 2**20, q8 / 2**20, linear / 2**20)


@pytest.mark.skipif(not ON_LINUX, reason="the CPU kernels are built on Linux only")
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_layer_equals_mlx_layer_and_goes_through_the_kernel(bits):
    from core.cpu import blas
    from core.cpu.quantized import QuantizedLinear

    linear = nn.Linear(256, 192, bias=True)
    mlx_layer = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    layer = QuantizedLinear(256, 192, True, 64, bits)
    layer.update(mlx_layer.parameters())
    for shape in [(1, 1, 256), (2, 1, 256), (4, 4, 256), (3, 256), (2, 9, 256)]:
        x = mx.random.normal(shape)
        before = blas.kernel_counters()["quantized"]
        y = layer(x)
        went_through = blas.kernel_counters()["quantized"] - before
        assert went_through == (1 if x.size // 256 <= 16 else 0)
        assert y.shape == (*shape[:-1], 192)
        np.testing.assert_allclose(np.array(y), np.array(mlx_layer(x)), atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny64")
    tiny_models.build_musicgen(folder, decoder="tiny-64", seed=4)
    return folder


@pytest.fixture(scope="module")
def stereo64(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stereo64")
    tiny_models.build_musicgen(folder, decoder="tiny-64", stereo=True, seed=5)
    return folder


def test_generation_paths_on_a_quantized_decoder(tiny64, stereo64):
    from core.cpu import blas

    for folder in (tiny64, stereo64):
        model = MusicGen.from_pretrained(folder, quantize=8, max_seconds=60)
        before = blas.kernel_counters()["quantized"]
        one = model.generate(PROMPTS[0], 0.3, seed=7, top_k=1)
        assert blas.kernel_counters()["quantized"] > before or not ON_LINUX
        assert one.samples.shape == (round(0.3 * 32000), model.channels)
        # a batch: each clip as it comes alone (greedy)
        clips = model.generate_batch([dict(prompt=PROMPTS[0], seconds=0.3, seed=7, top_k=1),
                                      dict(prompt=PROMPTS[1], seconds=0.2, seed=8, top_k=1)])
        np.testing.assert_array_equal(clips[0].tokens, one.tokens)
        # a continuation keeps its prompt's codes
        more = model.continue_tokens(one.tokens, PROMPTS[1], 0.2, seed=9, top_k=1)
        np.testing.assert_array_equal(more.tokens[:, :one.tokens.shape[1]], one.tokens)
    # windows past the model's: a short window (generation_config's max_length) keeps this cheap
    model = MusicGen.from_pretrained(tiny64, quantize=4, max_seconds=60)
    model.generation_config["max_length"] = 20
    long = model.generate(PROMPTS[0], 1.0, seed=3, extend_stride=0.2)
    assert long.tokens.shape == (4, 50)


def test_quantize_is_checked(tiny64):
    for bad in (3, 16, True, "8"):
        with pytest.raises(ValueError, match="quantize must be 4 or 8 bits"):
            MusicGen.from_pretrained(tiny64, quantize=bad)
    with pytest.raises(ValueError, match="group size"):
        check_quantization(8, 48)


def test_layers_that_do_not_split_into_groups_stay_float():
    model = nn.Sequential(nn.Linear(48, 64, bias=False), nn.Linear(64, 8, bias=False))
    assert quantize_layers(model, 8) == ["layers.1"]
    assert isinstance(model.layers[0], nn.Linear) and isinstance(model.layers[1], nn.QuantizedLinear)
