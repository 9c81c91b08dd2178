"""A scene's layout in the two forms the generator uses: heatmaps on a token grid, and object slots.

Heatmaps (`layout_maps`): for every token of a clip's (T, H, W) grid, how near it is to the centre
of each object, one channel per shape and one per colour, at the time each latent step shows (a
centre is a Gaussian as wide as a quarter of its object, so its spread also says how big the object
is). Layout supervision trains a probe to predict them from the transformer's tokens; a model with
`layout_channels` takes them as an input, so that where each object is has been decided before the
denoiser paints it.

Silhouettes (`silhouette_maps`): what each object covers, drawn with the world's own geometry at a
resolution finer than the tokens (SILHOUETTE_CELLS x SILHOUETTE_CELLS cells per token, every frame
a latent step stands for), one block of channels per colour. Heatmaps say where a centre is;
a silhouette also says which shape, how big, and how it turns and moves from frame to frame, the
attributes a small denoiser shown only centres gets wrong. Like a segmentation map given to an
image model, it is drawn from a plan (the truth in training, the planner's objects at sampling).

Slots (`scene_to_slots`, `slots_to_objects`): the objects of a scene as a (MAX_OBJECTS, SLOT_FEATURES)
array a layout planner can generate, one row per object: whether the slot holds an object, one-hot
colour, shape, size, motion and speed (as -1/+1), and the start centre (as -1..1 of the canvas).
Rows beyond the scene's objects say "none" and are zero elsewhere. A planner learns them in the
order its caption names the objects (`in_mention_order`), so that slot k has one place in the
prompt to read: which colour goes with which shape and motion is then a matter of where to look.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from kinetoscope.data import captions, world

LAYOUT_CHANNELS = len(world.SHAPES) + len(world.COLORS)
MIN_SPREAD = 0.5  # tokens: the narrowest centre Gaussian, so a small object between tokens still lights them
MAX_OBJECTS = world.SceneConstraints().max_objects
SLOT_GROUPS = {  # name -> the choices its one-hot columns stand for, in column order
    "color": tuple(world.COLORS),
    "shape": world.SHAPES,
    "size": tuple(world.SIZES),
    "motion": world.MOTIONS,
    "speed": tuple(world.SPEEDS),
}
# A planner with attribute tokens (models/planner.py `token_features`) reads each slot as three:
# what the object is (present, colour, shape, size), how it moves (motion, speed), where it starts.
SLOT_TOKEN_FEATURES = (1 + sum(len(SLOT_GROUPS[name]) for name in ("color", "shape", "size")),
                       len(SLOT_GROUPS["motion"]) + len(SLOT_GROUPS["speed"]), 2)
# Or as four (`identity_kind`): which object it is (present, colour), what else it is (shape, size),
# how it moves, where it starts; every token also sees the first kind, so a slot's motion can find
# its object's words by its colour, the word that names one object in a caption.
SLOT_IDENTITY_TOKEN_FEATURES = (1 + len(SLOT_GROUPS["color"]), len(SLOT_GROUPS["shape"]) + len(SLOT_GROUPS["size"]),
                                *SLOT_TOKEN_FEATURES[1:])
SILHOUETTE_CELLS = 4  # cells per token along each side; at 16-pixel tokens a cell is 4 pixels
SLOT_FEATURES = 1 + sum(len(choices) for choices in SLOT_GROUPS.values()) + 2  # present, one-hots, start (x, y)


def latent_step_times(frames: int, steps: int, fps: float) -> np.ndarray:
    """(steps,) the time each latent step shows: the causal autoencoder encodes the first frame
    alone and each later step from the frames since the previous one; a step stands for their mean."""
    if steps == 1:
        return np.zeros(1)
    per_step = (frames - 1) // (steps - 1)
    last_frames = np.arange(1, steps) * per_step
    return np.concatenate([[0.0], (last_frames - (per_step - 1) / 2) / fps])


def layout_maps(clips: Sequence[Sequence[world.ShapeObject]], size: tuple[int, int], frames: int, fps: float,
                grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, LAYOUT_CHANNELS) heatmaps of the centres of each clip's objects on the (T, H, W) token
    grid of clips of `size` (width, height) pixels and `frames` frames, tokens in row-major order like
    the transformer's."""
    t_steps, rows, cols = grid
    width, height = size
    canvas = world.canvas_units(width, height)
    times = latent_step_times(frames, t_steps, fps)
    duration = (frames - 1) / fps
    tokens_per_unit = min(width, height) * cols / width  # tokens along one short-side unit
    row_centres = (np.arange(rows) + 0.5)[None, :, None]
    col_centres = (np.arange(cols) + 0.5)[None, None, :]
    maps = np.zeros((len(clips), LAYOUT_CHANNELS, t_steps, rows, cols), dtype=np.float32)
    for index, objects in enumerate(clips):
        for obj in objects:
            x, y, object_width, _ = world.trajectory(obj, canvas, times, duration)
            centre_col = (x / canvas[0] * cols)[:, None, None]
            centre_row = (y / canvas[1] * rows)[:, None, None]
            spread = np.maximum(object_width * tokens_per_unit / 4, MIN_SPREAD)[:, None, None]
            heat = np.exp(-((col_centres - centre_col) ** 2 + (row_centres - centre_row) ** 2) / (2 * spread ** 2))
            for channel in (world.SHAPES.index(obj.shape), len(world.SHAPES) + list(world.COLORS).index(obj.color)):
                np.maximum(maps[index, channel], heat, out=maps[index, channel])
    return torch.from_numpy(maps).flatten(2).transpose(1, 2)


def silhouette_channels(frames_per_step: int) -> int:
    """Silhouette channels per token for latents whose steps each stand for `frames_per_step` frames."""
    return len(world.COLORS) * frames_per_step * SILHOUETTE_CELLS ** 2


def silhouette_maps(clips: Sequence[Sequence[world.ShapeObject]], size: tuple[int, int], frames: int, fps: float,
                    grid: tuple[int, int, int], frames_per_step: int) -> torch.Tensor:
    """(B, N, silhouette_channels(frames_per_step)) how much of each cell of each token each colour's
    objects cover, on the (T, H, W) token grid of clips of `size` (width, height) pixels and `frames`
    frames. A token's channels run colour, frame of its step, cell row, cell column. The first latent
    step stands for the first frame alone (the causal autoencoder's), drawn in each of its frame slots."""
    t_steps, rows, cols = grid
    if frames != 1 + (t_steps - 1) * frames_per_step:
        raise ValueError(f"{frames} frames do not make {t_steps} latent steps of {frames_per_step} frames after the first")
    cells = SILHOUETTE_CELLS
    # Frame indices each step's slots show: step 0 the first frame throughout, step k frames (k-1)*f+1 .. k*f.
    shown = np.concatenate([np.zeros(frames_per_step, dtype=int), np.arange(1, frames)])
    per_color = frames_per_step * cells * cells
    maps = np.zeros((len(clips), t_steps, rows, cols, len(world.COLORS) * per_color), dtype=np.float32)
    for index, objects in enumerate(clips):
        for obj in objects:
            cover = world.coverage(obj, cols * cells, rows * cells, frames, fps)[shown]  # (T*f, rows*cells, cols*cells)
            cover = cover.reshape(t_steps, frames_per_step, rows, cells, cols, cells).transpose(0, 2, 4, 1, 3, 5)
            first = list(world.COLORS).index(obj.color) * per_color
            block = slice(first, first + per_color)
            np.maximum(maps[index, ..., block], cover.reshape(t_steps, rows, cols, per_color), out=maps[index, ..., block])
    return torch.from_numpy(maps).flatten(1, 3)


def layout_inputs(clips: Sequence[Sequence[world.ShapeObject]], size: tuple[int, int], frames: int, fps: float,
                  grid: tuple[int, int, int], frames_per_step: int | None) -> torch.Tensor:
    """(B, N, channels) what a layout model is shown: the centre heatmaps, then, given the frames per
    latent step (a model with silhouette channels), the silhouettes."""
    heatmaps = layout_maps(clips, size, frames, fps, grid)
    if frames_per_step is None:
        return heatmaps
    return torch.cat([heatmaps, silhouette_maps(clips, size, frames, fps, grid, frames_per_step)], dim=-1)


def scene_objects(scenes: Sequence[dict]) -> list[tuple[world.ShapeObject, ...]]:
    """The objects of scenes given as dicts (a dataset batch's "scene")."""
    return [world.Scene.from_dict(scene).objects for scene in scenes]


def in_mention_order(objects: Sequence[world.ShapeObject], caption: str) -> list[world.ShapeObject]:
    """The objects in the order `caption` first names their colour (a colour names one kind of
    object in Shapes World, so it tells the objects of a caption apart); a group stays together."""
    named = [obj.color for obj in captions.parse_prompt(caption).objects]
    return sorted(objects, key=lambda obj: named.index(obj.color))


def slot_columns(name: str) -> slice:
    """Where a slot's one-hot `name` (a SLOT_GROUPS key) lies among its features."""
    first = 1 + sum(len(choices) for group, choices in itertools.takewhile(lambda item: item[0] != name, SLOT_GROUPS.items()))
    return slice(first, first + len(SLOT_GROUPS[name]))


def scene_to_slots(objects: Sequence[world.ShapeObject]) -> np.ndarray:
    """(MAX_OBJECTS, SLOT_FEATURES) float32: one row per object, in the order given, then empty rows."""
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, not {len(objects)}")
    slots = np.zeros((MAX_OBJECTS, SLOT_FEATURES), dtype=np.float32)
    slots[:, 0] = -1.0
    for row, obj in enumerate(objects):
        slots[row, 0] = 1.0
        for name, choices in SLOT_GROUPS.items():
            slots[row, slot_columns(name)] = [1.0 if getattr(obj, name) == choice else -1.0 for choice in choices]
        slots[row, -2:] = 2 * np.asarray(obj.start, dtype=np.float32) - 1
    return slots


def slots_to_objects(slots: np.ndarray) -> tuple[world.ShapeObject, ...]:
    """The objects of (MAX_OBJECTS, SLOT_FEATURES) slots as a planner generated them: each slot whose
    first feature is positive, with the likeliest of each choice, its start kept on the canvas. A
    circle never spins and only moves left, right, up or down at a speed, as in the world."""
    objects = []
    for row in np.asarray(slots, dtype=np.float32):
        if row[0] <= 0:
            continue
        chosen = {}
        for name, choices in SLOT_GROUPS.items():
            scores = row[slot_columns(name)]
            if name == "motion" and chosen["shape"] == "circle":
                scores = np.where(np.asarray(choices) == "spin", -np.inf, scores)
            chosen[name] = choices[int(np.argmax(scores))]
        speed = chosen["speed"] if chosen["motion"] in world.LINEAR_MOTIONS else None
        start = tuple(float(v) for v in np.clip((row[-2:] + 1) / 2, 0.0, 1.0))
        objects.append(world.ShapeObject(chosen["color"], chosen["shape"], chosen["size"], chosen["motion"], speed, start))
    return tuple(objects)


def plan_states(objects: Sequence[world.ShapeObject], stated: world.Scene) -> bool:
    """Whether a plan says all that `stated` (a parsed prompt, None where it says nothing) does: as
    many objects of each colour, each with the stated shape, size, motion and speed, and the stated
    relation between where the two colours start (a colour names one kind of object)."""
    wanted = {obj.color: (obj, count) for obj, count in stated.groups()}
    counts = {color: sum(obj.color == color for obj in objects) for color in {obj.color for obj in objects} | set(wanted)}
    if any(counts[color] != wanted.get(color, (None, 0))[1] for color in counts):
        return False
    for obj in objects:
        want = wanted[obj.color][0]
        if any(getattr(want, name) not in (None, getattr(obj, name)) for name in ("shape", "size", "motion", "speed")):
            return False
    if stated.relation is None:
        return True
    first, relation, second = stated.relation
    axis = 0 if relation in ("left of", "right of") else 1
    start = {color: np.mean([obj.start[axis] for obj in objects if obj.color == color]) for color in (first, second)}
    return (start[first] < start[second]) == (relation in ("left of", "above"))


def describe_objects(objects: Sequence[world.ShapeObject]) -> str:
    """A plan in words, e.g. "a small red circle moving right fast from (0.20, 0.50)", for people to read."""
    def one(obj: world.ShapeObject) -> str:
        motion = {"still": "staying still", "bounce": "bouncing", "grow": "growing", "shrink": "shrinking", "spin": "spinning"}.get(
            obj.motion, f"moving {obj.motion}")
        speed = f" {obj.speed}" if obj.speed else ""
        return f"a {obj.size} {obj.color} {obj.shape} {motion}{speed} from ({obj.start[0]:.2f}, {obj.start[1]:.2f})"

    return "; ".join(one(obj) for obj in objects) or "no objects"
