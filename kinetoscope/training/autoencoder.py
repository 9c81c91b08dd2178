"""Train the causal video autoencoder on Shapes World buckets from a TOML recipe.

    kinetoscope ae train --recipe configs/autoencoder.toml [--output runs/autoencoder] [--minutes M]

Resumes from OUTPUT/checkpoint when present. Every `eval_every` steps it measures PSNR on held-out
clips, writes a reconstruction contact sheet and the loss curve; at the end it measures the
latent statistics and exports the shippable weights to OUTPUT/final.

With `[data] painted` (files of `kinetoscope ae paint`, training/painted.py) and `[train]
painted_share`, that share of the steps teaches the decoder to draw a generator's painted latents as
the clips they stand for, the encoder frozen; the first PAINTED_HELD_OUT pairs are never trained on
and measure it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from kinetoscope.data.dataset import Bucket, tensor_to_clip
from kinetoscope.eval.reconstruction import heldout_clips, psnr
from kinetoscope.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from kinetoscope.models.checkpoint import config_from_dict
from kinetoscope.models.precision import autocast_for
from kinetoscope.training.common import (DATA_KEYS, TRAIN_KEYS, BatchPool, RecipeError, RunDirectory, Stopwatch, check_train_settings,
                                         check_buckets, learning_rate, load_recipe, recipe_dataset, replace_folder,
                                         reuse_setting, run_progress)
from kinetoscope.training.painted import PaintedPairs, encoder_fingerprint, join_pairs

REQUIRED = {"model": (), "data": DATA_KEYS, "train": TRAIN_KEYS}
KNOWN = {
    "model": None,  # the autoencoder's config names its own settings
    "data": (*DATA_KEYS, "bucket_weights", "max_batch_size", "painted"),
    "train": (*TRAIN_KEYS, "minutes", "reuse", "l1_weight", "freeze_encoder", "painted_share"),
}
PAINTED_HELD_OUT = 64  # painted pairs, the first of the files named, that only evaluation sees


def reconstruction_loss(video: torch.Tensor, recon: torch.Tensor, l1_weight: float = 1.0) -> torch.Tensor:
    # L1 keeps flat regions and edges sharp early on; the MSE term is what PSNR measures, and a
    # smaller L1 weight lets the few badly drawn pixels (fast motion, edges) lead the gradient.
    recon = recon.float()
    return l1_weight * F.l1_loss(recon, video) + F.mse_loss(recon, video)


def model_config(recipe: dict) -> AutoencoderConfig:
    try:
        return config_from_dict(AutoencoderConfig, {k: v for k, v in recipe["model"].items() if k != "init"})
    except (TypeError, ValueError) as error:
        raise RecipeError(f"[model]: {error}") from None


def start_from(model: VideoAutoencoder, directory: str):
    """Load exported weights into `model`, which may add decoder blocks or the pixel refiner to
    them: both start as the identity, so training continues from the same reconstructions."""
    try:
        start = VideoAutoencoder.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise RecipeError(f"[model] init: {error}") from None
    growable = {"decoder_blocks_per_level": None, "refine_width": 0}
    same_otherwise = replace(start.cfg, **growable) == replace(model.cfg, **growable)
    shrinks = model.cfg.decoder_blocks < start.cfg.decoder_blocks or start.cfg.refine_width not in (0, model.cfg.refine_width)
    if not same_otherwise or shrinks:
        raise RecipeError(f"[model] init {directory} is a {start.cfg}; the recipe's {model.cfg} can only add decoder blocks or a pixel refiner")
    model.load_state_dict(start.float().state_dict(), strict=False)


@torch.no_grad()
def latent_statistics(model: VideoAutoencoder, recipe: dict, batches: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of raw latents over training buckets."""
    device = next(model.parameters()).device
    stream = iter(recipe_dataset(recipe["data"], with_captions=False))
    latents = []
    for _ in range(batches):
        with autocast_for(device):
            z = model.encode(next(stream)["video"].to(device), normalize=False)
        latents.append(z.float().transpose(0, 1).flatten(1))
    latents = torch.cat(latents, dim=1)
    return latents.mean(1), latents.std(1).clamp_min(1e-4)


def save_training_model(model: VideoAutoencoder, directory: Path):
    model.save_pretrained(directory)


def train(recipe_path: str, output: str | None = None, minutes: float | None = None, steps: int | None = None) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would train the same and write the same folder
        raise RecipeError("the autoencoder trains in one process; run `kinetoscope ae train` without torchrun")
    recipe = load_recipe(recipe_path, REQUIRED, KNOWN)
    settings = recipe["train"]
    check_train_settings(settings)
    reuse = reuse_setting(settings)
    l1_weight = settings.get("l1_weight", 1.0)
    if isinstance(l1_weight, bool) or not isinstance(l1_weight, (int, float)) or l1_weight < 0:
        raise RecipeError(f"[train] l1_weight must be a number >= 0, not {l1_weight!r}")
    total_steps = steps or settings["steps"]
    minutes = minutes if minutes is not None else settings.get("minutes")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(settings["seed"])
    run = RunDirectory(output or settings["output"])

    model = VideoAutoencoder(model_config(recipe)).to(device)
    # A frozen encoder keeps the latent space (and its statistics) that a trained generator relies on.
    freeze_encoder = settings.get("freeze_encoder", False)
    if freeze_encoder and not recipe["model"].get("init"):
        raise RecipeError("[train] freeze_encoder needs trained weights to start from: set [model] init")
    model.encoder.requires_grad_(not freeze_encoder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"], betas=(0.9, 0.99), weight_decay=settings["weight_decay"])
    step, carried = 0, 0.0
    run.recover()
    if run.has_checkpoint():
        run.check_resumable(recipe)
        model.load_state_dict(load_file(run.checkpoint / "model.safetensors", device=str(device)))
        state = run.load_state(optimizer)
        step, carried = state["step"], state["elapsed_s"]
        print(f"resuming from step {step} ({carried / 60:.1f} min so far)")
    elif recipe["model"].get("init"):
        start_from(model, recipe["model"]["init"])
        print(f"starting from the weights in {recipe['model']['init']}")
    painted, painted_share = painted_setting(recipe, model)
    clock = Stopwatch(carried)
    eval_video = heldout_clips(Bucket(128, 128, 17))  # the clips behind `ae eval`'s 128x128 figure
    painted_eval, trainable_pairs, pairs_per_step = None, None, 0
    if painted is not None:
        held_out = min(PAINTED_HELD_OUT, len(painted) // 2)
        painted_eval = (painted.latents[:held_out].float(), painted.clips(range(held_out)))
        trainable_pairs, pairs_per_step = np.arange(held_out, len(painted)), painted_batch(recipe["data"], painted)

    def checkpoint():
        run.save(model, optimizer, {"step": step, "elapsed_s": clock.elapsed, "recipe": recipe}, save_training_model)

    last_checkpoint = time.monotonic()
    bar = tqdm(total=total_steps, initial=step, desc="autoencoder", dynamic_ncols=True)
    dataset = recipe_dataset(recipe["data"], step, with_captions=False)
    check_buckets(dataset.buckets, model)
    stream = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=settings["workers"]))
    pool = BatchPool(lambda: next(stream), reuse, seed=settings["seed"] * 1_000_003 + step)
    if step == 0 and recipe["model"].get("init"):
        evaluate(model, eval_video, run, step, painted_eval)  # where the weights it continues from stand
    model.train()
    while (fraction := run_progress(step, total_steps, clock.elapsed, minutes)) < 1.0:
        lr = learning_rate(step, settings["lr"], settings["warmup"], fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if painted is not None and pool.rng.random() < painted_share:
            chosen = pool.rng.choice(trainable_pairs, pairs_per_step, replace=False)
            video, source = painted.clips(chosen).to(device), "painted"
            with autocast_for(device):
                recon = model.decode(painted.latents[chosen].float().to(device))
        else:
            batch = pool.next()
            video, source = batch["video"].to(device, non_blocking=True), str(batch["bucket"])
            if reuse > 1 and pool.rng.random() < 0.5:  # each draw is mirrored half the time, so a batch's repeats differ
                video = video.flip(-1)
            with autocast_for(device):
                with torch.set_grad_enabled(not freeze_encoder):
                    latents = model.encode(video, normalize=False)
                recon = model.decode(latents, normalized=False)
        loss = reconstruction_loss(video, recon, l1_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        if torch.isfinite(grad_norm):  # one overflowing batch must not poison the weights and the next checkpoint
            optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", bucket=source)
        if step % settings["log_every"] == 0:
            run.log({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr,
                     "bucket": source, "elapsed_s": round(clock.elapsed, 1)})
        if step % settings["eval_every"] == 0:
            evaluate(model, eval_video, run, step, painted_eval)
            model.train()
        if time.monotonic() - last_checkpoint > settings["checkpoint_minutes"] * 60:
            checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint()
    if step % settings["eval_every"]:  # the last step's evaluation, unless the loop just made it
        evaluate(model, eval_video, run, step, painted_eval)
    return export(model, recipe, run, step, clock.elapsed, device, measure_latents=not freeze_encoder)


def painted_setting(recipe: dict, model: VideoAutoencoder) -> tuple[PaintedPairs | None, float]:
    """The recipe's painted pairs, checked to be in `model`'s latent space, and the share of steps they take."""
    files, share = recipe["data"].get("painted"), recipe["train"].get("painted_share")
    if files is None and share is None:
        return None, 0.0
    if files is None or share is None:
        raise RecipeError("[data] painted and [train] painted_share go together: the pairs, and the share of steps they take")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise RecipeError(f"[train] painted_share must be a number above 0 and at most 1, not {share!r}")
    if not recipe["train"].get("freeze_encoder"):
        raise RecipeError("[data] painted needs [train] freeze_encoder = true: the pairs' latents are the frozen encoder's space")
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise RecipeError(f"[data] painted must name a file of painted pairs or a list of them, not {files!r}")
    try:
        pairs = join_pairs(files)
    except (OSError, ValueError) as error:
        raise RecipeError(f"[data] painted: {error}") from None
    if len(pairs) < 2:
        raise RecipeError(f"[data] painted: {len(pairs)} pair is too few to hold some out and train on the rest")
    if pairs.encoder != encoder_fingerprint(model):
        raise RecipeError("[data] painted: the pairs were painted in another latent space than [model] init's encoder makes")
    width, height = pairs.size
    try:
        expected = model.latent_shape(pairs.frames, height, width)
    except ValueError as error:
        raise RecipeError(f"[data] painted: {error}") from None
    if tuple(pairs.latents.shape[1:]) != expected:
        raise RecipeError("[data] painted: the pairs' latents are not the shape this autoencoder decodes to their clips")
    return pairs, float(share)


def painted_batch(data: dict, pairs: PaintedPairs) -> int:
    """Pairs a step decodes: as many clips as the recipe's pixels per batch hold, at least one."""
    width, height = pairs.size
    return max(1, min(len(pairs) // 2, data["pixels_per_batch"] // (width * height * pairs.frames)))


@torch.no_grad()
def evaluate(model: VideoAutoencoder, video: torch.Tensor, run: RunDirectory, step: int,
             painted: tuple[torch.Tensor, torch.Tensor] | None = None):
    from kinetoscope.media.frames import save_contact_sheet

    model.eval()
    device = next(model.parameters()).device
    with autocast_for(device):
        recon = model.decode(model.encode(video.to(device))).float().cpu()
    score = float(psnr(video, recon).mean())
    record = {"step": step, "eval_psnr_128": score}
    clips, labels = [], []
    for i in range(min(4, video.shape[0])):
        clips += [tensor_to_clip(video[i]), tensor_to_clip(recon[i])]
        labels += [f"held-out clip {i}", f"reconstruction, step {step}"]
    if painted is not None:
        latents, truth = painted
        with autocast_for(device):
            drawn = torch.cat([model.decode(latents[i : i + 8].to(device)).float().cpu() for i in range(0, len(latents), 8)])
        record["eval_psnr_painted"] = float(psnr(truth, drawn).mean())
        for i in range(min(4, len(latents))):
            clips += [tensor_to_clip(truth[i]), tensor_to_clip(drawn[i])]
            labels += [f"held-out painted pair {i}: its scene", f"its painted latents decoded, step {step}"]
    run.log(record)
    save_contact_sheet(run.root / "samples" / f"reconstruction_{step:06d}.png", clips, labels)
    run.plot_loss(("loss",), title=f"autoencoder loss (eval PSNR {score:.1f} dB at step {step})")


def export(model: VideoAutoencoder, recipe: dict, run: RunDirectory, step: int, elapsed: float, device,
           measure_latents: bool = True) -> Path:
    """Measure latent statistics (unless the encoder was frozen) and write the shippable weights (bf16) to OUTPUT/final."""
    model.eval()
    if measure_latents:
        mean, std = latent_statistics(model, recipe)
        model.latent_mean.copy_(mean)
        model.latent_std.copy_(std)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    model.to(torch.bfloat16)
    final = replace_folder(run.root / "final", lambda folder: model.save_pretrained(
        folder, {"trained_steps": step, "wall_time_s": round(elapsed), "hardware": hardware}))
    model.float()
    print(f"exported weights to {final} after {step} steps, {elapsed / 60:.1f} min")
    return final
