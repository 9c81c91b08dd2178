"""Painted pairs: the latents a layout generator paints for training scenes, and the clips they stand for.

An autoencoder's decoder learns from what its encoder makes of true clips. A denoiser paints
latents near those, not on them: in the latent steps that stand for four frames, a small object
that moves or turns comes out as a blot with soft corners and coloured fringes, which the judge
reads as another shape for part of the clip. Given the true latents of the same clips, the decoder
draws every held-out scene right (README, "the generator's own decoder"), so what fails is the
painting. A layout model is told where every object is, frame by frame, so the latents it paints
from a scene's true plan mean that scene's clip: a pair the decoder can learn from.

`paint_pairs` draws training scenes (never a held-out combination, captions of the train split),
has the generator paint each from its true plan and keeps the latents with the scene, which the
world renders again on demand (`PaintedPairs.clips`). Where the caption names no background, the
pair's scene takes the one the generator chose. An autoencoder recipe's `[data] painted` mixes such
pairs into a decoder's training (training/autoencoder.py), the encoder frozen, so the latent space
stays the one the generator paints in; `encoder_fingerprint` ties pairs to that encoder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kinetoscope.data import captions, world
from kinetoscope.data.dataset import clip_to_tensor

PAIRS_FORMAT = 1
SAVE_EVERY = 25  # pairs between saves, so an interrupted run loses a minute at most


def encoder_fingerprint(autoencoder) -> str:
    """SHA-256 of what decides an autoencoder's latent space: its encoder and latent statistics."""
    digest = hashlib.sha256()
    for name, value in sorted(autoencoder.state_dict().items()):
        if name.startswith("encoder.") or name.startswith("latent_"):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def pair_scene(seed: int, index: int, aspect: float, seconds: float) -> tuple[world.Scene, str, int]:
    """Pair `index` of a run seeded `seed`: a training scene, one of its train-split captions and
    the noise seed it is painted from. Each pair has its own stream, so a resumed run paints what
    an uninterrupted one would have."""
    rng = np.random.default_rng([seed, index])
    scene = world.sample_scene(rng, aspect, seconds, captions.TRAIN_SCENES)
    return scene, captions.caption_variants(scene, rng, count=1, split="train")[0], int(rng.integers(2**31))


def painted_background(frames: np.ndarray) -> str:
    """The world background nearest the first frame's median colour: what the generator chose."""
    painted = np.median(frames[0].reshape(-1, 3), axis=0)
    return min(world.BACKGROUNDS, key=lambda name: float(((np.asarray(world.BACKGROUNDS[name]) - painted) ** 2).sum()))


@dataclass
class PaintedPairs:
    latents: torch.Tensor  # (N, C, T, h, w) bf16, normalised as the generator samples them
    scenes: list[world.Scene]
    size: tuple[int, int]  # (width, height) of the clips
    frames: int
    fps: float
    seed: int
    encoder: str  # encoder_fingerprint of the autoencoder whose latent space they are in

    def __len__(self) -> int:
        return len(self.scenes)

    def clips(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1]: the clips pairs `indices` stand for, rendered by the world."""
        width, height = self.size
        return torch.stack([clip_to_tensor(world.render(self.scenes[i], width, height, self.frames, self.fps)) for i in indices])

    def save(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save({"format": PAIRS_FORMAT, "latents": self.latents, "scenes": [scene.to_dict() for scene in self.scenes],
                    "size": list(self.size), "frames": self.frames, "fps": self.fps, "seed": self.seed,
                    "encoder": self.encoder}, partial)
        os.replace(partial, path)  # a save cut short leaves the last good file

    @classmethod
    def load(cls, path: str | Path) -> "PaintedPairs":
        """Raises ValueError, in one line, for a file that is not painted pairs."""
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("format") != PAIRS_FORMAT:
                raise ValueError(f"format {saved.get('format')!r}, not {PAIRS_FORMAT}")
            pairs = cls(saved["latents"], [world.Scene.from_dict(scene) for scene in saved["scenes"]], tuple(saved["size"]),
                        int(saved["frames"]), float(saved["fps"]), int(saved["seed"]), str(saved["encoder"]))
        except FileNotFoundError:
            raise
        except Exception as error:  # torch.load's unpickler, a missing key, a malformed scene
            raise ValueError(f"{path} is not a file of painted pairs ({type(error).__name__}: {error})".splitlines()[0]) from None
        if pairs.latents.ndim != 5 or len(pairs.latents) != len(pairs.scenes):
            raise ValueError(f"{path}: {len(pairs.scenes)} scenes for latents shaped {tuple(pairs.latents.shape)}")
        return pairs


def paint_pairs(pipe, path: str | Path, count: int, seed: int = 0, size: tuple[int, int] = (128, 128), seconds: float = 2.0,
                progress: Callable[[int], None] | None = None) -> PaintedPairs:
    """Paint pairs until the file at `path` holds `count`, resuming the pairs already there (which
    must come from the same seed, size and latent space). `pipe` is a layout model's TextToVideo.
    `progress` hears the number of pairs held: first those found, then after each new one."""
    if pipe.planner is None:
        raise ValueError("painted pairs need a layout model: it paints each training scene from its true plan")
    width, height = size
    frames = pipe.frames_for(seconds)
    fingerprint = encoder_fingerprint(pipe.autoencoder)
    path = Path(path)
    if path.is_file():
        pairs = PaintedPairs.load(path)
        if (pairs.seed, pairs.size, pairs.frames, pairs.fps, pairs.encoder) != (seed, (width, height), frames, pipe.fps, fingerprint):
            raise ValueError(f"{path} holds pairs of another seed, size, length or latent space; name a new file to paint these")
        latents, scenes = list(pairs.latents), list(pairs.scenes)
    else:
        latents, scenes = [], []

    def current() -> PaintedPairs:
        stacked = torch.stack(latents) if latents else torch.empty(0, dtype=torch.bfloat16)
        return PaintedPairs(stacked, list(scenes), (width, height), frames, pipe.fps, seed, fingerprint)

    if progress is not None:
        progress(len(scenes))  # the pairs held already, once the file is known to be resumable
    while len(scenes) < count:
        scene, prompt, noise_seed = pair_scene(seed, len(scenes), width / height, (frames - 1) / pipe.fps)
        # the first painting, as the denoiser makes it: a decoder learns what it is given, not the redraws the judge kept
        video = pipe(prompt, width=width, height=height, frames=frames, seed=noise_seed, plan=scene.objects, redraws=0)
        latents.append(video.latents[0].to(torch.bfloat16))
        scenes.append(replace(scene, background=painted_background(video.frames)))
        if len(scenes) % SAVE_EVERY == 0 or len(scenes) == count:
            current().save(path)
        if progress is not None:
            progress(len(scenes))
    return current()


def join_pairs(paths: Sequence[str | Path]) -> PaintedPairs:
    """The pairs of several files (painted in parallel, say) as one set; they must agree on the
    clips' size, length and frame rate and on the latent space. Raises ValueError otherwise."""
    parts = [PaintedPairs.load(path) for path in paths]
    if not parts:
        raise ValueError("no files of painted pairs named")
    first = parts[0]
    for path, part in zip(paths, parts):
        if (part.size, part.frames, part.fps, part.encoder) != (first.size, first.frames, first.fps, first.encoder):
            raise ValueError(f"{path} holds pairs of another size, length, frame rate or latent space than {paths[0]}")
        if len(part) == 0:
            raise ValueError(f"{path} holds no pairs")
    return PaintedPairs(torch.cat([part.latents for part in parts]), [scene for part in parts for scene in part.scenes],
                        first.size, first.frames, first.fps, first.seed, first.encoder)
