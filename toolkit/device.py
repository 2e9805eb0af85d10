"""Device, precision and peak FLOP/s (for MFU)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import time

import torch

from toolkit.errors import UserError

# dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps") from None


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process instead of returning it to the system, for CPU training.

    glibc serves large blocks (from 128 KB, rising to 32 MB as blocks are freed) with fresh mmap'd pages and
    trims the heap's free top, so the activations, logits and temporaries of every step arrive in new memory
    and pay a page fault per 4 KB: 3 000 faults per step of the attractor A1 recipe, 30 000 of the demo's
    llama (its 32 MB logits), a tenth of their step time. With no mmap'd blocks and a 1 GB trim threshold
    they come from the heap and are reused; the cost is that the process keeps its peak heap. Skipped when
    the user set MALLOC_* or GLIBC_TUNABLES malloc settings (their choice wins) and on other C libraries.
    Returns whether it applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in tunables:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on CUDA GPUs and CPUs (AVX-512 BF16 / AMX) that support it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_supported():
        raise UserError("train.dtype=bfloat16: this CPU has no native bf16 support (use float32)")
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("train.dtype=float16 needs a GPU (use bfloat16 or float32 on CPU)")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; master weights and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_cpu_peak: dict = {}


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the recipe's value, a known GPU's dense peak, or a measured CPU matmul peak."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # TF32 is about half the bf16 rate
        return 0.0
    if device.type == "cpu":
        if dtype not in _cpu_peak:
            n = 1024
            g = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run's dropout must not see this
            a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
            a @ b
            best = float("inf")
            for _ in range(5):  # the best of a few short trials: other load only ever slows a trial down
                t0 = time.perf_counter()
                for _ in range(3):
                    a @ b
                best = min(best, (time.perf_counter() - t0) / 3)
            _cpu_peak[dtype] = 2 * n**3 / best
        return _cpu_peak[dtype]
    return 0.0
