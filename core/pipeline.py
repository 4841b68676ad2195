"""``MusicGen``: text-to-music from one Hugging Face checkpoint (T5 text encoder, ``enc_to_dec_proj``, the
decoder of :mod:`core.decoder`, EnCodec): loading, generation (one clip, a batch, a continuation), audio encoding
and decoding, and the memory estimate. The decoding loop itself is :mod:`core.generate`.

Melody checkpoints (``model_type`` ``musicgen_melody``) load into the same class: their decoder has no
cross-attention and is conditioned on a prefix of chroma and text (:mod:`core.melody`); every generation method
then takes ``melody=(samples, sampling_rate)``.

Generation mirrors transformers' ``MusicgenForConditionalGeneration.generate``: the delay pattern of
``build_delay_pattern_mask`` (per channel for stereo), classifier-free guidance as one batch of cond + uncond
rows, temperature, then top-k.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import backend
from .chroma import ChromaConfig
from .decoder import DecoderConfig, MusicgenDecoder
from .encodec import EncodecConfig, EncodecModel
from .generate import decode_steps, plan_windows, run_steps, window_seed
from .generation import Clip, GenerationRequest, GenerationStopped
from .loading import (
    CheckpointError,
    check_weights,
    load_safetensors,
    parse_dtype,
    read_config,
    resolve,
)
from .melody import Melody, MelodyConditioning, MelodyConfig, is_melody_config
from .quantize import quantize_layers, quantize_weights
from .t5 import T5Config, T5EncoderModel
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

QUANT_GROUP_SIZE = 64  # values per scale and bias: MLX's default, and what its Metal kernels are tuned for

Request = GenerationRequest | Mapping


class MusicGen:
    """Text-to-music: tokenizer + T5 encoder + ``enc_to_dec_proj`` + decoder + EnCodec, loaded from one checkpoint.

    ``dtype`` applies to the decoder (the part that runs every step); the T5 encoder runs once per generation and
    EnCodec decodes audio, both stay float32.
    """

    def __init__(self, config: Mapping, text_encoder: T5EncoderModel, decoder: MusicgenDecoder,
                 audio_encoder: EncodecModel, tokenizer: PromptTokenizer, enc_to_dec_proj: nn.Linear | None = None,
                 generation_config: Mapping | None = None, max_seconds: float | None = None,
                 melody: MelodyConditioning | None = None):
        if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                        or not math.isfinite(max_seconds) or max_seconds <= 0):
            raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
        self._max_seconds = None if max_seconds is None else float(max_seconds)
        self.config = dict(config)
        self.text_encoder = text_encoder
        self.enc_to_dec_proj = enc_to_dec_proj
        self.decoder = decoder
        self.audio_encoder = audio_encoder
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.melody = melody
        self.quantization: dict | None = None  # {"bits", "group_size"} of the decoder's linear layers, if quantized
        self.source: Path | None = None  # the checkpoint folder it was loaded from

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str | mx.Dtype = "float32",
                        quantize: int | None = None, max_seconds: float | None = None) -> MusicGen:
        """Load a Hugging Face MusicGen checkpoint from a folder or a hub id.

        ``quantize`` (4 or 8 bits) quantizes the decoder's linear layers while loading, group-wise affine in MLX's
        layout (group size 64), one layer at a time so the float and the quantized decoder are never held at once;
        a checkpoint saved quantized (``config.json`` key ``quantization``, :meth:`save_quantized`) loads as it is
        (``quantize`` must then be None or its bits). ``max_seconds`` is the
        longest clip :meth:`generate` accepts (default: twice the model's window, 60 s for the real checkpoints;
        clips longer than the window are made window by window). Every problem with the files
        raises :class:`CheckpointError` naming the file.
        """
        dtype = parse_dtype(dtype)
        if quantize is not None and (isinstance(quantize, bool) or quantize not in (4, 8)):
            raise ValueError(f"quantize must be 4 or 8 bits, got {quantize!r}")
        _warn_without_backend()
        folder = resolve(name_or_path)
        config = read_config(folder)
        config_file = folder / "config.json"
        saved = config.get("quantization")
        group_size = QUANT_GROUP_SIZE
        if saved is not None:
            if (not isinstance(saved, dict) or saved.get("bits") not in (4, 8)
                    or not isinstance(saved.get("group_size"), int) or saved["group_size"] not in (32, 64, 128)):
                raise CheckpointError(f"{config_file} has an invalid 'quantization' section: {saved!r}")
            if quantize not in (None, saved["bits"]):
                raise CheckpointError(f"{folder} is saved with {saved['bits']}-bit weights; it cannot be loaded "
                                      f"with quantize={quantize}")
            quantize, group_size = saved["bits"], saved["group_size"]
        for part in ("text_encoder", "audio_encoder", "decoder"):
            if not isinstance(config.get(part), dict):
                raise CheckpointError(f"{config_file} has no '{part}' section: is this a MusicGen checkpoint?")
        is_melody = is_melody_config(config)
        generation_config = {}
        if (folder / "generation_config.json").is_file():
            generation_config = read_config(folder, "generation_config.json")
        preprocessor = {}
        if is_melody and (folder / "preprocessor_config.json").is_file():
            preprocessor = read_config(folder, "preprocessor_config.json")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file} is missing (the prompt tokenizer)")
        try:
            tokenizer = PromptTokenizer.from_file(tokenizer_file,
                                                  pad_token_id=int(config["text_encoder"].get("pad_token_id") or 0))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{tokenizer_file} could not be read: {e}") from None

        try:
            decoder_config = DecoderConfig.from_dict(config["decoder"])
            if is_melody:  # a melody decoder has no cross-attention, whatever its section says
                decoder_config.model_type = "musicgen_melody_decoder"
            text_encoder = T5EncoderModel(T5Config.from_dict(config["text_encoder"]))
            decoder = MusicgenDecoder(decoder_config)
            quantized = quantize_layers(decoder, quantize, group_size) if quantize else []
            audio_encoder = EncodecModel(EncodecConfig.from_dict(config["audio_encoder"]))
            melody = MelodyConditioning(MelodyConfig.from_dict(config), ChromaConfig.from_dict(preprocessor),
                                        decoder_config.hidden_size) if is_melody else None
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{config_file} is not a valid MusicGen config: {e}") from None
        text_size = text_encoder_size(config["text_encoder"])
        enc_to_dec_proj = None
        if text_size != decoder_config.hidden_size and (is_melody or decoder_config.cross_attention_hidden_size is None):
            enc_to_dec_proj = nn.Linear(text_size, decoder_config.hidden_size)

        weights = load_safetensors(folder)
        source = str(folder / ("model.safetensors" if (folder / "model.safetensors").is_file()
                               else "model.safetensors.index.json"))
        parts: dict[str, dict[str, mx.array]] = {"text_encoder": {}, "audio_encoder": {}, "decoder": {},
                                                 "enc_to_dec_proj": {}, "audio_enc_to_dec_proj": {}}
        for key, value in weights.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise CheckpointError(f"{source} holds an unexpected tensor {key}")
            parts[prefix][rest] = value
        weights = value = None  # the decoder's float weights must go as each layer is quantized (lazily loaded)
        decoder_weights = decoder.sanitize(parts.pop("decoder"))
        def load(module: nn.Module, weights: dict[str, mx.array], name: str, to: mx.Dtype) -> None:
            weights = {k: v.astype(to) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
            check_weights(module, weights, f"{source} ({name})")

        try:
            load(text_encoder, text_encoder.sanitize(parts["text_encoder"]), "text_encoder", mx.float32)
            load(audio_encoder, audio_encoder.sanitize(parts["audio_encoder"]), "audio_encoder", mx.float32)
            if quantized and saved is None:
                missing = [name for name in quantized if f"{name}.weight" not in decoder_weights]
                if missing:
                    raise CheckpointError(f"{source} (decoder) has no weight for {missing[0]}")
                quantize_weights(decoder_weights, quantized, quantize, group_size)
            load(decoder, decoder_weights, "decoder", dtype)
            del decoder_weights
            if enc_to_dec_proj is not None:
                load(enc_to_dec_proj, parts["enc_to_dec_proj"], "enc_to_dec_proj", dtype)
            elif parts["enc_to_dec_proj"]:
                raise CheckpointError(f"{source} has enc_to_dec_proj weights its config does not expect")
            audio_proj = melody.audio_enc_to_dec_proj if melody is not None else None
            if audio_proj is not None:
                load(audio_proj, parts["audio_enc_to_dec_proj"], "audio_enc_to_dec_proj", dtype)
            elif parts["audio_enc_to_dec_proj"]:
                raise CheckpointError(f"{source} has audio_enc_to_dec_proj weights its config does not expect")
        except CheckpointError:
            raise
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{source} does not match {config_file}: {e}") from None
        model = cls(config, text_encoder, decoder, audio_encoder, tokenizer, enc_to_dec_proj, generation_config,
                    max_seconds, melody)
        model.quantization = {"bits": quantize, "group_size": group_size} if quantize else None
        model.source = folder
        mx.eval(model.parameters())
        log.info("loaded %s%s: %d codebooks, %d channel(s), decoder %s%s, max %.4g s", folder,
                 " (melody)" if is_melody else "", decoder_config.num_codebooks, model.channels, dtype, f" q{quantize}" if quantize else "",
                 model.max_seconds)
        return model

    def save_quantized(self, folder: str | Path) -> Path:
        """Write this model, its decoder quantized, as a checkpoint folder that :meth:`from_pretrained` loads without
        quantizing again (``config.json`` gains a ``quantization`` key, as mlx-lm writes it; the decoder's tensors
        are MLX's packed ``weight``, ``scales`` and ``biases``; everything else is copied from the source)."""
        import shutil

        if self.quantization is None or self.source is None:
            raise ValueError("save_quantized needs a model loaded with quantize=8 or 4")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for file in self.source.iterdir():
            if file.is_file() and file.suffix in (".json", ".model") and file.name != "model.safetensors.index.json":
                shutil.copyfile(file, folder / file.name)
        config = dict(self.config, quantization={"group_size": self.quantization["group_size"],
                                                 "bits": self.quantization["bits"]})
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tensors = {k: v for k, v in load_safetensors(self.source).items() if not k.startswith("decoder.")}
        for name, value in backend.checkpoint_weights(self.decoder).items():
            key = f"decoder.{name}" if name.startswith("lm_heads.") else f"decoder.model.decoder.{name}"
            tensors[key] = value
        mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "mlx"})
        return folder

    def parameters(self) -> dict:
        """Every module's parameters, keyed like the checkpoint."""
        tree = {"text_encoder": self.text_encoder.parameters(), "decoder": self.decoder.parameters(),
                "audio_encoder": self.audio_encoder.parameters()}
        if self.enc_to_dec_proj is not None:
            tree["enc_to_dec_proj"] = self.enc_to_dec_proj.parameters()
        if self.melody is not None and self.melody.audio_enc_to_dec_proj is not None:
            tree["audio_enc_to_dec_proj"] = self.melody.audio_enc_to_dec_proj.parameters()
        return tree

    # ---------------------------------------------------------------------------------------- properties

    @property
    def sampling_rate(self) -> int:
        return int(self.audio_encoder.sampling_rate)

    @property
    def frame_rate(self) -> float:
        return self.audio_encoder.frame_rate

    @property
    def channels(self) -> int:
        return self.decoder.config.audio_channels

    @property
    def is_melody(self) -> bool:
        """Whether this is a melody model (``melody=`` conditions it on a tune)."""
        return self.melody is not None

    @property
    def num_codebooks(self) -> int:
        return self.decoder.config.num_codebooks

    @property
    def window_frames(self) -> int:
        """Frames the model generates in one go: ``generation_config.json``'s ``max_length`` (1500 frames = 30 s for
        the real checkpoints), else as many frames as the decoder has positions for."""
        max_length = self.generation_config.get("max_length")
        if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0:
            return max_length
        cfg = self.decoder.config
        return cfg.max_position_embeddings - cfg.channel_codebooks

    @property
    def window_seconds(self) -> float:
        """The model's window in seconds (30 s for the real checkpoints)."""
        return self.window_frames / self.frame_rate

    @property
    def max_seconds(self) -> float:
        """Longest clip (``from_pretrained(max_seconds=…)``, default twice the window: 60 s for the real
        checkpoints). Clips longer than the window are continued window by window; a melody model makes one
        window at most (30 s)."""
        longest = self._max_seconds if self._max_seconds is not None else 2 * self.window_seconds
        return min(longest, self.window_seconds) if self.is_melody else longest

    @property
    def default_extend_stride(self) -> float:
        """How far each window moves past the previous one by default: 60 % of the window (18 s of 30 s, as
        audiocraft), so every later window is prompted with the last 40 % (12 s) of the one before."""
        return 0.6 * self.window_seconds

    def frames_for(self, seconds: float) -> int:
        """EnCodec frames covering ``seconds`` (a tolerance keeps 0.58 s at 29 frames, not 30 from float error)."""
        return max(1, math.ceil(seconds * self.frame_rate - 1e-9))

    def samples_for(self, seconds: float) -> int:
        return round(seconds * self.sampling_rate)

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, prompt: str, seconds: float, *, seed: int | None = None, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0, prompt_tokens: np.ndarray | None = None,
                 extend_stride: float | None = None, melody: Melody | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Clip:
        """One clip of exactly ``round(seconds × sampling_rate)`` samples; ``GenerationStopped`` if stopped.

        ``prompt_tokens`` ``(codebooks, frames)`` makes it a continuation: the clip's first frames are exactly those
        codes and ``seconds`` is the total length (prompt + new). Up to ``max_seconds``; beyond the model's window the
        clip is continued window by window, each window moving ``extend_stride`` seconds (default
        :attr:`default_extend_stride`) and prompted with the end of the one before. ``on_progress(step, total)``
        counts decoder steps over all windows. ``melody`` ``(samples, sampling_rate)`` (samples ``(n,)`` or
        ``(n, channels)``, any rate; its first 30 s count) conditions a melody model on a tune; a melody model
        without one follows the text alone, a plain model refuses one (ValueError).
        """
        request = GenerationRequest(prompt, seconds, seed, top_k, temperature, guidance_scale, prompt_tokens,
                                    extend_stride, melody)
        clip = self.generate_batch([request], on_progress=_single_progress(on_progress),
                                   should_stop=_single_stop(should_stop))[0]
        if clip is None:
            raise GenerationStopped("generation was stopped")
        return clip

    def generate_tokens(self, prompt: str, frames: int, *, seed: int | None = None, top_k: int = 250,
                        temperature: float = 1.0, guidance_scale: float = 3.0,
                        prompt_tokens: np.ndarray | None = None, extend_stride: float | None = None,
                        melody: Melody | None = None, on_progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """EnCodec codes ``(codebooks, frames)`` for ``prompt`` (``frames`` in total, prompt tokens included);
        ``GenerationStopped`` if stopped."""
        if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
            raise ValueError("frames must be a whole number of at least 1.")
        request = GenerationRequest(prompt, frames / self.frame_rate, seed, top_k, temperature, guidance_scale,
                                    prompt_tokens, extend_stride, melody)
        request.validate(self.max_seconds)
        self._check_request(request, int(frames))
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        codes = self._generate_rows([request], [int(frames)], [seed], _single_progress(on_progress),
                                    _single_stop(should_stop))[0]
        if codes is None:
            raise GenerationStopped("generation was stopped")
        return codes

    def decode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Codes ``(codebooks, frames)`` -> float32 audio ``(frames × hop, channels)``; stereo models decode the
        interleaved codebooks ``[::2]`` (left) and ``[1::2]`` (right) through the mono EnCodec."""
        return self.decode_token_rows([tokens])[0]

    def decode_token_rows(self, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`decode_tokens` of several clips; clips with the same number of frames are decoded as one batch."""
        checked = []
        for tokens in rows:
            tokens = np.asarray(tokens)
            if tokens.ndim != 2 or tokens.shape[0] != self.num_codebooks:
                raise ValueError(f"tokens must be ({self.num_codebooks}, frames), got {tokens.shape}")
            checked.append(tokens.astype(np.int32))
        audio: list[np.ndarray | None] = [None] * len(checked)
        for frames in dict.fromkeys(t.shape[1] for t in checked):
            group = [i for i, t in enumerate(checked) if t.shape[1] == frames]
            codes = np.stack([checked[i] for i in group])  # (rows, K, F)
            streams = codes if self.channels == 1 else np.concatenate([codes[:, 0::2], codes[:, 1::2]])
            with backend.generation_scope():  # the LSTM's products run on the kernels' workers
                decoded = self.audio_encoder.decode(mx.array(streams)[:, None], [None])  # (streams, samples, 1)
                if self.channels == 2:  # left rows first, then right rows
                    decoded = mx.concatenate(mx.split(decoded, 2), axis=-1)
                mx.eval(decoded)
            decoded = np.array(decoded.astype(mx.float32), copy=False)
            for row, i in enumerate(group):
                audio[i] = decoded[row]
        return audio

    def generate_batch(self, requests: Sequence[Request], *,
                       on_progress: Callable[[int, int, int], None] | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> list[Clip | None]:
        """Generate several clips in one batch; each request has its own prompt, length, seed and options.

        ``requests`` are :class:`GenerationRequest` or dicts with the same keys. ``on_progress(row, step, total)`` is
        called for every row after every step; ``should_stop(row)`` is checked for every row before every step, and
        a stopped row leaves the batch: its result is ``None`` while the others go on. Rows run for their own number
        of steps; each clip is exactly ``round(seconds × sampling_rate)`` samples and records its seed and tokens.
        Rows that fit in the model's window run together; longer rows (and rows whose prompt tokens do not leave
        room in one window) run after them, one at a time, window by window.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        for request in requests:
            request.validate(self.max_seconds)
        frames = [self.frames_for(r.seconds) for r in requests]
        for request, n in zip(requests, frames, strict=True):
            self._check_request(request, n)
        if not requests:
            return []
        seeds = [r.seed if r.seed is not None else secrets.randbits(63) for r in requests]
        start = time.perf_counter()
        codes = self._generate_rows(requests, frames, seeds, on_progress, should_stop)
        finished = [i for i, tokens in enumerate(codes) if tokens is not None]
        audio = dict(zip(finished, self.decode_token_rows([codes[i] for i in finished]), strict=True))
        clips: list[Clip | None] = []
        for i, (request, seed, tokens) in enumerate(zip(requests, seeds, codes, strict=True)):
            if tokens is None:
                clips.append(None)
                continue
            clips.append(Clip(_fit(audio[i], self.samples_for(request.seconds)), self.sampling_rate, seed, tokens))
        log.info("generated %d/%d clip(s) (%s s) in %.2f s", sum(c is not None for c in clips), len(clips),
                 ", ".join(f"{r.seconds:g}" for r in requests), time.perf_counter() - start)
        return clips

    # ---------------------------------------------------------------------------------------- continuation

    def continue_tokens(self, tokens: np.ndarray, prompt: str, new_seconds: float, **options) -> Clip:
        """Continue EnCodec codes ``(codebooks, frames)`` (e.g. a clip's ``tokens``) by ``new_seconds`` of new music.

        ``new_seconds`` is the length of the new part: the clip is the given frames (decoded again) followed by exactly
        ``round(new_seconds × sampling_rate)`` new samples, and its ``tokens`` start with ``tokens`` exactly. The model is
        conditioned on at most the last ``window − min(new_seconds, extend_stride)`` seconds of the given frames (all of
        them are kept in the result). ``options`` are those of :meth:`generate` (``seed``, ``top_k``,
        ``temperature``, ``guidance_scale``, ``extend_stride``, ``on_progress``, ``should_stop``).
        """
        on_progress, should_stop = options.pop("on_progress", None), options.pop("should_stop", None)
        request = GenerationRequest(prompt, new_seconds, **options)
        request.validate(self.max_seconds)
        tokens = self._check_tokens(tokens, "The prompt tokens")
        if tokens.shape[1] > self.frames_for(self.max_seconds):
            raise ValueError(f"The audio to continue is too long ({tokens.shape[1] / self.frame_rate:g} s; at most "
                             f"{self.max_seconds:g} s).")
        new = self.frames_for(new_seconds)
        request = GenerationRequest(prompt, (tokens.shape[1] + new) / self.frame_rate, request.seed, request.top_k,
                                    request.temperature, request.guidance_scale, tokens, request.extend_stride,
                                    request.melody)
        self._check_request(request, tokens.shape[1] + new)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        start = time.perf_counter()
        codes = self._generate_rows([request], [tokens.shape[1] + new], [seed], _single_progress(on_progress),
                                    _single_stop(should_stop))[0]
        if codes is None:
            raise GenerationStopped("generation was stopped")
        audio = self.decode_tokens(codes)
        hop = audio.shape[0] // codes.shape[1]
        audio = _fit(audio, tokens.shape[1] * hop + self.samples_for(new_seconds))
        log.info("continued %.2f s by %g s in %.2f s", tokens.shape[1] / self.frame_rate, new_seconds,
                 time.perf_counter() - start)
        return Clip(audio, self.sampling_rate, seed, codes)

    def continue_audio(self, audio: np.ndarray, sampling_rate: int, prompt: str, new_seconds: float, **options) -> Clip:
        """Continue a recording by ``new_seconds`` of new music guided by ``prompt``.

        ``audio`` is ``(samples,)`` or ``(samples, channels)`` at ``sampling_rate``. It is resampled to the model's
        rate (band-limited FFT resampling, see :func:`resample`), mixed to the model's channels (the mean for a mono
        model; mono is duplicated and more than two channels are mixed down for a stereo model), EnCodec-encoded and
        continued with :meth:`continue_tokens`. ``new_seconds`` is the length of the new part: the result is the input
        (decoded again from its codes, its end trimmed to a whole EnCodec frame, i.e. by less than one frame) followed
        by exactly ``round(new_seconds × sampling_rate)`` new samples. The input may be at most ``max_seconds`` long; the
        model is conditioned on its last ``window − min(new_seconds, extend_stride)`` seconds. Bad input raises
        ``ValueError`` with a message fit to show a user.
        """
        tokens = self.encode_audio(audio, sampling_rate)
        return self.continue_tokens(tokens, prompt, new_seconds, **options)

    def encode_audio(self, audio: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Audio ``(samples,)`` or ``(samples, channels)`` at any rate -> EnCodec codes ``(codebooks, frames)``
        of its whole frames, as the decoder uses them (stereo: left and right interleaved)."""
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate < 1:
            raise ValueError(f"The sampling rate must be a whole number of hertz, got {sampling_rate!r}.")
        try:
            audio = np.asarray(audio, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError("The audio must be an array of samples.") from None
        if audio.ndim == 1:
            audio = audio[:, None]
        if audio.ndim != 2 or audio.shape[1] < 1:
            raise ValueError(f"The audio must have shape (samples,) or (samples, channels), got {audio.shape}.")
        if audio.shape[0] == 0:
            raise ValueError("The audio is empty.")
        if not np.isfinite(audio).all():
            raise ValueError("The audio contains invalid samples (NaN or infinity).")
        if audio.shape[0] / sampling_rate > self.max_seconds:
            raise ValueError(f"The audio is too long ({audio.shape[0] / sampling_rate:.1f} s; at most "
                             f"{self.max_seconds:g} s).")
        audio = resample(audio, sampling_rate, self.sampling_rate)
        if self.channels == 1 or audio.shape[1] > 2:
            audio = audio.mean(axis=1, keepdims=True)
        if self.channels == 2 and audio.shape[1] == 1:
            audio = np.repeat(audio, 2, axis=1)
        hop = round(self.sampling_rate / self.frame_rate)
        frames = audio.shape[0] // hop
        if frames < 1:
            raise ValueError(f"The audio is too short: it needs at least {1000 * hop / self.sampling_rate:g} ms.")
        audio = mx.array(np.ascontiguousarray(audio[: frames * hop]))
        streams = [audio[None, :, c:c + 1] for c in range(self.channels)]  # each (1, samples, 1)
        K = self.num_codebooks // self.channels
        codes = []
        with backend.generation_scope():
            for stream in streams:
                stream_codes, _ = self.audio_encoder.encode(stream)  # (1, chunks, Q, F): MusicGen's is unchunked
                if stream_codes.shape[1] != 1 or stream_codes.shape[2] < K:
                    raise ValueError(f"this model's EnCodec gives codes of shape {stream_codes.shape[1:3]} per "
                                     f"frame, not the {K} codebooks its decoder expects")
                codes.append(stream_codes[0, 0, :K])  # (K, F)
            tokens = codes[0] if self.channels == 1 else mx.stack(codes, axis=1).reshape(-1, frames)  # L0, R0, L1 …
            mx.eval(tokens)
        return np.array(tokens, dtype=np.int32)

    def _check_tokens(self, tokens: np.ndarray, what: str) -> np.ndarray:
        """Codes ``(codebooks, frames)`` as int32, or a user-fit ValueError."""
        tokens = np.asarray(tokens)
        K, vocab = self.num_codebooks, self.decoder.config.vocab_size
        if tokens.ndim != 2 or tokens.shape[0] != K or tokens.shape[1] < 1:
            raise ValueError(f"{what} must have shape ({K}, frames) with at least one frame, got {tokens.shape}.")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"{what} must be whole numbers from 0 to {vocab - 1}.")
        return tokens.astype(np.int32)

    def _check_request(self, request: GenerationRequest, frames: int) -> None:
        """What only the model can check: prompt tokens that fit it, an extend stride inside the window, a melody
        only for a melody model and within one window."""
        if request.melody is not None and not self.is_melody:
            raise ValueError("This model does not take a melody: load a melody checkpoint (e.g. "
                             "facebook/musicgen-melody) to condition on a tune.")
        if self.is_melody and frames > self.window_frames:
            raise ValueError(f"A melody model makes at most {self.window_seconds:g} s per clip (got "
                             f"{frames / self.frame_rate:g} s).")
        if request.extend_stride is not None and not request.extend_stride < self.window_seconds:
            raise ValueError(f"The extend stride must be less than the model's window of {self.window_seconds:g} s "
                             f"(got {request.extend_stride:g}).")
        if request.prompt_tokens is not None:
            tokens = self._check_tokens(request.prompt_tokens, "The prompt tokens")
            if tokens.shape[1] >= frames:
                raise ValueError(f"The length ({frames / self.frame_rate:g} s) must be longer than the audio prompt "
                                 f"({tokens.shape[1] / self.frame_rate:g} s).")

    def _stride_frames(self, request: GenerationRequest) -> int:
        stride = request.extend_stride if request.extend_stride is not None else self.default_extend_stride
        return min(max(1, round(stride * self.frame_rate)), self.window_frames - 1)

    def _generate_rows(self, requests: list[GenerationRequest], frames: list[int], seeds: list[int],
                       on_progress: Callable[[int, int, int], None] | None,
                       should_stop: Callable[[int], bool] | None) -> list[np.ndarray | None]:
        """Codes of every row: the rows that fit in one window together, then the others window by window."""
        prompts = [None if r.prompt_tokens is None else self._check_tokens(r.prompt_tokens, "The prompt tokens")
                   for r in requests]
        plans = [plan_windows(n, 0 if p is None else p.shape[1], self._stride_frames(r), self.window_frames)
                 for r, n, p in zip(requests, frames, prompts, strict=True)]
        together = [i for i, plan in enumerate(plans) if len(plan) == 1 and plan[0][0] == 0]
        results: list[np.ndarray | None] = [None] * len(requests)
        for group in self._batch_groups(requests, together):
            progress = None if on_progress is None else \
                lambda i, step, total, group=group: on_progress(group[i], step, total)
            stop = None if should_stop is None else lambda i, group=group: should_stop(group[i])
            codes = self._generate_codes([requests[i] for i in group], [frames[i] for i in group],
                                         [seeds[i] for i in group], progress, stop, [prompts[i] for i in group])
            for i, c in zip(group, codes, strict=True):
                results[i] = c
        for row in range(len(requests)):
            if row not in together:
                results[row] = self._generate_windows(row, requests[row], plans[row], seeds[row], prompts[row],
                                                      on_progress, should_stop)
        return results

    def _batch_groups(self, requests: list[GenerationRequest], rows: list[int]) -> list[list[int]]:
        """``rows`` split into the batches that run together: one for a plain model; for a melody model, one per
        prompt length in tokens, since its decoder attends the padded (zero) text positions as transformers does,
        so a row batched with longer prompts would not give its solo result."""
        if not rows:
            return []
        if not self.is_melody:
            return [rows]
        _, mask = self.tokenizer([requests[i].prompt for i in rows])
        groups: dict[int, list[int]] = {}
        for i, length in zip(rows, np.asarray(mask).sum(axis=1), strict=True):
            groups.setdefault(int(length), []).append(i)
        return list(groups.values())

    def _generate_windows(self, row: int, request: GenerationRequest, plan: list[tuple[int, int, int]], seed: int,
                          prompt: np.ndarray | None, on_progress: Callable[[int, int, int], None] | None,
                          should_stop: Callable[[int], bool] | None) -> np.ndarray | None:
        """One row window by window (``plan`` from :func:`core.generate.plan_windows`); progress counts steps over all windows."""
        extra = self.decoder.config.channel_codebooks - 1
        steps = [length + extra - p for _, length, p in plan]  # a window's prompt is prefilled, not stepped
        total, done = sum(steps), 0
        tokens = prompt if prompt is not None else np.zeros((self.num_codebooks, 0), np.int32)
        stop = None if should_stop is None else lambda _i: should_stop(row)
        for w, (start, length, p) in enumerate(plan):
            assert start + p == tokens.shape[1]
            progress = None if on_progress is None else \
                lambda _i, step, _total, done=done: on_progress(row, done + step, total)
            codes = self._generate_codes([request], [length], [window_seed(seed, w)], progress, stop,
                                         [tokens[:, start:] if p else None])[0]
            if codes is None:
                return None
            tokens = np.concatenate([tokens, codes[:, p:]], axis=1)
            done += steps[w]
            log.info("row %d: window %d/%d done (frames %d-%d)", row, w + 1, len(plan), start, start + length)
        return tokens

    def _text_states(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """Projected T5 states ``(B, S, dims)``, zeroed where the prompts' mask ``(B, S)`` is 0 (as transformers)."""
        ids, mask = self.tokenizer(prompts)
        mask = mx.array(mask)
        states = self.text_encoder(mx.array(ids), mask)  # (B, S, d_t5)
        if self.enc_to_dec_proj is not None:
            states = self.enc_to_dec_proj(states.astype(self.enc_to_dec_proj.weight.dtype))
        return states * mask[..., None].astype(states.dtype), mask

    def _melody_prefix(self, requests: Sequence[GenerationRequest], guided: bool) -> mx.array:
        """A melody model's decoder prefix ``(rows, chroma_length + S, dims)`` of ``requests`` (see
        :meth:`core.melody.MelodyConditioning.prefix`)."""
        states, _ = self._text_states([r.prompt for r in requests])
        chromas = [None if r.melody is None else self.melody.melody_chroma(r.melody) for r in requests]
        return self.melody.prefix(states.astype(self.decoder.layer_norm.weight.dtype), chromas, guided=guided)

    def _encode_text(self, prompts: list[str], guided: bool) -> tuple[list, mx.array]:
        """Cross-attention K/V per layer and the boolean cross mask ``(rows, 1, 1, S)``.

        As transformers does: states are projected, then zeroed where the mask is 0; the unconditional half (when
        ``guided``) gets zero states and a zero mask, so its cross-attention input is exactly zero. An all-masked row
        attends uniformly to zero values, like transformers' additive mask.
        """
        states, mask = self._text_states(prompts)
        attend = mask.astype(mx.bool_)
        dtype = self.decoder.layer_norm.weight.dtype
        cross_kv = self.decoder.cross_kv(states.astype(dtype))
        if guided:  # the projections have no bias: zero states give exactly zero keys and values
            cross_kv = [(mx.concatenate([k, mx.zeros_like(k)]), mx.concatenate([v, mx.zeros_like(v)]))
                        for k, v in cross_kv]
            attend = mx.concatenate([attend, mx.ones_like(attend)])
        return cross_kv, attend[:, None, None, :]

    def _generate_codes(self, requests: list[GenerationRequest], frames: list[int], seeds: list[int],
                        on_progress: Callable[[int, int, int], None] | None,
                        should_stop: Callable[[int], bool] | None,
                        prompts: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray | None]:
        """Codes of rows that fit in one window: the text encoded, then :func:`core.generate.decode_steps` driven
        with the callbacks (progress counts the steps after the prefill)."""
        guided = any(r.guidance_scale > 1 for r in requests)
        if self.is_melody:
            steps = decode_steps(self.decoder, None, None, requests, frames, seeds, prompts,
                                 prefix=self._melody_prefix(requests, guided))
        else:
            text, cross_mask = self._encode_text([r.prompt for r in requests], guided)
            steps = decode_steps(self.decoder, text, cross_mask, requests, frames, seeds, prompts)
        return run_steps(steps, on_progress, should_stop)

    # ---------------------------------------------------------------------------------------- memory

    def estimate_batch_bytes(self, requests: Sequence[Request]) -> int:
        """Rough peak memory in bytes to generate ``requests`` together, for choosing a batch size.

        Sums the weights, the self-attention KV cache (preallocated for 2 rows per request with guidance, for the
        longest row), the cross-attention K/V of the padded prompts, the per-step sampling work, and EnCodec
        decoding: every row through the LSTM together (its gates and states), then the longest row alone through
        the upsampling stages (every stage's activations, times the widest convolution's unfolded input). It errs
        on the high side.
        """
        requests = [GenerationRequest.coerce(r) for r in requests]
        if not requests:
            return 0
        weights = sum(v.nbytes for _, v in tree_flatten(self.parameters()))
        cfg = self.decoder.config
        rows = len(requests) * (2 if any(r.guidance_scale > 1 for r in requests) else 1)
        frames = max(self.frames_for(r.seconds) for r in requests)
        steps = frames + cfg.channel_codebooks - 1
        tokens = max(len(ids) for ids in self.tokenizer([r.prompt for r in requests])[0]) if requests else 1
        item = self.decoder.layer_norm.weight.dtype.size
        if self.is_melody:  # the prefix sits in the self-attention cache; there is no cross-attention
            steps += self.melody.prefix_length(tokens)
        kv = cfg.num_hidden_layers * 2 * rows * steps * cfg.hidden_size * item
        cross = 0 if self.is_melody else cfg.num_hidden_layers * 2 * rows * tokens * cfg.hidden_size * item
        sampling = rows * cfg.num_codebooks * cfg.vocab_size * 4 * 8
        audio = self.audio_encoder_config()
        ratios = list(audio.get("upsampling_ratios") or [8, 5, 4, 4])
        width = int(audio.get("num_filters") or 64) * 2 ** len(ratios)
        streams = 2 if self.channels == 2 else 1
        lstm = 4 * len(requests) * streams * frames * width * 12  # gates (4×), input, output and states
        activations, length = width * frames, frames
        for ratio in ratios:
            width, length = width // 2, length * ratio
            activations += width * length
        kernel = int(audio.get("kernel_size") or 7)
        decode = 4 * activations * (kernel + 3) * streams
        return int(weights + kv + cross + sampling + decode + lstm)

    def audio_encoder_config(self) -> dict:
        return dict(self.config.get("audio_encoder") or {})


_warned = False


def _warn_without_backend() -> None:
    """Once per process: say so when a Linux CPU run has not had :func:`core.preload_backend` give MLX the fast
    kernels (it was not called, or MLX was imported before it)."""
    global _warned
    missing = backend.cpu_backend_missing()
    if _warned or missing is None:
        return
    _warned = True
    warnings.warn("MLX runs on the slow reference BLAS: call core.preload_backend() before anything imports "
                  f"mlx ({missing})", RuntimeWarning, stacklevel=3)


def text_encoder_size(config: Mapping) -> int:
    """Hidden size of the text encoder's output (``d_model`` for T5)."""
    return int(config.get("d_model") or config.get("hidden_size"))


def _single_progress(on_progress: Callable[[int, int], None] | None) -> Callable[[int, int, int], None] | None:
    if on_progress is None:
        return None
    return lambda _row, step, total: on_progress(step, total)


def _single_stop(should_stop: Callable[[], bool] | None) -> Callable[[int], bool] | None:
    if should_stop is None:
        return None
    return lambda _row: bool(should_stop())


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample ``(samples, channels)`` audio from ``rate`` to ``target`` Hz to ``round(samples × target / rate)``
    samples, band-limited with numpy's real FFT (the spectrum is cut or zero-padded at the lower Nyquist frequency,
    like ``scipy.signal.resample``), so downsampling does not alias. The FFT treats the clip as periodic: the first
    and last milliseconds may ring slightly."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate == target:
        return audio
    n = audio.shape[0]
    m = max(1, round(n * target / rate))
    spectrum = np.fft.rfft(audio.astype(np.float64), axis=0)
    common = min(n, m)
    resized = np.zeros((m // 2 + 1, audio.shape[1]), dtype=spectrum.dtype)
    resized[: common // 2 + 1] = spectrum[: common // 2 + 1]
    if common % 2 == 0 and common > 1:  # the shorter signal's Nyquist bin stands for both signs of that frequency
        resized[common // 2] *= 2.0 if m < n else 0.5
    return (np.fft.irfft(resized, n=m, axis=0) * (m / n)).astype(np.float32)


def _fit(audio: np.ndarray, samples: int) -> np.ndarray:
    """Crop or zero-pad ``(n, channels)`` audio to exactly ``samples``, as contiguous float32."""
    if audio.shape[0] >= samples:
        audio = audio[:samples]
    else:
        audio = np.concatenate([audio, np.zeros((samples - audio.shape[0], audio.shape[1]), audio.dtype)])
    return np.ascontiguousarray(audio, dtype=np.float32)


__all__ = ["MusicGen", "resample"]
