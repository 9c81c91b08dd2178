"""How far to trust the judge: `kinetoscope calibrate [--count N] [--seed S]`.

Renders seeded Shapes World scenes (2 s at 8 fps) at several sizes, clean and degraded (blur,
noise, an H.264 round trip at a high CRF), and judges every clip three times: against its own full
truth (every attribute named; it should pass), against the next scene's truth, and against a
near miss, its own truth with one attribute changed (both should fail). Prints, per condition,
the share of clips passed, the shares of mismatches and near misses wrongly accepted, and the
accuracy of each kind of check on the true scenes.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from kinetoscope.data import world
from kinetoscope.data.judge import compare, observe
from kinetoscope.media.video import read_video, write_video

CANVASES = ((64, 64), (96, 64), (128, 128))
FPS = 8.0
FRAMES = 17  # 2 seconds
BLUR_SIGMA = 1.0  # pixels
NOISE_SIGMA = 10.0  # on the 0-255 scale
H264_CRF = 30  # libx264's default is 23 and Kinetoscope writes 18; 30 blurs colour edges visibly
CHECK_NAMES = ("count", "shape", "size", "motion", "speed", "steadiness", "background", "relation", "extra objects")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class Tally:
    clips: int = 0
    passed: int = 0
    false_accepts: int = 0  # another scene's truth passed
    near_miss_accepts: int = 0  # a truth with one attribute changed passed
    checks: Counter = field(default_factory=Counter)
    checks_passed: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # failed checks of true scenes, for inspection

    def add(self, verdict, mismatch_verdict, near_miss_verdict) -> None:
        self.clips += 1
        self.passed += verdict.passed
        self.false_accepts += mismatch_verdict.passed
        self.near_miss_accepts += near_miss_verdict.passed
        for check in verdict.checks:
            self.checks[check.name] += 1
            self.checks_passed[check.name] += check.passed
            if not check.passed:
                self.failures.append(str(check))


# Degradations, each (clip, rng, workdir) -> clip: the damage a generated or re-encoded clip may show.


def clean(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    return clip


def blur(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    return _to_uint8(ndimage.gaussian_filter(clip.astype(np.float32), (0, BLUR_SIGMA, BLUR_SIGMA, 0)))


def noise(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    return _to_uint8(clip + NOISE_SIGMA * rng.standard_normal(clip.shape, dtype=np.float32))


def h264(clip: np.ndarray, rng: np.random.Generator, workdir: Path, crf: int = H264_CRF) -> np.ndarray:
    path = write_video(workdir / "clip.mp4", clip, FPS, quality=crf)
    return read_video(path)[0]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def degradations(crf: int = H264_CRF) -> dict:
    return {"clean": clean, "blur": blur, "noise": noise, f"h264 crf{crf}": partial(h264, crf=crf)}


def near_miss(scene: world.Scene, rng: np.random.Generator) -> world.Scene:
    """`scene` with one thing changed: an attribute of one kind of object, the background or the relation."""
    kind = scene.objects[rng.integers(len(scene.objects))]
    options = ["color", "shape", "size", "motion", "background"]
    options += (["speed"] if kind.speed else []) + (["relation"] if scene.relation else [])
    what = options[rng.integers(len(options))]
    if what == "background":
        return replace(scene, background=_pick_other(rng, world.BACKGROUNDS, scene.background))
    if what == "relation":
        first, relation, second = scene.relation
        return replace(scene, relation=(first, OPPOSITE[relation], second))
    if what == "color":
        used = {obj.color for obj in scene.objects}
        value = _pick_other(rng, [color for color in world.COLORS if color not in used], None)
        relation = scene.relation and tuple(value if part == kind.color else part for part in scene.relation)
        scene = replace(scene, relation=relation)
    elif what == "motion":  # the new motion leaves speed unnamed, and circles never spin
        motions = [motion for motion in world.MOTIONS if not (motion == "spin" and kind.shape == "circle")]
        value = _pick_other(rng, motions, kind.motion)
    elif what == "shape" and kind.motion == "spin":
        value = "square" if kind.shape == "triangle" else "triangle"
    else:
        choices = {"shape": world.SHAPES, "size": world.SIZES, "speed": world.SPEEDS}[what]
        value = _pick_other(rng, choices, getattr(kind, what))
    changes = {what: value, **({"speed": None} if what == "motion" else {})}
    objects = tuple(replace(obj, **changes) if obj.color == kind.color else obj for obj in scene.objects)
    return replace(scene, objects=objects)


def _pick_other(rng: np.random.Generator, values, current):
    others = [value for value in values if value != current]
    return others[rng.integers(len(others))]


def calibrate(count: int, seed: int, canvases=CANVASES, crf: int = H264_CRF) -> dict[str, Tally]:
    """Tallies per condition, named like "64x64 blur"."""
    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix="kinetoscope-calibrate-") as workdir:
        for width, height in canvases:
            rng = np.random.default_rng([seed, width, height])
            scenes = [world.sample_scene(rng, width / height, (FRAMES - 1) / FPS) for _ in range(count)]
            for index, scene in enumerate(scenes):
                clip = world.render(scene, width, height, FRAMES, FPS)
                mismatch = scenes[(index + 1) % count]
                for name, degrade in degradations(crf).items():
                    observation = observe(degrade(clip, rng, Path(workdir)), FPS)
                    tally = tallies.setdefault(f"{width}x{height} {name}", Tally())
                    verdicts = (compare(observation, truth) for truth in (scene, mismatch, near_miss(scene, rng)))
                    tally.add(*verdicts)
    return tallies


def format_table(tallies: dict[str, Tally]) -> str:
    header = ["condition", "clips", "clip pass", "false accept (other scene)", "false accept (near miss)", *CHECK_NAMES]
    rows = [header, ["---"] * len(header)]
    for condition, tally in tallies.items():
        accuracies = [f"{tally.checks_passed[name] / tally.checks[name]:.1%}" if tally.checks[name] else "-"
                      for name in CHECK_NAMES]
        shares = [f"{part / tally.clips:.1%}" for part in (tally.passed, tally.false_accepts, tally.near_miss_accepts)]
        rows.append([condition, str(tally.clips), *shares, *accuracies])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
