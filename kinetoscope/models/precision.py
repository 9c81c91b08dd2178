"""The compute precision every model runs in: bf16 autocast on CPU (AVX-512 bf16 matmuls) and CUDA."""

from contextlib import nullcontext

import torch


def autocast_for(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type in ("cpu", "cuda") else nullcontext()
