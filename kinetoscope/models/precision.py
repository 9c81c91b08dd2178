"""The compute precision every model runs in: bf16 autocast where the hardware multiplies bf16
natively (CUDA; CPUs with AVX-512 BF16 or AMX), fp32 elsewhere."""

from contextlib import nullcontext
from functools import cache

import torch


@cache
def cpu_multiplies_bf16() -> bool:
    # Without these units oneDNN emulates bf16 matmuls: on a 2-core AVX2 EPYC a 1024^2 matmul ran at
    # 0.95 GFLOP/s against 129 GFLOP/s in fp32; autocast there made generation 5x and training 15x slower.
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return torch.bfloat16
    return torch.float32


def autocast_for(device: torch.device):
    dtype = compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
