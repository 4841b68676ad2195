"""Batched generation: a row's result does not depend on what it was batched with.

Float caveat: a row batched with others goes through matrix products of another shape than alone. On the CPU the
decoder step's products (up to 16 rows, core/cpu/_cpu_kernels.c) and its attention compute every row exactly as alone;
the rest (the prompt through T5 and the prefill in the BLAS, EnCodec's LSTM input) may round differently in the
last bit, and on a GPU everything may. On these models the tokens (greedy and sampled) come out identical, which is
what the tests require, and the audio within 1e-6.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from core import GenerationRequest, MusicGen, backend
from core.cache import KVCache
from tests.test_musicgen import build

LONG = "epic orchestral trailer music with a calm piano melody in the rain and heavy metal riff"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> MusicGen:
    folder = tmp_path_factory.mktemp("mono")
    build(folder, seed=3)
    return MusicGen.from_pretrained(folder)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory) -> MusicGen:
    folder = tmp_path_factory.mktemp("stereo")
    build(folder, stereo=True, seed=4)
    return MusicGen.from_pretrained(folder)


def alone(model: MusicGen, request: GenerationRequest):
    return model.generate_batch([request])[0]


def test_greedy_batched_equals_alone(model):
    requests = [GenerationRequest(LONG, 0.3, top_k=1), GenerationRequest("jazz", 0.12, top_k=1),
                GenerationRequest("techno at 130 bpm", 0.2, top_k=1, guidance_scale=1.0),
                GenerationRequest("jazz", 0.3, top_k=1, guidance_scale=5.0)]
    ids, _ = model.tokenizer([r.prompt for r in requests])
    batched = model.generate_batch(requests)
    for request, clip in zip(requests, batched, strict=True):
        np.testing.assert_array_equal(clip.tokens, alone(model, request).tokens)
    assert not np.array_equal(batched[0].tokens[:, :6], batched[1].tokens[:, :6])


def test_mlx_attention_gives_the_c_kernels_tokens(model, monkeypatch):
    """Where the C kernels cannot attend (no compiler at install, another dtype, a GPU) MLX attends: same tokens."""
    requests = [GenerationRequest(LONG, 0.2, top_k=1), GenerationRequest("jazz", 0.16, top_k=1),
                GenerationRequest("lofi", 0.2, seed=5)]
    with_kernels = model.generate_batch(requests)
    monkeypatch.setattr(backend, "host_attention", lambda dtype, head_dim: False)
    assert isinstance(model.decoder.make_cache(2, 4)[0], KVCache)
    for clip, plain in zip(with_kernels, model.generate_batch(requests), strict=True):
        np.testing.assert_array_equal(plain.tokens, clip.tokens)
        np.testing.assert_allclose(plain.samples, clip.samples, atol=1e-6)


def test_short_prompt_batched_with_long_one(model):
    short = GenerationRequest("jazz", 0.2, top_k=1)
    ids, mask = model.tokenizer(["jazz", LONG])
    assert mask[0].sum() < mask[1].sum() // 3  # "jazz" is padded a lot next to the long prompt
    batched = model.generate_batch([GenerationRequest(LONG, 0.2, top_k=1), short])[1]
    np.testing.assert_array_equal(batched.tokens, alone(model, short).tokens)


def test_sampled_same_seed_alone_or_batched(model, stereo):
    for m in (model, stereo):
        requests = [GenerationRequest("lofi hip hop", 0.2, seed=11),
                    GenerationRequest(LONG, 0.3, seed=12, top_k=20, temperature=0.7),
                    GenerationRequest("lofi hip hop", 0.2, seed=13, guidance_scale=1.0, temperature=1.5)]
        batched = m.generate_batch(requests)
        for request, clip in zip(requests, batched, strict=True):
            single = alone(m, request)
            assert clip.seed == single.seed == request.seed
            np.testing.assert_array_equal(clip.tokens, single.tokens)
            np.testing.assert_allclose(clip.samples, single.samples, atol=1e-6)
        assert not np.array_equal(batched[0].tokens, batched[2].tokens)  # same prompt, other seed


def test_mixed_durations_exact_lengths(model, stereo):
    seconds = [0.5, 1 / 3, 0.02, 1.01]
    for m in (model, stereo):
        clips = m.generate_batch([GenerationRequest("ambient", s, seed=i) for i, s in enumerate(seconds)])
        assert [c.samples.shape for c in clips] == [(round(s * 32000), m.channels) for s in seconds]
        assert [c.tokens.shape[1] for c in clips] == [25, 17, 1, 51]


def test_progress_per_row(model):
    calls = defaultdict(list)
    model.generate_batch([GenerationRequest("a", 0.1, seed=0), GenerationRequest("b", 0.3, seed=0)],
                         on_progress=lambda row, step, total: calls[row].append((step, total)))
    assert calls[0] == [(i, 8) for i in range(1, 9)]
    assert calls[1] == [(i, 18) for i in range(1, 19)]


def test_stopping_one_row_leaves_the_others_running(model):
    requests = [GenerationRequest("a", 0.3, seed=1), GenerationRequest("b", 0.3, seed=2),
                GenerationRequest("c", 0.2, seed=3)]
    steps = defaultdict(int)

    def on_progress(row, step, total):
        steps[row] = step

    clips = model.generate_batch(requests, on_progress=on_progress, should_stop=lambda row: row == 1 and
                                 steps[1] >= 4)
    assert clips[1] is None
    assert steps[1] == 4 and steps[0] == 18 and steps[2] == 13
    for i in (0, 2):
        np.testing.assert_array_equal(clips[i].tokens, alone(model, requests[i]).tokens)
    assert model.generate_batch(requests, should_stop=lambda row: True) == [None, None, None]


def test_dict_requests_and_drawn_seeds(model):
    clips = model.generate_batch([{"prompt": "jazz", "seconds": 0.1}, {"prompt": "jazz", "seconds": 0.1},
                                  GenerationRequest("jazz", 0.1, seed=5)])
    assert clips[0].seed != clips[1].seed and clips[2].seed == 5
    np.testing.assert_array_equal(alone(model, GenerationRequest("jazz", 0.1, seed=clips[0].seed)).tokens,
                                  clips[0].tokens)
    assert model.generate_batch([]) == []
    for bad in ({"prompt": "x"}, {"prompt": "x", "seconds": 1, "colour": "red"}, "x"):
        with pytest.raises(ValueError):
            model.generate_batch([{"prompt": "fine", "seconds": 1}, bad])


def test_memory_estimate_grows_with_batch_and_length(model):
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    one = model.estimate_batch_bytes([GenerationRequest("a", 5)])
    four = model.estimate_batch_bytes([GenerationRequest("a", 5)] * 4)
    longer = model.estimate_batch_bytes([GenerationRequest("a", 20)])
    assert weights < one < four and one < longer
    assert model.estimate_batch_bytes([{"prompt": "a", "seconds": 5, "guidance_scale": 1.0}]) < one


def test_few_row_linear_matches_plain():
    """The (W @ xᵀ)ᵀ fast path of the decoder's projections gives nn.Linear's result."""
    import mlx.core as mx

    from core.cpu.linear import FewRowLinear as Linear

    layer = Linear(96, 40, bias=False)
    chosen = Linear.transposed_rows
    for shape in [(2, 1, 96), (4, 1, 96), (8, 1, 96), (9, 1, 96), (16, 96), (3, 5, 96), (64, 1, 96), (70, 96)]:
        x = mx.random.normal(shape, key=mx.random.key(len(shape) + shape[0]))
        try:
            Linear.transposed_rows = (1, 64)
            fast = layer(x)
            Linear.transposed_rows = None
            plain = layer(x)
        finally:
            Linear.transposed_rows = chosen
        assert fast.shape == plain.shape == (*shape[:-1], 40)
        np.testing.assert_allclose(np.array(fast), np.array(plain), rtol=1e-5, atol=1e-5)
