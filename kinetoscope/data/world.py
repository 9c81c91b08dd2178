"""Shapes World: the procedural domain of the default model (contract: shared/world.md).

A `Scene` is resolution-free: positions are fractions of the canvas, sizes and speeds are
fractions of the canvas's shorter side, so one scene renders at any width, height, frame rate
and frame count. Sampling needs the aspect ratio and duration only to keep objects inside.

Coordinates: x grows to the right, y grows downwards (image convention). Internally motion is
computed in "short-side units" (the shorter canvas side is 1.0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 190, 70),
    "cyan": (30, 200, 220),
    "blue": (40, 80, 230),
    "purple": (140, 60, 210),
    "pink": (245, 110, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "medium": 0.22, "large": 0.32}
MOTIONS = ("still", "left", "right", "up", "down", "bounce", "grow", "shrink", "spin")
LINEAR_MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slow": 0.15, "fast": 0.35}
RELATIONS = ("left of", "right of", "above", "below")

GROW_FACTOR = 1.8
SHRINK_FACTOR = 0.55
SPIN_PERIOD_S = 2.0
BOUNCE_FALL_S = 0.6  # time to fall from rest to the bottom edge; the rise mirrors it
MARGIN = 0.02  # kept between an object and the canvas edge, in short-side units
MIN_RELATION_GAP = 0.15  # start-centroid gap along the named axis for a relation to be stated


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    motion: str
    speed: str | None  # "slow"/"fast" for left/right/up/down, None for other motions
    start: tuple[float, float]  # centre at t=0, as fractions of canvas width and height


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    relation: tuple[str, str, str] | None = None  # (colour, "left of"|..., colour) at t=0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["objects"] = [dict(o, start=list(o["start"])) for o in out["objects"]]
        out["relation"] = list(self.relation) if self.relation else None
        return out

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        objects = tuple(ShapeObject(**{**o, "start": tuple(o["start"])}) for o in d["objects"])
        relation = tuple(d["relation"]) if d.get("relation") else None
        return Scene(objects=objects, background=d["background"], relation=relation)

    def groups(self) -> list[tuple[ShapeObject, int]]:
        """Objects grouped by colour (a colour names one kind of object): [(object, count)]."""
        counts: dict[str, list[ShapeObject]] = {}
        for obj in self.objects:
            counts.setdefault(obj.color, []).append(obj)
        return [(objs[0], len(objs)) for objs in counts.values()]


# ---------------------------------------------------------------------------------------------
# Motion: where an object is and how big it is at time t (short-side units)


def _width_scale(motion: str, u: np.ndarray) -> np.ndarray:
    """u in [0, 1] is progress through the clip; width grows or shrinks linearly over it."""
    if motion == "grow":
        return 1.0 + (GROW_FACTOR - 1.0) * u
    if motion == "shrink":
        return 1.0 + (SHRINK_FACTOR - 1.0) * u
    return np.ones_like(u)


def _bounce_offset(t: np.ndarray, drop: float) -> np.ndarray:
    """Downward offset of a ball dropped from rest that falls `drop` in BOUNCE_FALL_S, elastically."""
    phase = np.mod(t, 2 * BOUNCE_FALL_S)
    tau = BOUNCE_FALL_S - np.abs(phase - BOUNCE_FALL_S)
    return drop * (tau / BOUNCE_FALL_S) ** 2


def _bounding_radius(shape: str, spinning: bool) -> float:
    """Largest extent from the centre along x or y, per unit of object width."""
    if shape == "circle":
        return 0.5
    if shape == "square":
        return math.sqrt(0.5) if spinning else 0.5
    return 1.0 / math.sqrt(3.0)  # triangle: circumradius around the centroid


def _extent_below(shape: str) -> float:
    """From the centre down to the lowest point, per unit of width: where a bounce meets the floor.
    An apex-up triangle's base lies at half its circumradius below the centroid."""
    return 0.5 / math.sqrt(3.0) if shape == "triangle" else _bounding_radius(shape, False)


def trajectory(obj: ShapeObject, canvas: tuple[float, float], times: np.ndarray, duration: float):
    """Centre (x, y), width and clockwise angle of `obj` at `times`, in short-side units.

    canvas is (width, height) in short-side units; duration is the clip length in seconds
    (grow and shrink complete over it). Returns four arrays shaped like `times`.
    """
    cw, ch = canvas
    width0 = SIZES[obj.size]
    x0, y0 = obj.start[0] * cw, obj.start[1] * ch
    u = times / duration if duration > 0 else np.zeros_like(times)
    width = width0 * _width_scale(obj.motion, u)
    x = np.full_like(times, x0)
    y = np.full_like(times, y0)
    if obj.motion in LINEAR_MOTIONS:
        dx, dy = LINEAR_MOTIONS[obj.motion]
        x = x + dx * SPEEDS[obj.speed] * times
        y = y + dy * SPEEDS[obj.speed] * times
    elif obj.motion == "bounce":
        drop = ch - MARGIN - width0 * _extent_below(obj.shape) - y0
        y = y + _bounce_offset(times, max(drop, 0.0))
    angle = 2 * math.pi * times / SPIN_PERIOD_S if obj.motion == "spin" else np.zeros_like(times)
    return x, y, width, angle


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SceneConstraints:
    """Which scenes a sampler may produce; `reject` filters whole scenes (e.g. held-out splits)."""

    max_objects: int = 3
    reject: object = field(default=None)  # callable(Scene) -> bool, True to resample


def _start_range(obj: ShapeObject, axis: int, canvas, times, duration) -> tuple[float, float]:
    """Interval of start centres (short-side units) that keep the object inside along `axis`."""
    probe = replace(obj, start=(0.0, 0.0))
    pos = trajectory(probe, canvas, times, duration)[axis]
    width = trajectory(probe, canvas, times, duration)[2]
    radius = width * _bounding_radius(obj.shape, obj.motion == "spin") + MARGIN
    if obj.motion == "bounce" and axis == 1:
        # The drop depends on the start; keep room for a visible fall of at least 0.25.
        r0 = radius[0]
        return r0, canvas[1] - r0 - 0.25
    return float(np.max(radius - pos)), float(np.min(canvas[axis] - radius - pos))


def _fits(obj: ShapeObject, canvas, times, duration) -> bool:
    return all(lo <= hi for lo, hi in (_start_range(obj, axis, canvas, times, duration) for axis in (0, 1)))


def _sample_object(rng: np.random.Generator, color: str, canvas, times, duration, tries: int = 20) -> ShapeObject:
    """Draw attributes, preferring ones that can stay inside the canvas for the whole clip."""
    for _ in range(tries):
        shape = SHAPES[rng.integers(len(SHAPES))]
        motions = [m for m in MOTIONS if not (m == "spin" and shape == "circle")]
        motion = motions[rng.integers(len(motions))]
        speed = list(SPEEDS)[rng.integers(len(SPEEDS))] if motion in LINEAR_MOTIONS else None
        size = list(SIZES)[rng.integers(len(SIZES))]
        obj = ShapeObject(color=color, shape=shape, size=size, motion=motion, speed=speed, start=(0.5, 0.5))
        if _fits(obj, canvas, times, duration):
            break
    return obj


def _overlaps(objects, canvas, times, duration) -> bool:
    tracks = [trajectory(o, canvas, times, duration) for o in objects]
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            xi, yi, wi, _ = tracks[i]
            xj, yj, wj, _ = tracks[j]
            reach = wi * _bounding_radius(objects[i].shape, True) + wj * _bounding_radius(objects[j].shape, True)
            if np.any(np.hypot(xi - xj, yi - yj) < reach + MARGIN):
                return True
    return False


def _relation(a: ShapeObject, b: ShapeObject, canvas) -> tuple[str, str, str] | None:
    dx = (a.start[0] - b.start[0]) * canvas[0]
    dy = (a.start[1] - b.start[1]) * canvas[1]
    if abs(dx) >= MIN_RELATION_GAP and abs(dx) > 2 * abs(dy):
        return (a.color, "left of" if dx < 0 else "right of", b.color)
    if abs(dy) >= MIN_RELATION_GAP and abs(dy) > 2 * abs(dx):
        return (a.color, "above" if dy < 0 else "below", b.color)
    return None


def is_possible(objects, aspect: float, seconds: float, tolerance: float = 1e-3) -> bool:
    """Whether these objects, as placed, make a scene `sample_scene` could draw on a canvas of
    `aspect` (W/H) for `seconds`: each one inside the canvas for the whole clip (a bounce with room
    to fall) and no two touching."""
    canvas = canvas_units(aspect, 1.0)
    times = np.linspace(0.0, seconds, 33)
    for obj in objects:
        for axis in (0, 1):
            lo, hi = _start_range(obj, axis, canvas, times, seconds)
            if not lo - tolerance <= obj.start[axis] * canvas[axis] <= hi + tolerance:
                return False
    return not _overlaps(objects, canvas, times, seconds)


def canvas_units(width: float, height: float) -> tuple[float, float]:
    short = min(width, height)
    return width / short, height / short


def sample_scene(
    rng: np.random.Generator,
    aspect: float = 1.0,
    seconds: float = 2.0,
    constraints: SceneConstraints = SceneConstraints(),
) -> Scene:
    """Draw a scene whose objects stay inside a canvas of `aspect` (W/H) for `seconds`.

    Each colour names one kind of object: either a single object or a group of 2-3 identical
    ones ("two small yellow squares slide up quickly"), so captions and judges can refer to
    objects by colour. Objects never overlap during the clip.
    """
    canvas = canvas_units(aspect, 1.0)
    times = np.linspace(0.0, seconds, 33)
    while True:
        n_objects = int(rng.integers(1, constraints.max_objects + 1))
        colors = rng.permutation(list(COLORS))
        kinds: list[tuple[ShapeObject, int]] = []
        remaining = n_objects
        while remaining > 0:
            count = 1
            if remaining >= 2 and rng.random() < 0.25:
                count = int(rng.integers(2, remaining + 1))
            kinds.append((_sample_object(rng, str(colors[len(kinds)]), canvas, times, seconds), count))
            remaining -= count
        scene = _place(rng, kinds, canvas, times, seconds)
        if scene is None:
            continue
        scene = replace(scene, background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
        if constraints.reject is not None and constraints.reject(scene):
            continue
        return scene


def _place(rng, kinds, canvas, times, seconds, attempts: int = 40) -> Scene | None:
    templates = [obj for obj, count in kinds for _ in range(count)]
    for _ in range(attempts):
        placed = []
        for obj in templates:
            start = []
            for axis in (0, 1):
                lo, hi = _start_range(obj, axis, canvas, times, seconds)
                pos = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
                start.append(float(pos / canvas[axis]))
            placed.append(replace(obj, start=(round(start[0], 4), round(start[1], 4))))
        if not _overlaps(placed, canvas, times, seconds):
            relation = None
            singles = [obj for obj, count in kinds if count == 1]
            if len(singles) >= 2:
                a, b = (singles[i] for i in rng.permutation(len(singles))[:2])
                a = next(o for o in placed if o.color == a.color)
                b = next(o for o in placed if o.color == b.color)
                relation = _relation(a, b, canvas)
            return Scene(objects=tuple(placed), background="black", relation=relation)
    return None


# ---------------------------------------------------------------------------------------------
# Rendering


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) in the object's own frame, y pointing down."""
    half = width / 2
    if shape == "circle":
        return np.hypot(px, py) - half
    if shape == "square":
        qx, qy = np.abs(px) - half, np.abs(py) - half
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0)
    # Equilateral triangle of side `width` centred on its centroid, apex up (Inigo Quilez's SDF).
    k = math.sqrt(3.0)
    x = np.abs(px) - half
    y = -py + half / k
    flip = x + k * y > 0
    x, y = np.where(flip, (x - k * y) / 2, x), np.where(flip, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * half, 0)
    return -np.hypot(x, y) * np.sign(y)


def coverage(obj: ShapeObject, width: int, height: int, frames: int, fps: float) -> np.ndarray:
    """(frames, height, width) float32: how much of each pixel the object covers, anti-aliased
    over one pixel, on a canvas of `width` x `height` pixels (any resolution of the same aspect
    draws the same scene)."""
    short = min(width, height)
    times = np.arange(frames, dtype=np.float32) / fps
    x, y, w, angle = (a.astype(np.float32)[:, None, None]
                      for a in trajectory(obj, canvas_units(width, height), times, (frames - 1) / fps))
    # Pixel centres in short-side units, broadcast as (1, H, W) against per-frame (T, 1, 1).
    gx = ((np.arange(width, dtype=np.float32) + 0.5) / short)[None, None, :]
    gy = ((np.arange(height, dtype=np.float32) + 0.5) / short)[None, :, None]
    # Rotate pixels into the object's frame; a clockwise turn on screen (y down) is +angle.
    dx, dy = gx - x, gy - y
    cos, sin = np.cos(angle), np.sin(angle)
    px, py = cos * dx + sin * dy, -sin * dx + cos * dy
    return np.clip(0.5 - _signed_distance(obj.shape, px, py, w) * short, 0.0, 1.0)


def render(scene: Scene, width: int, height: int, frames: int, fps: float) -> np.ndarray:
    """Render a scene to uint8 frames shaped (frames, height, width, 3), anti-aliased."""
    if width < 1 or height < 1 or frames < 1 or fps <= 0:
        raise ValueError(f"cannot render {width}x{height}, {frames} frames at {fps} fps")
    image = np.empty((frames, height, width, 3), dtype=np.float32)
    image[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    for obj in scene.objects:
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        image += coverage(obj, width, height, frames, fps)[..., None] * (color - image)
    return np.rint(image).astype(np.uint8)
