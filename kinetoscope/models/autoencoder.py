"""Causal video autoencoder: 4x in time, 8x or more in each spatial side (Sora's "video compression network").

A clip of 1 + 4k frames becomes 1 + k latent steps. Frames are grouped causally: the first frame
alone (repeated to fill a group, so an image is a one-frame video), then every following run of 4
frames. Within a group, time and 4x4 pixels fold into channels (space-to-depth, as in DC-AE), so
no convolution ever runs at full resolution; that is what makes decoding faster than real time
on a CPU. Every change of resolution or width has a parameter-free shortcut (channel averaging
on the way down, channel repeating on the way up, DC-AE's "residual autoencoding"), so the
convolutions learn only a residual around plain space-to-depth; this is what lets a high
compression train in thousands of steps rather than hundreds of thousands. Across groups, information flows only through CausalTimeMix layers, which see the
current and the previous step: a latent never depends on a later frame, and a long clip streams
through in chunks carrying one step of state per layer.

Shapes: video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k, H and W multiples of f = patch * 2^(levels-1)
(8 for the shipped model); latent (B, C, 1 + k, H/f, W/f), normalised per channel with statistics
stored in the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kinetoscope.models.checkpoint import Pretrained


@dataclass
class AutoencoderConfig:
    latent_channels: int = 16
    widths: tuple[int, ...] = (48, 96)  # features at 1/4, 1/8, ... of the input size
    blocks_per_level: int = 2
    temporal_factor: int = 4
    patch: int = 4  # space-to-depth before the first convolution
    decoder_blocks_per_level: int | None = None  # None: as many as the encoder; more for a stronger decoder
    refine_width: int = 0  # features of the full-resolution refiner after the decoder; 0: none

    @property
    def decoder_blocks(self) -> int:
        return self.blocks_per_level if self.decoder_blocks_per_level is None else self.decoder_blocks_per_level

    @property
    def spatial_factor(self) -> int:
        return self.patch * 2 ** (len(self.widths) - 1)

    def check_shortcuts(self):
        """Each shortcut averages or repeats whole channel groups, so widths must divide evenly;
        the first width must also split each pixel channel's patch evenly, or colours would mix."""
        group_channels = 3 * self.temporal_factor * self.patch**2
        pairs = [(group_channels, self.widths[0]), (self.widths[-1], self.latent_channels)]
        pairs += [(4 * a, b) for a, b in zip(self.widths, self.widths[1:])]
        colour_aligned = self.patch**2 % (group_channels // self.widths[0]) == 0 if group_channels % self.widths[0] == 0 else False
        if not colour_aligned or any(wide % narrow for wide, narrow in pairs):
            raise ValueError(f"autoencoder widths {self.widths} and {self.latent_channels} latent channels do not divide evenly")


def channel_average(x, channels: int):  # (N, C, h, w) -> (N, channels, h, w), C a multiple of channels
    return x.unflatten(1, (channels, -1)).mean(2)


def channel_repeat(x, channels: int):  # (N, C, h, w) -> (N, channels, h, w), channels a multiple of C
    return x.repeat_interleave(channels // x.shape[1], dim=1)


class ChannelNorm(nn.Module):
    """RMS norm over channels at each position: keeps activations in range without batch statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable without norms
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):  # (N, C, h, w)
        return x + self.conv2(F.silu(self.conv1(F.silu(self.norm(x)))))


class CausalTimeMix(nn.Module):
    """Residual 1x1 conv over [step t, step t-1] features; the only path between latent steps."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, steps: int, previous):  # x (B*N, C, h, w), previous (B, C, h, w) or None
        x = x.unflatten(0, (-1, steps))  # (B, N, C, h, w)
        first = torch.zeros_like(x[:, 0]) if previous is None else previous
        shifted = torch.cat([first[:, None], x[:, :-1]], dim=1)
        mixed = self.conv(F.silu(torch.cat([x, shifted], dim=2)).flatten(0, 1))
        return x.flatten(0, 1) + mixed, x[:, -1]


class Stage(nn.Module):
    """A resolution level: time mixing, then residual blocks."""

    def __init__(self, channels: int, blocks: int):
        super().__init__()
        self.time_mix = CausalTimeMix(channels)
        self.blocks = nn.Sequential(*(ResBlock(channels) for _ in range(blocks)))

    def forward(self, x, steps, state: list, index: int):
        x, state[index] = self.time_mix(x, steps, state[index])
        return self.blocks(x)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        group_channels = 3 * cfg.temporal_factor * cfg.patch**2
        self.conv_in = nn.Conv2d(group_channels, cfg.widths[0], 3, padding=1)
        self.stages = nn.ModuleList(Stage(w, cfg.blocks_per_level) for w in cfg.widths)
        self.downs = nn.ModuleList(
            nn.Conv2d(4 * cfg.widths[i], cfg.widths[i + 1], 1) for i in range(len(cfg.widths) - 1)
        )
        self.conv_out = nn.Conv2d(cfg.widths[-1], cfg.latent_channels, 3, padding=1)
        self.patch = cfg.patch

    def forward(self, groups, state: list):  # groups (B, N, 3*4, H, W) -> (B, N, C, H/f, W/f)
        steps = groups.shape[1]
        patches = F.pixel_unshuffle(groups.flatten(0, 1), self.patch)
        x = self.conv_in(patches) + channel_average(patches, self.conv_in.out_channels)
        for i, stage in enumerate(self.stages):
            if i > 0:
                folded = F.pixel_unshuffle(x, 2)
                x = self.downs[i - 1](folded) + channel_average(folded, self.downs[i - 1].out_channels)
            x = stage(x, steps, state, i)
        latents = self.conv_out(F.silu(x)) + channel_average(x, self.conv_out.out_channels)
        return latents.unflatten(0, (-1, steps))


class PixelRefiner(nn.Module):
    """Three 3x3 convolutions at full resolution over a group's frames, added to them.

    Nearly all of the decoder's error sits on the edges of shapes: its last layer turns features
    at a quarter of the size into 4x4-pixel patches linearly, which cannot draw a sharp edge at
    any position inside a patch. These convolutions are the only nonlinearity at full resolution;
    they see the 4 frames of one group, so causality holds, and start as the identity.
    """

    def __init__(self, group_channels: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(group_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, group_channels, 3, padding=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, frames):  # (N, 3*4, H, W) -> same
        return frames + self.layers(frames)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = cfg.widths[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(Stage(w, cfg.decoder_blocks) for w in widths)
        self.ups = nn.ModuleList(nn.Conv2d(widths[i], 4 * widths[i + 1], 1) for i in range(len(widths) - 1))
        self.conv_out = nn.Conv2d(widths[-1], 3 * cfg.temporal_factor * cfg.patch**2, 3, padding=1)
        self.refiner = PixelRefiner(3 * cfg.temporal_factor, cfg.refine_width) if cfg.refine_width else nn.Identity()
        self.patch = cfg.patch

    def forward(self, latents, state: list):  # (B, N, C, h, w) -> groups (B, N, 3*4, f*h, f*w)
        steps = latents.shape[1]
        z = latents.flatten(0, 1)
        x = self.conv_in(z) + channel_repeat(z, self.conv_in.out_channels)
        for i, stage in enumerate(self.stages):
            if i > 0:
                up = self.ups[i - 1]
                x = F.pixel_shuffle(up(F.silu(x)) + channel_repeat(x, up.out_channels), 2)
            x = stage(x, steps, state, i)
        patches = self.conv_out(F.silu(x)) + channel_repeat(x, self.conv_out.out_channels)
        return self.refiner(F.pixel_shuffle(patches, self.patch)).unflatten(0, (-1, steps))


class VideoAutoencoder(Pretrained, nn.Module):
    config_class = AutoencoderConfig
    kind = "autoencoder"

    def __init__(self, cfg: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        cfg.check_shortcuts()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))
        self.to(memory_format=torch.channels_last)

    # -- shapes ---------------------------------------------------------------------------------

    def check_input(self, frames: int, height: int, width: int):
        factor, step = self.cfg.spatial_factor, self.cfg.temporal_factor
        if (frames - 1) % step or height % factor or width % factor or min(frames, height, width) < 1:
            raise ValueError(
                f"the autoencoder takes 1+{step}k frames of a size that is a multiple of {factor}; "
                f"got {frames} frames of {width}x{height}"
            )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self.check_input(frames, height, width)
        f = self.cfg.spatial_factor
        return (self.cfg.latent_channels, 1 + (frames - 1) // self.cfg.temporal_factor, height // f, width // f)

    def _to_groups(self, video):  # (B, 3, T, H, W) -> (B, N, 3*4, H, W)
        first = video[:, :, :1].expand(-1, -1, self.cfg.temporal_factor, -1, -1)
        padded = torch.cat([first, video[:, :, 1:]], dim=2)
        b, c, t, h, w = padded.shape
        groups = padded.reshape(b, c, t // self.cfg.temporal_factor, self.cfg.temporal_factor, h, w)
        return groups.permute(0, 2, 3, 1, 4, 5).flatten(2, 3)

    def _from_groups(self, groups):  # (B, N, 4*3, H, W) -> (B, 3, 1 + 4(N-1), H, W)
        b, n, _, h, w = groups.shape
        frames = groups.reshape(b, n * self.cfg.temporal_factor, 3, h, w)
        # Group 0 decodes to four copies of the first frame; keep its last.
        frames = frames[:, self.cfg.temporal_factor - 1 :]
        return frames.permute(0, 2, 1, 3, 4)

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, video: torch.Tensor, chunk_steps: int | None = None, normalize: bool = True) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, C, 1 + (T-1)/4, H/f, W/f); chunk_steps bounds memory for long clips."""
        self.check_input(*video.shape[2:])
        groups = self._to_groups(video)
        state = [None] * len(self.encoder.stages)
        step = chunk_steps or groups.shape[1]
        latents = torch.cat([self.encoder(groups[:, i : i + step], state) for i in range(0, groups.shape[1], step)], 1)
        latents = latents.permute(0, 2, 1, 3, 4)
        if normalize:
            latents = (latents - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)
        return latents

    def decode(self, latents: torch.Tensor, chunk_steps: int | None = None, normalized: bool = True) -> torch.Tensor:
        """(B, C, N, h, w) -> (B, 3, 1 + 4(N-1), f*h, f*w)."""
        if normalized:
            latents = latents * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        latents = latents.permute(0, 2, 1, 3, 4)
        state = [None] * len(self.decoder.stages)
        step = chunk_steps or latents.shape[1]
        groups = torch.cat([self.decoder(latents[:, i : i + step], state) for i in range(0, latents.shape[1], step)], 1)
        return self._from_groups(groups)

    def forward(self, video):
        return self.decode(self.encode(video, normalize=False), normalized=False)

    # -- weights --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> "VideoAutoencoder":
        """`directory` None: the shipped weights."""
        return super().from_pretrained(directory if directory is not None else default_weights_dir())


def default_weights_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "weights" / "autoencoder"
