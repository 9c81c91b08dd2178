"""What every training run shares: TOML recipes, resumable checkpoints, the log and its loss curve."""

from __future__ import annotations

import json
import math
import shutil
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from kinetoscope.data.dataset import ShapesWorldDataset

TRAIN_KEYS = ("steps", "lr", "warmup", "weight_decay", "grad_clip", "seed", "workers", "log_every",
              "eval_every", "checkpoint_minutes", "output")
DATA_KEYS = ("buckets", "fps", "pixels_per_batch", "seed")


class RecipeError(ValueError):
    """A recipe that is missing, not TOML, or lacks a setting its trainer needs."""


def load_recipe(path: str | Path, required: dict[str, tuple[str, ...]] | None = None, known: dict | None = None,
                _extending: tuple = ()) -> dict:
    """Read a TOML recipe and check that every `required` table has its keys, and that it has no
    table or setting beyond `known` ({table: its settings, or None where another check names them}):
    a misspelt setting would otherwise be ignored, and the run would train something else.

    A recipe that continues another names it with a top-level `extends = "other.toml"` (relative
    to its own folder) and states only what changes: each of its tables updates the other's
    table key by key (an inline table such as `overrides` is replaced whole).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe at {path}")
    if path.resolve() in _extending:
        raise RecipeError(f"{path} extends itself through {' -> '.join(p.name for p in _extending)}")
    try:
        with path.open("rb") as f:
            recipe = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path} is not valid TOML: {error}") from None
    if "extends" in recipe:
        base_name = recipe.pop("extends")
        if not isinstance(base_name, str):
            raise RecipeError(f"{path}: extends must name a recipe file, not {base_name!r}")
        base = load_recipe(path.parent / base_name, None, None, (*_extending, path.resolve()))
        for table, settings in recipe.items():
            if isinstance(settings, dict) and isinstance(base.get(table), dict):
                base[table] = {**base[table], **settings}
            else:
                base[table] = settings
        recipe = base
    for table, keys in (required or {}).items():
        if not isinstance(recipe.get(table), dict):
            raise RecipeError(f"{path} has no [{table}] table")
        missing = [key for key in keys if key not in recipe[table]]
        if missing:
            raise RecipeError(f"{path}: [{table}] lacks {', '.join(missing)}")
    for table, settings in recipe.items() if known is not None else ():
        if table not in known or not isinstance(settings, dict):
            raise RecipeError(f"{path}: unknown table or setting {table!r}; a recipe has the tables "
                              f"{', '.join(f'[{name}]' for name in known)}")
        unknown = sorted(set(settings) - set(known[table] or settings))
        if unknown:
            raise RecipeError(f"{path}: [{table}] has no setting {', '.join(unknown)}; it takes {', '.join(known[table])}")
    return recipe


def check_train_settings(settings: dict):
    """The [train] numbers every trainer divides or counts by: fail now, not at the first log."""
    whole = {"steps": 1, "log_every": 1, "eval_every": 1, "warmup": 0, "workers": 0, "seed": 0}
    for key, low in whole.items():
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RecipeError(f"[train] {key} must be a whole number of at least {low}, not {value!r}")
    for key in ("lr", "checkpoint_minutes", *(("minutes",) if "minutes" in settings else ())):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise RecipeError(f"[train] {key} must be a positive number, not {value!r}")


def learning_rate(step: int, peak: float, warmup: int, progress: float, floor: float = 0.05) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to floor * peak as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_progress(step: int, total_steps: int, elapsed_s: float, minutes: float | None) -> float:
    """How far through its budget a run is: steps, or wall time when that runs out first.

    A CPU run is bounded by the session's time, so the learning rate anneals by whichever
    budget ends first rather than being cut off at its peak.
    """
    by_steps = step / total_steps
    return max(by_steps, elapsed_s / (minutes * 60)) if minutes else by_steps


class BatchPool:
    """Each rendered (and, for the generator, encoded) batch serves `reuse` steps on average.

    On a CPU, rendering a batch costs a large part of a training step, and a model learns nearly
    as much from a clip seen again (at fresh noise and times, or mirrored) as from a new one. The
    pool holds 4 * reuse batches; every `reuse` steps the oldest gives way to a new one, and each
    step trains on a batch drawn at random from the pool, so a batch's uses are spread over its
    time in the pool rather than made in a row. reuse = 1 uses every batch exactly once, in order.
    """

    def __init__(self, make_batch, reuse: int, seed: int):
        self.make_batch = make_batch
        self.reuse = reuse
        self.capacity = 1 if reuse == 1 else 4 * reuse
        self.batches = []
        self.steps = 0
        self.rng = np.random.default_rng(seed)

    def next(self):
        if self.steps % self.reuse == 0 or not self.batches:
            self.batches.append(self.make_batch())
            if len(self.batches) > self.capacity:
                self.batches.pop(0)
            while len(self.batches) < min(self.capacity, 4):  # a young pool first gathers a few batches
                self.batches.append(self.make_batch())
        self.steps += 1
        return self.batches[self.rng.integers(len(self.batches))]


def recipe_dataset(data: dict, step: int = 0, with_captions: bool = True) -> ShapesWorldDataset:
    """The training stream of a recipe's [data] table; a malformed table is the recipe's error."""
    try:
        return ShapesWorldDataset.from_recipe(data, step, with_captions)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"[data]: {error}") from None


def reuse_setting(settings: dict) -> int:
    reuse = settings.get("reuse", 1)
    if not isinstance(reuse, int) or isinstance(reuse, bool) or reuse < 1:
        raise RecipeError(f"[train] reuse must be a whole number of at least 1, not {reuse!r}")
    return reuse


class RunDirectory:
    """runs/NAME/: checkpoint/ (resumable state), log.jsonl, loss.png, samples/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoint = self.root / "checkpoint"
        self.log_path = self.root / "log.jsonl"
        (self.root / "samples").mkdir(parents=True, exist_ok=True)

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "state.json").is_file()

    def recover(self):
        """Before a run starts (on one process only): bring back a checkpoint an interrupted save
        left behind, and drop log records past the checkpoint, which the resumed run logs again."""
        self._recover_interrupted_save()
        resumed_at = json.loads((self.checkpoint / "state.json").read_text())["step"] if self.has_checkpoint() else 0
        records = self.records()
        kept = [r for r in records if r.get("step", 0) <= resumed_at]
        if len(kept) < len(records):
            staging = self.log_path.with_suffix(".tmp")
            staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
            staging.replace(self.log_path)

    def _recover_interrupted_save(self):
        """A crash between save()'s two renames leaves the last good checkpoint as checkpoint.old."""
        previous = self.root / "checkpoint.old"
        if not previous.exists():
            return
        if (self.checkpoint / "state.json").is_file():
            shutil.rmtree(previous)
            return
        if self.checkpoint.exists():
            shutil.rmtree(self.checkpoint)
        previous.rename(self.checkpoint)

    def save(self, model, optimizer, state: dict, save_model):
        """Write to a temporary folder, then swap it in, so a crash never leaves half a checkpoint."""
        self._recover_interrupted_save()

        def write(staging: Path):
            save_model(model, staging)
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            (staging / "state.json").write_text(json.dumps(state, indent=2))

        replace_folder(self.checkpoint, write)

    def check_resumable(self, recipe: dict):
        """Refuse to resume this run's checkpoint under another recipe than the one that made it."""
        saved = json.loads((self.checkpoint / "state.json").read_text()).get("recipe", recipe)
        resumed_recipe_check(saved, recipe, self.checkpoint)

    def load_state(self, optimizer) -> dict:
        optimizer.load_state_dict(torch.load(self.checkpoint / "optimizer.pt", weights_only=True))
        return json.loads((self.checkpoint / "state.json").read_text())

    def log(self, record: dict):
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def plot_loss(self, keys: tuple[str, ...] = ("loss",), title: str = "training loss"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # none before the first logged step
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.root / "loss.png", dpi=100)
        plt.close(fig)


def replace_folder(target: Path, write) -> Path:
    """Let `write(staging)` make and fill a temporary sibling of `target`, then swap it in: a crash
    leaves the previous folder whole (as `target` or, between the two renames, as `target.old`)."""
    staging, previous = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    if staging.exists():
        shutil.rmtree(staging)
    write(staging)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)
    return target


def check_buckets(buckets, autoencoder, transformer=None):
    """Every bucket must cut into whole latent cells (and the transformer's patches): fail now, not when drawn."""
    for bucket in buckets:
        try:
            latent_shape = autoencoder.latent_shape(bucket.frames, bucket.height, bucket.width)
            if transformer is not None:
                transformer.check_latent_shape(*latent_shape[1:])
        except ValueError as error:
            raise RecipeError(f"[data] buckets: {bucket} does not fit this model ({error})") from None


def resumed_recipe_check(saved: dict, recipe: dict, checkpoint: Path):
    """A checkpoint resumes only under the recipe that made it; the budget and bookkeeping may change."""
    may_change = {"train": {"steps", "minutes", "output", "checkpoint_minutes", "log_every", "eval_every", "workers"}, "eval": None}
    changed = []
    for table in sorted(set(saved) | set(recipe)):
        if table in may_change and may_change[table] is None:
            continue
        before, now = saved.get(table, {}), recipe.get(table, {})
        skip = may_change.get(table, set())
        changed += [f"[{table}] {key}" for key in sorted((set(before) | set(now)) - skip) if before.get(key) != now.get(key)]
    if changed:
        raise RecipeError(f"{checkpoint} was made by a different recipe ({', '.join(changed)} differ); "
                          "resume with that recipe, or give this one another --output")


class Stopwatch:
    """Wall time that survives resumes: elapsed seconds carried in the checkpoint plus this process's."""

    def __init__(self, carried: float = 0.0):
        self.carried = carried
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return self.carried + time.monotonic() - self.started
