"""How far to trust the judge: `python -m kinetoscope.eval.calibrate [--count N] [--seed S]`.

Renders seeded Shapes World scenes (2 s at 8 fps) at several sizes, clean and degraded (blur,
noise, an H.264 round trip at a high CRF), and judges every clip twice: against its own full
truth (every attribute named; it should pass) and against the next scene's truth (it should
fail). Prints, per condition, the share of clips passed, the share of mismatched scenes wrongly
accepted, and the accuracy of each kind of check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from kinetoscope.data import world
from kinetoscope.eval.judge import compare, observe
from kinetoscope.media.video import read_video, write_video

CANVASES = ((64, 64), (96, 64), (128, 128), (32, 32))
FPS = 8.0
FRAMES = 17  # 2 seconds
BLUR_SIGMA = 1.0  # pixels
NOISE_SIGMA = 10.0  # on the 0-255 scale
H264_CRF = 35  # libx264's default is 23; 35 shows clear blocking and colour bleeding
CHECK_NAMES = ("count", "shape", "size", "motion", "speed", "steadiness", "background", "relation", "extra objects")


@dataclass
class Tally:
    clips: int = 0
    passed: int = 0
    false_accepts: int = 0
    checks: Counter = field(default_factory=Counter)
    checks_passed: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # failed checks of true scenes, for inspection

    def add(self, verdict, mismatch_verdict) -> None:
        self.clips += 1
        self.passed += verdict.passed
        self.false_accepts += mismatch_verdict.passed
        for check in verdict.checks:
            self.checks[check.name] += 1
            self.checks_passed[check.name] += check.passed
            if not check.passed:
                self.failures.append(str(check))


def blur(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    return _to_uint8(ndimage.gaussian_filter(clip.astype(np.float32), (0, BLUR_SIGMA, BLUR_SIGMA, 0)))


def noise(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    return _to_uint8(clip + rng.normal(0.0, NOISE_SIGMA, clip.shape))


def h264(clip: np.ndarray, rng: np.random.Generator, workdir: Path) -> np.ndarray:
    path = write_video(workdir / "clip.mp4", clip, FPS, quality=H264_CRF)
    return read_video(path)[0]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


DEGRADATIONS = {"clean": lambda clip, rng, workdir: clip, "blur": blur, "noise": noise, "h264": h264}


def calibrate(count: int, seed: int, canvases=CANVASES) -> dict[str, Tally]:
    """Tallies per condition, named like "64x64 h264"."""
    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix="kinetoscope-calibrate-") as workdir:
        for width, height in canvases:
            rng = np.random.default_rng([seed, width, height])
            scenes = [world.sample_scene(rng, width / height, (FRAMES - 1) / FPS) for _ in range(count)]
            for index, scene in enumerate(scenes):
                clip = world.render(scene, width, height, FRAMES, FPS)
                mismatch = scenes[(index + 1) % count]
                for name, degrade in DEGRADATIONS.items():
                    observation = observe(degrade(clip, rng, Path(workdir)), FPS)
                    tally = tallies.setdefault(f"{width}x{height} {name}", Tally())
                    tally.add(compare(observation, scene), compare(observation, mismatch))
    return tallies


def format_table(tallies: dict[str, Tally]) -> str:
    header = ["condition", "clips", "clip pass", "false accept", *CHECK_NAMES]
    rows = [header, ["---"] * len(header)]
    for condition, tally in tallies.items():
        accuracies = [
            f"{tally.checks_passed[name] / tally.checks[name]:.1%}" if tally.checks[name] else "-" for name in CHECK_NAMES
        ]
        rows.append([condition, str(tally.clips), f"{tally.passed / tally.clips:.1%}", f"{tally.false_accepts / tally.clips:.1%}", *accuracies])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kinetoscope.eval.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="scenes per canvas size (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-failures", type=int, default=0, metavar="N", help="print up to N failed checks per condition")
    args = parser.parse_args(argv)
    if args.count < 2:
        parser.error("--count must be at least 2 (each scene is also judged against another)")
    start = time.perf_counter()
    tallies = calibrate(args.count, args.seed)
    print(format_table(tallies))
    print(f"\n{args.count} scenes per canvas, {FRAMES} frames at {FPS:g} fps; blur sigma {BLUR_SIGMA:g} px, "
          f"noise sigma {NOISE_SIGMA:g}, H.264 CRF {H264_CRF}; {time.perf_counter() - start:.0f} s")
    for condition, tally in tallies.items():
        for line in tally.failures[: args.show_failures]:
            print(f"{condition}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
