"""Does the generator make what held-out prompts ask? Generate them and let the judge score.

Tiers, all never trained on:
- unseen combinations: held-out (colour, shape) and (shape, motion) pairs, phrased as in training;
- unseen phrasings: training scenes described by held-out sentence forms and words.

And where along the sampler's path a model decides a layout (`evaluate_from_noise`): true clips of
training scenes, noised part of the way and sampled back, judged against their captions.

And whether one report differs from another by more than chance (`compare_reports`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from kinetoscope.data import captions, world
from kinetoscope.data.judge import judge

EVAL_SEED = 777
EVAL_SECONDS = 2.0  # every held-out scene lasts this long
# Each generation's noise seed, as reports record it: prompt i's, so that the rates average over the
# noise rather than ride on one draw of it, and two models meet the same noise prompt by prompt.
NOISE_SEEDS = "the prompt's index"
TIERS = {
    "unseen combinations": (captions.HELDOUT_SCENES, "train"),
    "unseen phrasings": (captions.TRAIN_SCENES, "heldout"),
}


@dataclass(frozen=True)
class EvalPrompt:
    tier: str
    prompt: str
    objects: tuple[world.ShapeObject, ...] = ()  # the scene the prompt was written from: its true layout


def held_out_prompts(per_tier: int, seed: int = EVAL_SEED, seconds: float = EVAL_SECONDS) -> list[EvalPrompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for tier, (constraints, split) in TIERS.items():
        for _ in range(per_tier):
            scene = world.sample_scene(rng, 1.0, seconds, constraints)
            prompts.append(EvalPrompt(tier, captions.caption_variants(scene, rng, count=1, split=split)[0], scene.objects))
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


def evaluate_generator(pipe, per_tier: int = 50, settings: dict | None = None, progress=None, seed: int = EVAL_SEED,
                       true_layout: bool = False) -> dict:
    """{"tiers": {tier: scores}, "by_objects": {objects named: {"prompts", "fully_right"}}, "failures",
    "paintings" (clips painted, redraws included)};
    by_objects counts prompts over both tiers, since what fails most is a scene of several objects.
    The judge checks each named group of objects (count, shape, size, motion, speed where named,
    steadiness), a named relation and background once, and extra objects once per prompt, so the
    counts say how many checks each rate rests on. Prompt i starts from noise seed i (NOISE_SEEDS).
    With `true_layout` a layout model paints the objects of the scene each prompt was written from
    instead of its planner's plan: how often the denoiser paints a right plan right."""
    settings = {"frames": pipe.frames_for(EVAL_SECONDS), **(settings or {})}  # the scenes' length at the model's frame rate
    verdicts, by_objects = defaultdict(list), defaultdict(list)
    failures, paintings = [], 0
    for index, item in enumerate(held_out_prompts(per_tier, seed)):
        video = pipe(item.prompt, seed=index, **({"plan": item.objects} if true_layout else {}), **settings)
        paintings += video.draws
        scene = captions.parse_prompt(item.prompt)
        verdict = judge(video.frames, scene, video.fps)
        verdicts[item.tier].append(verdict)
        by_objects[len(scene.objects)].append(verdict.passed)
        if not verdict.passed:
            failures.append((item, [str(c) for c in verdict.checks if not c.passed]))
        if progress is not None:
            progress(item, verdict)
    return {"tiers": {tier: scores(results) for tier, results in verdicts.items()},
            "by_objects": {count: {"prompts": len(passed), "fully_right": int(sum(passed))} for count, passed in sorted(by_objects.items())},
            "failures": failures, "paintings": paintings}


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


@dataclass(frozen=True)
class Change:
    """One rate in two eval reports: `passed` of `of` in the base, then in the other."""
    section: str  # a tier, "from 0.7 of the path", or "all"
    rate: str     # "fully right", an attribute, or "all checks"
    base: tuple[int, int]
    other: tuple[int, int]

    @property
    def z(self) -> float:
        """The change in standard errors of the difference between two proportions (pooled); 0
        where both rates are 0 or both 1, since then no count could have come out otherwise."""
        (a, n), (b, m) = self.base, self.other
        pooled = (a + b) / (n + m)
        spread = np.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
        return float((b / m - a / n) / spread) if spread > 0 else 0.0


def compare_reports(base: dict, other: dict) -> list[Change]:
    """Every rate two `kinetoscope eval --report` files share: per tier (or noise level) the prompts
    fully right and each attribute's checks, then each attribute and all checks summed over the
    sections. Raises ValueError for a report this cannot read or two that share no section."""
    base_sections, other_sections = report_sections(base, "the base report"), report_sections(other, "the other report")
    shared = [name for name in base_sections if name in other_sections]
    if not shared:
        raise ValueError(f"the reports share no tier or noise level (base: {', '.join(base_sections)}; "
                         f"other: {', '.join(other_sections)})")
    changes, totals = [], defaultdict(lambda: np.zeros(4, dtype=int))
    for name in shared:
        old, new = base_sections[name], other_sections[name]
        changes.append(Change(name, "fully right", (round(old["fully_right"] * old["prompts"]), old["prompts"]),
                              (round(new["fully_right"] * new["prompts"]), new["prompts"])))
        for rate in (rate for rate in old["checks"] if rate in new["checks"]):
            counts = (old["checks"][rate]["passed"], old["checks"][rate]["of"], new["checks"][rate]["passed"], new["checks"][rate]["of"])
            changes.append(Change(name, rate, counts[:2], counts[2:]))
            totals[rate] += counts
            totals["all checks"] += counts
    summed = [rate for rate in totals if rate != "all checks"] if len(shared) > 1 else []
    return changes + [Change("all", rate, tuple(map(int, totals[rate][:2])), tuple(map(int, totals[rate][2:])))
                      for rate in summed + ["all checks"]]


def report_noise_seeds(report: dict) -> str:
    """How a report seeded its noise; those that do not say are from before it was recorded, when
    held-out prompts all started from seed 0 (noise levels always started from the clip's index)."""
    return report.get("noise_seeds") or (NOISE_SEEDS if "from_noise" in report else "0 for every prompt (before 2026-12-01)")


def report_sections(report, which: str) -> dict[str, dict]:
    """{section name: scores} of one eval report, checked enough that comparing cannot fail later."""
    parts = [report.get(key, {}) for key in ("tiers", "from_noise")] if isinstance(report, dict) else [None]
    if not all(isinstance(part, dict) for part in parts) or not any(parts):
        raise ValueError(f"{which} is not a report of `kinetoscope eval --report` (no tiers or noise levels)")
    sections = {**parts[0], **{f"from {level} of the path": scores for level, scores in parts[1].items()}}
    for name, scores in sections.items():
        try:
            checks = scores["checks"]
            valid = (isinstance(scores["prompts"], int) and scores["prompts"] > 0 and 0 <= scores["fully_right"] <= 1
                     and all(isinstance(c["passed"], int) and isinstance(c["of"], int) and 0 <= c["passed"] <= c["of"] and c["of"] > 0
                             for c in checks.values()))
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{which}: {name} lacks per-check counts (reports written before 2026-11-30 have none); "
                             "rerun kinetoscope eval --report") from None
        if not valid:
            raise ValueError(f"{which}: {name} has impossible counts")
    return sections
