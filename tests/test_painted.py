"""Painted pairs: a layout generator's latents of training scenes, and a decoder tuned on them."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kinetoscope.cli import main
from kinetoscope.data import captions
from kinetoscope.models.autoencoder import VideoAutoencoder
from kinetoscope.models.dit import DiffusionTransformer, config_for
from kinetoscope.models.planner import LayoutPlanner
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.pipelines.text_to_video import SamplingSettings, TextToVideo
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
