"""Layout planner: a small rectified-flow transformer that turns a prompt into its scene's objects.

A layout model's denoiser (models/dit.py, `layout_channels`) paints objects where a layout tells it
to. The planner writes that layout: it generates a set of object slots (data/layout.py: whether the
slot holds an object, its colour, shape, size, motion, speed and start), conditioned on the text
tokens and on the canvas (aspect ratio and duration decide where a moving object must start to stay
in view). Generating rather than regressing the slots matters: two objects without a stated
relation may be anywhere, and an average of their places would stack them in the middle.

Slot k holds the k-th object the prompt names (a learned embedding per slot tells them apart), so
each slot has one place in the prompt to read its colour, shape and motion from. As a set with
nothing but noise to tell the slots apart, a first planner bound shapes and motions to the wrong
colours (README). Each block is the denoiser's (DiTBlock: adaLN-Zero from the timestep, pooled
prompt and canvas; self-attention among the slots; cross-attention to the text), with rotary
positions that do not turn: the slot embedding says which slot is which.

A slot may also be read as several tokens (`token_features`), each writing a group of its features.
A planner with one token per slot learns the world's joint odds of shape and motion, and no
training scene has a shrinking square: told "the block shrinks and the triangle is twirling", it
swapped the motions, since a spinning square and a shrinking triangle are what it has seen (its
main failure on held-out prompts). With the groups (what the object is, how it moves, where it
starts), every token but the last kind attends only to tokens of its own kind, so a slot's motion
is read from the words alone and can never lean on the shape chosen for it; where it starts (the
last kind) depends on everything and sees everything. Measured, it read unseen phrasings better
but left most of those swaps (README): the odds also live in how the text encoder's states for a
noun and its verb sit together.

The cause was found later (`kinetoscope planner binding`): a slot's motion token knows which slot
it is and nothing else of its object, so it learnt to read the k-th verb of the prompt for slot k:
with stand-in nouns, right where a caption says what each object does in the order it introduced
them and swapped where it does not ("a red kite left of a blue lamp; the lamp shrinks and the kite
spins"). Yet the text
encoder's state for "kite" in "a red kite" says what the kite does (a linear read-out of it finds
the verb in 97% of held-out probe prompts). With `identity_kind` the first token kind holds only
presence and colour, and every token sees it: the motion token then knows its object's colour, the
word that introduces it, and no shape, and no held-out pair joins a colour with a motion.
Measured, 2,000 steps from the shipped planner did not teach it that (configs/planner_identity.toml).

Text layers (`text_layers`): transformer layers over the prompt's tokens before the slots read
them. The slots only ever look at the words; to give "the lamp shrinks" to the right slot, they
must find which earlier "a ... lamp" it refers back to, and the text layers let the words do that
among themselves. Each starts as the identity (its residual branches end in zeros), so a planner
without them starts one with them. Measured, neither they nor the planner without them learnt
that: told "a red kite left of a blue lamp; the lamp shrinks and the kite spins", both give the
motions the right way round in about as many draws as the wrong way (README).

Mentions (`mentions`): each text token also reads the mean of the other tokens of its prompt that
are the same word piece (TextEncoder.mentions), through a linear layer that starts at zero. The
slot that reads "a tiny pink lamp" then also reads what the text encoder made of "the lamp
shrinks": the step from a reference back to what it refers to is given, not left to be learnt.

A plan scorer (`PlanScorer`) is the same network with one number out in place of the velocity:
how well a clean plan says what its prompt states, which picks among the planner's draws. It may
leave some features unread (`unread_features`): blind to shape, no plan it reads can show a
held-out (colour, shape) or (shape, motion) pair, and it judges every other attribute.

Shapes: slots (B, S, F); text (B, L, D_text) with mask (B, L); canvas (B, 2); K tokens per slot
(1 without `token_features`); tokens (B, S * K, D).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kinetoscope.models.checkpoint import Pretrained
from kinetoscope.models.dit import DiTBlock, DiTConfig, modulate, rows_per_text, timestep_embedding


@dataclass
class PlannerConfig:
    slots: int = 3  # the most objects a scene holds
    features: int = 28  # per slot (data/layout.py's SLOT_FEATURES)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384
    guidance: float = 1.0  # classifier-free guidance its plans are drawn with: above 1 only once trained with caption dropout
    token_features: tuple[int, ...] = ()  # features of each of a slot's tokens, in column order; () for one token per slot
    unread_features: tuple[int, ...] = ()  # columns of a slot it never reads (zeroed on the way in)
    text_layers: int = 0  # transformer layers over the prompt's tokens before the slots read them
    mentions: bool = False  # each text token also reads the other mentions of its word (TextEncoder.mentions)
    identity_kind: bool = False  # with token_features: every token also sees the first kind's (which object: present, colour)

    def __post_init__(self):
        self.token_features = tuple(self.token_features)  # lists, as config.json holds them
        self.unread_features = tuple(self.unread_features)

    def block_config(self) -> DiTConfig:
        return DiTConfig(dim=self.dim, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio, text_dim=self.text_dim)


def canvas_condition(width: int, height: int, seconds: float) -> torch.Tensor:
    """(2,) what the planner knows of the canvas: the log of its aspect ratio (W/H) and the clip's length in seconds."""
    return torch.tensor([math.log(width / height), seconds], dtype=torch.float32)


class SlotTransformer(nn.Module):
    """What the planner and the plan scorer share: object slots read as tokens (one per slot, or one
    per attribute group), DiT blocks conditioned on the pooled prompt and the canvas (adaLN-Zero),
    self-attention among the tokens, cross-attention to the text."""

    def __init__(self, cfg: PlannerConfig):
        super().__init__()
        self.cfg = cfg
        block_cfg = cfg.block_config()  # also checks that the head size suits the attention
        d = cfg.dim
        groups = cfg.token_features or (cfg.features,)
        if sum(groups) != cfg.features or min(groups) < 1:
            raise ValueError(f"token_features {list(cfg.token_features)} must split the {cfg.features} slot features into groups")
        # (K, F): which features token kind k reads and writes (none that are unread). One projection
        # serves every kind, so a planner with one token per slot has exactly the parameters it always had.
        columns = torch.zeros(len(groups), cfg.features)
        for kind, (first, count) in enumerate(zip((0, *itertools.accumulate(groups)), groups)):
            columns[kind, first:first + count] = 1.0
        if not all(0 <= column < cfg.features for column in cfg.unread_features):
            raise ValueError(f"unread_features {list(cfg.unread_features)} must be columns of the {cfg.features} slot features")
        columns[:, list(cfg.unread_features)] = 0.0
        self.register_buffer("kind_columns", columns, persistent=False)
        kind = torch.arange(cfg.slots * len(groups)) % len(groups)  # of each token, slot-major
        visible = (kind[:, None] == kind[None, :]) | (kind[:, None] == len(groups) - 1)  # (S * K, S * K)
        if cfg.identity_kind:
            if len(groups) < 3:
                raise ValueError("identity_kind needs token_features of at least three kinds: which object, the rest, where")
            visible |= kind[None, :] == 0
        self.register_buffer("visible", visible if len(groups) > 1 else None, persistent=False)
        self.slots_in = nn.Linear(cfg.features, d)
        self.slot_embedding = nn.Parameter(torch.randn(1, cfg.slots, d) * 0.02)
        if len(groups) > 1:
            self.kind_embedding = nn.Parameter(torch.randn(1, 1, len(groups), d) * 0.02)
        self.canvas_mlp = nn.Sequential(nn.Linear(2, d), nn.SiLU(), nn.Linear(d, d))
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.text_pool = nn.Linear(cfg.text_dim, d)
        self.text_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg.heads, int(d * cfg.mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.text_layers))
        self.mention_proj = nn.Linear(d, d) if cfg.mentions else None
        self.blocks = nn.ModuleList(DiTBlock(block_cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)

    def initialize(self, zero_layers):
        """Xavier for every linear layer, then zeros for `zero_layers` and for each residual branch's
        last layer (adaLN-Zero, as the denoiser): every text layer, and the reading of mentions,
        starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        mention_proj = () if self.mention_proj is None else (self.mention_proj,)
        for layer in (*(block.adaLN for block in self.blocks), *(block.cross.proj for block in self.blocks),
                      *(branch for layer in self.text_layers for branch in (layer.self_attn.out_proj, layer.linear2)),
                      *mention_proj, *zero_layers):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def drop_text(text, text_mask, drop):
        """The prompts where drop (B,) is True replaced by the empty prompt: one token of zeros, which
        the text projection reads as its bias. Caption dropout in training, and the unconditional pass
        of guidance, with no weights a planner trained without it lacks."""
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = True
        return text.masked_fill(drop[:, None, None], 0.0), torch.where(drop[:, None], null_mask, text_mask)

    def read(self, slots, cond, text, text_mask, canvas, mentions=None):
        """slots (B, S, F), cond (B, D) beyond the prompt and canvas, text (B / k, L, text_dim) with
        text_mask (B / k, L), canvas (B, 2), mentions (B / k, L, L) bool (TextEncoder.mentions; a
        planner with `mentions` only) -> tokens (B, S * K, D), full cond (B, D).

        Each prompt may condition k consecutive rows of slots (the tries of one prompt at sampling),
        so that the text, most of a small planner's work, is projected once per prompt."""
        x = self.slots_in(slots[:, :, None] * self.kind_columns) + self.slot_embedding[:, :, None]  # (B, S, K, D)
        if self.visible is not None:
            x = x + self.kind_embedding
        x = x.flatten(1, 2)  # (B, S * K, D)
        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True).clamp_min(1)
        cond = cond + self.text_pool(pooled).repeat_interleave(rows_per_text(slots, text), 0) + self.canvas_mlp(canvas)
        context = self.text_in(text)
        for layer in self.text_layers:
            context = layer(context, src_key_padding_mask=~text_mask)
        if self.mention_proj is not None:
            if mentions is None or mentions.shape != (*text_mask.shape, text_mask.shape[1]):
                raise ValueError(f"this {self.kind} reads each word's other mentions: it needs mentions (B, L, L) as the text's (TextEncoder.mentions)")
            same = (mentions & text_mask[:, None, :] & text_mask[:, :, None]).to(context.dtype)  # a dropped prompt has none
            context = context + self.mention_proj(same @ context / same.sum(-1, keepdim=True).clamp_min(1))
        still = torch.ones(x.shape[1], self.cfg.dim // self.cfg.heads // 2, dtype=torch.complex64, device=slots.device)
        for block in self.blocks:
            x = block(x, cond, context, text_mask, still, (1, 1, x.shape[1]), self.visible)
        return self.norm_out(x), cond


class LayoutPlanner(Pretrained, SlotTransformer):
    config_class = PlannerConfig
    kind = "layout planner"

    def __init__(self, cfg: PlannerConfig = PlannerConfig()):
        super().__init__(cfg)
        d = cfg.dim
        self.time_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.adaLN_out = nn.Linear(d, 2 * d)
        self.slots_out = nn.Linear(d, cfg.features)
        self.initialize((self.adaLN_out, self.slots_out))

    def forward(self, slots, t, text, text_mask, canvas, mentions=None):
        """slots (B, S, F) noised to t (B,) in [0, 1], text (B / k, L, text_dim), text_mask (B / k, L), canvas (B, 2),
        mentions (B / k, L, L) -> velocity (B, S, F)."""
        x, cond = self.read(slots, self.time_mlp(timestep_embedding(t, 256)), text, text_mask, canvas, mentions)
        shift, scale = self.adaLN_out(F.silu(cond)).chunk(2, dim=-1)
        out = self.slots_out(modulate(x, shift, scale)).unflatten(1, (slots.shape[1], -1))  # (B, S, K, F)
        return (out * self.kind_columns).sum(2)  # each feature as its own kind's token writes it


class PlanScorer(Pretrained, SlotTransformer):
    """How well a whole plan (clean slots) says what its prompt states, as one number: the sum of
    what each token judges of its own attributes. Trained to rank a caption's true plan above plans
    that contradict it (training/planner.py `PlanBatches`), it picks among the planner's draws: a
    generative planner learns every attribute's odds at once, and a draw that gives an object the
    motion of the object named beside it costs its loss no more than any other wrong motion; the
    scorer is taught that contrast directly."""

    config_class = PlannerConfig
    kind = "plan scorer"

    def __init__(self, cfg: PlannerConfig = PlannerConfig()):
        super().__init__(cfg)
        self.score_out = nn.Linear(cfg.dim, 1)
        self.initialize((self.score_out,))

    def forward(self, slots, text, text_mask, canvas, mentions=None):
        """slots (B, S, F), text (B / k, L, text_dim), text_mask (B / k, L), canvas (B, 2), mentions (B / k, L, L) -> scores (B,)."""
        x, _ = self.read(slots, 0.0, text, text_mask, canvas, mentions)
        return self.score_out(x).sum((1, 2))
