"""EnCodec through transformers' `EncodecModel`: load, encode long audio in chunks, decode.

The 24 kHz model is causal (causal convolutions, a one-way LSTM): a frame's code depends only on the audio
before it. So chunks can be batched with zero padding on the right (it changes only frames we drop), and a
second of left context before each chunk makes its first frames match what a single pass over the whole file
would give. Chunks are cut in silences where there are any (the seed's silence-aware chunking), else in the
middle, always on a frame boundary, so the codes of the chunks concatenate to exactly ceil(samples / hop) frames.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from toolkit.audio import DEFAULT_BANDWIDTH, DEFAULT_CODEC
from toolkit.errors import UserError


@dataclass
class Codec:
    model: torch.nn.Module  # transformers.EncodecModel, in eval mode on `device`
    name: str  # hub name or local folder; stored in code files so decode can find the same codec
    device: torch.device

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop(self) -> int:
        return int(self.model.config.hop_length)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def bandwidths(self) -> list[float]:
        return [float(b) for b in self.model.config.target_bandwidths]

    def n_codebooks(self, bandwidth: float) -> int:
        if float(bandwidth) not in self.bandwidths:
            raise UserError(f"--bandwidth {bandwidth:g}: this codec supports "
                            f"{', '.join(f'{b:g}' for b in self.bandwidths)} kbps")
        return self.model.quantizer.get_num_quantizers_for_bandwidth(float(bandwidth))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def from_model(model: torch.nn.Module, name: str, device: str = "cpu") -> Codec:
    """Wrap an `EncodecModel` (pretrained or built from a config) after checking it is one we can chunk."""
    cfg = model.config
    if not cfg.use_causal_conv or cfg.normalize or cfg.chunk_length_s is not None or cfg.audio_channels != 1:
        raise UserError(f"codec {name}: only causal mono EnCodec models without normalisation (like "
                        f"{DEFAULT_CODEC}) are supported")
    dev = resolve_device(device)
    return Codec(model.eval().to(dev), name, dev)


def load_codec(name_or_path: str = DEFAULT_CODEC, device: str = "auto") -> Codec:
    """EnCodec from a local `save_pretrained` folder, or by name from the Hugging Face hub."""
    from transformers import EncodecModel

    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            model = EncodecModel.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"--codec {path}: not an EnCodec model folder ({str(e).splitlines()[0]})") from None
        return from_model(model, str(path.resolve()), device)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"--codec {name_or_path}: no such folder (give a folder saved with save_pretrained, "
                        f"or a hub name like {DEFAULT_CODEC})")
    from toolkit.hub import offline_unless_reachable

    offline_unless_reachable()
    try:
        model = EncodecModel.from_pretrained(name_or_path)
    except OSError:
        raise UserError(f"cannot load EnCodec {name_or_path!r} from the Hugging Face hub (offline?): pass "
                        f"--codec PATH with a local copy made by EncodecModel.from_pretrained('{name_or_path}')"
                        ".save_pretrained(PATH)") from None
    return from_model(model, name_or_path, device)


# --- chunking ---------------------------------------------------------------------------------------


def silence_cuts(audio: np.ndarray, sample_rate: int, threshold_db: float = -60.0, min_silence_s: float = 1.0,
                 window: int = 2048, hop: int = 512) -> np.ndarray:
    """Sample positions in the middle of every silent run longer than `min_silence_s` (the seed's rule: windows
    of 2048 samples, hop 512, whose peak is below -60 dBFS)."""
    n_blocks = len(audio) // hop
    k = window // hop
    if n_blocks < k:
        return np.zeros(0, dtype=np.int64)
    peaks = np.abs(audio[: n_blocks * hop]).reshape(n_blocks, hop).max(axis=1)
    window_peak = np.lib.stride_tricks.sliding_window_view(peaks, k).max(axis=1)  # window i: [i*hop, i*hop+window)
    silent = np.concatenate([[0], (window_peak < 10 ** (threshold_db / 20)).astype(np.int8), [0]])
    edges = np.diff(silent)
    first, stop = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    run_start, run_end = first * hop, (stop - 1) * hop + window
    keep = run_end - run_start >= min_silence_s * sample_rate
    return ((run_start + run_end) // 2)[keep].astype(np.int64)


def plan_chunks(n_samples: int, max_len: int, cuts: np.ndarray, align: int) -> list[tuple[int, int]]:
    """Split [0, n_samples) until no chunk is longer than `max_len`: always the longest chunk, at the candidate
    cut nearest its middle (within its middle half), else at its middle. Cuts fall on multiples of `align`."""
    max_len = max(align, max_len // align * align)
    cuts = np.unique(np.asarray(cuts, dtype=np.int64) // align * align)
    heap = [(-n_samples, 0, n_samples)]
    done = []
    while heap:
        neg, start, end = heapq.heappop(heap)
        if -neg <= max_len:
            done.append((start, end))
            continue
        length = end - start
        inside = cuts[(cuts >= start + length // 4) & (cuts <= end - length // 4)]
        middle = start + length // 2
        cut = int(inside[np.argmin(np.abs(inside - middle))]) if len(inside) else start + (length // 2) // align * align
        cut = max(cut, start + align)  # start + align < end, as length > max_len >= align
        heapq.heappush(heap, (-(cut - start), start, cut))
        heapq.heappush(heap, (-(end - cut), cut, end))
    return sorted(done)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- encode / decode --------------------------------------------------------------------------------


@torch.inference_mode()
def encode(codec: Codec, audio: np.ndarray, bandwidth: float = DEFAULT_BANDWIDTH, chunk_seconds: float = 20.0,
           context_seconds: float = 1.0, batch_size: int = 4, cut_at_silence: bool = True,
           on_progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Mono float audio at the codec's rate -> codes, int16 (n_codebooks, ceil(len / hop))."""
    n_q = codec.n_codebooks(bandwidth)
    hop, sr = codec.hop, codec.sample_rate
    n_frames = math.ceil(len(audio) / hop)
    cuts = silence_cuts(audio, sr) if cut_at_silence else np.zeros(0, dtype=np.int64)
    chunks = plan_chunks(len(audio), int(chunk_seconds * sr), cuts, hop)
    context = int(round(context_seconds * sr / hop)) * hop
    spans = [(max(0, s - context), s, e) for s, e in chunks]  # (input start, kept start, end)
    spans.sort(key=lambda span: span[2] - span[0])  # similar lengths share a batch: little padding
    out = np.zeros((n_q, n_frames), dtype=np.int16)
    for batch in _batches(spans, batch_size):
        width = max(e - s0 for s0, _, e in batch)
        x = torch.zeros(len(batch), 1, width)
        for j, (s0, _, e) in enumerate(batch):
            x[j, 0, : e - s0] = torch.from_numpy(audio[s0:e])
        embeddings = codec.model.encoder(x.to(codec.device))
        codes = codec.model.quantizer.encode(embeddings, float(bandwidth)).cpu().numpy()  # (n_q, batch, frames)
        for j, (s0, s, e) in enumerate(batch):
            skip, n = (s - s0) // hop, math.ceil((e - s) / hop)
            out[:, s // hop : s // hop + n] = codes[:, j, skip : skip + n]
        if on_progress is not None:
            on_progress(sum(e - s for _, s, e in batch) / sr)
    return out


@torch.inference_mode()
def decode(codec: Codec, codes: np.ndarray, n_codebooks: int | None = None, chunk_seconds: float = 20.0,
           context_seconds: float = 1.0, batch_size: int = 4,
           on_progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Codes (n_codebooks, frames) -> mono float32 audio of frames * hop samples, from the first `n_codebooks`
    codebooks (residual quantisation: fewer codebooks = coarser audio; the seed decoded codebook 0 alone)."""
    n = codes.shape[0] if n_codebooks is None else n_codebooks
    if not 1 <= n <= codes.shape[0]:
        raise UserError(f"--codebooks {n}: the code file has {codes.shape[0]} codebooks")
    if n > len(codec.model.quantizer.layers):
        raise UserError(f"--codebooks {n}: the codec has only {len(codec.model.quantizer.layers)} codebooks")
    if codes.size and (codes.min() < 0 or codes.max() >= codec.codebook_size):
        raise UserError(f"codes out of range for a codebook of {codec.codebook_size}")
    hop, sr = codec.hop, codec.sample_rate
    n_frames = codes.shape[1]
    step = max(1, int(chunk_seconds * codec.frame_rate))
    context = int(round(context_seconds * codec.frame_rate))
    spans = [(max(0, s - context), s, min(s + step, n_frames)) for s in range(0, n_frames, step)]
    out = np.zeros(n_frames * hop, dtype=np.float32)
    for batch in _batches(spans, batch_size):
        width = max(e - s0 for s0, _, e in batch)
        c = torch.zeros(n, len(batch), width, dtype=torch.long)
        for j, (s0, _, e) in enumerate(batch):
            c[:, j, : e - s0] = torch.from_numpy(codes[:n, s0:e].astype(np.int64))
        audio = codec.model.decoder(codec.model.quantizer.decode(c.to(codec.device)))[:, 0].float().cpu().numpy()
        for j, (s0, s, e) in enumerate(batch):
            out[s * hop : e * hop] = audio[j, (s - s0) * hop : (e - s0) * hop]
        if on_progress is not None:
            on_progress(sum(e - s for _, s, e in batch) * hop / sr)
    return out


@torch.inference_mode()
def seed_codebooks(codec: Codec, audio: np.ndarray, bandwidth: float = DEFAULT_BANDWIDTH, seed: int = 0) -> None:
    """Fill the codebooks of a randomly initialised codec with encoder frames of `audio` (each codebook from the
    residual the previous ones leave), so it emits varied codes. Random EnCodec codebooks are all zero, and then
    every code is 0. For tests and benchmarks only: a real codec is pretrained."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None].to(codec.device)
    residual = codec.model.encoder(x)[0].T  # (frames, dim)
    for layer in codec.model.quantizer.layers[: codec.n_codebooks(bandwidth)]:
        book = layer.codebook
        if len(residual) >= book.codebook_size:
            pick = torch.randperm(len(residual), generator=gen)[: book.codebook_size]
        else:
            pick = torch.randint(0, len(residual), (book.codebook_size,), generator=gen)
        # noise keeps repeated frames apart: near-equal entries would make codes flip on rounding differences
        noise = torch.randn(book.codebook_size, residual.shape[1], generator=gen).to(residual.device)
        book.embed.copy_(residual[pick.to(residual.device)] + 0.01 * residual.std() * noise)
        residual = residual - book.decode(book.encode(residual))
