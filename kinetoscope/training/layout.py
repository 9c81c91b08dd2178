"""Layout supervision: the transformer's early tokens learn to say where each object is.

Representation alignment (REPA, Yu et al., 2024) trains a diffusion transformer's early hidden
states to predict a pretrained encoder's features of the clean image, and reports many times
faster training: the model learns what a scene is made of before it learns to paint it. Shapes
World needs no pretrained encoder for that, since every clip comes with its truth. A small probe
reads the tokens after block `layout_block` and predicts, for every token, heatmaps of the object
centres near it, one per shape and one per colour (`data/layout.py`'s `layout_maps`). What the
samples get wrong is exactly this layout: an object named once drawn twice, latent steps that
disagree on where an object is.

The probe is training's alone: it is not part of the exported model, and sampling never runs it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kinetoscope.data.layout import LAYOUT_CHANNELS


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
