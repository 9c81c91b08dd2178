"""Encode a clip to latents and decode it back: the autoencoder as a user-facing pipeline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kinetoscope.data.dataset import clip_to_tensor, tensor_to_clip
from kinetoscope.models.autoencoder import VideoAutoencoder
from kinetoscope.models.precision import autocast_for

MAX_PIXELS = 1024 * 1024 * 257  # beyond this a round trip would take minutes; refuse up front


class VideoReconstruction:
    """Round-trips any clip: sizes and lengths the autoencoder cannot take are padded, then cropped."""

    def __init__(self, autoencoder: VideoAutoencoder, device: str | torch.device = "cpu", chunk_steps: int = 8):
        self.autoencoder = autoencoder.to(device).eval()
        self.device = torch.device(device)
        self.chunk_steps = chunk_steps

    @classmethod
    def load(cls, weights: str | None = None, device: str | None = None) -> "VideoReconstruction":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(VideoAutoencoder.from_pretrained(weights), device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) -> uint8 (T, H, W, 3)."""
        t, h, w, _ = frames.shape
        if t * h * w > MAX_PIXELS:
            raise ValueError(f"clip too large to reconstruct: {t} frames of {w}x{h}")
        video = clip_to_tensor(frames)[None].to(self.device)
        cfg = self.autoencoder.cfg
        pad_t = (-(t - 1)) % cfg.temporal_factor
        pad_h, pad_w = (-h) % cfg.spatial_factor, (-w) % cfg.spatial_factor
        # Replicate edges and the last frame: padding that looks like the clip costs the least.
        padded = F.pad(video, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")
        with autocast_for(self.device):
            latents = self.autoencoder.encode(padded, chunk_steps=self.chunk_steps)
            restored = self.autoencoder.decode(latents, chunk_steps=self.chunk_steps)
        return tensor_to_clip(restored[0, :, :t, :h, :w])
