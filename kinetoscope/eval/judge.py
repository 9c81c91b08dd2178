"""Automatic judge: does a clip show what its prompt says? (contract: shared/world.md, "What a judge checks")

Two stages. `observe(frames, fps)` measures a clip without knowing the prompt: its background,
and for every palette colour the regions it covers in each frame, linked over time into tracks
that each get a shape, a start size and a motion. `compare(observation, expected)` turns those
measurements into one `Check` per attribute the prompt names. `judge` does both.

Pixels. Anti-aliased and blurred edges mix an object's colour with the background, and a mix
can lie close to a third palette colour (red half over white is near pink), so snapping pixels
to their nearest palette colour leaves rings of false colour around objects. Instead each pixel
is explained as a blend `background + coverage * (colour - background)` with whichever palette
colour fits best; it belongs to that colour's object when it is at least half covered and the
blend explains it closely. Areas and centroids weight pixels by coverage, and edges are located
where coverage crosses one half, so measurements stay sub-pixel accurate at 32x32.

Clip length. Motion thresholds are world.md's for the nominal 2-second clip; shorter clips scale
them down in proportion (not below a half-second clip's, where measurement noise would take over),
longer clips keep them. A 1-frame clip shows no motion: "still" and nothing else passes there,
since every other motion (and any speed) claims a change that a single frame cannot show; the
observation reads "not checkable".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from kinetoscope.data.world import BACKGROUNDS, COLORS, SHRINK_FACTOR, SIZES, SPEEDS, Scene, ShapeObject

PALETTE = {**COLORS, **BACKGROUNDS}
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)

# Pixels (RGB distances on the 0-255 scale).
NEAR_BACKGROUND = 20.0  # closer than this to the background, no object covers more than ~10% of a pixel
MAX_RESIDUAL = 60.0  # further than this from every blend, a pixel is unexplained (palette colours are >= 80 apart)
PURE_PREFERENCE = 40.0  # per unit of missing coverage: a pure gray beats "white half over black"
HALF_COVERED = 0.5
# Regions smaller than half the world's smallest object (a small triangle shrunk to 0.55) are specks.
MIN_REGION_AREA = 0.5 * (math.sqrt(3) / 4) * (SIZES["small"] * SHRINK_FACTOR) ** 2  # short sides squared
MIN_REGION_PIXELS = 2
IN_PLANE = np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))], dtype=bool)

FRINGE_PIXELS = 2

# Shapes. A region's complex moments c_k = sum(coverage * z**k) about its centroid, normalised by
# area**(1 + k/2), are unchanged by moving, scaling, turning and (nearly) by isotropic blur. All
# three world shapes have c_2 = 0; a triangle's 3-fold symmetry leaves c_3 and a square's 4-fold
# symmetry c_4 (values measured on a 4000x4000 raster); a circle has neither.
TRIANGLE_MOMENT = 0.06754
SQUARE_MOMENT = 1 / 60
ELONGATED = 0.05  # |c_2| / area**2 of an ellipse 1.35 times longer than wide
# Area per squared width (width is the diameter or the side, as in world.md; an irregular region
# counts as the circle of its area), and the turn after which each shape looks the same.
AREA_PER_SQUARED_WIDTH = {"triangle": math.sqrt(3) / 4, "circle": math.pi / 4, "square": 1.0, "irregular": math.pi / 4}
SYMMETRY_FOLD = {"triangle": 3, "square": 4}  # circles have no orientation to track

# Motion, in short sides over the nominal clip (world.md).
NOMINAL_SECONDS = 2.0
SHORTEST_SCALED_SECONDS = 0.5
MOVED = 0.1
STILL = 0.05
MAIN_AXIS_RATIO = 2.0  # "mainly along that axis": at least twice the travel across it
GROWN = 1.3
SHRUNK = 0.77
STEADY_AREA = 1.15  # "area steady" for still: last over first within 1/1.15 .. 1.15
BOUNCE_LEG = 0.1  # both the fall and the rise after it
SPUN = math.radians(90)  # a spin turns 360 degrees in the nominal clip

# Over the clip.
MOST_FRAMES = 0.5  # "found in most frames": in more than half
STEADY_COUNT = 0.9  # steadiness: the count holds in 90% of frames (one slip in 17) ...
STEADY_SHAPE = 0.75  # ... and each object reads as the same shape in 75% of its frames
EXTRA_PRESENCE = 0.25  # an unnamed colour seen in a quarter of the frames is an extra object


@dataclass(frozen=True)
class Check:
    subject: str  # "red circle", "red circles" for a group, or "scene"
    name: str  # "count", "shape", "size", "motion", "speed", "steadiness", "background", ...
    expected: str
    observed: str
    passed: bool

    @property
    def attribute(self) -> str:
        return f"{self.subject}: {self.name}"

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.attribute}  expected {self.expected}, observed {self.observed}"


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def __str__(self) -> str:
        failed = sum(not check.passed for check in self.checks)
        summary = "clip satisfies the prompt" if self.passed else f"clip fails {failed} of {len(self.checks)} checks"
        return "\n".join([*map(str, self.checks), summary])


@dataclass(frozen=True)
class Blob:
    """One region of one colour in one frame; positions and sizes in short sides, y downwards."""

    frame: int
    x: float
    y: float
    area: float
    elongation: float  # |c_2| / area**2
    triangularity: float  # 1 for a triangle, 0 for a circle or square
    squareness: float  # 1 for a square, 0 for a circle or triangle
    phase3: float  # angles of c_3 and c_4: 3 and 4 times the orientation
    phase4: float

    @property
    def shape(self) -> str:
        return _classify_shape(self.elongation, self.triangularity, self.squareness)


@dataclass(frozen=True)
class Track:
    """One object followed over the frames where its colour shows its usual number of regions."""

    blobs: tuple[Blob, ...]
    shape: str  # from the median signature over the frames
    shape_agreement: float  # share of frames where the object alone reads as `shape`
    start_width: float
    motion: str  # a world motion, "unclear", or "not checkable" for a single frame
    motion_evidence: str
    speed: float | None  # net travel per second; None for a single frame


@dataclass(frozen=True)
class ColourObservation:
    blobs: tuple[tuple[Blob, ...], ...]  # this colour's regions, per frame
    tracks: tuple[Track, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(blobs) for blobs in self.blobs)

    @property
    def shape(self) -> str:
        return _shape_of([blob for track in self.tracks for blob in track.blobs])

    @property
    def signature(self) -> str:
        blobs = [blob for track in self.tracks for blob in track.blobs]
        triangularity = np.median([blob.triangularity for blob in blobs])
        squareness = np.median([blob.squareness for blob in blobs])
        return f"triangularity {triangularity:.2f}, squareness {squareness:.2f}"


@dataclass(frozen=True)
class ClipObservation:
    frames: int
    fps: float
    background: str
    background_share: float
    colours: dict[str, ColourObservation]  # every object colour seen in at least one frame


def judge(frames: np.ndarray, expected: Scene, fps: float) -> Verdict:
    """Check a clip (uint8, T x H x W x 3) against the scene its prompt describes."""
    return compare(observe(frames, fps), expected)


# ---------------------------------------------------------------------------------------------
# Observing a clip


def observe(frames: np.ndarray, fps: float) -> ClipObservation:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    pixels = frames.astype(np.float32)
    sample = pixels[:, ::2, ::2]  # every other pixel each way is plenty to tell the background
    nearest = _nearest_palette(sample)
    shares = np.bincount(nearest.ravel(), minlength=len(PALETTE)) / nearest.size
    background = int(shares.argmax())
    background_rgb = _background_rgb(sample, nearest, background)
    blobs = _find_blobs(pixels, background_rgb, background)
    colours = {
        PALETTE_NAMES[index]: _observe_colour(per_frame, fps)
        for index, per_frame in blobs.items()
        if any(per_frame)
    }
    return ClipObservation(len(frames), float(fps), PALETTE_NAMES[background], float(shares[background]), colours)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    flat = pixels.reshape(-1, 3)
    distance2 = (flat**2).sum(1)[:, None] - 2 * flat @ PALETTE_RGB.T + (PALETTE_RGB**2).sum(1)[None]
    return distance2.argmin(1).reshape(pixels.shape[:-1])


def _background_rgb(pixels: np.ndarray, nearest: np.ndarray, background: int) -> np.ndarray:
    """Per frame, the background as drawn (a generated clip may be a shade off the palette)."""
    rgb = np.empty((len(pixels), 3), dtype=np.float32)
    for t, frame in enumerate(pixels):
        plain = frame[nearest[t] == background]
        rgb[t] = np.median(plain, axis=0) if len(plain) else PALETTE_RGB[background]
    return rgb


def _explain_frame(frame: np.ndarray, background_rgb: np.ndarray, candidates: list[int]):
    """Per pixel: the candidate colour whose blend with the background fits best, and its coverage.

    Returns (owner, coverage): owner is a palette index (-1 where the pixel is plain background
    or unexplained), coverage the fraction of the pixel that colour covers.
    """
    offset = frame - background_rgb
    busy = (offset**2).sum(-1) > NEAR_BACKGROUND**2
    owner = np.full(frame.shape[:2], -1, dtype=np.int16)
    coverage = np.zeros(frame.shape[:2], dtype=np.float32)
    if not busy.any():
        return owner, coverage
    d = offset[busy]
    directions = PALETTE_RGB[candidates] - background_rgb
    along = d @ directions.T
    length2 = (directions**2).sum(1)
    alpha = np.clip(along / length2, 0.0, 1.0)
    residual = np.sqrt(np.maximum((d**2).sum(1)[:, None] - 2 * alpha * along + alpha**2 * length2, 0.0))
    best = (residual + PURE_PREFERENCE * (1.0 - alpha)).argmin(1)
    rows = np.arange(len(d))
    explained = residual[rows, best] <= MAX_RESIDUAL
    owner[busy] = np.where(explained, np.asarray(candidates)[best], -1)
    coverage[busy] = np.where(explained, alpha[rows, best], 0.0)
    return owner, coverage


def _find_blobs(pixels: np.ndarray, background_rgb: np.ndarray, background: int) -> dict[int, list[list[Blob]]]:
    """For each palette colour that covers any pixel: per frame, its regions above speck size."""
    count, height, width, _ = pixels.shape
    short = min(height, width)
    candidates = [i for i in range(len(PALETTE)) if i != background]
    owner = np.empty((count, height, width), dtype=np.int16)
    covered = np.empty((count, height, width), dtype=bool)
    for t in range(count):
        owner[t], coverage = _explain_frame(pixels[t], background_rgb[t], candidates)
        covered[t] = coverage >= HALF_COVERED
    min_pixels = max(MIN_REGION_PIXELS, MIN_REGION_AREA * short**2)
    regions = {}  # palette index -> list of (frame, slices, label image, label)
    kept = np.zeros_like(covered)
    for colour in np.unique(owner[covered]):
        labels, _ = ndimage.label(covered & (owner == colour), structure=IN_PLANE)
        sizes = np.bincount(labels.ravel())
        large = [(label, where) for label, where in enumerate(ndimage.find_objects(labels), 1) if sizes[label] >= min_pixels]
        kept |= np.isin(labels, [label for label, _ in large])
        regions[int(colour)] = [(where[0].start, where[1:], labels, label) for label, where in large]
    blobs = {}
    for colour, found in regions.items():
        per_frame = [[] for _ in range(count)]
        for t, (rows, cols), labels, label in found:
            rows, cols = _grow_slice(rows, 2, height), _grow_slice(cols, 2, width)
            region = labels[t, rows, cols] == label
            others = kept[t, rows, cols] & ~region
            offset = pixels[t, rows, cols] - background_rgb[t]
            per_frame[t].append(_measure_blob(t, offset, PALETTE_RGB[colour] - background_rgb[t], region, others, (rows.start, cols.start), short))
        blobs[colour] = per_frame
    return blobs


def _grow_slice(where: slice, margin: int, limit: int) -> slice:
    return slice(max(where.start - margin, 0), min(where.stop + margin, limit))


def _measure_blob(frame, offset, direction, region, others, origin, short) -> Blob:
    """Coverage-weighted measurements of one region and the fringe around it.

    The fringe ring is two pixels wide so that a blurred edge's mass is counted too.
    """
    around = ndimage.binary_dilation(region, structure=np.ones((3, 3), dtype=bool), iterations=FRINGE_PIXELS) & ~others
    alpha = np.where(around, np.clip(offset @ direction / (direction @ direction), 0.0, 1.0), 0.0)
    area = alpha.sum()
    ys, xs = np.indices(alpha.shape) + 0.5
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    z = (xs - cx) + 1j * (ys - cy)
    c2, c3, c4 = ((alpha * z**k).sum() for k in (2, 3, 4))
    return Blob(
        frame=frame,
        x=float((cx + origin[1]) / short),
        y=float((cy + origin[0]) / short),
        area=float(area / short**2),
        elongation=float(abs(c2) / area**2),
        triangularity=float(abs(c3) / area**2.5 / TRIANGLE_MOMENT),
        squareness=float(abs(c4) / area**3 / SQUARE_MOMENT),
        phase3=float(np.angle(c3)),
        phase4=float(np.angle(c4)),
    )


def _classify_shape(elongation: float, triangularity: float, squareness: float) -> str:
    """The world shape whose symmetry signature is nearest; "irregular" for a stretched region.

    Signatures (triangularity, squareness): circle (0, 0), square (0, 1), triangle (1, 0). Blur
    and pixelation only pull a shape towards the circle, so the nearest-signature boundaries at
    one half leave room for both.
    """
    if elongation > ELONGATED:
        return "irregular"
    if max(triangularity, squareness) <= 0.5:
        return "circle"
    return "triangle" if triangularity > squareness else "square"


def _shape_of(blobs: list[Blob]) -> str:
    median = {name: float(np.median([getattr(blob, name) for blob in blobs])) for name in ("elongation", "triangularity", "squareness")}
    return _classify_shape(**median)


def _observe_colour(per_frame: list[list[Blob]], fps: float) -> ColourObservation:
    return ColourObservation(tuple(map(tuple, per_frame)), tuple(_summarise_track(track, fps) for track in _link_tracks(per_frame)))


def _link_tracks(per_frame: list[list[Blob]]) -> list[list[Blob]]:
    """Follow objects through the frames showing the colour's usual (most common non-zero) count.

    Frames with more or fewer regions (a merge, a flicker) are skipped rather than guessed at;
    consecutive usable frames are matched by least total centroid movement.
    """
    usual = Counter(len(blobs) for blobs in per_frame if blobs).most_common(1)[0][0]
    tracks = None
    for blobs in per_frame:
        if len(blobs) != usual:
            continue
        if tracks is None:
            tracks = [[blob] for blob in blobs]
            continue
        last = np.array([[track[-1].x, track[-1].y] for track in tracks])
        now = np.array([[blob.x, blob.y] for blob in blobs])
        rows, cols = linear_sum_assignment(np.linalg.norm(last[:, None] - now[None], axis=-1))
        for row, col in zip(rows, cols):
            tracks[row].append(blobs[col])
    return tracks


def _summarise_track(blobs: list[Blob], fps: float) -> Track:
    shape = _shape_of(blobs)
    times = np.array([blob.frame for blob in blobs]) / fps
    duration = times[-1] - times[0]
    travel = math.hypot(blobs[-1].x - blobs[0].x, blobs[-1].y - blobs[0].y)
    motion, evidence = _classify_motion(blobs, shape, duration)
    return Track(
        blobs=tuple(blobs),
        shape=shape,
        shape_agreement=sum(blob.shape == shape for blob in blobs) / len(blobs),
        start_width=math.sqrt(blobs[0].area / AREA_PER_SQUARED_WIDTH[shape]),
        motion=motion,
        motion_evidence=evidence,
        speed=travel / duration if duration > 0 else None,
    )


def _classify_motion(blobs: list[Blob], shape: str, duration: float) -> tuple[str, str]:
    """One world motion (or "unclear") from the track's travel, area, vertical path and turning."""
    if duration <= 0:
        return "not checkable", "a single frame shows no motion"
    scale = min(1.0, max(duration, SHORTEST_SCALED_SECONDS) / NOMINAL_SECONDS)
    dx, dy = blobs[-1].x - blobs[0].x, blobs[-1].y - blobs[0].y
    travel = math.hypot(dx, dy)
    growth = blobs[-1].area / blobs[0].area
    fall, rise = _fall_and_rise([blob.y for blob in blobs])
    turn = _turn(blobs, shape)
    if fall > BOUNCE_LEG * scale and rise > BOUNCE_LEG * scale:
        return "bounce", f"fell {fall:.2f} then rose {rise:.2f}"
    if travel > MOVED * scale and max(abs(dx), abs(dy)) >= MAIN_AXIS_RATIO * min(abs(dx), abs(dy)):
        if abs(dx) > abs(dy):
            return ("right" if dx > 0 else "left"), f"travel {travel:.2f}"
        return ("down" if dy > 0 else "up"), f"travel {travel:.2f}"
    if growth > GROWN:
        return "grow", f"area x{growth:.2f}"
    if growth < SHRUNK:
        return "shrink", f"area x{growth:.2f}"
    if turn is not None and abs(turn) > SPUN * scale:
        return "spin", f"turned {math.degrees(abs(turn)):.0f} degrees {'clockwise' if turn > 0 else 'anticlockwise'}"
    if travel < STILL * scale and 1 / STEADY_AREA < growth < STEADY_AREA:
        return "still", f"travel {travel:.2f}"
    return "unclear", f"travel {travel:.2f}, area x{growth:.2f}"


def _fall_and_rise(ys: list[float]) -> tuple[float, float]:
    """How far the object falls to its lowest point, and how far it climbs back after it (y is down)."""
    lowest = int(np.argmax(ys))
    return ys[lowest] - ys[0], ys[lowest] - min(ys[lowest:])


def _turn(blobs: list[Blob], shape: str) -> float | None:
    """Total turn in radians, clockwise on screen positive; None for shapes without an orientation.

    A square looks the same every 90 degrees and a triangle every 120, so its k-fold moment's
    angle is k times its orientation modulo 360: frame-to-frame steps are unwrapped on that
    angle (valid while a step is under half the symmetry) and summed.
    """
    fold = SYMMETRY_FOLD.get(shape)
    if fold is None:
        return None
    phases = np.array([blob.phase3 if fold == 3 else blob.phase4 for blob in blobs])
    return float(np.angle(np.exp(1j * np.diff(phases))).sum() / fold)


# ---------------------------------------------------------------------------------------------
# Comparing an observation with the prompt's scene


def compare(observation: ClipObservation, expected: Scene) -> Verdict:
    checks = []
    for obj, count in expected.groups():
        checks += _object_checks(observation, obj, count)
    if expected.background is not None:
        checks.append(_background_check(observation, expected.background))
    if expected.relation is not None:
        checks.append(_relation_check(observation, expected.relation))
    checks.append(_extra_objects_check(observation, {obj.color for obj in expected.objects}))
    return Verdict(tuple(checks))


def _object_checks(observation: ClipObservation, obj: ShapeObject, count: int) -> list[Check]:
    subject = f"{obj.color} {obj.shape}{'s' if count > 1 else ''}"
    seen = observation.colours.get(obj.color)
    counts = seen.counts if seen else (0,) * observation.frames
    matching = sum(found == count for found in counts)
    usual = Counter(counts).most_common(1)[0][0]
    checks = [Check(subject, "count", str(count), f"{usual} (as named in {matching}/{len(counts)} frames)", matching > MOST_FRAMES * len(counts))]
    named = [("shape", obj.shape), ("size", obj.size), ("motion", obj.motion), ("speed", obj.speed), ("steadiness", "steady")]
    named = [(name, value) for name, value in named if value is not None]
    if seen is None:
        return checks + [Check(subject, name, value, "not found", False) for name, value in named]
    measure = {"shape": _shape, "size": _size, "motion": _motion, "speed": _speed, "steadiness": _steadiness}
    for name, value in named:
        observed, passed = measure[name](seen, value)
        checks.append(Check(subject, name, value, observed, passed))
    return checks


def _shape(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    return f"{seen.shape} ({seen.signature})", seen.shape == expected


def _size(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    width = float(np.median([track.start_width for track in seen.tracks]))
    size = min(SIZES, key=lambda name: abs(width - SIZES[name]))
    return f"{size} (width {width:.2f})", size == expected


def _motion(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    observed = "; ".join(f"{track.motion} ({track.motion_evidence})" for track in seen.tracks)
    passed = all(track.motion == expected or (track.motion == "not checkable" and expected == "still") for track in seen.tracks)
    return observed, passed


def _speed(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    if any(track.speed is None for track in seen.tracks):
        return "not checkable (a single frame shows no motion)", False
    classes = [min(SPEEDS, key=lambda name: abs(track.speed - SPEEDS[name])) for track in seen.tracks]
    observed = "; ".join(f"{name} ({track.speed:.2f} per second)" for name, track in zip(classes, seen.tracks))
    return observed, all(name == expected for name in classes)


def _steadiness(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    usual, held = Counter(seen.counts).most_common(1)[0]
    agreement = min(track.shape_agreement for track in seen.tracks)
    observed = f"count held in {held}/{len(seen.counts)} frames, shape in {agreement:.0%}"
    return observed, usual > 0 and held >= STEADY_COUNT * len(seen.counts) and agreement >= STEADY_SHAPE


def _background_check(observation: ClipObservation, expected: str) -> Check:
    observed = f"{observation.background} ({observation.background_share:.0%} of pixels)"
    return Check("scene", "background", expected, observed, observation.background == expected)


def _relation_check(observation: ClipObservation, relation: tuple[str, str, str]) -> Check:
    first, named, second = relation
    expected = f"{first} {named} {second}"
    a, b = observation.colours.get(first), observation.colours.get(second)
    together = [t for t in range(observation.frames) if a and b and a.counts[t] and b.counts[t]]
    if not together:
        return Check("scene", "relation", expected, "not found together", False)
    (ax, ay), (bx, by) = _centre(a.blobs[together[0]]), _centre(b.blobs[together[0]])
    if named in ("left of", "right of"):
        gap, actual = bx - ax, "left of" if ax < bx else "right of"
    else:
        gap, actual = by - ay, "above" if ay < by else "below"
    return Check("scene", "relation", expected, f"{first} {actual} {second} (gap {abs(gap):.2f})", actual == named)


def _centre(blobs: tuple[Blob, ...]) -> tuple[float, float]:
    return float(np.mean([b.x for b in blobs])), float(np.mean([b.y for b in blobs]))


def _extra_objects_check(observation: ClipObservation, named: set[str]) -> Check:
    extras = [
        f"{colour} {seen.shape}"
        for colour, seen in observation.colours.items()
        if colour not in named and sum(c > 0 for c in seen.counts) >= EXTRA_PRESENCE * observation.frames
    ]
    return Check("scene", "extra objects", "none", ", ".join(extras) or "none", not extras)
