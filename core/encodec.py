"""EnCodec neural audio codec on MLX, a port of the Hugging Face ``transformers`` ``EncodecModel``.

Audio is channels-last everywhere: ``(batch, samples, channels)``; codes are
``(batch, chunks, num_quantizers, frames)`` int32. Module attribute names mirror the checkpoint keys, so
:meth:`EncodecModel.sanitize` only folds weight norm, moves conv axes and drops codebook statistics.

Several things differ from a line-by-line port, all for speed on the CPU backend, each with a plain version
that tests compare it with: transposed convolutions with ``kernel == 2 * stride`` (every EnCodec upsampler) are one
matmul plus an overlap-add instead of ``mx.conv_transpose1d``; long convolutions are shifted matmuls; on the CPU,
the LSTM recurrence and the ELU run in NumPy (vectorised ``tanh``/``expm1``, ``sgemv``), and the decoder runs its
last upsampling stages in time chunks that stay in cache (exact: convolutions are local, chunks carry halos).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backend
from .loading import (
    BaseConfig,
    CheckpointError,
    check_weights,
    fold_weight_norm,
    load_safetensors,
    parse_dtype,
    read_config,
    resolve,
)

log = logging.getLogger(__name__)

# Decoding in time chunks (EncodecDecoder.decode_chunked): the last CHUNKED_STAGES upsampling stages run on
# chunks of DEFAULT_CHUNK_LENGTH output samples (2.5 MB of 64-channel float32 at the last stage).
CHUNKED_STAGES = 2
DEFAULT_CHUNK_LENGTH = 10240

# Codebook statistics kept by the training code as buffers; not needed to encode or decode.
DROPPED_SUFFIXES = (".cluster_size", ".embed_avg", ".inited")


class Chunking:
    """Chunk length and stride in samples, from ``chunk_length_s``, ``overlap`` and ``sampling_rate`` (48 kHz
    EnCodec cuts audio into overlapping chunks; the others do not chunk)."""

    chunk_length_s: float | None
    overlap: float | None
    sampling_rate: int

    @property
    def chunk_length(self) -> int | None:
        return None if self.chunk_length_s is None else int(self.chunk_length_s * self.sampling_rate)

    @property
    def chunk_stride(self) -> int | None:
        if self.chunk_length_s is None or self.overlap is None:
            return None
        return max(1, int((1.0 - self.overlap) * self.chunk_length))


@dataclass
class EncodecConfig(Chunking, BaseConfig):
    """Hyper-parameters of an EnCodec model, as in a Hugging Face ``config.json`` (or MusicGen's ``audio_encoder``)."""

    sampling_rate: int = 24_000
    audio_channels: int = 1
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None
    hidden_size: int = 128
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    norm_type: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    codebook_size: int = 1024
    codebook_dim: int | None = None
    use_conv_shortcut: bool = True
    target_bandwidths: list[float] = field(default_factory=lambda: [1.5, 3.0, 6.0, 12.0, 24.0])

    def __post_init__(self) -> None:
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        self.upsampling_ratios = [int(r) for r in self.upsampling_ratios]
        self.target_bandwidths = [float(b) for b in self.target_bandwidths]
        if self.norm_type not in ("weight_norm", "time_group_norm"):
            raise ValueError(f"norm_type must be weight_norm or time_group_norm, got {self.norm_type!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}")
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
        if self.audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {self.audio_channels}")
        if self.codebook_size < 2 or 2 ** self.codebook_nbits != self.codebook_size:
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if not self.target_bandwidths:
            raise ValueError("target_bandwidths is empty")

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.upsampling_ratios))

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def codebook_nbits(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))


# ---------------------------------------------------------------------------------------------------------------
# Convolutions (channels-last: (B, T, C))

PAD_MODES = ("reflect", "constant", "replicate")


def pad1d(x: mx.array, left: int, right: int, mode: str = "constant") -> mx.array:
    """Pad the time axis of ``x`` (B, T, C) like ``torch.nn.functional.pad``.

    Reflect padding of an input no longer than the padding first appends zeros on the right (as the reference
    does), so short inputs work instead of failing.
    """
    if left == 0 and right == 0:
        return x
    if mode == "constant":
        return mx.pad(x, [(0, 0), (left, right), (0, 0)])
    if mode == "replicate":
        return mx.pad(x, [(0, 0), (left, right), (0, 0)], mode="edge")
    length = x.shape[1]
    extra = max(0, max(left, right) - length + 1)
    if extra:
        x = mx.pad(x, [(0, 0), (0, extra), (0, 0)])
        length += extra
    index = np.concatenate([np.arange(left, 0, -1), np.arange(length), np.arange(length - 2, length - 2 - right, -1)])
    out = mx.take(x, mx.array(index[: len(index) - extra]), axis=1)
    return out


def mean_time_channels(x: mx.array) -> mx.array:
    """Mean of (B, T, C) over time and channels, keeping dims: (B, 1, 1).

    MLX's CPU reductions sum sequentially, so one reduction over T * C float32 values drifts by ~1e-5 relative.
    Summing blocks of 256 steps first keeps the result as accurate as torch's (pairwise) reductions.
    """
    batch, length, channels = x.shape
    block = 256
    padded = -(-length // block) * block
    if padded != length:
        x = mx.pad(x, [(0, 0), (0, padded - length), (0, 0)])
    partial = mx.sum(x.reshape(batch, padded // block, block, channels), axis=2)  # (B, T / 256, C)
    total = mx.sum(mx.sum(partial, axis=1), axis=-1)  # (B,)
    return (total / (length * channels)).reshape(batch, 1, 1)


class GroupNorm1(nn.Module):
    """``torch.nn.GroupNorm(1, dim)``: statistics over time and channels, a scale and shift per channel."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.bias = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x = x - mean_time_channels(x)
        var = mean_time_channels(x * x)
        return x * mx.rsqrt(var + self.eps) * self.weight + self.bias


def conv1d(x: mx.array, weight: mx.array, stride: int = 1, dilation: int = 1) -> mx.array:
    """Unpadded convolution of x (B, T, Cin) with weight (Cout, K, Cin).

    For long inputs with enough channels, K matmuls of shifted views beat ``mx.conv1d`` on CPU (up to 25x for
    the decoder's last 64 -> 1 conv); short or single-channel inputs keep ``mx.conv1d``.
    """
    out_channels, kernel, in_channels = weight.shape
    length = (x.shape[1] - (kernel - 1) * dilation - 1) // stride + 1
    if in_channels < 16 or length < 2048:
        return mx.conv1d(x, weight, stride=stride, dilation=dilation)
    batch, padded_length, _ = x.shape
    if stride == 1 and batch > 1:
        # Rows laid end to end: each tap is one contiguous slice of the flat signal, so no copies. Outputs that
        # straddle two rows are computed and thrown away ((B - 1) * (K - 1) * dilation of them).
        flat = x.reshape(batch * padded_length, in_channels)
        span = (batch - 1) * padded_length + length
        out = None
        for k in range(kernel):
            y = flat[k * dilation: k * dilation + span] @ weight[:, k].T  # (span, Cout)
            out = y if out is None else out + y
        out = mx.pad(out, [(0, batch * padded_length - span), (0, 0)])
        return out.reshape(batch, padded_length, out_channels)[:, :length]
    out = None
    for k in range(kernel):
        start = k * dilation
        y = x[:, start: start + (length - 1) * stride + 1: stride] @ weight[:, k].T  # (B, T', Cout)
        out = y if out is None else out + y
    return out


class EncodecConv1d(nn.Module):
    """Conv1d with the reference's causal or centred padding (plus the extra right padding that makes the
    last window complete) and optional time group norm."""

    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        if config.norm_type == "time_group_norm":
            self.norm = GroupNorm1(out_channels)
        self.causal = config.use_causal_conv
        self.pad_mode = config.pad_mode
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = (kernel_size - 1) * dilation + 1  # effective
        self.padding_total = self.kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:  # (B, T, Cin) -> (B, T', Cout)
        length = x.shape[1]
        frames = -(-(length - self.kernel_size + self.padding_total) // self.stride)  # ceil division
        extra = frames * self.stride + self.kernel_size - self.padding_total - length
        if self.causal:
            x = pad1d(x, self.padding_total, extra, self.pad_mode)
        else:
            right = self.padding_total // 2
            x = pad1d(x, self.padding_total - right, right + extra, self.pad_mode)
        x = conv1d(x, self.conv.weight, self.stride, self.dilation) + self.conv.bias
        if "norm" in self:
            x = self.norm(x)
        return x


def conv_transpose1d_plain(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """Transposed convolution with ``mx.conv_transpose1d``; ``weight`` is (Cout, K, Cin). Any kernel size."""
    return mx.conv_transpose1d(x, weight, stride=stride) + bias


def conv_transpose1d_fast(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """The same transposed convolution as one matmul and an overlap-add; needs ``K == 2 * stride``.

    Input frame t writes ``x[t] @ W[:, k]`` to output sample ``t * stride + k``. With K = 2S the first S taps of
    frame t and the last S taps of frame t - 1 land on the same S samples, so the output is two shifted halves
    of a single (B, T, Cin) x (Cin, K * Cout) product.
    """
    batch, length, _ = x.shape
    out_channels, kernel, in_channels = weight.shape
    if kernel != 2 * stride:
        raise ValueError(f"fast transposed conv needs kernel == 2 * stride, got kernel {kernel}, stride {stride}")
    w = weight.transpose(2, 1, 0).reshape(in_channels, kernel * out_channels)  # (Cin, K * Cout)
    y = (x @ w).reshape(batch, length, 2, stride, out_channels)
    head = mx.pad(y[:, :, 0], [(0, 0), (0, 1), (0, 0), (0, 0)])  # (B, T + 1, S, Cout)
    tail = mx.pad(y[:, :, 1], [(0, 0), (1, 0), (0, 0), (0, 0)])
    return (head + tail).reshape(batch, (length + 1) * stride, out_channels) + bias


class EncodecConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims the reference's fixed padding (causal: ``trim_right_ratio`` on the right)."""

    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)  # weight (Cout, K, Cin)
        if config.norm_type == "time_group_norm":
            self.norm = GroupNorm1(out_channels)
        self.causal = config.use_causal_conv
        self.trim_right_ratio = config.trim_right_ratio
        self.stride = stride
        self.kernel_size = kernel_size

    def __call__(self, x: mx.array) -> mx.array:  # (B, T, Cin) -> (B, T * stride, Cout)
        if self.kernel_size == 2 * self.stride:
            x = conv_transpose1d_fast(x, self.conv.weight, self.conv.bias, self.stride)
        else:
            x = conv_transpose1d_plain(x, self.conv.weight, self.conv.bias, self.stride)
        if "norm" in self:
            x = self.norm(x)
        padding_total = self.kernel_size - self.stride
        if self.causal:
            right = math.ceil(padding_total * self.trim_right_ratio)
        else:
            right = padding_total // 2
        left = padding_total - right
        return x[:, left: x.shape[1] - right]


# ---------------------------------------------------------------------------------------------------------------
# ELU

def elu_plain(x: mx.array) -> mx.array:
    """``torch.nn.ELU()`` (alpha 1) in MLX ops."""
    return mx.where(x > 0, x, mx.expm1(x))


class ELU(nn.Module):
    """ELU activation (no parameters, so it keeps the checkpoint's layer numbering like ``nn.ELU``).

    float32 on the CPU goes through :func:`core.cpu.encodec_numpy.elu_numpy`, everything else (GPU, other dtypes) :func:`elu_plain`.
    """

    def __call__(self, x: mx.array) -> mx.array:
        cpu = backend.cpu_paths()
        if cpu is not None and x.dtype == mx.float32:
            return cpu.elu_numpy(x)
        return elu_plain(x)


# ---------------------------------------------------------------------------------------------------------------
# LSTM, residual blocks, encoder, decoder


class LSTM(nn.Module):
    """``torch.nn.LSTM`` (stacked, gate order i, f, g, o, two biases, zero initial state).

    Parameters keep torch's names (``weight_ih_l0`` …) so checkpoints load without renaming. The input
    projections of all time steps are one MLX matmul; the recurrence runs in NumPy for float32
    (:func:`core.cpu.encodec_numpy.lstm_recurrence_numpy`) and in MLX ops otherwise (:meth:`recurrence_plain`).
    """

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"weight_ih_l{i}", mx.zeros((4 * dim, dim)))
            setattr(self, f"weight_hh_l{i}", mx.zeros((4 * dim, dim)))
            setattr(self, f"bias_ih_l{i}", mx.zeros((4 * dim,)))
            setattr(self, f"bias_hh_l{i}", mx.zeros((4 * dim,)))

    def __call__(self, x: mx.array, *, fast: bool = True) -> mx.array:  # (B, T, D) -> (B, T, D)
        for i in range(self.num_layers):
            w_hh = self[f"weight_hh_l{i}"]  # (4D, D)
            gates_x = x @ self[f"weight_ih_l{i}"].T + (self[f"bias_ih_l{i}"] + self[f"bias_hh_l{i}"])  # (B, T, 4D)
            cpu = backend.cpu_paths() if fast and gates_x.dtype == w_hh.dtype == mx.float32 else None
            if cpu is not None:
                with cpu.numpy_blas_threads(1):
                    x = mx.array(cpu.lstm_recurrence_numpy(np.asarray(gates_x), np.asarray(w_hh)))
            else:
                x = self.recurrence_plain(gates_x, w_hh)
        return x

    @staticmethod
    def recurrence_plain(gates_x: mx.array, w_hh: mx.array) -> mx.array:
        """The recurrence in MLX ops: gates_x (B, T, 4D), w_hh (4D, D) -> hidden states (B, T, D)."""
        h = c = mx.zeros((gates_x.shape[0], w_hh.shape[1]), dtype=gates_x.dtype)
        outputs = []
        for t in range(gates_x.shape[1]):
            h, c = _lstm_step(gates_x[:, t], h, c, w_hh)
            outputs.append(h)
        return mx.stack(outputs, axis=1)


@mx.compile
def _lstm_step(gates_x: mx.array, h: mx.array, c: mx.array, w_hh: mx.array) -> tuple[mx.array, mx.array]:
    # One time step, compiled so the gate arithmetic is one fused kernel.
    gates = gates_x + (w_hh @ h.T).T  # (B, 4D)
    i, f, g, o = mx.split(gates, 4, axis=-1)
    c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
    return mx.sigmoid(o) * mx.tanh(c), c


class EncodecLSTM(nn.Module):
    """Stacked LSTM with a residual connection."""

    def __init__(self, config: EncodecConfig, dim: int):
        super().__init__()
        self.lstm = LSTM(dim, config.num_lstm_layers)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lstm(x) + x


class EncodecResnetBlock(nn.Module):
    """SEANet residual block: ELU, dilated conv, ELU, 1x1 conv, plus a 1x1 conv or identity shortcut."""

    def __init__(self, config: EncodecConfig, dim: int, dilations: Sequence[int]):
        super().__init__()
        kernel_sizes = (config.residual_kernel_size, 1)
        hidden = dim // config.compress
        block: list[nn.Module] = []
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations, strict=True)):
            in_channels = dim if i == 0 else hidden
            out_channels = dim if i == len(kernel_sizes) - 1 else hidden
            block += [ELU(), EncodecConv1d(config, in_channels, out_channels, kernel_size, dilation=dilation)]
        self.block = block
        if config.use_conv_shortcut:
            self.shortcut = EncodecConv1d(config, dim, dim, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        residual = self.shortcut(x) if "shortcut" in self else x
        for layer in self.block:
            x = layer(x)
        return residual + x


def receptive_radius(layers: Sequence[nn.Module]) -> int:
    """How many input samples on each side an output sample of ``layers`` (applied in order) may depend on.

    An upper bound (the whole kernel counts on both sides, so causal and centred padding are both covered);
    raises for layers with a global view (LSTM, group norm).
    """
    radius = 0  # in samples at the output of the layers seen so far (walking backwards)
    for layer in reversed(layers):
        if isinstance(layer, ELU):
            continue
        if isinstance(layer, EncodecConv1d) and "norm" not in layer:
            radius = radius * layer.stride + layer.kernel_size
        elif isinstance(layer, EncodecConvTranspose1d) and "norm" not in layer:
            radius = -(-(radius + layer.kernel_size) // layer.stride) + 1
        elif isinstance(layer, EncodecResnetBlock):
            convs = [m for m in layer.block if isinstance(m, EncodecConv1d)]
            shortcut = [layer.shortcut] if "shortcut" in layer else []
            radius = max(receptive_radius(convs), receptive_radius(shortcut)) + radius
        else:
            raise ValueError(f"{type(layer).__name__} is not local in time; it cannot run in chunks")
    return radius


class EncodecEncoder(nn.Module):
    """SEANet encoder: audio (B, T, channels) -> embeddings (B, T / hop_length, hidden_size)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        layers: list[nn.Module] = [EncodecConv1d(config, config.audio_channels, config.num_filters, config.kernel_size)]
        scaling = 1
        for ratio in reversed(config.upsampling_ratios):
            dim = scaling * config.num_filters
            layers += [EncodecResnetBlock(config, dim, [config.dilation_growth_rate ** j, 1])
                       for j in range(config.num_residual_layers)]
            layers += [ELU(), EncodecConv1d(config, dim, dim * 2, kernel_size=ratio * 2, stride=ratio)]
            scaling *= 2
        dim = scaling * config.num_filters
        layers += [EncodecLSTM(config, dim), ELU(),
                   EncodecConv1d(config, dim, config.hidden_size, config.last_kernel_size)]
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecDecoder(nn.Module):
    """SEANet decoder: embeddings (B, F, hidden_size) -> audio (B, F * hop_length, channels)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        scaling = 2 ** len(config.upsampling_ratios)
        dim = scaling * config.num_filters
        layers: list[nn.Module] = [EncodecConv1d(config, config.hidden_size, dim, config.kernel_size),
                                   EncodecLSTM(config, dim)]
        for ratio in config.upsampling_ratios:
            dim = scaling * config.num_filters
            layers += [ELU(), EncodecConvTranspose1d(config, dim, dim // 2, kernel_size=ratio * 2, stride=ratio)]
            layers += [EncodecResnetBlock(config, dim // 2, (config.dilation_growth_rate ** j, 1))
                       for j in range(config.num_residual_layers)]
            scaling //= 2
        layers += [ELU(), EncodecConv1d(config, config.num_filters, config.audio_channels, config.last_kernel_size)]
        self.layers = layers
        # The last upsampling stages work on long signals (160 000 x 64 floats for 5 s at 32 kHz). Run them in
        # time chunks so every temporary stays in cache: see `decode_chunked`. Group norm has statistics over the
        # whole signal, so only weight-norm models chunk.
        self.lstm_end = 2  # the convolution and the LSTM: batched rows go through these together (see __call__)
        stages = max(0, len(config.upsampling_ratios) - CHUNKED_STAGES)
        self.tail_start = self.lstm_end + stages * (2 + config.num_residual_layers)
        self.chunk_length: int | None = DEFAULT_CHUNK_LENGTH if config.norm_type == "weight_norm" else None

    def __call__(self, x: mx.array) -> mx.array:  # (B, F, hidden) -> (B, F * hop, channels)
        if backend.cpu_paths() is None:  # GPUs have the bandwidth; chunks and rows apart only add dispatches
            return self.decode_plain(x)
        if x.shape[0] > 1:
            # On the CPU rows go through the LSTM together (its recurrence streams the 16 MB matrix once per step
            # for all rows: 4 rows of 5 s took 270 ms there, against 190-250 ms for each one alone), then one at a
            # time: the upsampling convolutions of several long rows fall out of cache (4 rows 5.1-6.2 s, one
            # by one 4 x 0.3-0.5 s).
            x = self.decode_plain(x, last=self.lstm_end)
            mx.eval(x)
            rows = [self._decode_layers(x[i:i + 1], self.lstm_end) for i in range(x.shape[0])]
            return mx.concatenate(rows, axis=0)
        return self._decode_layers(x, 0)

    def _decode_layers(self, x: mx.array, first: int) -> mx.array:
        """Layers ``first`` … on ``x``: in time chunks where the model allows (see :meth:`decode_chunked`)."""
        if self.chunk_length is None:
            return self.decode_plain(x, first)
        return self.decode_chunked(x, self.chunk_length, first)

    def decode_plain(self, x: mx.array, first: int = 0, last: int | None = None) -> mx.array:
        """Layers ``first`` … ``last - 1`` (every layer by default) on the whole signal (the reference's order of
        operations)."""
        for layer in self.layers[first:last]:
            x = layer(x)
        return x

    def decode_chunked(self, x: mx.array, chunk_length: int, first: int = 0) -> mx.array:
        """The first layers (from layer ``first``) on the whole signal, the rest in chunks of about ``chunk_length``
        output samples (counting every row of the batch).

        Convolutions are local, so a chunk computed with ``halo`` extra input samples on each side (less at the
        signal's ends, where the layers' own padding applies as in the plain path) is exact away from its cut
        edges; only those exact middles are kept. Each chunk is evaluated before the next one is built.
        """
        head, tail = self.layers[first: max(first, self.tail_start)], self.layers[max(first, self.tail_start):]
        for layer in head:
            x = layer(x)
        upsample = int(np.prod([layer.stride for layer in tail if isinstance(layer, EncodecConvTranspose1d)]))
        step = max(1, chunk_length // (upsample * x.shape[0]))  # tail input samples per chunk, all rows together
        length = x.shape[1]
        if length <= step:
            for layer in tail:
                x = layer(x)
            return x
        halo = receptive_radius(tail)
        mx.eval(x)
        pieces = []
        for start in range(0, length, step):
            stop = min(start + step, length)
            lo, hi = max(0, start - halo), min(length, stop + halo)
            y = x[:, lo:hi]
            for layer in tail:
                y = layer(y)
            y = y[:, (start - lo) * upsample: (stop - lo) * upsample]
            mx.eval(y)
            pieces.append(y)
        return mx.concatenate(pieces, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Residual vector quantizer


class EncodecEuclideanCodebook(nn.Module):
    """A codebook searched by Euclidean distance."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.embed = mx.zeros((config.codebook_size, config.codebook_dim))

    def encode(self, x: mx.array) -> mx.array:  # (B, T, D) -> (B, T) int32
        # The reference's formula, term for term, so that near-ties resolve the same way.
        squared = mx.sum(x * x, axis=-1, keepdims=True)  # (B, T, 1)
        dist = -(squared - 2 * (x @ self.embed.T) + mx.sum(self.embed * self.embed, axis=-1))  # (B, T, N)
        return mx.argmax(dist, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:  # (B, T) -> (B, T, D)
        return mx.take(self.embed, codes, axis=0)


class EncodecVectorQuantization(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.codebook = EncodecEuclideanCodebook(config)

    def encode(self, x: mx.array) -> mx.array:
        return self.codebook.encode(x)

    def decode(self, codes: mx.array) -> mx.array:
        return self.codebook.decode(codes)


class EncodecResidualVectorQuantizer(nn.Module):
    """Each codebook quantizes what the previous ones left over."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.frame_rate = config.frame_rate
        self.layers = [EncodecVectorQuantization(config) for _ in range(config.num_quantizers)]

    def num_quantizers_for_bandwidth(self, bandwidth: float | None = None) -> int:
        """How many codebooks a bandwidth in kbps allows (all of them for ``None``)."""
        if bandwidth is None or bandwidth <= 0.0:
            return len(self.layers)
        bits_per_quantizer = math.log2(self.codebook_size) * self.frame_rate
        return int(max(1, math.floor(bandwidth * 1000 / bits_per_quantizer)))

    def encode(self, x: mx.array, bandwidth: float | None = None) -> mx.array:  # (B, T, D) -> (B, Q, T)
        residual = x
        codes = []
        for layer in self.layers[: self.num_quantizers_for_bandwidth(bandwidth)]:
            indices = layer.encode(residual)
            residual = residual - layer.decode(indices)
            codes.append(indices)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:  # (B, Q, T) -> (B, T, D)
        out = self.layers[0].decode(codes[:, 0])
        for q in range(1, codes.shape[1]):
            out = out + self.layers[q].decode(codes[:, q])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Model


class EncodecModel(nn.Module):
    """EnCodec: SEANet encoder, residual vector quantizer, SEANet decoder; optional per-chunk normalisation."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.config = config
        self.encoder = EncodecEncoder(config)
        self.decoder = EncodecDecoder(config)
        self.quantizer = EncodecResidualVectorQuantizer(config)

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.config.audio_channels

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def chunk_length(self) -> int | None:
        return self.config.chunk_length

    @property
    def chunk_stride(self) -> int | None:
        return self.config.chunk_stride

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    # -- encoding ---------------------------------------------------------------------------------------------
    def _encode_frame(self, input_values: mx.array, bandwidth: float | None) -> tuple[mx.array, mx.array | None]:
        """Encode one chunk (B, T, C) to codes (B, Q, F) and, when normalising, its scale (B, 1, 1)."""
        length = input_values.shape[1]
        if self.config.chunk_length_s is not None and length / self.sampling_rate > 1e-5 + self.config.chunk_length_s:
            raise ValueError(f"a chunk of {length} samples is longer than chunk_length_s={self.config.chunk_length_s}")
        scale = None
        if self.config.normalize:
            mono = mx.sum(input_values, axis=2, keepdims=True) / input_values.shape[2]  # (B, T, 1)
            scale = mx.sqrt(mean_time_channels(mono * mono)) + 1e-8  # (B, 1, 1)
            input_values = input_values / scale
        embeddings = self.encoder(input_values)
        return self.quantizer.encode(embeddings, bandwidth), scale

    def encode(self, input_values: mx.array, padding_mask: mx.array | None = None, bandwidth: float | None = None,
               *, return_pad_length: bool = False):
        """Encode audio (B, T, C) to ``(audio_codes (B, chunks, Q, F) int32, audio_scales)``.

        ``padding_mask`` (B, T) or (B, T, C) zeroes padded samples (as the processor returns it). ``bandwidth``
        in kbps must be one of ``config.target_bandwidths`` (default: the smallest). ``audio_scales`` holds one
        (B, 1, 1) array per chunk, or ``None`` per chunk when the model does not normalise. Codes of a shorter
        last chunk are padded with zeros; ``return_pad_length=True`` also returns that padding (pass it to
        :meth:`decode` as ``last_frame_pad_length``).
        """
        if bandwidth is None:
            bandwidth = self.config.target_bandwidths[0]
        if float(bandwidth) not in self.config.target_bandwidths:
            raise ValueError(f"bandwidth {bandwidth} is not supported; choose one of {self.config.target_bandwidths}")
        input_values = _as_batch(input_values, self.channels)
        batch, length, _ = input_values.shape
        if padding_mask is None:
            padding_mask = mx.ones((batch, length, 1), dtype=mx.bool_)
        else:
            padding_mask = padding_mask.reshape(padding_mask.shape[0], padding_mask.shape[1], -1).astype(mx.bool_)
            if padding_mask.shape[:2] != (batch, length):
                raise ValueError(f"padding_mask of shape {padding_mask.shape} does not fit audio of shape "
                                 f"{input_values.shape}")
        chunk_length, stride = self.chunk_length, self.chunk_stride
        if chunk_length is None or stride is None:
            chunk_length = stride = length
        codes, scales = [], []
        for offset in range(0, length, stride):
            chunk = input_values[:, offset: offset + chunk_length]
            chunk = mx.where(padding_mask[:, offset: offset + chunk_length], chunk, mx.zeros_like(chunk))
            frame_codes, scale = self._encode_frame(chunk, bandwidth)
            codes.append(frame_codes)
            scales.append(scale)
        pad = codes[0].shape[-1] - codes[-1].shape[-1]
        if pad > 0:
            codes[-1] = mx.pad(codes[-1], [(0, 0), (0, 0), (0, pad)])
        audio_codes = mx.stack(codes, axis=1)  # (B, chunks, Q, F)
        return (audio_codes, scales, pad) if return_pad_length else (audio_codes, scales)

    # -- decoding ---------------------------------------------------------------------------------------------
    def _decode_frame(self, codes: mx.array, scale: mx.array | None = None) -> mx.array:
        """Decode one chunk's codes (B, Q, F) to audio (B, F * hop_length, C), undoing its normalisation."""
        audio = self.decoder(self.quantizer.decode(codes))
        if scale is not None:
            audio = audio * scale.reshape(-1, 1, 1)
        return audio

    @staticmethod
    def _linear_overlap_add(frames: list[mx.array], stride: int) -> mx.array:
        """Join chunks (B, T_i, C) that start ``stride`` apart, cross-fading overlaps with triangular weights.

        Each chunk is weighted by a triangle peaking at its middle and the sum is divided by the summed weights,
        so a sample covered by one chunk is unchanged and two overlapping chunks fade linearly into each other.
        """
        if not frames:
            raise ValueError("no frames to overlap-add")
        frame_length = frames[0].shape[1]
        total = stride * (len(frames) - 1) + frames[-1].shape[1]
        time = np.linspace(0.0, 1.0, frame_length + 2, dtype=np.float64)[1:-1]
        weight = (0.5 - np.abs(time - 0.5)).astype(np.float32)
        sum_weight = np.zeros(total, dtype=np.float32)
        for i, frame in enumerate(frames):
            sum_weight[i * stride: i * stride + frame.shape[1]] += weight[: frame.shape[1]]
        if sum_weight.min() <= 0:
            raise ValueError("overlap-add leaves samples with no weight (stride larger than the chunks)")
        dtype = frames[0].dtype
        out = mx.zeros((frames[0].shape[0], total, frames[0].shape[2]), dtype=dtype)
        for i, frame in enumerate(frames):
            n = frame.shape[1]
            w = mx.array(weight[:n]).astype(dtype)[None, :, None]
            out[:, i * stride: i * stride + n] = out[:, i * stride: i * stride + n] + w * frame
        return out / mx.array(sum_weight).astype(dtype)[None, :, None]

    def decode(self, audio_codes: mx.array, audio_scales: Sequence[mx.array | None] | None = None,
               padding_mask: mx.array | None = None, *, last_frame_pad_length: int = 0) -> mx.array:
        """Decode codes (B, chunks, Q, F) to audio (B, T, C).

        ``audio_scales`` comes from :meth:`encode` (``None`` for models that do not normalise). With a
        ``padding_mask`` (B, T[, C]) the audio is cut to its length. ``last_frame_pad_length`` drops that many
        padded frames from the last chunk, as :meth:`encode` with ``return_pad_length=True`` reports them.
        """
        if audio_codes.ndim != 4:
            raise ValueError(f"audio_codes must be (batch, chunks, codebooks, frames), got shape {audio_codes.shape}")
        audio_codes = audio_codes.astype(mx.int32)
        chunks = audio_codes.shape[1]
        scales = list(audio_scales) if audio_scales is not None else [None] * chunks
        if len(scales) != chunks:
            raise ValueError(f"got {len(scales)} audio_scales for {chunks} chunks")
        frames = []
        for i in range(chunks):
            codes = audio_codes[:, i]
            if i == chunks - 1 and last_frame_pad_length > 0:
                codes = codes[..., :-last_frame_pad_length]
            frames.append(self._decode_frame(codes, scales[i]))
        if self.chunk_length is None:
            if chunks != 1:
                raise ValueError(f"this model does not chunk: expected 1 chunk, got {chunks}")
            audio = frames[0]
        else:
            audio = self._linear_overlap_add(frames, self.chunk_stride or 1)
        if padding_mask is not None and padding_mask.shape[1] < audio.shape[1]:
            audio = audio[:, : padding_mask.shape[1]]
        return audio

    # -- loading ----------------------------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Turn Hugging Face EnCodec weights (keys without an ``audio_encoder.`` prefix) into this module's.

        Folds weight norm (either storage format), moves conv axes to MLX's (Cout, K, Cin) and drops codebook
        training statistics.
        """
        transposed = {name + ".conv.weight" for name, module in self.named_modules()
                      if isinstance(module, EncodecConvTranspose1d)}
        out = {}
        for key, value in fold_weight_norm(weights).items():
            if key.endswith(DROPPED_SUFFIXES):
                continue
            if key in transposed and value.ndim == 3:
                value = value.transpose(1, 2, 0)  # torch (Cin, Cout, K) -> (Cout, K, Cin)
            elif key.endswith("conv.weight") and value.ndim == 3:
                value = value.transpose(0, 2, 1)  # torch (Cout, Cin, K) -> (Cout, K, Cin)
            out[key] = value
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str | mx.Dtype = "float32"
                        ) -> tuple[EncodecModel, EncodecProcessor]:
        """Load a standalone EnCodec checkpoint (``facebook/encodec_24khz`` …) or the codec of a MusicGen one.

        Returns the model and the processor that prepares waveforms for :meth:`encode`.
        """
        dtype = parse_dtype(dtype)
        folder = resolve(name_or_path)
        raw = read_config(folder)
        prefix = ""
        if isinstance(raw.get("audio_encoder"), dict):  # a MusicGen checkpoint
            raw, prefix = raw["audio_encoder"], "audio_encoder."
        try:
            config = EncodecConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'} is not a valid EnCodec config: {e}") from None
        weights = load_safetensors(folder)
        if prefix:
            weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        model = cls(config)
        weights = {k: v.astype(dtype) for k, v in model.sanitize(weights).items()}
        check_weights(model, weights, f"{folder} (EnCodec weights)")
        mx.eval(model.parameters())
        processor = EncodecProcessor.from_folder(folder, config)
        log.info("loaded EnCodec %s: %d Hz, %d channel(s), %d codebooks", name_or_path, config.sampling_rate,
                 config.audio_channels, config.num_quantizers)
        return model, processor


def _as_batch(input_values: mx.array, channels: int) -> mx.array:
    if input_values.ndim == 2 and channels == 1:
        input_values = input_values[..., None]
    if input_values.ndim != 3 or input_values.shape[2] != channels:
        raise ValueError(f"expected audio of shape (batch, samples, {channels}), got {tuple(input_values.shape)}")
    return input_values


# ---------------------------------------------------------------------------------------------------------------
# Processor


@dataclass
class EncodecProcessor(Chunking, BaseConfig):
    """Batches waveforms for :meth:`EncodecModel.encode` like the Hugging Face ``EncodecFeatureExtractor``.

    Waveforms are right-padded to the longest one, and when the model chunks, further to a whole number of
    chunk strides plus one chunk; ``padding_mask`` marks the real samples.
    """

    feature_size: int = 1
    sampling_rate: int = 24_000
    padding_value: float = 0.0
    chunk_length_s: float | None = None
    overlap: float | None = None

    @classmethod
    def from_config(cls, config: EncodecConfig) -> EncodecProcessor:
        return cls(feature_size=config.audio_channels, sampling_rate=config.sampling_rate,
                   chunk_length_s=config.chunk_length_s, overlap=config.overlap)

    @classmethod
    def from_folder(cls, folder: Path, config: EncodecConfig) -> EncodecProcessor:
        """From ``preprocessor_config.json`` when the folder has one, else from the model config."""
        if (folder / "preprocessor_config.json").is_file():
            processor = cls.from_dict(read_config(folder, "preprocessor_config.json"))
            if (processor.feature_size, processor.sampling_rate) != (config.audio_channels, config.sampling_rate):
                raise CheckpointError(f"{folder / 'preprocessor_config.json'} disagrees with config.json about "
                                      "the sampling rate or the number of channels")
            return processor
        return cls.from_config(config)

    def __call__(self, raw_audio: np.ndarray | Sequence[np.ndarray], *, sampling_rate: int) -> dict[str, mx.array]:
        """Batch one waveform or a list of them: ``(samples,)`` or ``(samples, channels)`` each.

        Returns ``input_values`` (B, T, channels) float32 and ``padding_mask`` (B, T) bool.
        """
        if sampling_rate != self.sampling_rate:
            raise ValueError(f"audio sampled at {sampling_rate} Hz, but this model needs {self.sampling_rate} Hz; "
                             "resample it first")
        batched = isinstance(raw_audio, (list, tuple)) and len(raw_audio) > 0 and not np.isscalar(raw_audio[0])
        waves = [np.asarray(w, dtype=np.float32) for w in (raw_audio if batched else [raw_audio])]
        for i, wave in enumerate(waves):
            if wave.ndim == 1:
                wave = wave[:, None]
            if wave.ndim != 2 or wave.shape[1] != self.feature_size:
                raise ValueError(f"waveform {i} has shape {np.shape(raw_audio[i] if batched else raw_audio)}; "
                                 f"expected (samples, {self.feature_size})"
                                 + (" or (samples,)" if self.feature_size == 1 else ""))
            if wave.shape[0] == 0:
                raise ValueError(f"waveform {i} is empty")
            waves[i] = wave
        length = max(w.shape[0] for w in waves)
        if self.chunk_length is not None and self.chunk_stride is not None:
            steps = math.ceil(length / self.chunk_stride)
            length = (steps - 1) * self.chunk_stride + self.chunk_length
        values = np.full((len(waves), length, self.feature_size), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(waves), length), dtype=bool)
        for i, wave in enumerate(waves):
            values[i, : wave.shape[0]] = wave
            mask[i, : wave.shape[0]] = True
        return {"input_values": mx.array(values), "padding_mask": mx.array(mask)}
