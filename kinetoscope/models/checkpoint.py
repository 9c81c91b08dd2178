"""The on-disk form every model shares: a folder with config.json (the config dataclass plus run
metadata) and model.safetensors."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def config_from_dict(config_class, raw: dict, ignore_unknown: bool = False):
    """A config dataclass from JSON/TOML values (lists become tuples); unknown keys are an error
    unless `ignore_unknown` (a checkpoint's config.json also carries run metadata)."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(raw) - known)
    if unknown and not ignore_unknown:
        raise ValueError(f"unknown {config_class.__name__} settings: {', '.join(unknown)}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})


def save_checkpoint(directory: str | Path, model: torch.nn.Module, config, metadata: dict | None = None):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**asdict(config), **(metadata or {})}, indent=2) + "\n")


def load_checkpoint(directory: str | Path, config_class, kind: str):
    """(config, state dict) from a checkpoint folder; FileNotFoundError names what is missing."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no {kind} checkpoint in {directory} (need config.json and model.safetensors)")
    try:
        config = config_from_dict(config_class, json.loads(config_path.read_text()), ignore_unknown=True)
    except (TypeError, ValueError) as error:  # e.g. another kind of model's folder
        raise ValueError(f"{config_path} does not describe a {kind} ({error})") from None
    return config, load_file(weights_path)


class Pretrained:
    """save_pretrained / from_pretrained for a module built from one config (`self.cfg`), in the
    folder form above: a subclass names its `config_class` and the `kind` error messages call it."""

    config_class: type
    kind: str

    def save_pretrained(self, directory: str | Path, metadata: dict | None = None):
        save_checkpoint(directory, self, self.cfg, metadata)

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        cfg, state = load_checkpoint(directory, cls.config_class, cls.kind)
        model = cls(cfg)
        model.load_state_dict(state)
        return model.eval()
