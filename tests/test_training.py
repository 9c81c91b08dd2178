"""What the trainers share: recipes, crash-safe checkpoints, and a generator run that resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinetoscope.cli import main
from kinetoscope.models.autoencoder import default_weights_dir
from kinetoscope.pipelines.text_to_video import SamplingSettings, TextToVideo
from kinetoscope.training.common import RecipeError, RunDirectory, load_recipe
from kinetoscope.training.common import BatchPool
from kinetoscope.training.generator import REQUIRED, layout_setting, train

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
reuse = 2
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
    run.recover()
    assert run.has_checkpoint() and run.load_state(optimizer)["step"] == 1
    # A crash after the swap but before the cleanup: the new checkpoint wins, the old one goes.
    run.save(model, optimizer, {"step": 2}, save_linear)
    (run.root / "checkpoint.old").mkdir()
    run.recover()
    assert run.has_checkpoint() and run.load_state(optimizer)["step"] == 2
    assert not (run.root / "checkpoint.old").exists()
    run.save(model, optimizer, {"step": 3}, save_linear)
    assert run.load_state(optimizer)["step"] == 3


def test_a_resumed_run_drops_the_log_records_it_will_make_again(tmp_path):
    run = RunDirectory(tmp_path / "run")
    model = torch.nn.Linear(2, 2)
    for step in range(1, 6):
        run.log({"step": step, "loss": 1.0 / step})
        if step == 3:
            run.save(model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3}, save_linear)
    run.recover()  # the process died at step 5; the checkpoint is at step 3
    assert [r["step"] for r in run.records()] == [1, 2, 3]
    run.recover()
    assert [r["step"] for r in run.records()] == [1, 2, 3]


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
    for table, wrong, message in (('buckets = ["32x32x1", "32x32x5"]', 'buckets = ["32x32"]', "WIDTHxHEIGHTxFRAMES"),
                                  ("[eval]", "[schedule]\nlogit_centre = 0.5\n\n[eval]", "logit_centre"),
                                  ("fps = 8.0", 'fps = 8.0\nautoencoder = "no/such/folder"', "no autoencoder checkpoint")):
        wrong_recipe = tmp_path / "wrong.toml"
        wrong_recipe.write_text(TINY_RECIPE.replace(table, wrong))
        with pytest.raises(RecipeError, match=message):
            train(str(wrong_recipe), output=str(tmp_path / "run"))
    misspelt_or_unfit = (
        ('overrides = { depth = 1 }', 'overrides = { depth = 1 }\ndepth = 4', "no setting depth"),  # outside overrides
        ("seed = 3", "seed = 3\nbucket_weigths = [1, 2]", "no setting bucket_weigths"),
        ("[eval]", "[evaluation]\nsteps = 1\n\n[eval]", "unknown table"),
        ('buckets = ["32x32x1", "32x32x5"]', 'buckets = ["40x40x5"]', "40x40x5 does not fit"),  # latents 5x5: no 2x2 patches
        ('buckets = ["32x32x1", "32x32x5"]', 'buckets = ["32x32x4"]', "32x32x4 does not fit"),
        ("seed = 3", "seed = 3\nbucket_weights = [1]", "bucket_weights"),
        ("seed = 3", "seed = 3\nbucket_weights = [1, -1]", "bucket_weights"),
        ("seed = 3", "seed = 3\nmotion_weights = { hop = 2.0 }", "motion_weights"),
        ("log_every = 1", "log_every = 0", "log_every"),
        ("checkpoint_minutes = 100", "checkpoint_minutes = 0", "checkpoint_minutes"),
        ("steps = 1\nguidance", "steps = 0\nguidance", "\\[eval\\] steps"),
        ("guidance = 2.0", 'guidance = "high"', "guidance"),
        ("depth = 1 }", "depth = 1, heads = 3 }", "head size"),
        ("[eval]", "[schedule]\nframe_correlation = 1.0\n\n[eval]", "frame_correlation"),
        ("log_every = 1", "log_every = 1\ntimes = [0.6]", "\\[train\\] times"),
        ("log_every = 1", "log_every = 1\ntimes = [0.8, 0.6]", "\\[train\\] times"),
        ("log_every = 1", 'log_every = 1\ntimes = [0.5, "1"]', "\\[train\\] times"),
    )
    for table, wrong, message in misspelt_or_unfit:
        wrong_recipe = tmp_path / "wrong.toml"
        assert table in TINY_RECIPE
        wrong_recipe.write_text(TINY_RECIPE.replace(table, wrong, 1))
        with pytest.raises(RecipeError, match=message):
            train(str(wrong_recipe), output=str(tmp_path / "run"))
    for bad in ("0", "2.5", "true"):
        reused = tmp_path / f"reuse_{bad}.toml"
        reused.write_text(TINY_RECIPE.replace("reuse = 2\n", f"reuse = {bad}\n"))
        with pytest.raises(RecipeError, match="reuse"):
            train(str(reused), output=str(tmp_path / "run"))


def test_a_recipe_extends_another_and_states_only_what_changes(tmp_path):
    (tmp_path / "base.toml").write_text(TINY_RECIPE)
    (tmp_path / "more.toml").write_text('extends = "base.toml"\n[train]\nsteps = 7\n[model]\ninit = "runs/x"\n')
    recipe = load_recipe(tmp_path / "more.toml", REQUIRED)
    base = load_recipe(tmp_path / "base.toml")
    assert recipe["train"] == {**base["train"], "steps": 7}
    assert recipe["model"] == {**base["model"], "init": "runs/x"} and recipe["data"] == base["data"]
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('extends = "gone.toml"\n')
    with pytest.raises(RecipeError, match="no recipe"):
        load_recipe(tmp_path / "orphan.toml")
    # The self-conditioning experiment is stage 2 plus self-conditioning.
    experiment = load_recipe(Path(__file__).parent.parent / "configs" / "generator_self_condition.toml", REQUIRED)
    assert experiment["model"]["overrides"]["self_condition"] and experiment["data"]["buckets"]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "configs").glob("generator*.toml")), ids=lambda p: p.stem)
def test_every_generator_recipe_in_the_repository_describes_a_model(recipe):
    from kinetoscope.models.dit import DiffusionTransformer, config_for

    loaded = load_recipe(recipe, REQUIRED)
    model = DiffusionTransformer(config_for(loaded["model"]["size"], **loaded["model"].get("overrides", {})))
    assert sum(p.numel() for p in model.parameters()) < 20_000_000  # what this CPU trains, and the repository ships
    layout_setting(loaded["train"], model.cfg.depth)  # a layout experiment names a block the model has
    if "autoencoder" in loaded["data"]:  # the latent space it trains in is in the repository
        assert (Path(__file__).parent.parent / loaded["data"]["autoencoder"] / "config.json").is_file()


def test_no_recipe_starts_from_the_weights_folder():
    # The weights folders hold whichever model ships now: a recipe starting from one would start
    # from another model once the next ships, and could no longer make what it made.
    for recipe in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        init = load_recipe(recipe).get("model", {}).get("init", "")
        assert not Path(init).is_relative_to("kinetoscope/weights"), f"{recipe.name} starts from {init}"


def test_batch_pool_serves_each_batch_about_reuse_times():
    made = []

    def make_batch():
        made.append(len(made))
        return made[-1]

    once = BatchPool(make_batch, reuse=1, seed=0)
    assert [once.next() for _ in range(5)] == [0, 1, 2, 3, 4]  # every batch once, in order

    made.clear()
    pool = BatchPool(make_batch, reuse=4, seed=0)
    served = [pool.next() for _ in range(4000)]
    assert len(made) == 4 - 1 + 4000 // 4  # a few batches up front, then one per `reuse` steps
    uses = torch.bincount(torch.tensor(served))
    assert abs(uses.float().mean().item() - 4) < 0.1
    assert max(served[i] for i in range(100, 4000)) < len(made) and len(pool.batches) == 16
    # Only batches still in the pool are served: never one older than its 16 newest.
    assert all(made[-1] - b < 16 for b in served[-4:])


@pytest.mark.parametrize("command", [["train"], ["ae", "train"]])
def test_train_cli_bad_recipe_is_one_line(tmp_path, capsys, command):
    broken = tmp_path / "broken.toml"
    broken.write_text("[model]\n[train]\nsteps = 1\n")
    assert main([*command, "--recipe", str(broken), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("lacks" in err or "has no" in err)
    assert main([*command, "--recipe", str(tmp_path / "none.toml")]) == 2
    assert not (tmp_path / "run").exists()


def test_the_autoencoder_trainer_refuses_torchrun(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_AUTOENCODER_RECIPE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["ae", "train", "--recipe", str(recipe), "--output", str(tmp_path / "run")]) == 2
    assert "without torchrun" in capsys.readouterr().err and not (tmp_path / "run").exists()


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
    optimizer_state = torch.load(output / "checkpoint" / "optimizer.pt", weights_only=True)["state"]
    assert {int(state["step"]) for state in optimizer_state.values()} == {4}  # the optimizer carried on, not restarted
    other = tmp_path / "other.toml"
    other.write_text(TINY_RECIPE.replace("lr = 1e-3", "lr = 2e-3"))
    with pytest.raises(RecipeError, match=r"different recipe \(\[train\] lr differ"):
        train(str(other), output=str(output), steps=5)
    assert (output / "loss.png").stat().st_size > 0 and list((output / "samples").glob("*.png"))

    config = json.loads((final / "config.json").read_text())
    assert config["trained_steps"] == 4 and config["depth"] == 1
    pipe = TextToVideo.load(final, device="cpu")  # self-contained: the default autoencoder it was trained with came along
    settings = json.loads((final / "pipeline.json").read_text())
    assert settings["autoencoder"] == "autoencoder"
    assert pipe.sampling == SamplingSettings(**settings["sampling"]) == SamplingSettings(steps=1, guidance=2.0)  # the recipe's [eval]
    assert (final / "autoencoder" / "model.safetensors").read_bytes() == (default_weights_dir() / "model.safetensors").read_bytes()
    video = pipe("a red square spins", width=32, height=32, frames=5, steps=1)
    assert video.frames.shape == (5, 32, 32, 3)

    # Another run can start from the exported weights (a fresh optimizer), for the same model or one
    # that adds blocks and canvas positions, but not for a different one.
    onward = tmp_path / "onward.toml"
    onward.write_text(TINY_RECIPE.replace('size = "tiny"', f'size = "tiny"\ninit = "{final}"'))
    onward_final = train(str(onward), output=str(tmp_path / "onward"), steps=1)
    assert json.loads((onward_final / "config.json").read_text())["trained_steps"] == 1
    grown = tmp_path / "grown.toml"
    grown.write_text(onward.read_text().replace("depth = 1", "depth = 3, canvas_frequencies = 4"))
    grown_config = json.loads((train(str(grown), output=str(tmp_path / "grown"), steps=1) / "config.json").read_text())
    assert (grown_config["depth"], grown_config["canvas_frequencies"]) == (3, 4)
    for change in ("depth = 1, dim = 64", "depth = 0"):
        mismatched = tmp_path / "mismatched.toml"
        mismatched.write_text(onward.read_text().replace("depth = 1", change))
        with pytest.raises(RecipeError, match="init"):
            train(str(mismatched), output=str(tmp_path / "mismatched"))


def test_a_grown_transformer_starts_from_the_same_predictions(tmp_path):
    from kinetoscope.models.dit import DiffusionTransformer, config_for
    from kinetoscope.training.generator import start_from

    torch.manual_seed(0)
    small = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=2))
    for p in small.parameters():  # open the adaLN-Zero gates so the outputs mean something
        torch.nn.init.normal_(p, std=0.05)
    small.save_pretrained(tmp_path / "small")
    grown = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=4, canvas_frequencies=6, self_condition=True,
                                            local_mixing=True))
    start_from(grown, str(tmp_path / "small"))
    x, t, text, mask = torch.randn(2, 8, 2, 4, 6), torch.rand(2), torch.randn(2, 3, 384), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, text, mask, torch.randn_like(x)), small(x, t, text, mask))
    grown.save_pretrained(tmp_path / "grown")
    with pytest.raises(RecipeError, match="can only add"):  # self-conditioning and local mixing cannot be taken away
        start_from(DiffusionTransformer(config_for("tiny", latent_channels=8, depth=4, canvas_frequencies=6, local_mixing=True)),
                   str(tmp_path / "grown"))
    with pytest.raises(RecipeError, match="can only add"):
        start_from(DiffusionTransformer(config_for("tiny", latent_channels=8, depth=4, canvas_frequencies=6, self_condition=True)),
                   str(tmp_path / "grown"))
    with pytest.raises(RecipeError, match="can only add"):
        start_from(DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1)), str(tmp_path / "small"))


def test_a_distill_recipe_trains_a_student_that_samples_in_one_pass(tmp_path):
    from kinetoscope.models.dit import DiffusionTransformer, config_for

    torch.manual_seed(0)
    teacher = DiffusionTransformer(config_for("tiny", latent_channels=32, depth=1))
    for p in teacher.parameters():  # open the adaLN-Zero gates so guidance makes a difference to learn
        torch.nn.init.normal_(p, std=0.05)
    teacher.save_pretrained(tmp_path / "teacher")
    distill = f'[distill]\nteacher = "{tmp_path / "teacher"}"\nguidance = [1.0, 3.0]\n'
    recipe = tmp_path / "distill.toml"
    recipe.write_text(TINY_RECIPE.replace('size = "tiny"', f'size = "tiny"\ninit = "{tmp_path / "teacher"}"') + distill)
    final = train(str(recipe), output=str(tmp_path / "run"), steps=3)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and all(0 < r["loss"] < 100 for r in records if "loss" in r)
    assert json.loads((final / "config.json").read_text())["distilled_guidance"] == [1.0, 3.0]
    pipe = TextToVideo.load(final, device="cpu")
    assert pipe("a red square spins", width=32, height=32, frames=5, steps=2, guidance=2.0).frames.shape == (5, 32, 32, 3)
    # What the recipe gets wrong is one line before any training.
    for broken, message in ((distill.replace("[1.0, 3.0]", "[3.0, 1.0]"), "guidance must be"),
                            (distill.replace("guidance = [1.0, 3.0]\n", ""), "lacks guidance"),
                            (distill.replace(str(tmp_path / "teacher"), str(tmp_path / "nowhere")), "teacher"),
                            (distill.replace("[1.0, 3.0]", "[3.0, 5.0]"), r"\[eval\] guidance")):
        recipe.write_text(TINY_RECIPE + broken)
        with pytest.raises(RecipeError, match=message):
            train(str(recipe), output=str(tmp_path / "broken"))
    recipe.write_text(TINY_RECIPE.replace("log_every = 1", "log_every = 1\nlayout_loss = 1.0\nlayout_block = 1") + distill)
    with pytest.raises(RecipeError, match="not a guidance-distilled student"):
        train(str(recipe), output=str(tmp_path / "broken"))
    assert not (tmp_path / "broken").exists()


def test_two_processes_under_torchrun_stop_together_on_the_time_budget(tmp_path):
    recipe = tmp_path / "tiny.toml"
    # With layout supervision, whose probe is a second module both processes train.
    recipe.write_text(TINY_RECIPE.replace("steps = 2\n", "steps = 100000\n").replace("log_every = 1", "log_every = 1\nlayout_loss = 1.0\nlayout_block = 1"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "kinetoscope", "train",
               "--recipe", str(recipe), "--output", str(tmp_path / "run"), "--minutes", "0.5"]
    # Half a minute: the budget counts each process's start (the text encoder, the first batch), which took over 6 s on a 2-GHz Xeon.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] > 0 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint" / "layout_probe.safetensors").is_file()


# The autoencoder trains on the same tiny data and schedule; it has no captions, EMA or eval.
TINY_AUTOENCODER_RECIPE = """
[model]
latent_channels = 8
widths = [12, 24]
blocks_per_level = 1
""" + TINY_RECIPE[TINY_RECIPE.index("[data]"):TINY_RECIPE.index("[eval]")].replace("caption_dropout = 0.5\n", "").replace("ema_decay = 0.9\n", "")


def test_a_decoder_fine_tune_keeps_the_latent_space(tmp_path):
    from safetensors.torch import load_file

    from kinetoscope.models.autoencoder import AutoencoderConfig, VideoAutoencoder
    from kinetoscope.training.autoencoder import start_from
    from kinetoscope.training.autoencoder import train as train_autoencoder

    recipe = tmp_path / "ae.toml"
    recipe.write_text(TINY_AUTOENCODER_RECIPE)
    first = train_autoencoder(str(recipe), output=str(tmp_path / "first"))

    stronger = TINY_AUTOENCODER_RECIPE.replace("blocks_per_level = 1", f'blocks_per_level = 1\ndecoder_blocks_per_level = 2\nrefine_width = 4\ninit = "{first}"')
    # The added decoder blocks and pixel refiner start as the identity: same reconstructions before any step.
    grown = VideoAutoencoder(AutoencoderConfig(latent_channels=8, widths=(12, 24), blocks_per_level=1, decoder_blocks_per_level=2, refine_width=4))
    start_from(grown, str(first))
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(grown(video), VideoAutoencoder.from_pretrained(first).float()(video))

    fine_tune = tmp_path / "decoder.toml"
    fine_tune.write_text(stronger.replace("workers = 0\n", "workers = 0\nfreeze_encoder = true\nl1_weight = 0.1\n"))
    second = train_autoencoder(str(fine_tune), output=str(tmp_path / "second"))
    log = [json.loads(line) for line in (tmp_path / "second" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "eval_psnr_128" in log[0]  # where the weights it continues from stood
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    for name, value in before.items():
        if name.startswith("encoder.") or name.startswith("latent_"):
            assert torch.equal(after[name], value), name  # the latent space a generator relies on
    assert any(not torch.equal(after[name], value) for name, value in before.items() if name.startswith("decoder."))
    assert any(name.startswith("decoder.") and name not in before for name in after)

    with pytest.raises(RecipeError, match="set \\[model\\] init"):
        unanchored = tmp_path / "unanchored.toml"
        unanchored.write_text(TINY_AUTOENCODER_RECIPE.replace("workers = 0\n", "workers = 0\nfreeze_encoder = true\n"))
        train_autoencoder(str(unanchored), output=str(tmp_path / "third"))
    with pytest.raises(RecipeError, match="l1_weight must be a number"):
        negative = tmp_path / "negative.toml"
        negative.write_text(stronger.replace("workers = 0\n", "workers = 0\nl1_weight = -1\n"))
        train_autoencoder(str(negative), output=str(tmp_path / "negative"))
    with pytest.raises(RecipeError, match="can only add decoder blocks"):
        wider = tmp_path / "wider.toml"
        wider.write_text(stronger.replace("widths = [12, 24]", "widths = [24, 48]"))
        train_autoencoder(str(wider), output=str(tmp_path / "fourth"))


def test_the_autoencoder_loss_weighs_l1_as_the_recipe_says():
    from kinetoscope.training.autoencoder import reconstruction_loss

    video, recon = torch.zeros(1, 3, 1, 4, 4), torch.full((1, 3, 1, 4, 4), 0.5)
    assert reconstruction_loss(video, recon, l1_weight=0).item() == pytest.approx(0.25)  # squared error alone
    assert reconstruction_loss(video, recon).item() == pytest.approx(0.75)  # L1 0.5 + squared error 0.25


def test_a_time_window_trains_on_that_stretch_of_the_samplers_path_only():
    from kinetoscope.diffusion.rectified_flow import FlowSchedule, shift_time
    from kinetoscope.models.dit import DiffusionTransformer, config_for
    from kinetoscope.training.generator import diffusion_loss

    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1))
    latents, text, mask = torch.randn(64, 8, 2, 4, 4), torch.randn(64, 3, model.cfg.text_dim), torch.ones(64, 3, dtype=torch.bool)
    schedule = FlowSchedule(reference_tokens=4)  # 8 tokens a clip: shift sqrt(2), so the window's ends move
    shift = schedule.shift(model.token_count(latents.shape))
    _, t, _ = diffusion_loss(model, latents, text, mask, schedule, caption_dropout=0.0, window=(0.6, 1.0))
    assert shift_time(torch.tensor(0.6), shift) <= t.min() and t.max() <= 1.0
    assert t.min() < shift_time(torch.tensor(0.7), shift) and t.max() > shift_time(torch.tensor(0.9), shift)  # the whole window
    _, everywhere, _ = diffusion_loss(model, latents, text, mask, schedule, caption_dropout=0.0)
    assert everywhere.min() < shift_time(torch.tensor(0.6), shift)  # without one, the whole path


def test_the_pixel_loss_measures_the_velocity_error_in_the_decoded_frames(tmp_path):
    from kinetoscope.diffusion.rectified_flow import FlowSchedule, add_noise, velocity_target
    from kinetoscope.models.autoencoder import VideoAutoencoder
    from kinetoscope.models.dit import DiffusionTransformer, config_for
    from kinetoscope.training.generator import diffusion_loss, pixel_velocity_loss

    autoencoder = VideoAutoencoder.from_pretrained().requires_grad_(False)
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 32, 2, 4, 4), torch.randn(4, 32, 2, 4, 4)
    t = torch.tensor([0.9, 0.2, 0.6, 0.4])
    noisy, truth = add_noise(latents, noise, t), velocity_target(latents, noise)
    error = 0.05 * torch.randn(4, 32, 2, 4, 4)

    def loss(prediction, times=t, clips=2):
        return pixel_velocity_loss(autoencoder, add_noise(latents, noise, times), prediction, latents, times, clips)

    wrong = loss(truth + error)
    assert loss(truth) < 1e-3 * wrong  # the true velocity decodes to the true frames
    # Only the clips nearest the clean end (t 0.2 and 0.4) are decoded: errors elsewhere cost nothing.
    far = error.clone()
    far[[1, 3]] = 0
    assert loss(truth + far) == loss(truth)
    near = error.clone()
    near[[0, 2]] = 0
    assert torch.allclose(loss(truth + near), wrong)
    # Divided by t, it is a velocity error: the same one costs about the same at another time,
    # though the clean latents it points to are off by t times as much. Four times the error above:
    # under bf16 autocast (CPUs with AVX-512 BF16) the decoder's rounding alone moved the ratio of
    # the small one to 0.87 (float32: 1.001; four times: 1.009 and 1.003).
    once = torch.zeros(4, 32, 2, 4, 4)
    once[1] = 4 * error[1]
    at_low, at_high = (loss(truth + once, torch.tensor([0.9, time, 0.9, 0.9]), clips=1) for time in (0.2, 0.4))
    assert at_low > 0 and at_high / at_low == pytest.approx(1.0, abs=0.05)
    # Its gradient reaches the prediction, not the frozen decoder.
    prediction = (truth + error).requires_grad_(True)
    loss(prediction).backward()
    assert prediction.grad[[1, 3]].abs().sum() > 0 and prediction.grad[[0, 2]].abs().sum() == 0
    assert all(parameter.grad is None for parameter in autoencoder.parameters())

    model = DiffusionTransformer(config_for("tiny", latent_channels=32, depth=1))
    text, mask = torch.randn(4, 3, model.cfg.text_dim), torch.ones(4, 3, dtype=torch.bool)
    assert diffusion_loss(model, latents, text, mask, FlowSchedule(), 0.0)[2] is None
    assert diffusion_loss(model, latents, text, mask, FlowSchedule(), 0.0, pixels=(autoencoder, 2))[2] > 0

    recipe = tmp_path / "pixels.toml"
    for setting, error_message in (("pixel_loss = 0", "pixel_loss must be a positive weight, not 0"),
                                   ("pixel_clips = 2", "pixel_loss must be a positive weight, not None"),
                                   ("pixel_loss = 1.0\npixel_clips = 0", "pixel_clips must be a whole number of clips, at least 1, not 0"),
                                   ("pixel_loss = 1.0\npixel_clips = 1.5", "not 1.5")):
        recipe.write_text(TINY_RECIPE.replace("[train]\n", f"[train]\n{setting}\n"))
        with pytest.raises(RecipeError, match=error_message):
            train(str(recipe), output=str(tmp_path / "refused"))
    torch.manual_seed(0)
    DiffusionTransformer(config_for("tiny", latent_channels=32, depth=1)).save_pretrained(tmp_path / "teacher")
    recipe.write_text(TINY_RECIPE.replace("[train]\n", "[train]\npixel_loss = 1.0\n")
                      + f'[distill]\nteacher = "{tmp_path / "teacher"}"\nguidance = [1.0, 3.0]\n')
    with pytest.raises(RecipeError, match="not a guidance-distilled student"):
        train(str(recipe), output=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    recipe.write_text(TINY_RECIPE.replace("[train]\n", "[train]\npixel_loss = 1.0\npixel_clips = 1\n"))
    final = train(str(recipe), output=str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "pixel_loss" in r] == [1, 2] and all(r["pixel_loss"] > 0 for r in records if "loss" in r)
    assert TextToVideo.load(final, device="cpu")("a red square spins", width=32, height=32, frames=5, steps=2).frames.shape == (5, 32, 32, 3)


def test_layout_maps_put_each_object_centre_on_its_token_by_shape_and_colour():
    from kinetoscope.data import world
    from kinetoscope.data.layout import LAYOUT_CHANNELS, latent_step_times, layout_maps

    assert latent_step_times(17, 5, 8.0).tolist() == [0.0, 0.3125, 0.8125, 1.3125, 1.8125]  # frames 1-4 -> mean 2.5 -> 0.3125 s
    assert latent_step_times(1, 1, 8.0).tolist() == [0.0]
    still = world.ShapeObject("red", "circle", "medium", "still", None, (0.3, 0.7))
    moving = world.ShapeObject("blue", "square", "small", "right", "fast", (0.2, 0.2))
    scene = (still, moving)
    maps = layout_maps([scene], (128, 128), 17, 8.0, (5, 8, 8))
    assert maps.shape == (1, 5 * 8 * 8, LAYOUT_CHANNELS)
    grid = maps[0].T.reshape(LAYOUT_CHANNELS, 5, 8, 8)

    def peak(channel, step):
        return divmod(int(grid[channel, step].argmax()), 8)

    circle, square = world.SHAPES.index("circle"), world.SHAPES.index("square")
    red, blue = (len(world.SHAPES) + list(world.COLORS).index(c) for c in ("red", "blue"))
    assert peak(circle, 0) == peak(red, 0) == peak(circle, 4) == (5, 2)  # (0.3, 0.7) of 8 tokens, all along
    assert peak(square, 0) == peak(blue, 0) == (1, 1)
    assert peak(square, 4)[1] > peak(square, 2)[1] > peak(square, 0)[1]  # it travels right, token by token
    named = {circle, square, red, blue}
    assert all(grid[c].max() == 0 for c in range(LAYOUT_CHANNELS) if c not in named)  # nothing green, no triangle
    wide = layout_maps([scene], (192, 128), 17, 8.0, (5, 8, 12))  # the same scene on a wider canvas
    assert divmod(int(wide[0, :96, circle].argmax()), 12) == (5, 3)  # 0.3 of 12 tokens across


def test_layout_supervision_trains_its_probe_resumes_it_and_leaves_it_out_of_the_export(tmp_path):
    recipe = tmp_path / "layout.toml"
    recipe.write_text(TINY_RECIPE.replace("log_every = 1", "log_every = 1\nlayout_loss = 1.0\nlayout_block = 1"))
    output = tmp_path / "run"
    train(str(recipe), output=str(output))
    first_probe = (output / "checkpoint" / "layout_probe.safetensors").read_bytes()
    final = train(str(recipe), output=str(output), steps=6)
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    layout = [r["layout_loss"] for r in records]
    assert all(0 <= value < 100 for value in layout) and layout[-1] < layout[0]  # the probe learns
    assert (output / "checkpoint" / "layout_probe.safetensors").read_bytes() != first_probe  # carried on across the resume
    assert not any("probe" in path.name for path in final.iterdir())  # sampling never runs it
    assert TextToVideo.load(final, device="cpu")("a red square spins", width=32, height=32, frames=5, steps=1).frames.shape == (5, 32, 32, 3)
    for wrong, message in (("layout_loss = 1.0", "layout_loss = 0"), ("layout_block = 1", "layout_block = 2"),
                           ("layout_block = 1", 'layout_block = "first"'), ("layout_loss = 1.0\n", "")):
        broken = tmp_path / "broken.toml"
        broken.write_text(recipe.read_text().replace(wrong, message))
        with pytest.raises(RecipeError, match="layout_loss must be|layout_block must be"):
            train(str(broken), output=str(tmp_path / "broken"))
    assert not (tmp_path / "broken").exists()
