"""Diffusion transformer over spacetime latent patches, conditioned on text (DiT style).

One model for every size, aspect ratio and duration, images included: the latent video is cut
into patches of (pt, ph, pw) latent cells, and positions enter through 3D rotary embeddings in
attention (optionally also canvas features, fractions of the clip), so nothing is tied to one
grid. Each block: self-attention over all spacetime tokens, cross-attention to the text tokens, MLP. Self-attention and MLP are modulated and gated by
adaLN-Zero from the timestep (and the pooled prompt); cross-attention's output projection starts
at zero, so every block starts as the identity.

Self-conditioning (Chen et al., "Analog Bits", 2022): a model with `self_condition` also takes an
estimate of the clean latents, its own prediction from the previous sampling step (zeros at the
first). At high noise a small model otherwise re-decides the layout at every step, and the
decisions of successive steps can disagree (one object drawn twice, parts drifting apart); seeing
its last estimate lets it refine one layout instead.

Local mixing (SANA's Mix-FFN, Xie et al. 2024): a model with `local_mixing` adds a depthwise 3x3
convolution over each latent step's token grid inside every MLP, so a token hears its neighbours
directly rather than only through attention, and neighbouring tokens can agree on one object.

Guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", 2023; FLUX.1-dev
ships this way): a model with `distilled_guidance` takes the guidance scale as an input, embedded
like the timestep, and is trained to give in one forward pass what classifier-free guidance takes
two for, so sampling costs half.

Layout input: a model with `layout_channels` also takes, at every token, heatmaps of where each
object's centre is (data/layout.py), from the clip's truth in training and from a layout planner
(models/planner.py) at sampling. Where objects go, how many and of what kind, is then decided
once, in a few numbers a small model can get right, and the denoiser paints what it is shown. A
model with `silhouette_channels` is also shown each object's silhouette, frame by frame, finer than
its tokens (data/layout.py), through its own zero-initialised projection, so a model trained with
heatmaps alone grows into one that takes both.

Shapes: latents (B, C, T, H, W); text (B, L, D_text) with mask (B, L); tokens (B, N, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kinetoscope.models.checkpoint import Pretrained


@dataclass
class DiTConfig:
    latent_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)  # (time, height, width) latent cells per token
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    text_dim: int = 384
    rope_theta: float = 100.0
    canvas_frequencies: int = 0  # Fourier features of each token's place as fractions of the clip; 0: none
    self_condition: bool = False  # also sees its own previous estimate of the clean latents
    local_mixing: bool = False  # a depthwise 3x3 convolution over each step's token grid inside each MLP (SANA's Mix-FFN)
    distilled_guidance: tuple[float, float] | None = None  # guidance scales it takes as an input; None: two passes at sampling
    layout_channels: int = 0  # heatmaps of object centres per token it takes as an input (data/layout.py); 0: none
    silhouette_channels: int = 0  # object silhouettes per token it also takes after the heatmaps (data/layout.py); 0: none

    def __post_init__(self):
        self.patch = tuple(self.patch)
        if self.distilled_guidance is not None:
            self.distilled_guidance = tuple(float(g) for g in self.distilled_guidance)
            if len(self.distilled_guidance) != 2 or not 0 <= self.distilled_guidance[0] <= self.distilled_guidance[1]:
                raise ValueError(f"distilled_guidance must be (lowest, highest) scales with 0 <= lowest <= highest, not {self.distilled_guidance!r}")
        if self.silhouette_channels and not self.layout_channels:
            raise ValueError("silhouette_channels come after the centre heatmaps: a model with silhouettes needs layout_channels too")
        if self.dim % self.heads or (self.dim // self.heads) % 2 or self.dim // self.heads < 6:
            raise ValueError(f"dim {self.dim} over {self.heads} heads must give an even head size of at least 6 "
                             "(rotary positions turn pairs of features, at least one pair per axis)")


MODEL_SIZES = {  # the shipped default is "medium"; "small" grown to 8 blocks was before it
    "tiny": dict(dim=128, depth=4, heads=2),
    "small": dict(dim=192, depth=6, heads=3),
    # Wider keeps this CPU's matmuls busier: at 128x128x17 the denoiser reaches 47% of the bf16
    # matmul rate eagerly (small grown to 8 blocks: 36%) and still runs 1.6x real time.
    "medium": dict(dim=256, depth=8, heads=4),
    "base": dict(dim=384, depth=12, heads=6),
    "large": dict(dim=768, depth=24, heads=12),
    "xl": dict(dim=1152, depth=28, heads=16),
}


def config_for(size: str, **overrides) -> DiTConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {', '.join(MODEL_SIZES)}")
    return DiTConfig(**{**MODEL_SIZES[size], **overrides})


# ---------------------------------------------------------------------------------------------
# Positions: 3D rotary embeddings, the head dimension split between time, height and width


def rope_frequencies(head_dim: int, grid: tuple[int, int, int], theta: float, device) -> torch.Tensor:
    """Complex rotations (N, head_dim/2) for every cell of a (T, H, W) token grid, row-major."""
    pairs = head_dim // 2
    split = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)  # time gets the remainder
    axes = []
    for n_pairs, length in zip(split, grid):
        freqs = 1.0 / theta ** (torch.arange(n_pairs, device=device, dtype=torch.float32) / max(n_pairs, 1))
        axes.append(torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs))
    t, h, w = grid
    angles = torch.cat(
        [
            axes[0][:, None, None].expand(t, h, w, -1),
            axes[1][None, :, None].expand(t, h, w, -1),
            axes[2][None, None, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, pairs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:  # x float32 (B, heads, N, head_dim)
    """Rotate each (even, odd) pair of features. One complex multiply: in eager mode 6% faster per
    step than the same in real arithmetic, and as fast once compiled (measured, `kinetoscope bench`)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2)


def canvas_features(grid: tuple[int, int, int], frequencies: int, device) -> torch.Tensor:
    """(N, 6 * frequencies + 1): where each token sits in the clip, as fractions.

    Rotary positions are relative, so without these a token cannot tell how far it is from an
    edge (Shapes World's bounces and in-canvas paths need that) or whether it is the first latent
    step, which the causal autoencoder encodes from one frame while later steps hold four. Height,
    width and time are fractions u of the clip (time 0 for an image), given as sin and cos of
    pi k u for k = 1..frequencies, so they mean the same at every size and duration; one more
    feature flags the first step.
    """
    t, h, w = grid
    k = torch.arange(1, frequencies + 1, device=device, dtype=torch.float32) * math.pi

    def fourier(u):  # (length,) -> (length, 2 * frequencies)
        return torch.cat([torch.sin(u[:, None] * k), torch.cos(u[:, None] * k)], dim=-1)

    def centres(length):
        return (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length

    steps = torch.arange(t, device=device, dtype=torch.float32)
    times = torch.cat([fourier(steps / max(t - 1, 1)), (steps == 0).float()[:, None]], dim=-1)
    rows, cols = fourier(centres(h)), fourier(centres(w))
    return torch.cat(
        [times[:, None, None].expand(t, h, w, -1), rows[None, :, None].expand(t, h, w, -1), cols[None, None, :].expand(t, h, w, -1)],
        dim=-1,
    ).reshape(t * h * w, -1)


# ---------------------------------------------------------------------------------------------
# Blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as in DiT), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rotations, visible=None):  # x (B, N, D), visible (N, N) bool: which tokens each may attend to
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        # Norms and rotations in float32 (fused there under autocast); attention in the compute dtype.
        q = apply_rope(self.q_norm(q.float()), rotations).type_as(v)
        k = apply_rope(self.k_norm(k.float()), rotations).type_as(v)
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=visible).transpose(1, 2).flatten(2))


def rows_per_text(x: torch.Tensor, text: torch.Tensor) -> int:
    """How many consecutive rows of x each row of text conditions."""
    if x.shape[0] % text.shape[0]:
        raise ValueError(f"{text.shape[0]} prompts cannot each condition an equal share of {x.shape[0]} rows")
    return x.shape[0] // text.shape[0]


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, text, text_mask):  # x (B, N, D), text (B / k, L, D), text_mask (B / k, L) bool
        # A text row may serve k consecutive rows of x (many draws of one prompt): those rows' tokens
        # read it as one sequence of k * N queries, so its keys and values are projected and
        # attended to once, not k times (a query's attention does not depend on the other queries).
        b, n, _ = x.shape
        x = x.reshape(text.shape[0], rows_per_text(x, text) * n, -1)  # (B / k, k * N, D)
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(text).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q.float()).type_as(v), self.k_norm(k.float()).type_as(v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross = CrossAttention(d, cfg.heads)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        # Exact (erf) GELU: on this CPU its bf16 kernel is 6x faster than the tanh approximation DiT
        # used (0.22 against 1.28 ms on the MLP's hidden states), and models trained with the
        # approximation give the same outputs within bf16 rounding.
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.local_mix = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if cfg.local_mixing else None
        self.adaLN = nn.Linear(d, 6 * d)  # shift/scale/gate for attention and MLP

    def forward(self, x, cond, text, text_mask, rotations, grid, visible=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), rotations, visible)
        x = x + self.cross(self.norm2(x), text, text_mask)
        return x + gate_m[:, None] * self.feed_forward(modulate(self.norm3(x), shift_m, scale_m), grid)

    def feed_forward(self, x, grid):  # (B, N, D) -> (B, N, D)
        # self.mlp is taken apart rather than called whole; it stays one Sequential so that
        # checkpoints from before local mixing keep their parameter names.
        hidden = self.mlp[1](self.mlp[0](x))  # (B, N, hidden)
        if self.local_mix is not None:
            # Each token also hears its 8 neighbours in the same latent step directly, so neighbouring
            # tokens can agree on where an object's edge runs instead of deciding one by one.
            b, n, c = hidden.shape
            t, h, w = grid
            cells = hidden.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # (B*T, hidden, H, W), channels-last in memory
            # In the weights' precision, not autocast's: CPUs have no fast bf16 depthwise convolution.
            with torch.autocast(hidden.device.type, enabled=False):
                mixed = self.local_mix(cells.to(self.local_mix.weight.dtype).contiguous(memory_format=torch.channels_last))
            hidden = hidden + mixed.permute(0, 2, 3, 1).reshape(b, n, c).to(hidden.dtype)
        return self.mlp[2](hidden)


# ---------------------------------------------------------------------------------------------
# The model


class DiffusionTransformer(Pretrained, nn.Module):
    config_class = DiTConfig
    kind = "generator"

    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        if cfg.patch[0] != 1:  # causal latents have 1 + k steps: the first frame stands alone
            raise ValueError(f"time patch {cfg.patch[0]} is not supported; the causal latent needs a time patch of 1")
        self.cfg = cfg
        d = cfg.dim
        patch_dim = cfg.latent_channels * math.prod(cfg.patch)
        self.patch_in = nn.Linear(patch_dim, d)
        self.canvas_in = nn.Linear(6 * cfg.canvas_frequencies + 1, d) if cfg.canvas_frequencies else None
        self.estimate_in = nn.Linear(patch_dim, d) if cfg.self_condition else None
        # No bias, so that an all-zero layout (no object anywhere, or none given) adds nothing.
        self.layout_in = nn.Linear(cfg.layout_channels, d, bias=False) if cfg.layout_channels else None
        self.silhouette_in = nn.Linear(cfg.silhouette_channels, d, bias=False) if cfg.silhouette_channels else None
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.guidance_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d)) if cfg.distilled_guidance else None
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.text_pool = nn.Linear(cfg.text_dim, d)
        self.null_text = nn.Parameter(torch.zeros(1, cfg.text_dim))  # the "no prompt" of guidance
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, patch_dim)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_text, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
            nn.init.zeros_(block.cross.proj.weight)
        nn.init.zeros_(self.adaLN_out.weight)
        nn.init.zeros_(self.adaLN_out.bias)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)
        guidance_out = self.guidance_mlp[-1] if self.guidance_mlp is not None else None
        for extra_input in (self.canvas_in, self.estimate_in, self.layout_in, self.silhouette_in, guidance_out, *(block.local_mix for block in self.blocks)):
            if extra_input is not None:  # start silent, so weights trained without them keep working
                nn.init.zeros_(extra_input.weight)
                if extra_input.bias is not None:
                    nn.init.zeros_(extra_input.bias)

    def check_latent_shape(self, t: int, h: int, w: int):
        pt, ph, pw = self.cfg.patch
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {t}x{h}x{w} is not divisible by the patch {pt}x{ph}x{pw}")

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        """The (T, H, W) grid of tokens of latents shaped (C, T, H, W) or (B, C, T, H, W)."""
        self.check_latent_shape(*latent_shape[-3:])
        return tuple(length // patch for length, patch in zip(latent_shape[-3:], self.cfg.patch))

    def token_count(self, latent_shape) -> int:
        """Tokens in a clip of latents shaped (C, T, H, W) or (B, C, T, H, W)."""
        return math.prod(latent_shape[-3:]) // math.prod(self.cfg.patch)

    def patchify(self, latents):
        """(B, C, T, H, W) -> (B, N, C*pt*ph*pw), tokens in (t, h, w) row-major order, and the token grid."""
        b, c = latents.shape[:2]
        pt, ph, pw = self.cfg.patch
        grid = self.token_grid(latents.shape)
        x = latents.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), -1), grid

    def forward(self, latents, t, text, text_mask, clean_estimate=None, guidance=None, layout=None):
        """latents (B, C, T, H, W), t (B,) in [0, 1], text (B, L, text_dim), text_mask (B, L) -> velocity like latents.

        clean_estimate (like latents): the model's previous prediction of the clean latents, for a
        self-conditioned model; None means no estimate yet (zeros). Other models refuse one.
        guidance (B,): the scale of classifier-free guidance a guidance-distilled model gives the
        velocity of; such a model needs it, others refuse it.
        layout (B, N, layout_channels + silhouette_channels): heatmaps of the object centres at each
        token (and the silhouettes), for a model that takes them; None means no layout (zeros), as
        with the empty prompt. Others refuse one.
        """
        b, c, lt, lh, lw = latents.shape
        pt, ph, pw = self.cfg.patch
        patches, grid = self.patchify(latents)
        x = self.patch_in(patches)
        if self.estimate_in is not None:
            estimate = clean_estimate if clean_estimate is not None else torch.zeros_like(latents)
            x = x + self.estimate_in(self.patchify(estimate.to(latents.dtype))[0])
        elif clean_estimate is not None:
            raise ValueError("this model was not trained with self-conditioning; it takes no clean estimate")
        if layout is not None:
            if self.layout_in is None:
                raise ValueError("this model takes no layout; it was trained without layout_channels")
            if layout.shape[-1] != self.cfg.layout_channels + self.cfg.silhouette_channels:
                raise ValueError(f"this model takes {self.cfg.layout_channels} heatmap and {self.cfg.silhouette_channels} "
                                 f"silhouette channels per token, not {layout.shape[-1]} in all")
            layout = layout.to(x.dtype)
            x = x + self.layout_in(layout[..., :self.cfg.layout_channels])
            if self.silhouette_in is not None:
                x = x + self.silhouette_in(layout[..., self.cfg.layout_channels:])
        if self.canvas_in is not None:
            x = x + self.canvas_in(canvas_features(grid, self.cfg.canvas_frequencies, latents.device))
        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp_min(1)
        cond = self.time_mlp(timestep_embedding(t, 256)) + self.text_pool(pooled)  # (B, D)
        if (guidance is None) != (self.guidance_mlp is None):
            raise ValueError("a guidance-distilled model needs the guidance scale as an input" if guidance is None
                             else "this model was not guidance-distilled; it takes no guidance scale")
        if guidance is not None:
            cond = cond + self.guidance_mlp(timestep_embedding(guidance, 256))
        context = self.text_in(text)
        rotations = rope_frequencies(self.cfg.dim // self.cfg.heads, grid, self.cfg.rope_theta, latents.device)
        for block in self.blocks:
            x = block(x, cond, context, text_mask, rotations, grid)
        shift, scale = self.adaLN_out(F.silu(cond)).chunk(2, dim=-1)
        x = self.patch_out(modulate(self.norm_out(x), shift, scale))  # (B, N, C*pt*ph*pw)
        x = x.reshape(b, *grid, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, lt, lh, lw)

    def drop_text(self, text, text_mask, drop):
        """Replace the prompts where drop (B,) is True by the empty prompt: one learned token.

        Caption dropout in training and the unconditional half of classifier-free guidance.
        """
        b, length, _ = text.shape
        null_text = torch.cat([self.null_text[None].expand(b, 1, -1), text.new_zeros(b, length - 1, text.shape[-1])], 1)
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = True
        return torch.where(drop[:, None, None], null_text.to(text.dtype), text), torch.where(drop[:, None], null_mask, text_mask)
