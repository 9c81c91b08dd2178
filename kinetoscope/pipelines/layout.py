"""Prompt to layout: the planner's sampling, and a planned scene drawn by the world's own renderer.

`plan_objects` carries seeded noise to object slots with the planner (rectified flow, Euler) and
reads them as the scene's objects. `PlannedScenes` renders those objects exactly as Shapes World
would, so the judge can score a planner alone: the share of held-out prompts a layout model could
get fully right if its denoiser painted every plan perfectly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kinetoscope.data import world
from kinetoscope.data.captions import parse_prompt
from kinetoscope.data.layout import MAX_OBJECTS, SLOT_FEATURES, slots_to_objects
from kinetoscope.diffusion.rectified_flow import euler_sample
from kinetoscope.models.planner import LayoutPlanner, canvas_condition
from kinetoscope.models.text_encoder import TextEncoder

PLAN_STEPS = 24  # Euler steps over 3 slot tokens: a few milliseconds


def check_planner(planner: LayoutPlanner):
    """A planner must write the slots data/layout.py reads."""
    if (planner.cfg.slots, planner.cfg.features) != (MAX_OBJECTS, SLOT_FEATURES):
        raise ValueError(f"the layout planner writes {planner.cfg.slots} slots of {planner.cfg.features} features; "
                         f"this version reads {MAX_OBJECTS} of {SLOT_FEATURES}")


@torch.no_grad()
def plan_objects(planner: LayoutPlanner, text: torch.Tensor, mask: torch.Tensor, width: int, height: int, seconds: float,
                 generator: torch.Generator, steps: int = PLAN_STEPS) -> list[tuple[world.ShapeObject, ...]]:
    """The objects the planner places for each prompt (text (B, L, D), mask (B, L)) on a canvas of
    width x height pixels lasting `seconds`; seeded by `generator`."""
    device = text.device
    b = text.shape[0]
    canvas = canvas_condition(width, height, seconds).to(device).expand(b, -1)
    noise = torch.randn((b, planner.cfg.slots, planner.cfg.features), generator=generator).to(device)
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    slots = euler_sample(lambda x, t: planner(x, t, text, mask, canvas).float(), noise, times)
    return [slots_to_objects(row) for row in slots.cpu().numpy()]


class PlannedScenes:
    """Looks like a pipeline to `evaluate_generator`: each prompt's plan, rendered by Shapes World
    itself on the prompt's background (black where it names none; the planner places objects only)."""

    def __init__(self, planner: LayoutPlanner, text_encoder: TextEncoder, fps: float = 8.0, size: tuple[int, int] = (128, 128)):
        check_planner(planner)
        self.planner = planner.eval()
        self.text_encoder = text_encoder
        self.fps = fps
        self.size = size

    @classmethod
    def load(cls, weights: str | Path) -> "PlannedScenes":
        return cls(LayoutPlanner.from_pretrained(weights), TextEncoder.load("cpu"))

    def frames_for(self, seconds: float) -> int:
        return 1 + round(seconds * self.fps)

    def __call__(self, prompt: str, seed: int = 0, frames: int = 17):
        from kinetoscope.pipelines.text_to_video import GeneratedVideo

        width, height = self.size
        text, mask = self.text_encoder.encode([prompt])
        objects = plan_objects(self.planner, text, mask, width, height, (frames - 1) / self.fps, torch.Generator().manual_seed(seed))[0]
        background = parse_prompt(prompt).background or "black"
        scene = world.Scene(objects, background)
        return GeneratedVideo(world.render(scene, width, height, frames, self.fps), self.fps, seed, plan=objects)
