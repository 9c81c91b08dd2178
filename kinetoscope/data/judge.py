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
blend explains it closely. Connected covered pixels of one colour form a region; specks smaller
than half the world's smallest object and thin slivers (compression leaves them along edges) are
not objects. Areas, centroids and moments weight pixels by coverage, so they stay sub-pixel
accurate down to 32x32.

Shapes. world.md tells shapes apart by how much of their rotated bounding box they fill (circle
0.79, square 1.0, triangle 0.5). Measured that way a triangle's sharp corners are lost to pixels
and blur: a small triangle at 64x64 fills 0.60 of its box when clean and 0.76 (a circle) after
a one-pixel blur. The judge draws the same distinction from the region's symmetry instead,
which blur leaves alone: a triangle looks the same every 120 degrees, a square every 90, a
circle always (see TRIANGLE_MOMENT below). The same moments give the orientation that spin
tracks, modulo each shape's symmetry.

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

from kinetoscope.data.world import BACKGROUNDS, COLORS, LINEAR_MOTIONS, SHRINK_FACTOR, SIZES, SPEEDS, Scene, ShapeObject

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
FRINGE_PIXELS = 2  # how far past its half-covered pixels a region's coverage is summed (blurred edges)

# Shapes. A region's complex moments c_k = sum(coverage * z**k) about its centroid, normalised by
# area**(1 + k/2), are unchanged by moving, scaling, turning and (nearly) by isotropic blur. All
# three world shapes have c_2 = 0; a triangle's 3-fold symmetry leaves c_3 and a square's 4-fold
# symmetry c_4 (values measured on a 4000x4000 raster); a circle has neither.
TRIANGLE_MOMENT = 0.06754
SQUARE_MOMENT = 1 / 60
ELONGATED = 0.1  # |c_2| / area**2 of an ellipse 1.85 times longer than wide
# Thinner still, a region is a sliver along some edge (compression leaves them), not an object.
SLIVER = 0.25  # an ellipse 3.8 times longer than wide
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
MOST_FRAMES = 0.5  # "found in most frames": in more than half; the same makes an unnamed colour an extra object
STEADY_COUNT = 0.9  # steadiness: the count holds in 90% of frames (one slip in 17), and each
# object reads as the same shape in each third of the clip (a median per third absorbs a noisy frame)


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
        mark = "PASS" if self.passed else "FAIL"
        return f"{mark}  {self.attribute}  expected {self.expected}, observed {self.observed}"


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


@dataclass(frozen=True)
class Track:
    """One object followed over the frames where its colour shows its usual number of regions."""

    blobs: tuple[Blob, ...]
    shape: str  # from the median signature over the frames
    shape_by_third: tuple[str, ...]  # the same, over each third of the frames
    start_width: float
    motion: str  # a world motion, "unclear", or "not checkable" for a single frame
    motion_evidence: str
    speed: float | None  # net travel per second; None for a single frame


@dataclass(frozen=True)
class ColourObservation:
    blobs: tuple[tuple[Blob, ...], ...]  # this colour's regions, per frame
    tracks: tuple[Track, ...]
    shape: str  # from the median signature over all tracked regions
    triangularity: float
    squareness: float

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(blobs) for blobs in self.blobs)


@dataclass(frozen=True)
class ClipObservation:
    frames: int
    fps: float
    background: str
    background_share: float
    colours: dict[str, ColourObservation]  # every palette colour but the background's that shows an object


def judge(frames: np.ndarray, expected: Scene, fps: float) -> Verdict:
    """Check a clip (uint8, T x H x W x 3) against the scene its prompt describes."""
    return compare(observe(frames, fps), expected)


# ---------------------------------------------------------------------------------------------
# Observing a clip


def observe(frames: np.ndarray, fps: float) -> ClipObservation:
    """Measure a clip (RGB on the 0-255 scale, shaped (T, H, W, 3)) without knowing its prompt."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    pixels = frames.astype(np.float32)
    sample = pixels[:, ::3, ::3]  # every third pixel each way is plenty to tell the background
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


def _thin_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (N, 3) times b (K, 3) transposed, (N, K), without BLAS: OpenBLAS threads such thin products,
    gaining nothing, and its threads then spin for a while, so on 2 cores the denoising steps after
    a pipeline's check (its redraw, the next clip's) ran 1.3x slower (einsum's own loop instead)."""
    return np.einsum("nc,kc->nk", a, b)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    flat = pixels.reshape(-1, 3)
    distance2 = (flat**2).sum(1)[:, None] - 2 * _thin_product(flat, PALETTE_RGB) + (PALETTE_RGB**2).sum(1)[None]
    return distance2.argmin(1).reshape(pixels.shape[:-1])


def _background_rgb(pixels: np.ndarray, nearest: np.ndarray, background: int) -> np.ndarray:
    """Per frame, the background as drawn (a generated clip may be a shade off the palette)."""
    rgb = np.empty((len(pixels), 3), dtype=np.float32)
    for t, frame in enumerate(pixels):
        plain = frame[nearest[t] == background]
        rgb[t] = np.median(plain, axis=0) if len(plain) else PALETTE_RGB[background]
    return rgb


def _explain(pixels: np.ndarray, background_rgb: np.ndarray, candidates: list[int]):
    """Per pixel: the candidate colour whose blend with the background fits best, and its coverage.

    Returns (owner, coverage), both (T, H, W): owner is a palette index (-1 where the pixel is
    plain background or unexplained), coverage the fraction of the pixel that colour covers.
    """
    owner = np.full(pixels.shape[:-1], -1, dtype=np.int16)
    coverage = np.zeros(pixels.shape[:-1], dtype=np.float32)
    for t, frame in enumerate(pixels):
        offset = frame - background_rgb[t]
        busy = np.einsum("hwc,hwc->hw", offset, offset) > NEAR_BACKGROUND**2
        d = offset[busy]
        directions = PALETTE_RGB[candidates] - background_rgb[t]
        along = _thin_product(d, directions)
        length2 = (directions**2).sum(1)
        alpha = np.clip(along / length2, 0.0, 1.0)
        residual2 = np.einsum("nc,nc->n", d, d)[:, None] - 2 * alpha * along + alpha**2 * length2  # |d - alpha*dir|^2
        residual = np.sqrt(np.maximum(residual2, 0.0))
        best = (residual + PURE_PREFERENCE * (1.0 - alpha)).argmin(1)
        rows = np.arange(len(d))
        explained = residual[rows, best] <= MAX_RESIDUAL
        owner[t][busy] = np.where(explained, np.asarray(candidates, dtype=np.int16)[best], -1)
        coverage[t][busy] = np.where(explained, alpha[rows, best], 0.0)
    return owner, coverage


def _find_blobs(pixels: np.ndarray, background_rgb: np.ndarray, background: int) -> dict[int, list[list[Blob]]]:
    """For each palette colour that covers any pixel: per frame, its regions that can be objects."""
    count, height, width, _ = pixels.shape
    short = min(height, width)
    owner, coverage = _explain(pixels, background_rgb, [i for i in range(len(PALETTE)) if i != background])
    covered = coverage >= HALF_COVERED
    min_pixels = max(MIN_REGION_PIXELS, MIN_REGION_AREA * short**2)
    blobs = {}
    for colour in np.unique(owner[covered]):
        owned = owner == colour
        labels, _ = ndimage.label(covered & owned, structure=IN_PLANE)
        sizes = np.bincount(labels.ravel())
        found = enumerate(ndimage.find_objects(labels), 1)
        large = [(label, where) for label, where in found if sizes[label] >= min_pixels]
        large_labels = [label for label, _ in large]
        per_frame = [[] for _ in range(count)]
        for label, (when, rows, cols) in large:
            t = when.start
            rows, cols = _grow_slice(rows, FRINGE_PIXELS, height), _grow_slice(cols, FRINGE_PIXELS, width)
            patch = labels[t, rows, cols]
            region = patch == label
            # The fringe may take this colour's pixels around the region, but not another object's.
            fringe = owned[t, rows, cols] & ~(np.isin(patch, large_labels) & ~region)
            blob = _measure_blob(t, coverage[t, rows, cols], region, fringe, (rows.start, cols.start), short)
            if blob.elongation <= SLIVER:
                per_frame[t].append(blob)
        blobs[int(colour)] = per_frame
    return blobs


def _grow_slice(where: slice, margin: int, limit: int) -> slice:
    return slice(max(where.start - margin, 0), min(where.stop + margin, limit))


def _measure_blob(frame: int, coverage: np.ndarray, region: np.ndarray, fringe: np.ndarray, origin, short: int) -> Blob:
    """Coverage-weighted measurements of one region and its fringe.

    The fringe reaches FRINGE_PIXELS out, so that a blurred edge's mass counts too, but only
    over pixels explained by this colour: background noise would otherwise swamp the moments.
    """
    around = ndimage.binary_dilation(region, structure=np.ones((3, 3), dtype=bool), iterations=FRINGE_PIXELS)
    alpha = np.where(region | (around & fringe), coverage, 0.0)
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
    """The world shape a region's symmetry signature shows; "irregular" for a stretched region.

    Signatures (triangularity, squareness): circle (0, 0), square (0, 1), triangle (1, 0). Blur
    and pixelation pull every shape towards the circle, so each needs only half its signature.
    Triangularity is read first: the pixel grid adds 4-fold structure to any small region (pixels
    are squares) but never 3-fold structure.
    """
    if elongation > ELONGATED:
        return "irregular"
    if triangularity > 0.5:
        return "triangle"
    return "square" if squareness > 0.5 else "circle"


def _median_signature(blobs: list[Blob]) -> dict[str, float]:
    names = ("elongation", "triangularity", "squareness")
    return {name: float(np.median([getattr(blob, name) for blob in blobs])) for name in names}


def _shape_of(blobs: list[Blob]) -> str:
    return _classify_shape(**_median_signature(blobs))


def _observe_colour(per_frame: list[list[Blob]], fps: float) -> ColourObservation:
    tracks = _link_tracks(per_frame)
    signature = _median_signature([blob for track in tracks for blob in track])
    return ColourObservation(
        blobs=tuple(map(tuple, per_frame)),
        tracks=tuple(_summarise_track(track, fps) for track in tracks),
        shape=_classify_shape(**signature),
        triangularity=signature["triangularity"],
        squareness=signature["squareness"],
    )


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
    thirds = np.array_split(np.arange(len(blobs)), 3)
    return Track(
        blobs=tuple(blobs),
        shape=shape,
        shape_by_third=tuple(_shape_of([blobs[i] for i in third]) for third in thirds if len(third)),
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
    if turn is not None and abs(turn) > SPUN * scale:  # the world's spin is clockwise
        return ("spin" if turn > 0 else "unclear"), f"turned {math.degrees(abs(turn)):.0f} degrees {'clockwise' if turn > 0 else 'anticlockwise'}"
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
    """One check per attribute `expected` names (None means unnamed), plus one for unnamed objects."""
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
    observed = f"{usual} (as named in {matching}/{len(counts)} frames)"
    checks = [Check(subject, "count", str(count), observed, matching > MOST_FRAMES * len(counts))]
    attributes = {"shape": obj.shape, "size": obj.size, "motion": obj.motion, "speed": obj.speed}
    attributes["steadiness"] = "steady"  # asked of every object
    named = [(name, value) for name, value in attributes.items() if value is not None]
    if seen is None:
        return checks + [Check(subject, name, value, "not found", False) for name, value in named]
    measure = {"shape": _shape, "size": _size, "motion": _motion, "speed": _speed, "steadiness": _steadiness}
    for name, value in named:
        observed, passed = measure[name](seen, value)
        checks.append(Check(subject, name, value, observed, passed))
    return checks


def _shape(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    """The colour's pooled shape, and each object's own: one wrong member of a group is not outvoted."""
    observed = f"{seen.shape} (triangularity {seen.triangularity:.2f}, squareness {seen.squareness:.2f})"
    if len({track.shape for track in seen.tracks}) > 1:
        observed += f"; by object: {', '.join(track.shape for track in seen.tracks)}"
    return observed, seen.shape == expected and all(track.shape == expected for track in seen.tracks)


def _size(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    """Every object's own size, from its width at the start."""
    sizes = [min(SIZES, key=lambda name: abs(track.start_width - SIZES[name])) for track in seen.tracks]
    observed = "; ".join(f"{size} (width {track.start_width:.2f})" for size, track in zip(sizes, seen.tracks))
    return observed, all(size == expected for size in sizes)


def _motion(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    observed = "; ".join(f"{track.motion} ({track.motion_evidence})" for track in seen.tracks)
    return observed, all(_motion_holds(track.motion, expected) for track in seen.tracks)


def _motion_holds(observed: str, expected: str) -> bool:
    # A single frame cannot show a change, so only "still" (which claims none) holds there.
    return observed == expected or (observed == "not checkable" and expected == "still")


def _speed(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    """Net travel per second, the nearest of world.md's speeds (defined for left, right, up and down)."""
    if any(track.speed is None for track in seen.tracks):
        return "not checkable (a single frame shows no motion)", False
    if any(track.motion not in LINEAR_MOTIONS for track in seen.tracks):  # a still object is not "slow"
        return "; ".join(f"no travel to time ({track.motion})" for track in seen.tracks), False
    classes = [min(SPEEDS, key=lambda name: abs(track.speed - SPEEDS[name])) for track in seen.tracks]
    observed = "; ".join(f"{name} ({track.speed:.2f} per second)" for name, track in zip(classes, seen.tracks))
    return observed, all(name == expected for name in classes)


def _steadiness(seen: ColourObservation, expected: str) -> tuple[str, bool]:
    usual, held = Counter(seen.counts).most_common(1)[0]
    changed = [track.shape_by_third for track in seen.tracks if len(set(track.shape_by_third)) > 1]
    shape = f"shape changed ({', '.join(changed[0])})" if changed else "shape held"
    observed = f"count held in {held}/{len(seen.counts)} frames, {shape}"
    return observed, usual > 0 and held >= STEADY_COUNT * len(seen.counts) and not changed


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
        if colour not in named and sum(c > 0 for c in seen.counts) > MOST_FRAMES * observation.frames
    ]
    return Check("scene", "extra objects", "none", ", ".join(extras) or "none", not extras)
