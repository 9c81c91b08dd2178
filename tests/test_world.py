"""Shapes World: sampling, geometry of every attribute, determinism, dataset buckets."""

import math

import numpy as np
import pytest
import torch

from kinetoscope.data import world
from kinetoscope.data.dataset import DEFAULT_BUCKETS, Bucket, ShapesWorldDataset
from kinetoscope.data.world import COLORS, Scene, ShapeObject


def single(shape="square", color="red", size="large", motion="still", speed=None, start=(0.5, 0.5), background="black"):
    return Scene((ShapeObject(color, shape, size, motion, speed, start),), background)


def mask_of(frame, color):
    return np.all(np.abs(frame.astype(int) - np.array(COLORS[color])) < 30, axis=-1)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def test_sampling_is_deterministic_and_covers_the_vocabulary():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    scenes_a = [world.sample_scene(rng_a) for _ in range(300)]
    scenes_b = [world.sample_scene(rng_b) for _ in range(300)]
    assert scenes_a == scenes_b
    objects = [o for s in scenes_a for o in s.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(world.SHAPES)
    assert {o.size for o in objects} == set(world.SIZES)
    assert {o.motion for o in objects} == set(world.MOTIONS)
    assert {o.speed for o in objects} == {None, "slow", "fast"}
    assert {s.background for s in scenes_a} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in scenes_a} == {1, 2, 3}
    assert {r[1] for s in scenes_a if (r := s.relation)} == set(world.RELATIONS)
    assert not any(o.shape == "circle" and o.motion == "spin" for o in objects)
    assert all((o.speed is not None) == (o.motion in world.LINEAR_MOTIONS) for o in objects)


def test_each_colour_names_one_kind_of_object_and_groups_are_identical():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = world.sample_scene(rng)
        for obj, count in scene.groups():
            same = [o for o in scene.objects if o.color == obj.color]
            assert len(same) == count
            assert all((o.shape, o.size, o.motion, o.speed) == (obj.shape, obj.size, obj.motion, obj.speed) for o in same)


def test_render_is_deterministic_and_sized():
    scene = world.sample_scene(np.random.default_rng(1))
    a = world.render(scene, 96, 64, 17, 8)
    assert a.shape == (17, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, world.render(scene, 96, 64, 17, 8))


@pytest.mark.parametrize("background", list(world.BACKGROUNDS))
def test_background_colour(background):
    frame = world.render(single(size="small", background=background), 64, 64, 1, 8)[0]
    assert tuple(frame[0, 0]) == world.BACKGROUNDS[background]


@pytest.mark.parametrize("shape,fill", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_shape_fills_its_bounding_box(shape, fill):
    frame = world.render(single(shape=shape), 256, 256, 1, 8)[0]
    mask = mask_of(frame, "red")
    ys, xs = np.nonzero(mask)
    box = (np.ptp(xs) + 1) * (np.ptp(ys) + 1)
    assert mask.sum() / box == pytest.approx(fill, abs=0.04)


@pytest.mark.parametrize("size", list(world.SIZES))
def test_size_is_width_over_shorter_side(size):
    frame = world.render(single(size=size), 200, 100, 1, 8)[0]
    xs = np.nonzero(mask_of(frame, "red"))[1]
    assert (np.ptp(xs) + 1) / 100 == pytest.approx(world.SIZES[size], abs=0.02)


@pytest.mark.parametrize("motion,speed", [("left", "slow"), ("right", "fast"), ("up", "fast"), ("down", "slow")])
def test_linear_motion_travels_at_its_speed(motion, speed):
    start = {"left": (0.8, 0.5), "right": (0.2, 0.5), "up": (0.5, 0.8), "down": (0.5, 0.2)}[motion]
    video = world.render(single(size="small", motion=motion, speed=speed, start=start), 128, 128, 17, 8)
    (x0, y0), (x1, y1) = centroid(mask_of(video[0], "red")), centroid(mask_of(video[-1], "red"))
    dx, dy = world.LINEAR_MOTIONS[motion]
    expected = world.SPEEDS[speed] * 2.0 * 128  # two seconds
    assert (x1 - x0, y1 - y0) == pytest.approx((dx * expected, dy * expected), abs=1.5)


@pytest.mark.parametrize("motion,ratio", [("grow", world.GROW_FACTOR**2), ("shrink", world.SHRINK_FACTOR**2)])
def test_grow_and_shrink_change_area(motion, ratio):
    video = world.render(single(size="large", motion=motion), 256, 256, 17, 8)
    assert mask_of(video[-1], "red").sum() / mask_of(video[0], "red").sum() == pytest.approx(ratio, rel=0.08)


def test_bounce_falls_then_rises():
    video = world.render(single(shape="circle", size="small", motion="bounce", start=(0.5, 0.2)), 128, 128, 17, 8)
    ys = [centroid(mask_of(f, "red"))[1] for f in video]
    lowest = int(np.argmax(ys))
    assert 0 < lowest < 16
    assert ys[lowest] - ys[0] > 0.3 * 128 and ys[lowest] - ys[-1] > 0.1 * 128
    assert max(np.nonzero(mask_of(video[lowest], "red"))[0]) <= 127  # reaches, never crosses, the floor


def test_every_shape_bounces_on_the_same_floor():
    """The floor is where the shape's lowest point turns: a triangle's base, not its circumradius."""
    floors = {}
    for shape in world.SHAPES:
        video = world.render(single(shape=shape, motion="bounce", start=(0.5, 0.3)), 128, 128, 33, 16)
        floors[shape] = max(np.nonzero(mask_of(frame, "red"))[0].max() for frame in video)
    assert max(floors.values()) - min(floors.values()) <= 1, floors


def test_spin_turns_clockwise_a_full_turn_in_two_seconds():
    video = world.render(single(shape="triangle", motion="spin"), 128, 128, 17, 8)
    apex_up, quarter = mask_of(video[0], "red"), mask_of(video[4], "red")  # t = 0 and 0.5 s
    cx, cy = centroid(apex_up)
    ys, xs = np.nonzero(apex_up)
    assert ys.min() < cy - 20  # apex above the centroid
    ys, xs = np.nonzero(quarter)
    assert xs.max() > cx + 20  # a quarter turn clockwise points the apex right
    assert np.array_equal(mask_of(video[0], "red"), mask_of(video[16], "red"))  # full turn after 2 s


def test_relation_matches_start_positions():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(300):
        scene = world.sample_scene(rng)
        if scene.relation is None:
            continue
        a, word, b = scene.relation
        pa = next(o for o in scene.objects if o.color == a).start
        pb = next(o for o in scene.objects if o.color == b).start
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[word]
        assert sign * (pa[axis] - pb[axis]) > 0
        checked += 1
    assert checked > 20


def test_objects_stay_inside_and_never_overlap():
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = world.sample_scene(rng, aspect=1.0, seconds=2.0)
        video = world.render(scene, 64, 64, 17, 8)
        for obj, count in scene.groups():
            # A rendered object of a colour never touches the border (fully inside the canvas).
            mask = mask_of(video, obj.color)
            assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())


def test_scene_dict_round_trip():
    scene = world.sample_scene(np.random.default_rng(2))
    assert Scene.from_dict(scene.to_dict()) == scene


def test_dataset_buckets_and_determinism():
    buckets = [Bucket(64, 64, 1), Bucket(96, 64, 5), Bucket(64, 96, 9), Bucket(128, 128, 17)]
    dataset = ShapesWorldDataset(buckets=buckets, pixels_per_batch=4 * 64 * 64 * 9, seed=3)
    seen = {}
    for batch, _ in zip(dataset, range(12)):
        b = batch["bucket"]
        assert batch["video"].shape == (dataset.batch_size(b), 3, b.frames, b.height, b.width)
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert len(batch["caption"]) == len(batch["scene"]) == batch["video"].shape[0]
        seen[b] = True
    assert len(seen) >= 3
    first = next(iter(ShapesWorldDataset(buckets=buckets, seed=3)))
    again = next(iter(ShapesWorldDataset(buckets=buckets, seed=3)))
    other = next(iter(ShapesWorldDataset(buckets=buckets, seed=4)))
    assert torch.equal(first["video"], again["video"]) and first["caption"] == again["caption"]
    assert first["scene"] != other["scene"]


def test_motion_weights_make_a_motion_more_common_and_refuse_nonsense():
    def share_of_bouncing_scenes(motion_weights):
        dataset = ShapesWorldDataset(seed=0, motion_weights=motion_weights)
        rng = np.random.default_rng(5)
        scenes = [dataset.sample_scene(rng, 1.0, 2.0, world.SceneConstraints()) for _ in range(400)]
        return np.mean([any(obj.motion == "bounce" for obj in scene.objects) for scene in scenes])

    unweighted = ShapesWorldDataset(seed=0, motion_weights={"bounce": 1.0})  # recipes without weights keep their stream
    through_dataset, through_world = np.random.default_rng(9), np.random.default_rng(9)
    drawn = [unweighted.sample_scene(through_dataset, 1.0, 2.0, world.SceneConstraints()) for _ in range(20)]
    assert drawn == [world.sample_scene(through_world, 1.0, 2.0) for _ in range(20)]
    plain, weighted = share_of_bouncing_scenes(None), share_of_bouncing_scenes({"bounce": 3.0})
    assert weighted > 1.5 * plain  # 3x the odds of a scene with a bounce against one without
    for wrong in ({"hop": 2.0}, {"bounce": 0}, {"bounce": -1.0}, {"bounce": "2"}, {"bounce": float("inf")}, [("bounce", 2.0)]):
        with pytest.raises(ValueError, match="motion_weights"):
            ShapesWorldDataset(motion_weights=wrong)


def test_dataloader_workers_draw_different_streams():
    dataset = ShapesWorldDataset(buckets=[Bucket(64, 64, 1)], pixels_per_batch=64 * 64 * 4, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    batches = [b for b, _ in zip(loader, range(2))]  # one from each worker
    assert batches[0]["scene"] != batches[1]["scene"]


def test_default_buckets_cover_images_and_aspect_ratios():
    assert {b.frames for b in DEFAULT_BUCKETS} == {1, 5, 9, 17}
    assert {(b.width, b.height) for b in DEFAULT_BUCKETS} >= {(64, 64), (96, 64), (64, 96), (128, 128)}


def test_world_sample_cli_writes_clips_metadata_and_contact_sheet(tmp_path):
    import json

    from kinetoscope.cli import main
    from kinetoscope.data.captions import parse_prompt
    from kinetoscope.media.video import video_info

    assert main(["world", "sample", "--count", "3", "--out", str(tmp_path), "--size", "96x64", "--seconds", "1", "--seed", "5"]) == 0
    for index in range(3):
        info = video_info(tmp_path / f"clip_{index:04d}.mp4")
        assert (info["width"], info["height"], info["frames"], info["codec"]) == (96, 64, 9, "h264")
        meta = json.loads((tmp_path / f"clip_{index:04d}.json").read_text())
        assert meta["size"] == [96, 64] and meta["frames"] == 9 and meta["fps"] == 8.0
        assert meta["background"] in world.BACKGROUNDS and len(meta["captions"]) >= 2
        assert meta["relation"] is None or meta["relation"][1] in world.RELATIONS
        for obj in meta["objects"]:
            assert set(obj) == {"color", "shape", "size", "motion", "speed", "start"}
        for caption in meta["captions"]:
            parsed = parse_prompt(caption)
            assert sorted(o.color for o in parsed.objects) == sorted(o["color"] for o in meta["objects"])
    assert (tmp_path / "contact_sheet.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args",
    [["--size", "0x5"], ["--count", "0"], ["--fps", "-1"], ["--fps", "1e-9"], ["--size", "big"], ["--seed", "-1"],
     ["--size", "4096x4096", "--seconds", "10"]],
)
def test_world_sample_cli_bad_inputs(tmp_path, capsys, args):
    from kinetoscope.cli import main

    assert main(["world", "sample", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kinetoscope world sample: error: "), err  # named as argparse names it
    assert not (tmp_path / "out").exists()
