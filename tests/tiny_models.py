"""Tiny random checkpoints in the real Hugging Face format, built with transformers + torch.

They are saved exactly as the hub repos are (``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``), so the project's own loader reads them as it reads ``facebook/musicgen-small``, and the same
transformers model serves as the reference implementation. Used by the tests and the benchmark; never at run time.

``python -m tests.tiny_models OUT_DIR [--stereo] [--melody]`` builds one from the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Sizes of the real checkpoints (FACTS.md); "tiny" keeps every structural choice and shrinks widths and depths.
DECODER_SHAPES = {
    # wider than the tiny T5 (48 vs 32) so `enc_to_dec_proj` exists, as in every real checkpoint (768 → 1024…)
    "tiny": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96),
    # as wide as the tiny T5: transformers then has no `enc_to_dec_proj`
    "tiny-same-width": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64),
    # widths a multiple of 64, MLX's quantization group: every linear layer of the decoder is quantized
    "tiny-64": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128),
    # musicgen-small's layer widths in a two-layer stack: the quantization error of real-shaped matrices
    "small-2-layers": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, ffn_dim=4096),
    "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
    "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144),
}
T5_SHAPES = {
    "tiny": dict(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64),
    "t5-base": dict(d_model=768, d_kv=64, num_heads=12, num_layers=12, d_ff=3072),
}
ENCODEC_SHAPES = {
    "tiny": dict(hidden_size=16, num_filters=4),
    "real": dict(hidden_size=128, num_filters=64),
}

TOKENIZER_CORPUS = [
    "warm synthwave with a driving bassline", "lofi hip hop beat to study to", "epic orchestral trailer music",
    "a calm piano melody in the rain", "80s pop track with bassy drums and synth", "jazz trio, brushed drums",
    "techno at 130 bpm, dark and hypnotic", "acoustic guitar folk song", "ambient pads, slowly evolving textures",
    "reggae groove with offbeat guitar", "heavy metal riff, distorted guitars", "bossa nova, nylon guitar",
]


def encodec_config(kind: str = "32khz", shape: str = "tiny"):
    """An ``EncodecConfig`` shaped like facebook/encodec_24khz, the 32 kHz MusicGen codec, or encodec_48khz."""
    from transformers import EncodecConfig

    sizes = ENCODEC_SHAPES[shape]
    if kind == "32khz":  # the codec inside every MusicGen checkpoint
        return EncodecConfig(sampling_rate=32000, audio_channels=1, normalize=False, chunk_length_s=None,
                             overlap=None, upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm",
                             use_causal_conv=False, pad_mode="reflect", codebook_size=2048,
                             codebook_dim=sizes["hidden_size"], use_conv_shortcut=False, target_bandwidths=[2.2],
                             num_lstm_layers=2, **sizes)
    if kind == "24khz":
        return EncodecConfig(sampling_rate=24000, audio_channels=1, normalize=False, upsampling_ratios=[8, 5, 4, 2],
                             norm_type="weight_norm", use_causal_conv=True, pad_mode="reflect", codebook_size=1024,
                             target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], use_conv_shortcut=True, **sizes)
    if kind == "48khz":
        return EncodecConfig(sampling_rate=48000, audio_channels=2, normalize=True, chunk_length_s=1.0, overlap=0.01,
                             upsampling_ratios=[8, 5, 4, 2], norm_type="time_group_norm", use_causal_conv=False,
                             pad_mode="reflect", codebook_size=1024, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
                             use_conv_shortcut=True, **sizes)
    raise ValueError(f"unknown EnCodec kind {kind!r}")


def make_sensitive(model, seed: int) -> None:
    """Make a random model's outputs depend on what the tests check, in place.

    transformers initialises EnCodec codebooks to zeros, so every code would decode to the same audio: they get
    random values. With 0.02-scaled random weights the text barely moves the decoder's logits, so a wrong prompt or
    mask would go unnoticed: the decoder's cross-attention value and output projections are scaled up.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    codec = getattr(model, "audio_encoder", model)
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=generator))
        if hasattr(model, "decoder") and hasattr(model.decoder, "model"):
            for layer in model.decoder.model.decoder.layers:
                layer.encoder_attn.v_proj.weight.mul_(10)
                layer.encoder_attn.out_proj.weight.mul_(10)


def build_tokenizer(folder: Path, vocab_size: int = 120) -> int:
    """Write a T5-style ``tokenizer.json`` (Unigram, Metaspace, ``</s>`` appended; pad 0, eos 1, unk 2).

    Also writes the files ``transformers.AutoTokenizer`` needs, for the reference side. Returns the vocab size.
    """
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    tokenizer = SentencePieceUnigramTokenizer()
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  unk_token="<unk>", show_progress=False)
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                  special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    fast = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0)
    fast.save_pretrained(str(folder))
    return tokenizer.get_vocab_size()


def t5_config(vocab: int, shape: str = "tiny"):
    """The text encoder's config: t5-base's structure, ``shape``'s widths (the tiny tokenizer's vocabulary)."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab if shape == "tiny" else 32128, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="relu", dropout_rate=0.0,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **T5_SHAPES[shape])


def decoder_section(shape: str = "tiny", stereo: bool = False) -> dict:
    """The ``decoder`` section of a MusicGen config: the real checkpoints' vocabulary and tokens, ``shape``'s
    widths, 4 codebooks (8 interleaved for stereo)."""
    return dict(vocab_size=2048, max_position_embeddings=2048, num_codebooks=8 if stereo else 4,
                audio_channels=2 if stereo else 1, pad_token_id=2048, bos_token_id=2048, dropout=0.0,
                activation_function="gelu", **DECODER_SHAPES[shape])


def build_musicgen(folder: str | Path, *, stereo: bool = False, decoder: str = "tiny", text_encoder: str = "tiny",
                   codec: str = "tiny", seed: int = 0, dtype=None):
    """Save a random ``MusicgenForConditionalGeneration`` to ``folder`` as the hub repos store it; return the model.

    ``decoder="small"`` with ``text_encoder="t5-base"`` and ``codec="real"`` gives musicgen-small's shapes.
    """
    import torch
    from transformers import GenerationConfig, MusicgenConfig, MusicgenForConditionalGeneration

    folder = Path(folder)
    vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    t5 = t5_config(vocab, text_encoder)
    audio = encodec_config("32khz", codec)
    decoder_config = decoder_section(decoder, stereo)
    config = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=audio.to_dict(),
                            decoder=dict(model_type="musicgen_decoder", **decoder_config))
    model = MusicgenForConditionalGeneration(config).eval()
    make_sensitive(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048,
                                               do_sample=True, guidance_scale=3.0, max_length=1500)
    model.save_pretrained(str(folder))
    return model


def build_encodec(folder: str | Path, kind: str = "32khz", *, shape: str = "tiny", seed: int = 0):
    """Save a random standalone ``EncodecModel`` (+ preprocessor config) to ``folder``; return the model."""
    import torch
    from transformers import EncodecFeatureExtractor, EncodecModel

    folder = Path(folder)
    torch.manual_seed(seed)
    config = encodec_config(kind, shape)
    model = EncodecModel(config).eval()
    make_sensitive(model, seed)
    model.save_pretrained(str(folder))
    EncodecFeatureExtractor(feature_size=config.audio_channels, sampling_rate=config.sampling_rate,
                            chunk_length_s=config.chunk_length_s, overlap=config.overlap).save_pretrained(str(folder))
    return model


def build_musicgen_melody(folder: str | Path, *, stereo: bool = False, decoder: str = "tiny", text_encoder: str = "tiny",
                          codec: str = "tiny", chroma_length: int = 235, seed: int = 0, dtype=None):
    """Save a random ``MusicgenMelodyForConditionalGeneration`` (+ tokenizer and ``MusicgenMelodyFeatureExtractor``
    config) to ``folder`` as the hub's melody repos store it; return the model.

    The melody decoder has no cross-attention: text and chroma are prepended to its input. To make a wrong prefix
    visible in random logits, the projections into the prefix are scaled up and get random biases, and the
    self-attention's values and outputs are scaled up (as :func:`make_sensitive` scales the plain model's
    cross-attention).
    """
    import torch
    from transformers import (
        GenerationConfig,
        MusicgenMelodyConfig,
        MusicgenMelodyFeatureExtractor,
        MusicgenMelodyForConditionalGeneration,
    )

    folder = Path(folder)
    vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    t5 = t5_config(vocab, text_encoder)
    audio = encodec_config("32khz", codec)
    decoder_config = dict(decoder_section(decoder, stereo), model_type="musicgen_melody_decoder")
    config = MusicgenMelodyConfig(text_encoder=t5.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder_config,
                                  num_chroma=12, chroma_length=chroma_length)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make_sensitive's codebooks; there is no cross-attention to scale
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn(layer.codebook.embed.shape, generator=generator))
        for proj in (model.enc_to_dec_proj, model.audio_enc_to_dec_proj):
            proj.weight.mul_(20)
            proj.bias.normal_(generator=generator)
        for layer in model.decoder.model.decoder.layers:  # the prefix reaches the codes through self-attention
            layer.self_attn.v_proj.weight.mul_(10)
            layer.self_attn.out_proj.weight.mul_(10)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048,
                                               do_sample=True, guidance_scale=3.0, max_length=1500)
    model.save_pretrained(str(folder))
    MusicgenMelodyFeatureExtractor().save_pretrained(str(folder))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--stereo", action="store_true")
    parser.add_argument("--melody", action="store_true", help="a MusicGen-Melody checkpoint")
    parser.add_argument("--decoder", default="tiny", choices=sorted(DECODER_SHAPES))
    parser.add_argument("--text-encoder", default="tiny", choices=sorted(T5_SHAPES))
    parser.add_argument("--codec", default="tiny", choices=sorted(ENCODEC_SHAPES))
    args = parser.parse_args()
    build = build_musicgen_melody if args.melody else build_musicgen
    build(args.folder, stereo=args.stereo, decoder=args.decoder, text_encoder=args.text_encoder, codec=args.codec)
    print(args.folder)


if __name__ == "__main__":
    main()
