"""Layout supervision: the transformer's early tokens learn to say where each object is.

Representation alignment (REPA, Yu et al., 2024) trains a diffusion transformer's early hidden
states to predict a pretrained encoder's features of the clean image, and reports many times
faster training: the model learns what a scene is made of before it learns to paint it. Shapes
World needs no pretrained encoder for that, since every clip comes with its truth. A small probe
reads the tokens after block `layout_block` and predicts, for every token, heatmaps of the object
centres near it, one per shape and one per colour (a centre is a Gaussian as wide as a quarter of
its object, at the token grid's resolution). What the samples get wrong is exactly this layout:
an object named once drawn twice, latent steps that disagree on where an object is.

The probe is training's alone: it is not part of the exported model, and sampling never runs it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kinetoscope.data import world

LAYOUT_CHANNELS = len(world.SHAPES) + len(world.COLORS)
MIN_SPREAD = 0.5  # tokens: the narrowest centre Gaussian, so a small object between tokens still lights them


def latent_step_times(frames: int, steps: int, fps: float) -> np.ndarray:
    """(steps,) the time each latent step shows: the causal autoencoder encodes the first frame
    alone and each later step from the frames since the previous one; a step stands for their mean."""
    if steps == 1:
        return np.zeros(1)
    per_step = (frames - 1) // (steps - 1)
    last_frames = np.arange(1, steps) * per_step
    return np.concatenate([[0.0], (last_frames - (per_step - 1) / 2) / fps])


def layout_targets(scenes: list[dict], size: tuple[int, int], frames: int, fps: float, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, LAYOUT_CHANNELS) heatmaps of object centres on the (T, H, W) token grid of clips of
    `size` (width, height) pixels and `frames` frames, tokens in row-major order like the transformer's."""
    t_steps, rows, cols = grid
    width, height = size
    canvas = world.canvas_units(width, height)
    times = latent_step_times(frames, t_steps, fps)
    duration = (frames - 1) / fps
    tokens_per_unit = min(width, height) * cols / width  # tokens along one short-side unit
    row_centres = (np.arange(rows) + 0.5)[None, :, None]
    col_centres = (np.arange(cols) + 0.5)[None, None, :]
    maps = np.zeros((len(scenes), LAYOUT_CHANNELS, t_steps, rows, cols), dtype=np.float32)
    for index, scene in enumerate(scenes):
        for obj in world.Scene.from_dict(scene).objects:
            x, y, object_width, _ = world.trajectory(obj, canvas, times, duration)
            centre_col = (x / canvas[0] * cols)[:, None, None]
            centre_row = (y / canvas[1] * rows)[:, None, None]
            spread = np.maximum(object_width * tokens_per_unit / 4, MIN_SPREAD)[:, None, None]
            heat = np.exp(-((col_centres - centre_col) ** 2 + (row_centres - centre_row) ** 2) / (2 * spread ** 2))
            for channel in (world.SHAPES.index(obj.shape), len(world.SHAPES) + list(world.COLORS).index(obj.color)):
                np.maximum(maps[index, channel], heat, out=maps[index, channel])
    return torch.from_numpy(maps).flatten(2).transpose(1, 2)


class LayoutProbe(nn.Module):
    """Tokens (B, N, dim) -> layout heatmaps (B, N, LAYOUT_CHANNELS), REPA's small MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, LAYOUT_CHANNELS))

    def forward(self, tokens):
        return self.mlp(tokens.float())


class HiddenTokens:
    """Keeps the tokens one block of the transformer hands on, at every forward pass."""

    def __init__(self, block: nn.Module):
        self.tokens = None
        block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.tokens = output


def layout_loss(probe: LayoutProbe, hidden: HiddenTokens, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of the probe's heatmaps, summed over channels, averaged over tokens: (B,)."""
    predicted = probe(hidden.tokens)
    return F.mse_loss(predicted, targets.to(predicted.device), reduction="none").sum(-1).mean(1)
