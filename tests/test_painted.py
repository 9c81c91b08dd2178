"""Painted pairs: a layout generator's latents of training scenes, and a decoder tuned on them."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kinetoscope.cli import main
from kinetoscope.data import captions, world
from kinetoscope.data.judge import Check, Verdict
from kinetoscope.models.autoencoder import VideoAutoencoder
from kinetoscope.models.dit import DiffusionTransformer, config_for
from kinetoscope.models.planner import LayoutPlanner
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.pipelines import text_to_video
from kinetoscope.pipelines.text_to_video import SamplingSettings, TextToVideo, redraw_seed
from kinetoscope.training.autoencoder import train as train_autoencoder
from kinetoscope.training.common import RecipeError
from kinetoscope.training.painted import PaintedPairs, encoder_fingerprint, paint_pairs, painted_background

sys.path.insert(0, str(Path(__file__).parent))
from test_generator import TINY_AE  # noqa: E402
from test_layout import TINY_PLANNER  # noqa: E402
from test_training import TINY_AUTOENCODER_RECIPE  # noqa: E402

SIZE, SECONDS = (32, 32), 0.5  # 5 frames at 8 fps: two latent steps


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A layout generator folder (random weights, 2 sampling steps) and its pipeline."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("painted")
    VideoAutoencoder(TINY_AE).to(torch.bfloat16).save_pretrained(root / "autoencoder")  # as shipped: an export keeps it exactly
    transformer = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1, layout_channels=11))
    for p in transformer.parameters():  # open the adaLN-Zero gates and the layout input, so the latents depend on the plan
        torch.nn.init.normal_(p, std=0.05)
    transformer.save_pretrained(root / "generator")
    LayoutPlanner(TINY_PLANNER).save_pretrained(root / "generator" / "planner")
    (root / "generator" / "pipeline.json").write_text(json.dumps(
        {"autoencoder": "../autoencoder", "planner": "planner", "fps": 8.0, "sampling": {"steps": 2, "guidance": 2.0}}))
    return root, TextToVideo.load(root / "generator", "cpu")


def test_pairs_are_training_scenes_painted_from_their_true_plans_and_resume_as_if_never_stopped(generator, tmp_path):
    root, pipe = generator
    whole = paint_pairs(pipe, tmp_path / "whole.pt", 3, seed=5, size=SIZE, seconds=SECONDS)
    paint_pairs(pipe, tmp_path / "resumed.pt", 2, seed=5, size=SIZE, seconds=SECONDS)
    resumed = paint_pairs(pipe, tmp_path / "resumed.pt", 3, seed=5, size=SIZE, seconds=SECONDS)
    loaded = PaintedPairs.load(tmp_path / "whole.pt")
    assert len(whole) == len(loaded) == len(resumed) == 3 and loaded.latents.shape == (3, 8, 2, 4, 4)
    assert torch.equal(loaded.latents, resumed.latents) and loaded.scenes == resumed.scenes
    assert not any(captions.is_heldout_scene(scene) for scene in loaded.scenes)
    assert loaded.encoder == encoder_fingerprint(pipe.autoencoder) and (loaded.size, loaded.frames) == (SIZE, 5)
    other = paint_pairs(pipe, tmp_path / "other.pt", 3, seed=6, size=SIZE, seconds=SECONDS)
    assert other.scenes != loaded.scenes

    # Each pair's latents are what the generator painted from the scene's objects, and the scene's
    # background is the one it painted.
    from kinetoscope.training.painted import pair_scene
    scene, prompt, noise_seed = pair_scene(5, 1, 1.0, 0.5)
    video = pipe(prompt, width=32, height=32, frames=5, seed=noise_seed, plan=scene.objects)
    torch.testing.assert_close(loaded.latents[1], video.latents[0].to(torch.bfloat16))
    assert loaded.scenes[1].objects == scene.objects and loaded.scenes[1].background == painted_background(video.frames)
    assert loaded.clips([1]).shape == (1, 3, 5, 32, 32)

    with pytest.raises(ValueError, match="another seed, size, length or latent space"):
        paint_pairs(pipe, tmp_path / "whole.pt", 4, seed=6, size=SIZE, seconds=SECONDS)
    plain = TextToVideo(DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1)), pipe.autoencoder, pipe.text_encoder)
    with pytest.raises(ValueError, match="need a layout model"):
        paint_pairs(plain, tmp_path / "plain.pt", 1, size=SIZE, seconds=SECONDS)
    (tmp_path / "junk.pt").write_bytes(b"not pairs")
    with pytest.raises(ValueError, match="is not a file of painted pairs"):
        PaintedPairs.load(tmp_path / "junk.pt")


def test_a_decoder_learns_from_painted_pairs_and_the_encoder_stays(generator, tmp_path):
    root, pipe = generator
    pairs = tmp_path / "pairs.pt"
    paint_pairs(pipe, pairs, 4, seed=1, size=SIZE, seconds=SECONDS)
    base = TINY_AUTOENCODER_RECIPE.replace("blocks_per_level = 1", f'blocks_per_level = 1\ninit = "{root / "autoencoder"}"')
    tuned = base.replace("workers = 0\n", "workers = 0\nfreeze_encoder = true\npainted_share = 1.0\n").replace(
        "seed = 3\n", f'seed = 3\npainted = ["{pairs}"]\n')
    recipe = tmp_path / "tuned.toml"
    recipe.write_text(tuned)
    final = train_autoencoder(str(recipe), output=str(tmp_path / "run"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "eval_psnr_painted" in log[0] and all(r["bucket"] == "painted" for r in log if "bucket" in r)
    before, after = load_file(root / "autoencoder" / "model.safetensors"), load_file(final / "model.safetensors")
    for name, value in before.items():
        if name.startswith("encoder.") or name.startswith("latent_"):
            assert torch.equal(after[name].float(), value.float()), name
    assert any(not torch.equal(after[name].float(), value.float()) for name, value in before.items() if name.startswith("decoder."))
    assert encoder_fingerprint(VideoAutoencoder.from_pretrained(final)) == PaintedPairs.load(pairs).encoder

    other_space = tmp_path / "other_space"
    VideoAutoencoder(TINY_AE).save_pretrained(other_space)  # another random encoder
    cases = [
        (tuned.replace("painted_share = 1.0\n", ""), "go together"),
        (tuned.replace("painted_share = 1.0", "painted_share = 0"), "painted_share must be a number above 0"),
        (tuned.replace("painted_share = 1.0", "painted_share = 1.5"), "painted_share must be a number above 0"),
        (tuned.replace("freeze_encoder = true\n", ""), "needs \\[train\\] freeze_encoder"),
        (tuned.replace(str(root / "autoencoder"), str(other_space)), "another latent space"),
        (tuned.replace(str(pairs), str(tmp_path / "missing.pt")), "\\[data\\] painted: .*missing.pt"),
        (tuned.replace(f'["{pairs}"]', "3"), "must name a file of painted pairs"),
    ]
    for text, message in cases:
        recipe.write_text(text)
        with pytest.raises(RecipeError, match=message):
            train_autoencoder(str(recipe), output=str(tmp_path / "refused"))


def test_ae_paint_writes_resumes_and_refuses_bad_input_in_one_line(generator, tmp_path, capsys):
    root, _ = generator
    pairs = tmp_path / "pairs.pt"
    command = ["ae", "paint", "--weights", str(root / "generator"), "--size", "32x32", "--seconds", "0.5", "--output", str(pairs)]
    assert main([*command, "--count", "2"]) == 0
    assert main([*command, "--count", "3"]) == 0
    assert len(PaintedPairs.load(pairs)) == 3 and "3 painted pairs of 32x32, 5 frames" in capsys.readouterr().out
    for extra, message in ((["--count", "3", "--seed", "9"], "another seed"), (["--count", "0"], "at least 1"),
                           (["--count", "1", "--size", "33x33"], "not supported")):
        assert main([*command, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*command[:-1], str(tmp_path), "--count", "1"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_painting_that_misses_its_plan_is_painted_again_from_new_noise_and_the_best_is_kept(generator, monkeypatch):
    """The judge's reading of each painting against its plan is scripted here: how many of four
    checks it keeps. A painting that keeps them all ends the redraws; else the one keeping most does."""
    _, pipe = generator
    prompt, request = "a red circle moves to the right", {"width": 32, "height": 32, "frames": 5}
    first = pipe(prompt, seed=3, redraws=0, **request)
    assert first.draws == 1 and set(first.timings) == {"text", "plan", "denoise", "decode"}  # no check without redraws
    assert redraw_seed(3, 0) == 3 and len({redraw_seed(3, 1), redraw_seed(3, 2), redraw_seed(4, 1)}) == 3

    def scripted(*kept_by_painting):
        readings = iter(kept_by_painting)
        monkeypatch.setattr(text_to_video, "painting_verdict", lambda frames, plan, fps: _verdict_keeping(next(readings)))

    def painting(draw: int):
        return pipe(prompt, seed=redraw_seed(3, draw), plan=first.plan, redraws=0, **request).frames

    scripted(2, 4, 0)
    steps = []
    kept = pipe(prompt, seed=3, redraws=2, on_step=lambda done, total: steps.append((done, total)), **request)
    assert kept.draws == 2 and kept.seed == 3 and kept.plan == first.plan and kept.timings["check"] > 0
    assert np.array_equal(kept.frames, painting(1)) and not np.array_equal(kept.frames, first.frames)
    assert steps == [(1, 2), (2, 2), (3, 4), (4, 4)]  # the redraw adds its two steps to the work
    scripted(1, 3, 2)
    best = pipe(prompt, seed=3, redraws=2, **request)
    assert best.draws == 3 and np.array_equal(best.frames, painting(1))  # none kept the plan: the one keeping most of it
    scripted(3, 3)
    assert np.array_equal(pipe(prompt, seed=3, redraws=1, **request).frames, first.frames)  # a tie keeps the earlier painting
    for redraws, message in ((9, "from 0 to 8"), (-1, "from 0 to 8"), (True, "whole number")):
        with pytest.raises(ValueError, match=message):
            pipe(prompt, redraws=redraws, **request)


def test_a_plan_missed_four_times_gives_way_to_the_next_ranked_plans_and_a_given_plan_never_does(generator, monkeypatch):
    _, pipe = generator
    prompt, request = "a red circle moves to the right", {"width": 32, "height": 32, "frames": 5}
    ranked = [(world.ShapeObject("red", "circle", size, "right", "slow", (x, 0.5)),) for size, x in (("medium", 0.3), ("large", 0.4))]
    monkeypatch.setattr(text_to_video, "ranked_plans", lambda *args, **kwargs: [ranked])
    painted_plans, readings = [], iter([1, 1, 1, 1, 2, 0, 0] * 2)

    def reading(frames, plan, fps):
        painted_plans.append(plan)
        return _verdict_keeping(next(readings))
    monkeypatch.setattr(text_to_video, "painting_verdict", reading)
    assert text_to_video.FIRST_PLAN_PAINTINGS == 4
    kept = pipe(prompt, seed=3, redraws=6, **request)
    assert painted_plans == [ranked[0]] * 4 + [ranked[1]] * 3  # then each redraw the next plan, while there is one
    assert kept.draws == 7 and kept.plan == ranked[1]  # the painting keeping most: the next plan's first
    assert np.array_equal(kept.frames, pipe(prompt, seed=redraw_seed(3, 4), plan=ranked[1], redraws=0, **request).frames)
    painted_plans.clear()
    pipe(prompt, seed=3, redraws=6, plan=ranked[0], **request)
    assert painted_plans == [ranked[0]] * 7  # a plan a person sets is the only one


def _verdict_keeping(kept: int) -> Verdict:
    return Verdict(tuple(Check("red circle", "motion", "right", "-", i < kept) for i in range(4)))


def test_the_judge_reads_a_painting_against_every_attribute_of_its_plan():
    from kinetoscope.pipelines.layout import painting_verdict

    plan = (world.ShapeObject("red", "circle", "medium", "right", "slow", (0.3, 0.25)),
            world.ShapeObject("blue", "square", "large", "still", None, (0.7, 0.75)))
    painted = world.render(world.Scene(plan, "black"), 128, 128, 17, 8.0)
    assert painting_verdict(painted, plan, 8.0).passed
    for changed in (replace(plan[0], speed="fast"), replace(plan[0], size="small"), replace(plan[0], shape="triangle")):
        missed = painting_verdict(world.render(world.Scene((changed, plan[1]), "black"), 128, 128, 17, 8.0), plan, 8.0)
        assert [check.name for check in missed.checks if not check.passed] == [next(
            name for name in ("speed", "size", "shape") if getattr(changed, name) != getattr(plan[0], name))]
    assert painting_verdict(painted[:1], plan, 8.0).passed  # one frame shows no motion, so none is asked of it


def test_redraws_come_from_the_model_folder_or_the_command_line_and_only_a_layout_model_takes_them(generator, tmp_path, capsys):
    root, pipe = generator
    folder = root / "generator"
    settings = json.loads((folder / "pipeline.json").read_text())
    try:
        for redraws, message in ((9, "from 0 to 8"), (1.5, "whole number"), ("2", "whole number")):
            (folder / "pipeline.json").write_text(json.dumps({**settings, "redraws": redraws}))
            with pytest.raises(ValueError, match=f'pipeline.json "redraws".*{message}'):
                TextToVideo.load(folder)
        (folder / "pipeline.json").write_text(json.dumps({**settings, "redraws": 1}))
        assert TextToVideo.load(folder).redraws == 1
        out = tmp_path / "out.mp4"
        command = ["generate", "a red circle moves to the right", "-o", str(out), "--size", "32x32", "--seconds", "0.5", "--weights", str(folder)]
        assert main(command) == 0  # random weights paint nothing the judge can read as the plan: painted again
        assert "painted 2 times" in capsys.readouterr().out
        assert main([*command, "--redraws", "5"]) == 0
        assert "painted 6 times (after the 4th, from the planner's next layouts)" in capsys.readouterr().out
        assert main([*command, "--redraws", "0"]) == 0 and "painted" not in capsys.readouterr().out.replace("wrote", "")
        report = tmp_path / "eval.json"
        assert main(["eval", "--weights", str(folder), "--per-tier", "1", "--redraws", "2", "--report", str(report)]) == 0
        written = json.loads(report.read_text())
        assert written["redraws"] == 2 and written["paintings"] == 6  # two prompts, each painted three times
        assert "clips painted: 6 for 2 prompts" in capsys.readouterr().out
    finally:
        (folder / "pipeline.json").write_text(json.dumps(settings))
    plain = TextToVideo(DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1)), pipe.autoencoder, pipe.text_encoder)
    with pytest.raises(ValueError, match="plans no layout"):
        plain("a red circle", width=32, height=32, frames=5, steps=1, redraws=1)
    with pytest.raises(ValueError, match='pipeline.json "redraws".*plans no layout'):
        TextToVideo(plain.transformer, pipe.autoencoder, pipe.text_encoder, redraws=1)
