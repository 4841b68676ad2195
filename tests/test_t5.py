"""The MLX T5 encoder and the prompt tokenizer, checked against transformers + torch on tiny random models."""

from __future__ import annotations

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from mlx.utils import tree_map
from transformers import AutoTokenizer

from core.loading import CheckpointError, check_weights, load_safetensors
from core.t5 import T5Config, T5EncoderModel, relative_position_bucket
from core.tokenizer import PromptTokenizer
from tests.tiny_models import T5_SHAPES, TOKENIZER_CORPUS, build_musicgen, build_tokenizer

PROMPTS = [
    "warm synthwave with a driving bassline",
    "",
    "   ",
    "jazz",
    "Ünïcödé café ﬁ ½ — 日本語の曲 🎵 Ω",
    "  lofi\thip   hop\nbeat  ",
    "epic orchestral trailer music, 130 bpm, dark and hypnotic, brushed drums, nylon guitar",
    "<unk> </s> <pad> literal special tokens",
]

# (feed_forward_proj, buckets, max_distance): the small distance makes the logarithmic buckets matter at L ~ 40
CONFIGS = [("relu", 32, 128), ("relu", 8, 20), ("gated-gelu", 16, 24)]


def hf_encoder(feed_forward_proj: str, buckets: int, max_distance: int, vocab: int = 99):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=vocab, relative_attention_num_buckets=buckets,
                                   relative_attention_max_distance=max_distance, feed_forward_proj=feed_forward_proj,
                                   dropout_rate=0.0, layer_norm_epsilon=1e-6, **T5_SHAPES["tiny"])
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # layer norms start at 1: make them matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def mlx_encoder(hf) -> T5EncoderModel:
    model = T5EncoderModel(T5Config.from_dict(hf.config.to_dict()))
    weights = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items()}
    check_weights(model, T5EncoderModel.sanitize(weights), "reference T5")
    mx.eval(model.parameters())
    return model


def random_batch(lengths: list[int], vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, vocab, size=n)
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 24)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
    relative = torch.arange(-400, 401)[None, :]
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    got = relative_position_bucket(mx.array(relative.numpy()), num_buckets, max_distance)
    np.testing.assert_array_equal(np.array(got), expected.numpy())


@pytest.mark.parametrize("feed_forward_proj,buckets,max_distance", CONFIGS)
def test_hidden_states_match_transformers(feed_forward_proj, buckets, max_distance):
    hf = hf_encoder(feed_forward_proj, buckets, max_distance)
    model = mlx_encoder(hf)
    lengths = [41, 7, 1, 23]
    ids, mask = random_batch(lengths, hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids).long(),
                      attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = model(mx.array(ids), mx.array(mask))
    assert got.dtype == mx.float32 and got.shape == (4, 41, hf.config.d_model)
    got = np.array(got)
    keep = mask.astype(bool)
    assert np.abs(expected[keep]).max() > 0.1  # the comparison below is not between near-zero tensors
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)
    # padding is invisible: each row alone gives what it gave in the padded batch
    for row, n in enumerate(lengths):
        alone = np.array(model(mx.array(ids[row : row + 1, :n])))[0]
        np.testing.assert_allclose(alone, got[row, :n], atol=1e-5, rtol=0)
        with torch.no_grad():
            ref_alone = hf(input_ids=torch.from_numpy(ids[row : row + 1, :n]).long()).last_hidden_state[0].numpy()
        np.testing.assert_allclose(alone, ref_alone, atol=1e-4, rtol=0)


def test_fully_masked_row_stays_finite():
    hf = hf_encoder("relu", 32, 128)
    model = mlx_encoder(hf)
    ids, mask = random_batch([5, 5], hf.config.vocab_size)
    mask[1] = 0  # a classifier-free-guidance style empty row must not poison the batch with NaN
    got = model(mx.array(ids), mx.array(mask))
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids).long(),
                      attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4, rtol=0)


def test_half_precision_stays_close():
    hf = hf_encoder("gated-gelu", 16, 24)
    model = mlx_encoder(hf)
    model.update(tree_map(lambda p: p.astype(mx.float16), model.parameters()))
    ids, mask = random_batch([12, 5], hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids).long(),
                      attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = model(mx.array(ids), mx.array(mask))
    assert got.dtype == mx.float32
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.array(got)[keep], expected[keep], atol=5e-2, rtol=0)


def test_config_from_dict_and_bad_activation():
    d = transformers.T5Config(feed_forward_proj="gated-gelu", **T5_SHAPES["tiny"]).to_dict()
    config = T5Config.from_dict(d)
    assert (config.d_model, config.num_layers, config.is_gated, config.activation) == (32, 2, True, "gelu_new")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-swish-x")


def test_loads_text_encoder_of_a_musicgen_checkpoint(tmp_path):
    reference = build_musicgen(tmp_path)
    prefix = "text_encoder."
    weights = {k[len(prefix):]: v for k, v in load_safetensors(tmp_path).items() if k.startswith(prefix)}
    config = json.loads((tmp_path / "config.json").read_text())["text_encoder"]
    model = T5EncoderModel(T5Config.from_dict(config))
    check_weights(model, T5EncoderModel.sanitize(weights), "model.safetensors")

    tokenizer = PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    ids, mask = tokenizer(["warm synthwave", "a calm piano melody in the rain"])
    with torch.no_grad():
        expected = reference.text_encoder(input_ids=torch.from_numpy(ids).long(),
                                          attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = np.array(model(mx.array(ids), mx.array(mask)))
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=0)

    weights.pop("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    with pytest.raises(CheckpointError, match="missing"):
        check_weights(T5EncoderModel(T5Config.from_dict(config)), T5EncoderModel.sanitize(weights), "x")


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


def assert_same_as_transformers(folder, prompts, **kwargs):
    reference = AutoTokenizer.from_pretrained(str(folder))
    # transformers truncates only when asked to; PromptTokenizer always does (default 512)
    truncation = {"truncation": True, "max_length": kwargs["max_length"]} if "max_length" in kwargs else {}
    expected = reference(prompts, padding=True, return_tensors="np", **truncation)
    ids, mask = PromptTokenizer.from_file(folder / "tokenizer.json", **kwargs)(prompts)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    return ids, mask


def test_tokenizer_matches_transformers(tiny_tokenizer_folder):
    ids, mask = assert_same_as_transformers(tiny_tokenizer_folder, PROMPTS)
    eos = [ids[row, mask[row].sum() - 1] for row in range(len(PROMPTS))]
    assert eos == [1] * len(PROMPTS)  # every row ends with </s>, even the empty ones
    assert mask[1].sum() == mask[2].sum() == 1
    for prompt in PROMPTS:  # and one at a time (no padding)
        assert_same_as_transformers(tiny_tokenizer_folder, [prompt])


def test_tokenizer_truncates_keeping_eos(tiny_tokenizer_folder):
    ids, mask = assert_same_as_transformers(tiny_tokenizer_folder, PROMPTS, max_length=6)
    assert ids.shape == (len(PROMPTS), 6) and ids[0, -1] == 1


def test_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"model": {"type": "Unigram", "vocab": [')
    with pytest.raises(CheckpointError, match="corrupt.json"):
        PromptTokenizer.from_file(bad)
    bad.write_text('{"version": "1.0", "model": {"type": "Unigram", "vocab": "nonsense"}}')
    with pytest.raises(CheckpointError, match="corrupt.json"):
        PromptTokenizer.from_file(bad)


def _protobuf_fields(buf: bytes):
    """(field number, payload) of each top-level field of a protobuf message; payload only for bytes fields."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            value |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if buf[i - 1] < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            _, i = varint(i)
            yield key >> 3, None
        elif wire == 2:
            size, i = varint(i)
            yield key >> 3, buf[i : i + size]
            i += size
        else:  # fixed 64 or 32 bits
            i += {1: 8, 5: 4}[wire]
            yield key >> 3, None


@pytest.fixture(scope="module")
def t5_base_format_folder(tmp_path_factory):
    """A tokenizer folder laid out like t5-base / musicgen: a SentencePiece Unigram model with its Precompiled
    normalizer, the legacy WhitespaceSplit + Metaspace(add_prefix_space) pre-tokenizer, 100 sentinel tokens, and
    padding/truncation settings stored in the file. Returns (folder, SentencePiece processor)."""
    folder = tmp_path_factory.mktemp("t5-base-format")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_CORPUS * 3), model_writer=model, vocab_size=100,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    proto = model.getvalue()
    normalizer_spec = next(v for f, v in _protobuf_fields(proto) if f == 3)  # ModelProto.normalizer_spec
    charsmap = next(v for f, v in _protobuf_fields(normalizer_spec) if f == 2)  # .precompiled_charsmap
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [[sp.id_to_piece(i), sp.get_score(i)] for i in range(sp.get_piece_size())]
    sentinels = [f"<extra_id_{i}>" for i in range(99, -1, -1)]  # t5 stores them last, in reverse
    vocab += [[token, 0.0] for token in sentinels]
    special = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    spec = {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 512}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                    "pad_type_id": 0, "pad_token": "<pad>"},
        "added_tokens": [{"id": i, "content": token, **special} for i, (token, _) in enumerate(vocab)
                         if i < 3 or token.startswith("<extra_id_")],
        "normalizer": {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "</s>", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 0}},
                                    {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                           "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": 100, "additional_special_tokens": sentinels[::-1], "model_max_length": 512}))
    return folder, sp


def test_tokenizer_reads_t5_base_format(t5_base_format_folder):
    folder, sp = t5_base_format_folder
    prompts = PROMPTS + ["fill <extra_id_0> and <extra_id_99>"]
    ids, _ = assert_same_as_transformers(folder, prompts)
    assert ids.shape[1] < 100  # the padding stored in the file (fixed 512) is ignored
    assert_same_as_transformers(folder, prompts, max_length=9)
    ids, mask = assert_same_as_transformers(folder, prompts + ["x" * 40 + " y" * 600], max_length=512)
    assert ids.shape == (len(prompts) + 1, 512) and ids[-1, -1] == 1 and mask[-1].all()
    long_ids, _ = PromptTokenizer.from_file(folder / "tokenizer.json")(["x" * 40 + " y" * 600])
    np.testing.assert_array_equal(long_ids[0], ids[-1])  # 512 is the default
    # SentencePiece itself agrees on ordinary text (the normalizer really is applied: NFKC, whitespace folding)
    for prompt in [PROMPTS[0], PROMPTS[4], PROMPTS[5], PROMPTS[6]]:
        ids, _ = PromptTokenizer.from_file(folder / "tokenizer.json")([prompt])
        assert ids[0].tolist() == sp.encode(prompt) + [1]
