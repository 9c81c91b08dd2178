"""Prompt to layout: the planner's sampling, and a planned scene drawn by the world's own renderer.

`ranked_plans` carries seeded noise to object slots with the planner (rectified flow, Euler) and
reads them as the scene's objects. It draws several plans at once and ranks those the world
allows (`world.is_possible`: every object inside the canvas for the whole clip, no two touching)
by how much the others of those agree with each (`by_consensus`); `plan_objects` keeps the first.
A plan that breaks the world's rules cannot be drawn as the prompt asks: two objects drawn on top
of each other are one blob to anyone counting them. And the planner's likeliest reading is the
one most draws share: on the held-out prompts, the first allowed of 8 draws got 140 of 200 plans
fully right, the consensus of 32 153 (and 158 against 157 on another 200, with more attribute
checks passed on both). A draw the world refuses has no say in that consensus, since it is more
often a misreading (an object too many crowds the canvas): letting all 32 draws vote got 563 of
600 plans fully right over three seeded sets, the allowed ones alone 570. Where the planner's
folder holds a plan scorer (`scorer/`, models/planner.py `PlanScorer`), the allowed draws are
ranked by its scores instead (`load_planning` loads both). A pipeline paints the first plan, and
the next ones when its painter keeps missing it (pipelines/text_to_video.py `plan_for_painting`).
`PlannedScenes` renders a plan exactly as Shapes World would, so the judge can score a planner
alone: the share of held-out prompts a layout model could get fully right if its denoiser painted
every plan perfectly. `painting_verdict` is the judge's reading of a painted clip against its own
plan: how a pipeline tells a painting that missed its plan from one that kept it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kinetoscope.data import world
from kinetoscope.data.captions import parse_prompt
from kinetoscope.data.judge import Verdict, judge
from kinetoscope.data.layout import MAX_OBJECTS, SLOT_FEATURES, scene_to_slots, slots_to_objects
from kinetoscope.diffusion.rectified_flow import euler_sample
from kinetoscope.models.planner import LayoutPlanner, PlanScorer, canvas_condition
from kinetoscope.models.text_encoder import TextEncoder

# Euler steps of the plans. 12 planned as well as 24 (planner eval --per-tier 100, fully right of 400
# prompts over seeds 777 and 4242: 361 against 360) in half the time, but the system painting them
# got 152 of 200 held-out prompts fully right against 159 (steadiness 306 of 341 against 318).
PLAN_STEPS = 24
PLAN_TRIES = 32  # plans drawn at once per prompt, of which one the world allows is kept (the consensus, or the scorer's pick)
SCORER_FOLDER = "scorer"  # inside a planner's folder: the PlanScorer that picks among its plans
RELATION_MARGIN = 0.1  # of the canvas: starts nearer than this are level
SMALLEST = min(world.SIZES, key=world.SIZES.get)


def check_planner(planner: LayoutPlanner):
    """A planner must write the slots data/layout.py reads."""
    if (planner.cfg.slots, planner.cfg.features) != (MAX_OBJECTS, SLOT_FEATURES):
        raise ValueError(f"the layout planner writes {planner.cfg.slots} slots of {planner.cfg.features} features; "
                         f"this version reads {MAX_OBJECTS} of {SLOT_FEATURES}")


@torch.no_grad()
def ranked_plans(planner: LayoutPlanner, text: torch.Tensor, mask: torch.Tensor, width: int, height: int, seconds: float,
                 generator: torch.Generator, steps: int = PLAN_STEPS, tries: int = PLAN_TRIES,
                 guidance: float | None = None, scorer: PlanScorer | None = None,
                 mentions: torch.Tensor | None = None, small_cost: float = 0.0) -> list[list[tuple[world.ShapeObject, ...]]]:
    """The plans the planner draws for each prompt (text (B, L, D), mask (B, L), mentions (B, L, L)
    from TextEncoder.mentions, which a planner or scorer with `cfg.mentions` needs) on a canvas of
    width x height pixels lasting `seconds`, seeded by `generator`: of `tries` plans each, those
    that hold an object and the world allows (or all, where none does), best first: as `scorer`
    rates them, or without one by their consensus, less `small_cost` for each small object
    (`by_consensus`). Drawn with classifier-free `guidance` (None: the planner's own, `cfg.guidance`)."""
    device = text.device
    b = text.shape[0]
    guidance = planner.cfg.guidance if guidance is None else guidance
    # Prompt i's tries are rows i*tries...; the planner reads each prompt once for all of them.
    canvas = canvas_condition(width, height, seconds).to(device).expand(b * tries, -1)
    noise = torch.randn((b * tries, planner.cfg.slots, planner.cfg.features), generator=generator).to(device)
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    if guidance == 1:
        velocity = lambda x, t: planner(x, t, text, mask, canvas, mentions).float()  # noqa: E731
    else:  # one pass over the prompts and the empty prompt together
        dropped = torch.arange(2 * b, device=device) >= b
        both_text, both_mask = planner.drop_text(text.repeat(2, 1, 1), mask.repeat(2, 1), dropped)
        both_mentions = None if mentions is None else mentions.repeat(2, 1, 1)

        def velocity(x, t):
            conditional, unconditional = planner(x.repeat(2, 1, 1), t.repeat(2), both_text, both_mask, canvas.repeat(2, 1),
                                                 both_mentions).float().chunk(2)
            return unconditional + guidance * (conditional - unconditional)
    slots = euler_sample(velocity, noise, times).cpu().numpy()
    ranked = []
    for prompt in range(b):
        drawn = [slots_to_objects(row) for row in slots[prompt * tries:(prompt + 1) * tries]]
        # A plan of no objects draws nothing any prompt asks for, and its one trait (the count)
        # would agree wholly with every other empty draw.
        allowed = [plan for plan in drawn if plan and world.is_possible(plan, width / height, seconds)] or drawn
        ranked.append(by_consensus(allowed, small_cost) if scorer is None else
                      by_score(scorer, allowed, text[prompt:prompt + 1], mask[prompt:prompt + 1], canvas[:1],
                               None if mentions is None else mentions[prompt:prompt + 1]))
    return ranked


def plan_objects(*args, **kwargs) -> list[tuple[world.ShapeObject, ...]]:
    """The objects the planner places for each prompt: the best of its plans (`ranked_plans`, which takes the same arguments)."""
    return [plans[0] for plans in ranked_plans(*args, **kwargs)]


def by_score(scorer: PlanScorer, candidates, text: torch.Tensor, mask: torch.Tensor, canvas: torch.Tensor,
             mentions: torch.Tensor | None = None) -> list:
    """The candidate plans for one prompt (text (1, L, D), mask (1, L), canvas (1, 2), mentions (1, L, L)), those
    the scorer rates higher first; of equals, the planner's own order first."""
    slots = torch.from_numpy(np.stack([scene_to_slots(plan) for plan in candidates])).to(text.device)
    return best_first(candidates, scorer(slots, text, mask, canvas.expand(len(candidates), -1), mentions).float().tolist())


def load_planning(directory: str | Path) -> tuple[LayoutPlanner, PlanScorer | None]:
    """A planner folder's planner, and the scorer in its `scorer/` folder where it has one."""
    directory = Path(directory)
    scorer = directory / SCORER_FOLDER
    return LayoutPlanner.from_pretrained(directory), PlanScorer.from_pretrained(scorer) if scorer.is_dir() else None


def plan_traits(objects: tuple[world.ShapeObject, ...]) -> set[tuple]:
    """What a plan says that a prompt may state: each slot's attributes, and which way each pair of
    objects starts from each other (left or right, above or below; none when nearly level)."""
    traits = {("count", len(objects))}
    for k, obj in enumerate(objects):
        traits.update((k, name, getattr(obj, name)) for name in ("color", "shape", "size", "motion", "speed"))
        for j in range(k):
            for axis in (0, 1):
                gap = obj.start[axis] - objects[j].start[axis]
                traits.add((j, k, axis, 0 if abs(gap) < RELATION_MARGIN else int(np.sign(gap))))
    return traits


def by_consensus(plans, small_cost: float = 0.0) -> list:
    """The plans, those whose traits the plans share most first (each itself included; of equals,
    the planner's own order first): the planner's likeliest reading of the prompt leads, where the
    first draw may be one of its rarer ones. Each object a plan draws at the smallest size costs it
    `small_cost` (a share of the plans) of that agreement. The agreement is per trait of the plan,
    since a plan of more objects states more traits for others to share: summed, told "the big pink
    triangle spins", a plan of two triangles (3 of 20 draws) outscored the 17 draws of one."""
    traits = [plan_traits(plan) for plan in plans]
    cost = small_cost * len(plans)
    scores = [(sum(len(own & other) for other in traits) - cost * sum(obj.size == SMALLEST for obj in plan)) / len(own)
              for plan, own in zip(plans, traits)]
    return best_first(plans, scores)


def best_first(plans: list, scores: list[float]) -> list:
    """The plans by their scores, highest first; of equals, in their given order (the planner's)."""
    return [plans[i] for i in sorted(range(len(plans)), key=lambda i: -scores[i])]


def painting_verdict(frames: np.ndarray, plan: tuple[world.ShapeObject, ...], fps: float) -> Verdict:
    """The judge's checks of frames (uint8 (T, H, W, 3)) against every attribute of the plan they
    were painted from, the prompt's words unseen: a plan states each object's size, motion and
    speed, whether or not the prompt did. One frame shows no motion, so there only what it can show
    is checked."""
    if len(frames) == 1:
        plan = tuple(replace(obj, motion=None, speed=None) for obj in plan)
    return judge(frames, world.Scene(plan, background=None), fps)


class PlannedScenes:
    """Looks like a pipeline to `evaluate_generator`: each prompt's plan, rendered by Shapes World
    itself on the prompt's background (black where it names none; the planner places objects only)."""

    def __init__(self, planner: LayoutPlanner, text_encoder: TextEncoder, fps: float = 8.0, size: tuple[int, int] = (128, 128),
                 tries: int = PLAN_TRIES, guidance: float | None = None, scorer: PlanScorer | None = None, small_cost: float = 0.0):
        check_planner(planner)
        self.planner = planner.eval()
        self.scorer = scorer
        self.text_encoder = text_encoder
        self.fps = fps
        self.size = size
        self.tries = tries
        self.guidance = guidance
        self.small_cost = small_cost

    @classmethod
    def load(cls, weights: str | Path, tries: int = PLAN_TRIES, guidance: float | None = None, scored: bool = True,
             small_cost: float = 0.0) -> "PlannedScenes":
        planner, scorer = load_planning(weights)
        return cls(planner, TextEncoder.load("cpu"), tries=tries, guidance=guidance, scorer=scorer if scored else None,
                   small_cost=small_cost)

    def frames_for(self, seconds: float) -> int:
        return 1 + round(seconds * self.fps)

    def __call__(self, prompt: str, seed: int = 0, frames: int = 17):
        from kinetoscope.pipelines.text_to_video import GeneratedVideo

        width, height = self.size
        text, mask = self.text_encoder.encode([prompt])
        objects = plan_objects(self.planner, text, mask, width, height, (frames - 1) / self.fps, torch.Generator().manual_seed(seed),
                               tries=self.tries, guidance=self.guidance, scorer=self.scorer,
                               mentions=self.text_encoder.mentions([prompt]), small_cost=self.small_cost)[0]
        background = parse_prompt(prompt).background or "black"
        scene = world.Scene(objects, background)
        return GeneratedVideo(world.render(scene, width, height, frames, self.fps), self.fps, seed, plan=objects)
