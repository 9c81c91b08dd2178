"""all-MiniLM-L6-v2's network, a 6-layer BERT encoder, in plain PyTorch.

Importing transformers' model classes took 1.7 to 2.0 s of every cold start here (a whole
`kinetoscope generate` took about 7 s), for a network this small; the tokenizer still comes from
transformers. Parameter names are BERT's, so the pinned safetensors file loads as it is and a
compact copy (models/text_encoder.py) keeps its names. A test holds its states to transformers'
BertModel's on the same weights.

Shapes: input_ids and attention_mask (B, L); states (B, L, hidden_size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

UNUSED_WEIGHTS = ("pooler.", "embeddings.position_ids")  # the sentence pooler, and a buffer of arange(512)


@dataclass
class MiniLMConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: str | Path) -> "MiniLMConfig":
        """BERT's config.json; refuses the variants this network does not compute."""
        settings = json.loads(Path(path).read_text())
        for key, expected in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if settings.get(key, expected) != expected:
                raise ValueError(f"{path}: {key} {settings[key]!r} is not {expected!r}, which this encoder computes")
        return cls(**{field.name: settings[field.name] for field in fields(cls)})


def _dense_and_norm(fan_in: int, cfg: MiniLMConfig) -> nn.ModuleDict:
    return nn.ModuleDict({"dense": nn.Linear(fan_in, cfg.hidden_size), "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)})


class MiniLMLayer(nn.Module):
    """Post-norm BERT layer: self-attention, then a GELU MLP, each added back and layer-normed."""

    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}),
            "output": _dense_and_norm(d, cfg),
        })
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, cfg.intermediate_size)})
        self.output = _dense_and_norm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:  # x (B, L, D), visible (B, 1, 1, L) bool
        projections = self.attention["self"]
        q, k, v = (projections[name](x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for name in ("query", "key", "value"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible).transpose(1, 2).flatten(2)
        x = self.attention["output"]["LayerNorm"](self.attention["output"]["dense"](attended) + x)
        hidden = F.gelu(self.intermediate["dense"](x))
        return self.output["LayerNorm"](self.output["dense"](hidden) + x)


class MiniLM(nn.Module):
    def __init__(self, cfg: MiniLMConfig):
        super().__init__()
        d = cfg.hidden_size
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(cfg.vocab_size, d),
            "position_embeddings": nn.Embedding(cfg.max_position_embeddings, d),
            "token_type_embeddings": nn.Embedding(cfg.type_vocab_size, d),
            "LayerNorm": nn.LayerNorm(d, eps=cfg.layer_norm_eps),
        })
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(MiniLMLayer(cfg) for _ in range(cfg.num_hidden_layers))})

    @classmethod
    def from_state(cls, cfg: MiniLMConfig, state: dict[str, torch.Tensor]) -> "MiniLM":
        """The network with BERT-named weights `state` (the pooler's, which it never uses, dropped);
        every weight it has must be there."""
        model = cls(cfg)
        model.load_state_dict({name: value for name, value in state.items() if not name.startswith(UNUSED_WEIGHTS)})
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L) and which are real (B, L) -> the last layer's states (B, L, D)."""
        embeddings = self.embeddings
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = embeddings["word_embeddings"](input_ids) + embeddings["token_type_embeddings"](types)
        x = embeddings["LayerNorm"](x + embeddings["position_embeddings"](positions))
        visible = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder["layer"]:
            x = layer(x, visible)
        return x
