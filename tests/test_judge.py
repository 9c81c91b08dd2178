"""The judge recognises every attribute of rendered Shapes World clips and rejects mismatches."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kinetoscope.cli import main
from kinetoscope.data import world
from kinetoscope.data.captions import parse_prompt
from kinetoscope.data.world import (BACKGROUNDS, COLORS, LINEAR_MOTIONS, MOTIONS, SHAPES, SIZES, SPEEDS, Scene,
                                    ShapeObject)
from kinetoscope.eval.calibrate import blur, h264, noise
from kinetoscope.data.judge import compare, judge, observe
from kinetoscope.media.video import write_video

FPS = 8.0
FRAMES = 17  # 2 seconds
# Starts that keep a small object inside the canvas for two seconds of its motion, even fast.
STARTS = {"right": (0.15, 0.5), "left": (0.85, 0.5), "down": (0.5, 0.15), "up": (0.5, 0.85), "bounce": (0.5, 0.25)}


def thing(color="red", shape="circle", size="medium", motion="still", speed=None, start=(0.5, 0.5)) -> ShapeObject:
    return ShapeObject(color, shape, size, motion, speed, start)


def scene_of(*objects: ShapeObject, background="black", relation=None) -> Scene:
    return Scene(tuple(objects), background, relation)


def render(scene: Scene, width=64, height=64, frames=FRAMES, fps=FPS) -> np.ndarray:
    return world.render(scene, width, height, frames, fps)


def changed(scene: Scene, **attributes) -> Scene:
    """The scene with these attributes changed on every object."""
    return replace(scene, objects=tuple(replace(obj, **attributes) for obj in scene.objects))


def failed_checks(verdict) -> set[str]:
    return {check.attribute for check in verdict.checks if not check.passed}


def assert_recognised(scene: Scene, frames: np.ndarray | None = None, fps: float = FPS) -> None:
    verdict = judge(render(scene) if frames is None else frames, scene, fps)
    assert verdict.passed, f"{scene}\n{verdict}"


def every_moving_object():
    """Small red objects of every shape in every motion (circles never spin), at both speeds."""
    for shape in SHAPES:
        for motion in MOTIONS:
            if motion == "spin" and shape == "circle":
                continue
            for speed in SPEEDS if motion in LINEAR_MOTIONS else (None,):
                yield thing(shape=shape, size="small", motion=motion, speed=speed, start=STARTS.get(motion, (0.5, 0.5)))


# ---------------------------------------------------------------------------------------------
# Every attribute renders as specified and is recognised


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_every_colour_on_every_background(background):
    for index, color in enumerate(COLORS):
        assert_recognised(scene_of(thing(color=color, shape=SHAPES[index % 3]), background=background))


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_and_size(shape):
    for size in SIZES:
        scene = scene_of(thing(shape=shape, size=size), background="gray")
        observation = observe(render(scene), FPS)
        assert compare(observation, scene).passed
        for other in SHAPES:
            if other != shape:
                assert failed_checks(compare(observation, changed(scene, shape=other))) == {f"red {other}: shape"}
        for other in SIZES:
            if other != size:
                assert failed_checks(compare(observation, changed(scene, size=other))) == {f"red {shape}: size"}


def test_every_motion_and_speed_is_recognised_and_no_other():
    for obj in every_moving_object():
        scene = scene_of(obj, background="white")
        observation = observe(render(scene), FPS)
        verdict = compare(observation, scene)
        assert verdict.passed, f"{obj}\n{verdict}"
        for motion in MOTIONS:
            if motion != obj.motion:
                wrong = changed(scene, motion=motion, speed=None)
                assert failed_checks(compare(observation, wrong)) == {f"red {obj.shape}: motion"}, (obj, motion)
        if obj.speed:
            other = "fast" if obj.speed == "slow" else "slow"
            assert failed_checks(compare(observation, changed(scene, speed=other))) == {f"red {obj.shape}: speed"}


def test_spin_reads_clockwise():
    scene = scene_of(thing(shape="triangle", motion="spin"))
    motion = next(check for check in judge(render(scene), scene, FPS).checks if check.name == "motion")
    assert "clockwise" in motion.observed and "anticlockwise" not in motion.observed


@pytest.mark.parametrize(
    ("relation", "starts"),
    [("left of", ((0.25, 0.5), (0.75, 0.5))), ("right of", ((0.75, 0.5), (0.25, 0.5))),
     ("above", ((0.5, 0.25), (0.5, 0.75))), ("below", ((0.5, 0.75), (0.5, 0.25)))],
)
def test_relations(relation, starts):
    red = thing(color="red", size="small", start=starts[0])
    blue = thing(color="blue", shape="square", size="small", start=starts[1])
    observation = observe(render(scene_of(red, blue)), FPS)
    assert compare(observation, scene_of(red, blue, relation=("red", relation, "blue"))).passed
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    wrong = scene_of(red, blue, relation=("red", opposite, "blue"))
    assert failed_checks(compare(observation, wrong)) == {"scene: relation"}


def test_groups_of_identical_objects():
    rising = thing(color="yellow", shape="square", size="small", motion="up", speed="slow")
    group = tuple(replace(rising, start=(x, 0.8)) for x in (0.2, 0.5, 0.8))
    assert_recognised(scene_of(*group))
    assert_recognised(scene_of(*group[:2], thing(color="cyan", shape="triangle", motion="spin", start=(0.5, 0.3))))


def test_sampled_scenes_at_several_sizes():
    rng = np.random.default_rng(7)
    for width, height in ((64, 64), (96, 64), (128, 128), (64, 96), (32, 32)):
        for _ in range(6):
            scene = world.sample_scene(rng, width / height)
            assert_recognised(scene, render(scene, width, height))


# ---------------------------------------------------------------------------------------------
# Mismatches are rejected


def test_rejects_mismatched_attributes():
    scene = scene_of(thing(motion="right", speed="slow", start=(0.3, 0.5)), background="black")
    observation = observe(render(scene), FPS)
    red = scene.objects[0]
    cases = {
        "colour": scene_of(replace(red, color="blue")),
        "shape": scene_of(replace(red, shape="square")),
        "motion": scene_of(replace(red, motion="left")),
        "background": scene_of(red, background="white"),
        "count": scene_of(red, replace(red, start=(0.3, 0.2))),
    }
    for name, wrong in cases.items():
        assert not compare(observation, wrong).passed, name
    assert "blue circle: count" in failed_checks(compare(observation, cases["colour"]))
    assert failed_checks(compare(observation, cases["count"])) >= {"red circles: count"}


def test_one_wrong_member_of_a_group_is_not_outvoted():
    """A group is right only when every member is: its shape and size are judged object by object."""
    starts = ((0.2, 0.3), (0.5, 0.7), (0.8, 0.3))
    squares = scene_of(*(thing(shape="square", start=start) for start in starts))
    assert_recognised(squares)
    odd_shape = scene_of(*(thing(shape="square", start=start) for start in starts[:2]), thing(shape="circle", start=starts[2]))
    assert failed_checks(judge(render(odd_shape), squares, FPS)) == {"red squares: shape"}
    odd_size = scene_of(*(thing(shape="square", start=start) for start in starts[:2]), thing(shape="square", size="large", start=starts[2]))
    assert failed_checks(judge(render(odd_size), squares, FPS)) == {"red squares: size"}


def test_speed_is_not_read_off_an_object_that_does_not_travel():
    sliding = scene_of(thing(motion="left", speed="slow", start=(0.7, 0.5)))
    assert_recognised(sliding)
    still = render(changed(sliding, motion="still", speed=None))
    assert failed_checks(judge(still, sliding, FPS)) == {"red circle: motion", "red circle: speed"}


def test_an_anticlockwise_turn_is_not_the_world_spin():
    spinning = scene_of(thing(shape="square", motion="spin"))
    backwards = render(spinning)[:, :, ::-1]  # mirrored left to right: the same turn, anticlockwise
    assert "red square: motion" in failed_checks(judge(backwards, spinning, FPS))


def test_rejects_an_extra_object():
    red, blue = thing(color="red", start=(0.3, 0.5)), thing(color="blue", shape="square", start=(0.7, 0.5))
    verdict = judge(render(scene_of(red, blue)), scene_of(red), FPS)
    assert failed_checks(verdict) == {"scene: extra objects"}
    assert "blue square" in str(verdict)


def test_flicker_and_shape_change_are_unsteady():
    circle = scene_of(thing(shape="circle"))
    flicker = render(circle)
    flicker[6:9] = 0  # the circle vanishes for three frames (the background is black)
    assert failed_checks(judge(flicker, circle, FPS)) == {"red circle: steadiness"}
    morph = np.concatenate([render(circle)[:9], render(scene_of(thing(shape="square")))[9:]])
    assert "red circle: steadiness" in failed_checks(judge(morph, circle, FPS))


def test_mismatched_scenes_are_rejected():
    rng = np.random.default_rng(11)
    scenes = [world.sample_scene(rng) for _ in range(12)]
    for scene, other in zip(scenes, scenes[1:] + scenes[:1]):
        assert not judge(render(scene), other, FPS).passed


# ---------------------------------------------------------------------------------------------
# Degraded clips, other lengths


def test_degraded_clips_still_pass():
    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng) for _ in range(10)]
    with tempfile.TemporaryDirectory() as workdir:
        for degrade in (blur, noise, h264):
            passed = sum(judge(degrade(render(scene), rng, Path(workdir)), scene, FPS).passed for scene in scenes)
            assert passed >= 9, degrade.__name__


def test_observations_match_blas_products(monkeypatch):
    # The judge multiplies pixels by palette colours without BLAS (whose spinning threads slow the
    # denoising after a check); its observations must be exactly those of the BLAS products.
    rng = np.random.default_rng(5)
    clips = [noise(render(world.sample_scene(rng)), rng, None) for _ in range(6)]
    ours = [observe(clip, FPS) for clip in clips]
    monkeypatch.setattr("kinetoscope.data.judge._thin_product", lambda a, b: a @ b.T)
    assert ours == [observe(clip, FPS) for clip in clips]


def test_single_frame_clip():
    still = scene_of(thing(shape="square", size="large"), background="white")
    assert_recognised(still, render(still, frames=1))
    moving = scene_of(thing(shape="square", motion="right", speed="fast", start=(0.2, 0.5)))
    verdict = judge(render(moving, frames=1), moving, FPS)
    assert failed_checks(verdict) == {"red square: motion", "red square: speed"}
    assert "not checkable" in str(verdict)


@pytest.mark.parametrize(("frames", "fps"), [(5, 8.0), (2, 8.0), (49, 24.0), (33, 8.0)])
def test_other_clip_lengths(frames, fps):
    seconds = (frames - 1) / fps
    speed = "fast" if seconds <= 2 else "slow"  # so that it stays inside the canvas
    objects = [
        thing(motion="right", speed=speed, size="small", start=(0.15, 0.5)),
        thing(shape="triangle", motion="grow", size="small"),
        thing(motion="still"),
    ]
    if frames > 2:  # one step of 22.5 degrees is too little turn to tell from noise
        objects.append(thing(shape="square", motion="spin"))
    if seconds >= 1.2:  # a bounce needs time to fall and rise
        objects.append(thing(motion="bounce", size="small", start=(0.5, 0.25)))
    for obj in objects:
        scene = scene_of(obj)
        assert_recognised(scene, render(scene, frames=frames, fps=fps), fps)


def test_prompts_leave_unnamed_attributes_unchecked():
    falling = thing(color="green", shape="triangle", size="large", motion="down", speed="slow", start=(0.5, 0.3))
    truth = scene_of(falling, background="gray")
    verdict = judge(render(truth), parse_prompt("a green triangle moves down"), FPS)
    assert verdict.passed, str(verdict)
    assert {check.name for check in verdict.checks} == {"count", "shape", "motion", "steadiness", "extra objects"}


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_exit_codes(tmp_path, capsys):
    scene = scene_of(thing(color="red", motion="right", speed="slow", start=(0.3, 0.5)))
    video = write_video(tmp_path / "clip.mp4", render(scene), FPS)
    assert main(["judge", str(video), "--prompt", "a red circle moves to the right on a black background"]) == 0
    out = capsys.readouterr().out
    assert "PASS  red circle: motion  expected right, observed right" in out
    assert main(["judge", str(video), "--prompt", "a red square moves to the left"]) == 1
    assert "FAIL  red square: shape" in capsys.readouterr().out
    assert main(["judge", str(video), "--prompt", "a red circle wobbles"]) == 2
    assert "wobbles" in capsys.readouterr().err
    assert main(["judge", str(tmp_path / "missing.mp4"), "--prompt", "a red circle moves right"]) == 2
    (tmp_path / "text.mp4").write_text("not a video")
    assert main(["judge", str(tmp_path / "text.mp4"), "--prompt", "a red circle moves right"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
