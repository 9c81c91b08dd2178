"""Generation speed: seconds per clip by stage, real-time factor, achieved FLOP/s, peak memory."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kinetoscope.diffusion.rectified_flow import SAMPLERS
from kinetoscope.models.precision import compute_dtype

# Prompts of different lengths and words; the encoder's cache is cleared before each timed run, so
# every run pays for encoding as a new prompt would.
WARM_UP_PROMPT = "an orange square moves down on a white background"
BENCH_PROMPTS = (
    "a red circle moves to the right on a black background",
    "two small yellow squares slide up quickly",
    "a big blue triangle spins while a pink ball bounces, on white",
    "a green box left of an orange disc; the box grows",
    "a purple triangle shrinks on a gray background",
    "a cyan circle bounces while a red square moves left slowly",
)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel, which
# scaled_dot_product_attention dispatches to here: without this its FLOPs would count as zero.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def matmul_rate(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0, device="cpu") -> float:
    """This machine's dense matmul throughput in FLOP/s, for comparing the denoiser against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()  # the warm-up's queued work is not part of the timing
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def denoiser_flops(pipe, width: int, height: int, frames: int, sampling) -> int:
    """FLOPs of one clip's sampling as it is made: every velocity evaluation of its sampler, with
    both halves of the batch where classifier-free guidance applies (its interval) and one pass
    elsewhere or for a guidance-distilled model. A low-noise transformer has the transformer's
    architecture (the pipeline checks), so counting the transformer's passes alone counts its too."""
    latent_shape = pipe.autoencoder.latent_shape(frames, height, width)
    text, mask = pipe.text_encoder.encode([BENCH_PROMPTS[0]])
    velocity = pipe.guided_velocity(text.to(pipe.device), mask.to(pipe.device), sampling.guidance, pipe.transformer,  # eager: compiled kernels go uncounted
                                    interval=sampling.guidance_interval)
    times = pipe.schedule.sampling_times(sampling.steps, pipe.transformer.token_count(latent_shape), pipe.device)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter, torch.no_grad():
        SAMPLERS[sampling.sampler](velocity, torch.zeros(1, *latent_shape, device=pipe.device), times,
                                   draw_noise=lambda shape: torch.zeros(shape))
    return counter.get_total_flops()


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory allocated at once during the timed generations, the resident weights
    included. CPU: the process's peak resident memory, loading included (the OS keeps no per-phase peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark_generation(pipe, width=128, height=128, frames=17, sampling=None, repeats=5, prompts=BENCH_PROMPTS,
                         progress=None) -> dict:
    """`sampling`: SamplingSettings, or None for the model's own. Timed run i makes prompts[i % len(prompts)]
    from noise seed i (as `kinetoscope eval` seeds its prompts); `progress` (tqdm, say) wraps the runs."""
    sampling = sampling or pipe.sampling_for()
    pipe(WARM_UP_PROMPT, width=width, height=height, frames=frames, **asdict(sampling))
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    videos = []
    for i in (progress or iter)(range(repeats)):
        pipe.text_encoder.clear_cache()  # every run pays for encoding its prompt, as a new prompt would
        videos.append(pipe(prompts[i % len(prompts)], width=width, height=height, frames=frames, seed=i, **asdict(sampling)))
    memory = peak_memory_mib(pipe.device)  # before the FLOP count and the matmul rate allocate their own
    stages = {stage: float(np.median([video.timings[stage] for video in videos])) for stage in videos[0].timings}
    painting = float(np.median([video.timings["denoise"] / video.draws for video in videos]))  # one denoising, redraws apart
    total = sum(stages.values())
    clip_seconds = (frames - 1) / pipe.fps
    flops = denoiser_flops(pipe, width, height, frames, sampling)
    dtype = compute_dtype(pipe.device)
    peak = matmul_rate(dtype, device=pipe.device.type)
    return {
        "clip": f"{width}x{height}, {frames} frames ({clip_seconds:g} s at {pipe.fps:g} fps), {sampling.describe()}",
        "stages_s": stages,
        "total_s": total,
        # The median clip hides redraws, which a few prompts take many of: the mean is what a user waits on average.
        "mean_total_s": float(np.mean([sum(video.timings.values()) for video in videos])),
        "real_time_factor": clip_seconds / total,
        "paintings_per_clip": float(np.mean([video.draws for video in videos])),
        "denoiser_flops_per_s": flops / painting,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "matmul_flops_per_s": peak,
        "fraction_of_matmul_rate": flops / painting / peak,
        "peak_memory_mib": memory,
    }
