"""Train the diffusion transformer on Shapes World latents from a TOML recipe.

    kinetoscope train --recipe configs/generator.toml [--output runs/generator] [--minutes M]
    torchrun --nproc-per-node N -m kinetoscope train --recipe configs/generator.toml

Clips are rendered on the fly, encoded by the frozen autoencoder and captioned by the frozen
text encoder; held-out combinations and phrasings never appear (the dataset's train split).
Resumes from OUTPUT/checkpoint; keeps an EMA of the weights, which is what gets exported.

A recipe with a [distill] table trains a guidance-distilled student instead: on the same data, at
the times the sampler visits, the student given the prompt and a guidance scale g learns the
velocity its teacher gives with classifier-free guidance at g (the teacher's two passes, with and
without the prompt), so it samples in one pass per step. Caption dropout plays no part there.

`[train] layout_loss = W` (with `layout_block = K`) adds layout supervision (training/layout.py):
a probe on the tokens after block K learns to tell where each object's centre is, weighted W
against the velocity loss.

`[train] object_weight = W` weighs a silhouette painter's loss at the tokens its objects cover,
up to 1 + W (`object_token_weights`), against 1 at the background.

`[train] pixel_loss = W` (with `pixel_clips = K`, 2 unless set) adds the velocity error as the
frozen decoder draws it (`pixel_velocity_loss`), on the K clips of each batch drawn nearest the
clean end, weighted W against the latent loss.

A layout model (`[model] overrides = { layout_channels = 11 }`) takes the heatmaps of each clip's
true object centres (data/layout.py) as an input, dropped with the caption; `[model] planner` names
the layout planner (training/planner.py) that writes them at sampling, for the samples here and in
the export, which carries a copy of it. With `silhouette_channels` as well (data/layout.py's
silhouette_channels of the autoencoder's frames per latent step), it is also shown each object's
silhouette, drawn from the same objects. Distilling a layout model shows the student and the
teacher's conditional pass the true layout, and the teacher's unconditional pass none, as sampling does.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kinetoscope.data.captions import PromptError, parse_prompt
from kinetoscope.data.layout import LAYOUT_CHANNELS, layout_inputs, layout_maps, scene_objects, silhouette_channels
from kinetoscope.diffusion.rectified_flow import FlowSchedule, add_noise, predicted_clean, velocity_target
from kinetoscope.models.autoencoder import VideoAutoencoder, default_weights_dir
from kinetoscope.models.dit import DiffusionTransformer, config_for
from kinetoscope.models.planner import LayoutPlanner
from kinetoscope.models.precision import autocast_for
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.training.common import (DATA_KEYS, TRAIN_KEYS, BatchPool, RecipeError, RunDirectory, Stopwatch, check_train_settings,
                                         check_buckets, learning_rate, load_recipe, replace_folder,
                                         recipe_dataset, reuse_setting, run_progress)
from kinetoscope.training.layout import HiddenTokens, LayoutProbe, layout_loss

REQUIRED = {
    "model": ("size",),
    "data": DATA_KEYS,
    "train": (*TRAIN_KEYS, "caption_dropout", "ema_decay"),
    "eval": ("prompts", "steps", "guidance"),
}
KNOWN = {
    "model": ("size", "init", "overrides", "planner"),
    "schedule": tuple(f.name for f in fields(FlowSchedule)),
    "data": (*DATA_KEYS, "autoencoder", "bucket_weights", "motion_weights", "max_batch_size"),
    "train": (*REQUIRED["train"], "minutes", "reuse", "times", "layout_loss", "layout_block", "object_weight",
              "pixel_loss", "pixel_clips"),
    "eval": REQUIRED["eval"],
    "distill": ("teacher", "guidance"),
}
TIME_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # loss is logged per band of t
SELF_CONDITION_SHARE = 0.5  # of the steps that train a self-conditioned model on its own estimate


def band_key(band: int) -> str:
    """The log's name for the loss in one band of t, e.g. loss_t0.2-0.4."""
    return f"loss_t{TIME_BUCKETS[band]:.1f}-{TIME_BUCKETS[band + 1]:.1f}"


def start_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun this joins the process group (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK: its index on this machine), else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class LatentBatches:
    """Turns rendered, captioned batches into (latents, text states, text mask)."""

    def __init__(self, autoencoder: VideoAutoencoder, text_encoder: TextEncoder, device: torch.device):
        self.autoencoder = autoencoder.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict):
        video = batch["video"].to(self.device, non_blocking=True)
        with autocast_for(self.device):
            latents = self.autoencoder.encode(video).float()
        text, mask = self.text_encoder.encode(batch["caption"])
        return latents, text.to(self.device), mask.to(self.device)


def diffusion_loss(model, latents, text, mask, schedule: FlowSchedule, caption_dropout: float, generator=None,
                   window: tuple[float, float] | None = None, layout: torch.Tensor | None = None,
                   token_weights: torch.Tensor | None = None, pixels: tuple[VideoAutoencoder, int] | None = None):
    """Velocity MSE per sample (B,), the times it was drawn at: logit-normal, or uniform over
    `window` of the sampler's path (a model trained for one stretch of sampling, e.g. high noise),
    and, given `pixels` (the frozen autoencoder, how many clips), `pixel_velocity_loss` (else None).
    A layout model's `layout` (B, N, channels) goes where the caption goes: dropped with it.
    `token_weights` (B, N) weigh each token's squared error (a weighted mean per sample)."""
    b = latents.shape[0]
    tokens = unwrap(model).token_count(latents.shape)
    if window is None:
        t = schedule.sample_training_times(b, tokens, generator=generator).to(latents.device)
    else:
        t = schedule.path_times(b, tokens, window, generator).to(latents.device)
    noise = schedule.noise(latents.shape, generator).to(latents.device)
    drop = (torch.rand(b, generator=generator) < caption_dropout).to(latents.device)
    text, mask = unwrap(model).drop_text(text, mask, drop)
    if layout is not None:
        layout = layout.masked_fill(drop[:, None, None], 0.0)
    noisy = add_noise(latents, noise, t)
    with autocast_for(latents.device):
        prediction = model(noisy, t, text, mask, own_estimate(model, noisy, t, text, mask, generator, layout), layout=layout).float()
    error = F.mse_loss(prediction, velocity_target(latents, noise), reduction="none")
    pixel = None if pixels is None else pixel_velocity_loss(pixels[0], noisy, prediction, latents, t, pixels[1])
    if token_weights is None:
        return error.flatten(1).mean(1), t, pixel
    per_token = unwrap(model).patchify(error)[0].mean(-1)  # (B, N)
    return (per_token * token_weights).sum(1) / token_weights.sum(1), t, pixel


def pixel_velocity_loss(autoencoder: VideoAutoencoder, noisy, prediction, latents, t, clips: int) -> torch.Tensor:
    """The velocity error as the frames show it: (decode(predicted clean) - decode(clean)) / t,
    squared, the mean over the pixels of the `clips` clips of the batch drawn nearest the clean end
    (where the predicted clean latents are sharp enough to decode). The latent loss weighs every
    latent channel alike, though the decoder draws some far more strongly than others: an object
    smeared across the four frames of a latent step costs the frames more than it costs the latents."""
    chosen = t.argsort()[:clips]
    with autocast_for(latents.device):
        with torch.no_grad():
            target = autoencoder.decode(latents[chosen]).float()
        drawn = autoencoder.decode(predicted_clean(noisy[chosen], prediction[chosen], t[chosen])).float()
    return ((drawn - target) / t[chosen].view(-1, 1, 1, 1, 1)).pow(2).mean()


def object_token_weights(layout: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, N) loss weights from a layout model's input (B, N, channels): up to 1 + `weight` at each
    token an object's silhouette covers in any frame of its latent step, by the share of its most
    covered cell. Most of a Shapes World clip is plain background the painter gets right early;
    the objects are where its failures are."""
    return 1 + weight * layout[..., LAYOUT_CHANNELS:].amax(-1)


def object_weight_setting(settings: dict, model_cfg) -> float | None:
    """[train] object_weight = W (> 0): a painter that takes silhouettes weighs the loss at its
    objects' tokens 1 + W; absent, every token alike."""
    if "object_weight" not in settings:
        return None
    weight = positive_weight(settings, "object_weight")
    if not model_cfg.silhouette_channels:
        raise RecipeError("[train] object_weight finds the objects by their silhouettes: the model takes none "
                          "([model] overrides silhouette_channels)")
    return weight


def pixel_loss_setting(settings: dict) -> tuple[float, int] | None:
    """[train] pixel_loss (its weight, > 0) and pixel_clips (how many clips of a batch it decodes,
    at least 1; 2 unless set); absent, the latent loss alone."""
    if "pixel_loss" not in settings and "pixel_clips" not in settings:
        return None
    weight, clips = positive_weight(settings, "pixel_loss"), settings.get("pixel_clips", 2)
    if isinstance(clips, bool) or not isinstance(clips, int) or clips < 1:
        raise RecipeError(f"[train] pixel_clips must be a whole number of clips, at least 1, not {clips!r}")
    return weight, clips


def positive_weight(settings: dict, key: str) -> float:
    """[train] `key` as a loss weight: a finite number above 0."""
    weight = settings.get(key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise RecipeError(f"[train] {key} must be a positive weight, not {weight!r}")
    return float(weight)


def time_window(settings: dict) -> tuple[float, float] | None:
    """[train] times = [low, high]: the stretch of the sampler's path (0 clean, 1 pure noise, before
    the shift) this model trains on; absent, the whole path, logit-normal."""
    if "times" not in settings:
        return None
    window = settings["times"]
    if (not isinstance(window, list) or len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in window)
            or not 0 <= window[0] < window[1] <= 1):
        raise RecipeError(f"[train] times must be [low, high] with 0 <= low < high <= 1, not {window!r}")
    return float(window[0]), float(window[1])


def layout_setting(settings: dict, depth: int) -> tuple[float, int] | None:
    """[train] layout_loss (its weight, > 0) and layout_block (the block whose tokens the probe
    reads, 1..depth); absent, no layout supervision."""
    if "layout_loss" not in settings and "layout_block" not in settings:
        return None
    weight, block = positive_weight(settings, "layout_loss"), settings.get("layout_block")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= depth:
        raise RecipeError(f"[train] layout_block must be a block of the model, 1 to {depth}, not {block!r}")
    return weight, block


def distillation_loss(model, teacher, latents, text, mask, schedule: FlowSchedule, guidance_range, generator=None,
                      window: tuple[float, float] | None = None, layout: torch.Tensor | None = None):
    """The student's velocity at guidance g against its teacher's guided one, MSE per sample (B,),
    and the times it was drawn at: uniform over the sampler's path (or `window` of it) before the shift."""
    b, device = latents.shape[0], latents.device
    t = schedule.path_times(b, unwrap(model).token_count(latents.shape), window or (0.0, 1.0), generator).to(device)
    low, high = guidance_range
    guidance = (low + (high - low) * torch.rand(b, generator=generator)).to(device)
    noise = schedule.noise(latents.shape, generator).to(device)
    noisy = add_noise(latents, noise, t)
    with torch.no_grad(), autocast_for(device):
        both_text, both_mask = teacher.drop_text(text.repeat(2, 1, 1), mask.repeat(2, 1), torch.arange(2 * b, device=device) >= b)
        both_layout = None if layout is None else torch.cat([layout, torch.zeros_like(layout)])  # as the pipeline guides
        conditional, unconditional = teacher(noisy.repeat(2, 1, 1, 1, 1), t.repeat(2), both_text, both_mask, layout=both_layout).float().chunk(2)
        target = unconditional + guidance.view(-1, 1, 1, 1, 1) * (conditional - unconditional)
    with autocast_for(device):
        prediction = model(noisy, t, text, mask, guidance=guidance, layout=layout)
    return F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1), t


def load_teacher(settings: dict, device) -> tuple[DiffusionTransformer, tuple[float, float]]:
    """[distill]: the teacher (frozen) and the range of guidance scales to distill, checked."""
    from kinetoscope.pipelines.text_to_video import MAX_GUIDANCE

    missing = [key for key in KNOWN["distill"] if key not in settings]
    if missing:
        raise RecipeError(f"[distill] lacks {', '.join(missing)}")
    guidance = settings["guidance"]
    if (not isinstance(guidance, list) or len(guidance) != 2 or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in guidance)
            or not 0 <= guidance[0] <= guidance[1] <= MAX_GUIDANCE):
        raise RecipeError(f"[distill] guidance must be [lowest, highest] with 0 <= lowest <= highest <= {MAX_GUIDANCE:g}, not {guidance!r}")
    try:
        teacher = DiffusionTransformer.from_pretrained(settings["teacher"])
    except (OSError, ValueError, RuntimeError) as error:
        raise RecipeError(f"[distill] teacher: {error}") from None
    if teacher.cfg.self_condition or teacher.cfg.distilled_guidance:
        raise RecipeError(f"[distill] teacher {settings['teacher']} must be a plain model (no self-conditioning, not distilled)")
    return teacher.to(device).requires_grad_(False), (float(guidance[0]), float(guidance[1]))


def own_estimate(model, noisy, t, text, mask, generator=None, layout=None):
    """For a self-conditioned model, half of the steps first let it predict the clean latents
    without gradients and train it to refine that estimate; the other half train it from none,
    as at the first sampling step. Costs about a sixth more per step on average."""
    if not unwrap(model).cfg.self_condition or torch.rand(1, generator=generator).item() >= SELF_CONDITION_SHARE:
        return None
    with torch.no_grad():
        return predicted_clean(noisy, unwrap(model)(noisy, t, text, mask, layout=layout).float(), t)


def start_from(model: DiffusionTransformer, directory: str):
    """Load exported weights into `model`, which may be deeper, add canvas positions, add
    self-conditioning, add local mixing, take a distilled guidance scale, a layout or silhouettes: new blocks are appended
    and, like the new inputs and convolutions, start silent (adaLN-Zero, zero weights), so training
    continues from the same predictions."""
    try:
        start = DiffusionTransformer.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as error:
        raise RecipeError(f"[model] init: {error}") from None
    growable = {"depth": model.cfg.depth, "canvas_frequencies": model.cfg.canvas_frequencies,
                "self_condition": model.cfg.self_condition, "local_mixing": model.cfg.local_mixing,
                "distilled_guidance": model.cfg.distilled_guidance, "layout_channels": model.cfg.layout_channels,
                "silhouette_channels": model.cfg.silhouette_channels}
    grows = (model.cfg.depth >= start.cfg.depth and start.cfg.canvas_frequencies in (0, model.cfg.canvas_frequencies)
             and start.cfg.self_condition <= model.cfg.self_condition and start.cfg.local_mixing <= model.cfg.local_mixing
             and start.cfg.distilled_guidance in (None, model.cfg.distilled_guidance)
             and start.cfg.layout_channels in (0, model.cfg.layout_channels)
             and start.cfg.silhouette_channels in (0, model.cfg.silhouette_channels))
    if replace(start.cfg, **growable) != model.cfg or not grows:
        raise RecipeError(f"[model] init {directory} is a {start.cfg}; the recipe's {model.cfg} can only add blocks, "
                          "canvas positions, self-conditioning, local mixing, a guidance input, a layout input or silhouettes")
    model.load_state_dict(start.float().state_dict(), strict=False)


def load_planner(settings: dict, cfg, frames_per_step: int) -> LayoutPlanner | None:
    """[model] planner, the layout planner of a layout model (and only of one), checked, with the
    model's layout inputs: heatmaps, and silhouettes for latent steps of `frames_per_step` frames."""
    from kinetoscope.pipelines.layout import check_planner

    layout_channels = cfg.layout_channels
    if cfg.silhouette_channels not in (0, silhouette_channels(frames_per_step)):
        raise RecipeError(f"[model] overrides silhouette_channels must be {silhouette_channels(frames_per_step)} (a colour's cells "
                          f"in each of the autoencoder's {frames_per_step} frames per latent step), not {cfg.silhouette_channels}")
    if not layout_channels:
        if "planner" in settings:
            raise RecipeError("[model] planner writes the layout of a layout model; this one has no layout_channels")
        return None
    if layout_channels != LAYOUT_CHANNELS:
        raise RecipeError(f"[model] overrides layout_channels must be {LAYOUT_CHANNELS} (a shape and a colour heatmap each), not {layout_channels}")
    if "planner" not in settings:
        raise RecipeError("[model] planner must name the layout planner a layout model samples with (kinetoscope planner train)")
    try:
        planner = LayoutPlanner.from_pretrained(settings["planner"])
        check_planner(planner)
    except (OSError, ValueError, RuntimeError) as error:
        raise RecipeError(f"[model] planner: {error}") from None
    return planner


def check_eval_settings(settings: dict, guidance_range: tuple[float, float] | None = None):
    """The judge scores the samples, so every eval prompt must be in the world's grammar, and the
    sampler must take the settings (a distilled model only its range of guidance): fail now, not
    at step 500 (or, at the end, before the export)."""
    from kinetoscope.pipelines.text_to_video import SamplingSettings, checked_sampling

    if not isinstance(settings["prompts"], list) or not settings["prompts"]:
        raise RecipeError("[eval] prompts must be a list of at least one prompt")
    for prompt in settings["prompts"]:
        try:
            parse_prompt(prompt)
        except (PromptError, TypeError) as error:
            raise RecipeError(f"[eval] prompts: {error}") from None
    try:
        checked_sampling(settings["steps"], settings["guidance"], SamplingSettings.sampler, guidance_range)
    except ValueError as error:
        raise RecipeError(f"[eval] {error}") from None


def agreed(fraction: float, world_size: int, device: torch.device) -> float:
    """The furthest any rank is through the budget, so all ranks stop (and anneal) together."""
    if world_size == 1:
        return fraction
    value = torch.tensor([fraction], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint_model(modules, directory: Path):
    model, ema, probe = modules
    unwrap(model).save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, directory / "ema.safetensors")
    if probe is not None:
        save_file(unwrap(probe).state_dict(), directory / "layout_probe.safetensors")


def train(recipe_path: str, output: str | None = None, minutes: float | None = None, steps: int | None = None) -> Path | None:
    recipe = load_recipe(recipe_path, REQUIRED, KNOWN)
    settings = recipe["train"]
    check_train_settings(settings)
    reuse = reuse_setting(settings)
    window = time_window(settings)
    try:
        schedule = FlowSchedule(**recipe.get("schedule", {}))
    except (TypeError, ValueError) as error:
        raise RecipeError(f"[schedule]: {error}") from None
    total_steps = steps or settings["steps"]
    minutes = minutes if minutes is not None else settings.get("minutes")
    rank, world_size = start_distributed()
    device = local_device()
    main_process = rank == 0

    try:
        autoencoder = VideoAutoencoder.from_pretrained(recipe["data"].get("autoencoder"))
    except (OSError, ValueError) as error:
        raise RecipeError(f"[data] autoencoder: {error}") from None
    overrides = {"latent_channels": autoencoder.cfg.latent_channels, **recipe["model"].get("overrides", {})}
    teacher, guidance_range = load_teacher(recipe["distill"], device) if "distill" in recipe else (None, None)
    if teacher is not None:
        overrides["distilled_guidance"] = guidance_range
    check_eval_settings(recipe["eval"], guidance_range)
    torch.manual_seed(settings["seed"])  # the starting weights, too, are the recipe's
    try:
        model = DiffusionTransformer(config_for(recipe["model"]["size"], **overrides)).to(device)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"[model]: {error}") from None
    layout = layout_setting(settings, model.cfg.depth)
    object_weight = object_weight_setting(settings, model.cfg)
    pixel = pixel_loss_setting(settings)
    if teacher is not None and (layout, object_weight, pixel) != (None, None, None):
        raise RecipeError("[train] layout_loss, object_weight and pixel_loss train a model from data, not a guidance-distilled student")
    if teacher is not None and (teacher.cfg.layout_channels, teacher.cfg.silhouette_channels) != (
            model.cfg.layout_channels, model.cfg.silhouette_channels):
        raise RecipeError(f"[distill] the teacher takes {teacher.cfg.layout_channels} heatmap and {teacher.cfg.silhouette_channels} "
                          f"silhouette channels and the student {model.cfg.layout_channels} and {model.cfg.silhouette_channels}: "
                          "a layout model's student takes what its teacher does ([model] overrides)")
    planner = load_planner(recipe["model"], model.cfg, autoencoder.cfg.temporal_factor)
    run = RunDirectory(output or settings["output"])  # only once the recipe is known to describe a run
    ema = copy.deepcopy(model).requires_grad_(False)
    probe = LayoutProbe(model.cfg.dim).to(device) if layout else None
    hidden = HiddenTokens(model.blocks[layout[1] - 1]) if layout else None
    trained = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(trained, lr=settings["lr"], betas=(0.9, 0.99), weight_decay=settings["weight_decay"])
    step, carried = 0, 0.0
    if main_process:
        run.recover()
    if world_size > 1:
        dist.barrier()  # the others read the checkpoint only once it is whole again
    if run.has_checkpoint():
        run.check_resumable(recipe)
        model.load_state_dict(load_file(run.checkpoint / "model.safetensors", device=str(device)))
        ema.load_state_dict(load_file(run.checkpoint / "ema.safetensors", device=str(device)))
        if probe is not None:
            probe.load_state_dict(load_file(run.checkpoint / "layout_probe.safetensors", device=str(device)))
        state = run.load_state(optimizer)
        step, carried = state["step"], state["elapsed_s"]
        if main_process:
            print(f"resuming from step {step} ({carried / 60:.1f} min so far)")
    elif recipe["model"].get("init"):  # continue from exported weights (EMA, bf16): a fresh optimizer
        start_from(model, recipe["model"]["init"])
        ema.load_state_dict(model.state_dict())
        if main_process:
            print(f"starting from the weights in {recipe['model']['init']}")
    process_seed = settings["seed"] * 1_000_003 + step * 64 + rank  # a resumed run draws fresh noise and batches
    torch.manual_seed(process_seed)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
        probe = torch.nn.parallel.DistributedDataParallel(probe) if probe else None
    clock = Stopwatch(carried)
    to_latents = LatentBatches(autoencoder, TextEncoder.load(device), device)
    try:  # a compact text encoder (on a machine without the wheel) may lack a word: fail now, not at step 500
        to_latents.text_encoder.encode(recipe["eval"]["prompts"])
    except ValueError as error:
        raise RecipeError(f"[eval] prompts: {error}") from None
    dataset = recipe_dataset(recipe["data"], step)
    check_buckets(dataset.buckets, autoencoder, unwrap(model))
    stream = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=settings["workers"]))

    def encoded_batch():
        batch = next(stream)
        latents, text, mask = to_latents(batch)
        bucket = batch["bucket"]
        targets = shown = None
        objects, size, grid = scene_objects(batch["scene"]), (bucket.width, bucket.height), unwrap(model).token_grid(latents.shape)
        if probe is not None:
            targets = layout_maps(objects, size, bucket.frames, recipe["data"]["fps"], grid).to(device)
        if planner is not None:
            frames_per_step = autoencoder.cfg.temporal_factor if unwrap(model).cfg.silhouette_channels else None
            shown = layout_inputs(objects, size, bucket.frames, recipe["data"]["fps"], grid, frames_per_step).to(device)
        return latents, text, mask, targets, shown, bucket

    pool = BatchPool(encoded_batch, reuse, seed=process_seed)
    band_losses = [[] for _ in range(len(TIME_BUCKETS) - 1)]  # rank 0's, since the last log record

    def checkpoint():
        if main_process:
            run.save((model, ema, probe), optimizer, {"step": step, "elapsed_s": clock.elapsed, "recipe": recipe}, save_checkpoint_model)

    last_checkpoint = time.monotonic()
    bar = tqdm(total=total_steps, initial=step, desc="generator", dynamic_ncols=True, disable=not main_process)
    model.train()
    while (fraction := agreed(run_progress(step, total_steps, clock.elapsed, minutes), world_size, device)) < 1.0:
        latents, text, mask, targets, shown, bucket = pool.next()
        lr = learning_rate(step, settings["lr"], settings["warmup"], fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if teacher is not None:
            pixel_error = None
            per_sample, t = distillation_loss(model, teacher, latents, text, mask, schedule, guidance_range, window=window,
                                              layout=shown)
        else:
            weights = None if object_weight is None else object_token_weights(shown, object_weight)
            per_sample, t, pixel_error = diffusion_loss(model, latents, text, mask, schedule, settings["caption_dropout"],
                                                        window=window, layout=shown, token_weights=weights,
                                                        pixels=None if pixel is None else (autoencoder, pixel[1]))
        loss = per_sample.mean()  # what the log and the bar call the loss: the latent one, comparable across recipes
        probe_loss = layout_loss(probe, hidden, targets).mean() if probe is not None else None
        objective = loss
        if probe_loss is not None:
            objective = objective + layout[0] * probe_loss
        if pixel_error is not None:
            objective = objective + pixel[0] * pixel_error
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, settings["grad_clip"])
        if torch.isfinite(grad_norm):  # one overflowing batch must not poison the weights, the EMA and the next checkpoint
            optimizer.step()
            with torch.no_grad():
                decay = min(settings["ema_decay"], (1 + step) / (10 + step))  # short memory while young
                torch._foreach_lerp_(list(ema.parameters()), list(unwrap(model).parameters()), 1 - decay)
        if main_process:
            for value, band in zip(per_sample.tolist(), np.digitize(t.tolist(), TIME_BUCKETS[1:-1])):
                band_losses[band].append(value)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", bucket=str(bucket))
        if main_process and step % settings["log_every"] == 0:
            record = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr,
                      "bucket": str(bucket), "elapsed_s": round(clock.elapsed, 1)}
            if probe_loss is not None:
                record["layout_loss"] = probe_loss.item()
            if pixel_error is not None:
                record["pixel_loss"] = pixel_error.item()
            for band, values in enumerate(band_losses):
                if values:
                    record[band_key(band)] = float(np.mean(values))
                values.clear()
            run.log(record)
        if main_process and (step % settings["eval_every"] == 0):
            evaluate(ema, autoencoder, to_latents.text_encoder, schedule, recipe, run, step, device, planner)
        if time.monotonic() - last_checkpoint > settings["checkpoint_minutes"] * 60:
            checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint()
    if world_size > 1:
        dist.destroy_process_group()
    if not main_process:
        return None
    if step % settings["eval_every"]:  # the last step's evaluation, unless the loop just made it
        evaluate(ema, autoencoder, to_latents.text_encoder, schedule, recipe, run, step, device, planner)
    return export(ema, recipe, run, step, clock.elapsed, device)


@torch.no_grad()
def evaluate(ema, autoencoder, text_encoder, schedule, recipe, run: RunDirectory, step: int, device, planner=None):
    """Generate the recipe's sample prompts with the EMA weights (and a layout model's planner), judge them, save a contact sheet."""
    from kinetoscope.data.judge import judge
    from kinetoscope.media.frames import save_contact_sheet
    from kinetoscope.pipelines.text_to_video import TextToVideo

    pipe = TextToVideo(ema, autoencoder, text_encoder, schedule, recipe["data"]["fps"], device, sample_settings(recipe), planner)
    clips, labels, passed = [], [], 0
    for i, prompt in enumerate(recipe["eval"]["prompts"]):
        video = pipe(prompt, seed=i)
        verdict = judge(video.frames, parse_prompt(prompt), video.fps)
        passed += verdict.passed
        clips.append(video.frames)
        labels.append(f"{'PASS' if verdict.passed else 'FAIL'}  {prompt}")
    run.log({"step": step, "eval_judge_pass": passed / len(clips)})
    save_contact_sheet(run.root / "samples" / f"samples_{step:06d}.png", clips, labels)
    run.plot_loss(("loss", "layout_loss", *map(band_key, range(len(TIME_BUCKETS) - 1))), title=f"generator loss (judge pass {passed}/{len(clips)} at step {step})")


def sample_settings(recipe: dict):
    """[eval] steps and guidance: how a run's samples are drawn, and so its export's own settings."""
    from kinetoscope.pipelines.text_to_video import SamplingSettings

    return SamplingSettings(steps=recipe["eval"]["steps"], guidance=float(recipe["eval"]["guidance"]))


def export(ema, recipe: dict, run: RunDirectory, step: int, elapsed: float, device) -> Path:
    """Write the EMA weights (bf16) and the pipeline settings to OUTPUT/final."""
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"

    def write(folder: Path):
        copy.deepcopy(ema).to(torch.bfloat16).save_pretrained(
            folder, {"trained_steps": step, "wall_time_s": round(elapsed), "hardware": hardware}
        )
        # The autoencoder it was trained with travels with it, the default one too: a later default
        # with other latents must not decode this generator's.
        shutil.copytree(recipe["data"].get("autoencoder") or default_weights_dir(), folder / "autoencoder")
        settings = {"fps": recipe["data"]["fps"], "schedule": recipe.get("schedule", {}), "autoencoder": "autoencoder",
                    "sampling": asdict(sample_settings(recipe))}
        if ema.cfg.layout_channels:  # its planner travels with it, as its autoencoder does
            shutil.copytree(recipe["model"]["planner"], folder / "planner")
            settings["planner"] = "planner"
        (folder / "pipeline.json").write_text(json.dumps(settings, indent=2) + "\n")

    final = replace_folder(run.root / "final", write)
    print(f"exported weights to {final} after {step} steps, {elapsed / 60:.1f} min")
    return final


def join_experts(noisy: Path, clean: Path, boundary: float, output: Path) -> Path:
    """One generator folder from two exports trained on either side of `boundary` of the path
    (`[train] times`): `noisy` whole, its autoencoder, planner and settings included, with `clean`'s
    transformer as its low-noise one (pipeline.json "low_noise"). Both must be one architecture
    trained in one latent space; nothing is written unless they are."""
    from kinetoscope.pipelines.text_to_video import checked_boundary

    boundary = checked_boundary(boundary)
    settings = {}
    for folder in (noisy, clean):
        if not (folder / "pipeline.json").is_file():
            raise ValueError(f"{folder} is not a generator folder (no pipeline.json)")
        settings[folder] = json.loads((folder / "pipeline.json").read_text())
    if "low_noise" in settings[noisy] or "low_noise" in settings[clean]:
        raise ValueError("join two single transformers: one of these folders already has a low-noise transformer")
    noisy_cfg, clean_cfg = (DiffusionTransformer.from_pretrained(folder).cfg for folder in (noisy, clean))
    if noisy_cfg != clean_cfg:
        raise ValueError(f"the two transformers differ in architecture or inputs: {noisy_cfg} against {clean_cfg}")
    noisy_ae, clean_ae = (VideoAutoencoder.from_pretrained(folder / settings[folder]["autoencoder"] if "autoencoder" in settings[folder] else None)
                          .state_dict() for folder in (noisy, clean))  # none named: the default one
    if noisy_ae.keys() != clean_ae.keys() or not all(torch.equal(noisy_ae[k], clean_ae[k]) for k in noisy_ae):
        raise ValueError("the two transformers were trained on different autoencoders' latents")

    def write(folder: Path):
        shutil.copytree(noisy, folder)
        (folder / "low_noise").mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(clean / name, folder / "low_noise" / name)
        joined = {**settings[noisy], "low_noise": {"transformer": "low_noise", "boundary": boundary}}
        for part in ("autoencoder", "planner"):  # a folder beside `noisy` (the shipped "../autoencoder") is named in full
            if part in joined and (noisy / joined[part]).resolve() != (output / joined[part]).resolve():
                joined[part] = str((noisy / joined[part]).resolve())
        (folder / "pipeline.json").write_text(json.dumps(joined, indent=2) + "\n")

    return replace_folder(output, write)
