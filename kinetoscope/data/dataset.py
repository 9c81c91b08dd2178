"""Streaming Shapes World dataset, bucketed by size, aspect ratio and frame count.

Every batch comes from one bucket (all clips the same W×H×T) so it stacks without padding; the
bucket is drawn per batch. The stream is endless and deterministic: the same seed, rank and
worker give the same batches, and different ranks/workers never repeat each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kinetoscope.data import world


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int
    frames: int  # 1 is an image; videos are 1 + 4k frames for the causal autoencoder

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"

    @staticmethod
    def parse(text: str) -> "Bucket":
        try:
            width, height, frames = (int(v) for v in str(text).lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {text!r} is not WIDTHxHEIGHTxFRAMES (e.g. 128x128x17)") from None
        return Bucket(width, height, frames)


SIZES = ((64, 64), (96, 64), (64, 96), (128, 128))
FRAME_COUNTS = (1, 5, 9, 17)
DEFAULT_BUCKETS = tuple(Bucket(w, h, t) for w, h in SIZES for t in FRAME_COUNTS)


def clip_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_clip(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    video = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return video.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def motion_keep_probabilities(motion_weights: dict[str, float]) -> dict[str, float]:
    """{motion: weight} (unnamed motions 1) -> the chance that a scene whose heaviest motion it is stays drawn."""
    if not isinstance(motion_weights, dict) or any(m not in world.MOTIONS for m in motion_weights):
        raise ValueError(f"motion_weights must map world motions ({', '.join(world.MOTIONS)}) to weights, not {motion_weights!r}")
    weights = {m: motion_weights.get(m, 1.0) for m in world.MOTIONS}
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in weights.values()):
        raise ValueError(f"motion_weights must be numbers > 0, not {motion_weights!r}")
    heaviest = max(weights.values())
    return {m: w / heaviest for m, w in weights.items()}


def stream_seed(seed: int) -> list[int]:
    """Seed for this process and DataLoader worker, so no two of them draw the same stream."""
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    info = get_worker_info()
    return [seed, rank, info.id if info is not None else 0]


class ShapesWorldDataset(IterableDataset):
    """Yields batches: {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "scene": [dict], "bucket": Bucket}.

    pixels_per_batch sets the batch size per bucket (at least 1 clip, at most max_batch_size) so
    that every step costs about the same; bucket_weights (default: uniform) sets how often each bucket is drawn.
    motion_weights ({motion: weight}, unnamed motions 1) makes scenes showing a motion more common:
    a drawn scene is kept with its heaviest object's weight over the heaviest weight, so a scene
    without a weighted motion stays as likely as before relative to others like it.
    split is "train" (held-out combinations and phrasings never appear) or "heldout".
    """

    def __init__(
        self,
        buckets=DEFAULT_BUCKETS,
        pixels_per_batch: int = 8 * 64 * 64 * 17,
        max_batch_size: int = 64,
        fps: float = 8.0,
        seed: int = 0,
        split: str = "train",
        bucket_weights=None,
        motion_weights: dict[str, float] | None = None,
        with_captions: bool = True,
    ):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.buckets = tuple(buckets)
        weights = np.ones(len(self.buckets)) if bucket_weights is None else np.asarray(bucket_weights, float)
        if weights.shape != (len(self.buckets),) or not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"bucket_weights must be {len(self.buckets)} numbers >= 0 (one per bucket, not all 0), not {bucket_weights!r}")
        self.bucket_probs = weights / weights.sum()
        self.motion_keep = motion_keep_probabilities(motion_weights or {})
        self.pixels_per_batch = pixels_per_batch
        self.max_batch_size = max_batch_size
        self.fps = fps
        self.seed = seed
        self.split = split
        self.with_captions = with_captions

    @classmethod
    def from_recipe(cls, data: dict, step: int = 0, with_captions: bool = True) -> "ShapesWorldDataset":
        """The training stream of a recipe's [data] table, resumed at `step` on fresh, reproducible data."""
        return cls(
            buckets=[Bucket.parse(b) for b in data["buckets"]],
            bucket_weights=data.get("bucket_weights"),
            motion_weights=data.get("motion_weights"),
            pixels_per_batch=data["pixels_per_batch"],
            max_batch_size=data.get("max_batch_size", 64),
            fps=data["fps"],
            seed=data["seed"] * 1_000_003 + step,
            with_captions=with_captions,
        )

    def batch_size(self, bucket: Bucket) -> int:
        return max(1, min(self.max_batch_size, self.pixels_per_batch // bucket.pixels))

    def __iter__(self):
        rng = np.random.default_rng(stream_seed(self.seed))
        while True:
            bucket = self.buckets[rng.choice(len(self.buckets), p=self.bucket_probs)]
            yield self.make_batch(rng, bucket, self.batch_size(bucket))

    def sample_scene(self, rng: np.random.Generator, aspect: float, seconds: float, constraints: world.SceneConstraints) -> world.Scene:
        while True:
            scene = world.sample_scene(rng, aspect, seconds, constraints)
            keep = max(self.motion_keep[obj.motion] for obj in scene.objects)
            if keep == 1.0 or rng.random() < keep:  # no draw when kept for sure: recipes without weights keep their stream
                return scene

    def make_batch(self, rng: np.random.Generator, bucket: Bucket, batch_size: int) -> dict:
        from kinetoscope.data import captions  # the vocabulary and split live there

        constraints = captions.TRAIN_SCENES if self.split == "train" else captions.HELDOUT_SCENES
        seconds = max(bucket.frames - 1, 1) / self.fps
        scenes = [self.sample_scene(rng, bucket.width / bucket.height, seconds, constraints) for _ in range(batch_size)]
        videos = [clip_to_tensor(world.render(s, bucket.width, bucket.height, bucket.frames, self.fps)) for s in scenes]
        texts = [captions.caption_variants(s, rng, count=1, split=self.split)[0] for s in scenes] if self.with_captions else []
        return {"video": torch.stack(videos), "caption": texts, "scene": [s.to_dict() for s in scenes], "bucket": bucket}
