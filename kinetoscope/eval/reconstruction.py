"""How well the autoencoder gives back what it was given: PSNR, SSIM, palette colours, speed."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from kinetoscope.data import world
from kinetoscope.data.dataset import Bucket, ShapesWorldDataset, tensor_to_clip
from kinetoscope.models.precision import autocast_for

EVAL_BUCKETS = (Bucket(64, 64, 17), Bucket(96, 64, 17), Bucket(128, 128, 17), Bucket(128, 128, 1))
EVAL_SEED = 20261125  # held-out clips: a seed the training stream never uses, on the held-out split


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per clip, in dB on the 8-bit scale; inputs (B, 3, T, H, W) in [-1, 1]."""
    a = _to_8bit(original)
    b = _to_8bit(reconstruction)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per clip mean SSIM (Gaussian window 11, sigma 1.5, per frame and channel)."""
    a = _to_8bit(original).transpose(1, 2).flatten(0, 2)[:, None]  # (B*T*3, 1, H, W)
    b = _to_8bit(reconstruction).transpose(1, 2).flatten(0, 2)[:, None]
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    pad = 5

    def blur(x):
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), window)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.reshape(original.shape[0], -1).mean(1)


def _to_8bit(video: torch.Tensor) -> torch.Tensor:
    return video.float().clamp(-1, 1).add(1).mul(127.5).round()


def palette_colours_kept(original: np.ndarray, reconstruction: np.ndarray, scene: world.Scene) -> tuple[int, int]:
    """(objects whose reconstructed interior still classifies to their palette colour, objects)."""
    palette_names = list(world.COLORS) + list(world.BACKGROUNDS)
    palette = np.array([*world.COLORS.values(), *world.BACKGROUNDS.values()], dtype=np.float32)
    kept = 0
    for obj, _count in scene.groups():
        interior = np.all(original == np.array(world.COLORS[obj.color], dtype=np.uint8), axis=-1)
        if not interior.any():
            continue
        pixels = reconstruction[interior].astype(np.float32)
        nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        majority = np.bincount(nearest, minlength=len(palette_names)).argmax()
        kept += palette_names[majority] == obj.color
    return kept, len(scene.groups())


def heldout_batches(clips_per_bucket: int = 16, buckets=EVAL_BUCKETS, fps: float = 8.0):
    """The evaluation's held-out clips, one batch per bucket in order: the same clips every time."""
    dataset = ShapesWorldDataset(seed=EVAL_SEED, fps=fps, split="heldout", with_captions=False)
    rng = np.random.default_rng(EVAL_SEED)
    for bucket in buckets:
        yield bucket, dataset.make_batch(rng, bucket, clips_per_bucket)


def heldout_clips(bucket: Bucket, clips_per_bucket: int = 16) -> torch.Tensor:
    """The clips `kinetoscope ae eval` scores for `bucket` (one of EVAL_BUCKETS), as (B, 3, T, H, W)."""
    if bucket not in EVAL_BUCKETS:
        raise ValueError(f"{bucket} is not one of the evaluation's buckets ({', '.join(map(str, EVAL_BUCKETS))})")
    return next(batch for b, batch in heldout_batches(clips_per_bucket) if b == bucket)["video"]


@torch.no_grad()
def evaluate_autoencoder(model, clips_per_bucket: int = 16, buckets=EVAL_BUCKETS, fps: float = 8.0, progress=None) -> dict:
    """PSNR / SSIM / palette colours on held-out Shapes World clips, per bucket."""
    device = next(model.parameters()).device
    results = {}
    for bucket, batch in heldout_batches(clips_per_bucket, buckets, fps):
        video = batch["video"].to(device)
        with autocast_for(device):
            recon = model.decode(model.encode(video))
        recon = recon.float().cpu()
        video = video.cpu()
        kept = total = 0
        for i, scene in enumerate(batch["scene"]):
            k, n = palette_colours_kept(tensor_to_clip(video[i]), tensor_to_clip(recon[i]), world.Scene.from_dict(scene))
            kept, total = kept + k, total + n
        results[str(bucket)] = {
            "psnr": float(psnr(video, recon).mean()),
            "ssim": float(ssim(video, recon).mean()),
            "palette_colours_kept": kept / max(total, 1),
        }
        if progress is not None:
            progress(bucket, results[str(bucket)])
    return results


@torch.no_grad()
def time_round_trip(model, bucket: Bucket = Bucket(128, 128, 17), repeats: int = 10) -> dict:
    """Warm encode and decode times of one clip (median over repeats), in seconds."""
    device = next(model.parameters()).device
    video = torch.zeros(1, 3, bucket.frames, bucket.height, bucket.width, device=device)
    encode_times, decode_times = [], []
    with autocast_for(device):
        latents = model.encode(video)
        model.decode(latents)
        for _ in range(repeats):
            start = time.perf_counter()
            latents = model.encode(video)
            _sync(device)
            middle = time.perf_counter()
            model.decode(latents)
            _sync(device)
            encode_times.append(middle - start)
            decode_times.append(time.perf_counter() - middle)
    return {"bucket": str(bucket), "encode_s": float(np.median(encode_times)), "decode_s": float(np.median(decode_times))}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
