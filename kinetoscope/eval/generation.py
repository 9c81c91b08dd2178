"""Does the generator make what held-out prompts ask? Generate them and let the judge score.

Tiers, all never trained on:
- unseen combinations: held-out (colour, shape) and (shape, motion) pairs, phrased as in training;
- unseen phrasings: training scenes described by held-out sentence forms and words.
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


def evaluate_generator(pipe, per_tier: int = 50, settings: dict | None = None, progress=None, seed: int = EVAL_SEED) -> dict:
    """{tier: {"prompts", "fully_right", "attributes": {name: pass rate}, "checks": {name: {"passed", "of"}}}}
    and the failures. The judge checks each named group of objects (count, shape, size, motion,
    speed where named, steadiness), a named relation and background once, and extra objects once
    per prompt, so the counts say how many checks each rate rests on."""
    settings = {"frames": pipe.frames_for(EVAL_SECONDS), **(settings or {})}  # the scenes' length at the model's frame rate
    passed = defaultdict(list)
    attributes = defaultdict(lambda: defaultdict(list))
    failures = []
    for item in held_out_prompts(per_tier, seed):
        video = pipe(item.prompt, **settings)
        verdict = judge(video.frames, captions.parse_prompt(item.prompt), video.fps)
        passed[item.tier].append(verdict.passed)
        for check in verdict.checks:
            attributes[item.tier][check.name].append(check.passed)
        if not verdict.passed:
            failures.append((item, [str(c) for c in verdict.checks if not c.passed]))
        if progress is not None:
            progress(item, verdict)
    report = {
        tier: {
            "prompts": len(results),
            "fully_right": float(np.mean(results)),
            "attributes": {name: float(np.mean(v)) for name, v in sorted(attributes[tier].items())},
            "checks": {name: {"passed": int(np.sum(v)), "of": len(v)} for name, v in sorted(attributes[tier].items())},
        }
        for tier, results in passed.items()
    }
    return {"tiers": report, "failures": failures}
