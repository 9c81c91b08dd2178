"""Does a layout planner read which verb goes with which object? A probe of reference.

A caption may introduce two objects and only then say what each does, referring back by noun:
"a red kite left of a blue lamp; the lamp shrinks and the kite spins". To plan it, a planner must
follow "the lamp" back to "a blue lamp". Held-out prompts cannot tell whether it does: where both
shapes may do both motions, what each shape usually does picks the majority right, and on a held-out
pair (a bouncing triangle) it picks it wrong.

`binding_rates` asks a planner prompts of that form whose objects show only combinations training
shows, each four ways: the shapes' own nouns or stand-in nouns (training/planner.py STAND_INS,
which say nothing of a shape), and the references back in the order of the introduction or the
other. Each draw is scored on the two motions alone: right, swapped (each object given the other's),
or neither. A planner that reads references is right in nearly every draw, whatever the nouns and
order; one that does not is right about as often as it swaps with stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from kinetoscope.data import captions, world
from kinetoscope.pipelines.layout import plan_objects
from kinetoscope.training.planner import STAND_INS

# One training verb phrase per motion the probe asks for (captions.VERBS, singular).
MOTION_PHRASES = {"still": "stays still", "left": "slides left", "up": "rises", "bounce": "hops", "grow": "grows",
                  "shrink": "shrinks", "spin": "spins"}
SHAPE_NOUNS = {"circle": "ball", "square": "box", "triangle": "triangle"}
PROBE_SEED = 0
WAYS = tuple((nouns, order) for nouns in ("shape nouns", "stand-ins") for order in ("same order", "other order"))


@dataclass(frozen=True)
class BindingPrompt:
    prompt: str
    way: tuple[str, str]  # (nouns, order), one of WAYS
    colors: tuple[str, str]
    motions: tuple[str, str]  # what the object of each colour does


def _allowed(color: str, shape: str, motion: str) -> bool:
    """Training shows it, and the world allows it (a circle never spins)."""
    return ((color, shape) not in captions.HELDOUT_COLOR_SHAPES and (shape, motion) not in captions.HELDOUT_SHAPE_MOTIONS
            and not (shape == "circle" and motion == "spin"))


def binding_prompts(count: int, seed: int = PROBE_SEED) -> list[BindingPrompt]:
    """`count` pairs of objects, each asked the four WAYS."""
    rng = np.random.default_rng(seed)
    prompts = []
    while len(prompts) < 4 * count:
        colors = tuple(str(c) for c in rng.choice(list(world.COLORS), 2, replace=False))
        shapes = tuple(str(s) for s in rng.choice(world.SHAPES, 2, replace=False))
        motions = tuple(str(m) for m in rng.choice(list(MOTION_PHRASES), 2, replace=False))
        if not all(_allowed(*obj) for obj in zip(colors, shapes, motions)):
            continue
        for nouns, order in WAYS:
            named = [SHAPE_NOUNS[shape] for shape in shapes] if nouns == "shape nouns" else [STAND_INS[0][0], STAND_INS[1][0]]
            backs = [f"the {noun} {MOTION_PHRASES[motion]}" for noun, motion in zip(named, motions)]
            if order == "other order":
                backs.reverse()
            prompt = f"a {colors[0]} {named[0]} left of a {colors[1]} {named[1]}; {backs[0]} and {backs[1]}"
            prompts.append(BindingPrompt(prompt, (nouns, order), colors, motions))
    return prompts


@torch.no_grad()
def binding_rates(planner, text_encoder, count: int = 48, draws: int = 16, seed: int = PROBE_SEED) -> dict:
    """{nouns: {order: {"right", "swapped", "draws"}}} over `draws` single draws (no consensus) of
    each of `count` pairs asked each way, at the planner's own guidance; prompt i's draws from seed i."""
    rates = {}
    for nouns, order in WAYS:
        rates.setdefault(nouns, {})[order] = {"right": 0, "swapped": 0, "draws": 0}
    for index, item in enumerate(tqdm(binding_prompts(count, seed), desc="binding probe", unit="prompt")):
        text, mask = text_encoder.encode([item.prompt])
        mentions = text_encoder.mentions([item.prompt])
        plans = plan_objects(planner, text.expand(draws, -1, -1), mask.expand(draws, -1), 128, 128, 2.0,
                             torch.Generator().manual_seed(index // len(WAYS)), tries=1, mentions=mentions.expand(draws, -1, -1))
        tally = rates[item.way[0]][item.way[1]]
        for plan in plans:
            motions = {obj.color: obj.motion for obj in plan}
            got = tuple(motions.get(color) for color in item.colors)
            tally["right"] += got == item.motions
            tally["swapped"] += got == item.motions[::-1]
        tally["draws"] += draws
    return rates


def binding_lines(rates: dict) -> list[str]:
    return [f"{nouns}, references in the {order}: right {r['right']} of {r['draws']} draws, swapped {r['swapped']}"
            for nouns, by_order in rates.items() for order, r in by_order.items()]
