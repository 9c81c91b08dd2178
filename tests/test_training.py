"""What the trainers share: recipes, crash-safe checkpoints, and a generator run that resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kinetoscope.cli import main
from kinetoscope.pipelines.text_to_video import TextToVideo
from kinetoscope.training.common import RecipeError, RunDirectory, load_recipe
from kinetoscope.training.generator import REQUIRED, train

TINY_RECIPE = """
[model]
size = "tiny"
overrides = { depth = 1 }

[data]
buckets = ["32x32x1", "32x32x5"]
pixels_per_batch = 20480
fps = 8.0
seed = 3

[train]
steps = 2
lr = 1e-3
warmup = 1
weight_decay = 0.0
grad_clip = 1.0
caption_dropout = 0.5
ema_decay = 0.9
seed = 0
workers = 0
log_every = 1
eval_every = 1000
checkpoint_minutes = 100
output = "unused"

[eval]
steps = 1
guidance = 2.0
prompts = ["a red square spins"]
"""


def save_linear(model, directory):
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "model.pt")


def test_an_interrupted_save_falls_back_to_the_last_good_checkpoint(tmp_path):
    run = RunDirectory(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.save(model, optimizer, {"step": 1}, save_linear)
    # A crash between save()'s renames: the good checkpoint is only at checkpoint.old.
    run.checkpoint.rename(run.root / "checkpoint.old")
    assert run.has_checkpoint() and run.load_state(optimizer)["step"] == 1
    # A crash after the swap but before the cleanup: the new checkpoint wins, the old one goes.
    run.save(model, optimizer, {"step": 2}, save_linear)
    (run.root / "checkpoint.old").mkdir()
    assert run.has_checkpoint() and run.load_state(optimizer)["step"] == 2
    assert not (run.root / "checkpoint.old").exists()
    run.save(model, optimizer, {"step": 3}, save_linear)
    assert run.load_state(optimizer)["step"] == 3


def test_recipes_are_checked_before_training(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 1")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(broken)
    partial = tmp_path / "partial.toml"
    partial.write_text(TINY_RECIPE.replace("ema_decay = 0.9\n", ""))
    with pytest.raises(RecipeError, match="lacks ema_decay"):
        load_recipe(partial, REQUIRED)
    unjudgeable = tmp_path / "unjudgeable.toml"
    unjudgeable.write_text(TINY_RECIPE.replace("a red square spins", "a red circle spins"))
    with pytest.raises(RecipeError, match="circles never spin"):
        train(str(unjudgeable), output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe(tmp_path / "missing.toml")


@pytest.mark.parametrize("command", [["train"], ["ae", "train"]])
def test_train_cli_bad_recipe_is_one_line(tmp_path, capsys, command):
    broken = tmp_path / "broken.toml"
    broken.write_text("[model]\n[train]\nsteps = 1\n")
    assert main([*command, "--recipe", str(broken), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("lacks" in err or "has no" in err)
    assert main([*command, "--recipe", str(tmp_path / "none.toml")]) == 2
    assert not (tmp_path / "run").exists()


def test_generator_training_resumes_and_exports_a_loadable_model(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    output = tmp_path / "run"
    train(str(recipe), output=str(output))
    steps_logged = [r["step"] for r in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps_logged == [1, 2]
    first_checkpoint = (output / "checkpoint" / "model.safetensors").read_bytes()

    final = train(str(recipe), output=str(output), steps=4)  # picks up at step 2
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite, not NaN
    assert json.loads((output / "checkpoint" / "state.json").read_text())["step"] == 4
    assert (output / "checkpoint" / "model.safetensors").read_bytes() != first_checkpoint
    assert (output / "loss.png").stat().st_size > 0 and list((output / "samples").glob("*.png"))

    config = json.loads((final / "config.json").read_text())
    assert config["trained_steps"] == 4 and config["depth"] == 1
    pipe = TextToVideo.load(final, device="cpu")  # self-contained: the default autoencoder is found
    video = pipe("a red square spins", width=32, height=32, frames=5, steps=1)
    assert video.frames.shape == (5, 32, 32, 3)

    # Another run can start from the exported weights (a fresh optimizer), but only for the same model.
    onward = tmp_path / "onward.toml"
    onward.write_text(TINY_RECIPE.replace('size = "tiny"', f'size = "tiny"\ninit = "{final}"'))
    onward_final = train(str(onward), output=str(tmp_path / "onward"), steps=1)
    assert json.loads((onward_final / "config.json").read_text())["trained_steps"] == 1
    mismatched = tmp_path / "mismatched.toml"
    mismatched.write_text(onward.read_text().replace("depth = 1", "depth = 2"))
    with pytest.raises(RecipeError, match="init"):
        train(str(mismatched), output=str(tmp_path / "mismatched"))


def test_two_processes_under_torchrun_stop_together_on_the_time_budget(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("steps = 2\n", "steps = 100000\n"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kinetoscope", "train",
               "--recipe", str(recipe), "--output", str(tmp_path / "run"), "--minutes", "0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] > 0 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
