"""Does the generator make what held-out prompts ask? Generate them and let the judge score.

Tiers, all never trained on:
- unseen combinations: held-out (colour, shape) and (shape, motion) pairs, phrased as in training;
- unseen phrasings: training scenes described by held-out sentence forms and words.

And where along the sampler's path a model decides a layout (`evaluate_from_noise`): true clips of
training scenes, noised part of the way and sampled back, judged against their captions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from kinetoscope.data import captions, world
from kinetoscope.eval.judge import judge

EVAL_SEED = 777
EVAL_SECONDS = 2.0  # every held-out scene lasts this long
TIERS = {
    "unseen combinations": (captions.HELDOUT_SCENES, "train"),
    "unseen phrasings": (captions.TRAIN_SCENES, "heldout"),
}


@dataclass(frozen=True)
class EvalPrompt:
    tier: str
    prompt: str


def held_out_prompts(per_tier: int, seed: int = EVAL_SEED, seconds: float = EVAL_SECONDS) -> list[EvalPrompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for tier, (constraints, split) in TIERS.items():
        for _ in range(per_tier):
            scene = world.sample_scene(rng, 1.0, seconds, constraints)
            prompts.append(EvalPrompt(tier, captions.caption_variants(scene, rng, count=1, split=split)[0]))
    return prompts


def scores(verdicts: list) -> dict:
    """{"prompts", "fully_right", "attributes": {name: pass rate}, "checks": {name: {"passed", "of"}}}
    of some judge verdicts."""
    attributes = defaultdict(list)
    for verdict in verdicts:
        for check in verdict.checks:
            attributes[check.name].append(check.passed)
    return {
        "prompts": len(verdicts),
        "fully_right": float(np.mean([v.passed for v in verdicts])),
        "attributes": {name: float(np.mean(v)) for name, v in sorted(attributes.items())},
        "checks": {name: {"passed": int(np.sum(v)), "of": len(v)} for name, v in sorted(attributes.items())},
    }


def evaluate_generator(pipe, per_tier: int = 50, settings: dict | None = None, progress=None, seed: int = EVAL_SEED) -> dict:
    """{"tiers": {tier: scores}, "failures"}. The judge checks each named group of objects (count,
    shape, size, motion, speed where named, steadiness), a named relation and background once, and
    extra objects once per prompt, so the counts say how many checks each rate rests on."""
    settings = {"frames": pipe.frames_for(EVAL_SECONDS), **(settings or {})}  # the scenes' length at the model's frame rate
    verdicts = defaultdict(list)
    failures = []
    for item in held_out_prompts(per_tier, seed):
        video = pipe(item.prompt, **settings)
        verdict = judge(video.frames, captions.parse_prompt(item.prompt), video.fps)
        verdicts[item.tier].append(verdict)
        if not verdict.passed:
            failures.append((item, [str(c) for c in verdict.checks if not c.passed]))
        if progress is not None:
            progress(item, verdict)
    return {"tiers": {tier: scores(results) for tier, results in verdicts.items()}, "failures": failures}


def evaluate_from_noise(pipe, levels: list[float], clips: int = 50, settings: dict | None = None, progress=None,
                        seed: int = EVAL_SEED, size: tuple[int, int] = (128, 128)) -> dict:
    """{level: scores} for true clips of training scenes (captions of the train split), each
    encoded, noised to `level` of the sampler's path (1: pure noise, so the video plays no part)
    and sampled back with its caption. A model that finishes any layout it is given but cannot
    choose one keeps its rate up to the levels where the layout is still in the noisy latents and
    falls near 1; where the rate falls is where the model decides layouts, and where to train it."""
    rng = np.random.default_rng(seed)
    frames = pipe.frames_for(EVAL_SECONDS)
    width, height = size
    clips_and_captions = []
    for _ in range(clips):
        scene = world.sample_scene(rng, width / height, EVAL_SECONDS, captions.TRAIN_SCENES)
        clips_and_captions.append((world.render(scene, width, height, frames, pipe.fps),
                                   captions.caption_variants(scene, rng, count=1, split="train")[0]))
    report = {}
    for level in levels:
        verdicts = []
        for index, (clip, caption) in enumerate(clips_and_captions):
            video = pipe(caption, video=clip, strength=level, seed=index, **(settings or {}))
            verdicts.append(judge(video.frames, captions.parse_prompt(caption), video.fps))
            if progress is not None:
                progress(level, verdicts[-1])
        report[level] = scores(verdicts)
    return report
