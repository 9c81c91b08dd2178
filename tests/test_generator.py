"""The generator: diffusion transformer, rectified flow, the text-to-video pipeline and its CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kinetoscope.cli import common, main
from kinetoscope.data.dataset import DEFAULT_BUCKETS, Bucket, ShapesWorldDataset
from kinetoscope.diffusion.rectified_flow import SAMPLERS, FlowSchedule, euler_sample, heun_sample, shift_time, stochastic_sample
from kinetoscope.media.video import video_info
from kinetoscope.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from kinetoscope.models.dit import MODEL_SIZES, DiffusionTransformer, config_for
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.pipelines.text_to_video import SamplingSettings, TextToVideo
from kinetoscope.training.generator import LatentBatches, diffusion_loss

TINY_AE = AutoencoderConfig(latent_channels=8, widths=(12, 24), blocks_per_level=1)


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    model = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=2))
    for p in model.parameters():  # open the adaLN-Zero gates so outputs depend on every input
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder.load()


@pytest.fixture(scope="module")
def pipe(text_encoder):
    torch.manual_seed(0)
    return TextToVideo(tiny_transformer(), VideoAutoencoder(TINY_AE), text_encoder)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, pipe):
    """A complete generator folder (random weights) for exercising loading and the CLI."""
    root = tmp_path_factory.mktemp("weights")
    pipe.autoencoder.save_pretrained(root / "autoencoder")
    pipe.transformer.save_pretrained(root / "generator")
    (root / "generator" / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder", "fps": 8.0}))
    return root / "generator"


# -- the transformer --------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", DEFAULT_BUCKETS, ids=str)
def test_transformer_keeps_the_latent_shape_for_every_bucket(bucket):
    model = tiny_transformer()
    shape = (2, 8, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
    text, mask = torch.randn(2, 5, 384), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        assert model(torch.randn(shape), torch.rand(2), text, mask).shape == shape


def test_padding_tokens_of_the_prompt_are_ignored():
    model = tiny_transformer()
    x, t = torch.randn(1, 8, 2, 4, 4), torch.rand(1)
    text = torch.randn(1, 3, 384)
    padded = torch.cat([text, torch.randn(1, 2, 384) * 100], 1)
    with torch.no_grad():
        a = model(x, t, text, torch.ones(1, 3, dtype=torch.bool))
        b = model(x, t, padded, torch.tensor([[True] * 3 + [False] * 2]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_canvas_positions_tell_tokens_where_the_edges_are():
    """With rotary positions alone a model cannot tell a token at the edge from one in the middle of
    a uniform latent; canvas features can, and at any size they mean the same fractions."""
    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1, canvas_frequencies=4))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.zeros(1, 8, 1, 8, 8), torch.full((1,), 0.5)  # a 4x4 grid of 2x2-cell tokens
    text, mask = torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, text, mask)[0, :, 0]  # (C, H, W)
        assert not torch.allclose(out[:, 0, 0], out[:, 2, 2], atol=1e-4)  # corner token, inner token
        model.canvas_in.weight.zero_()
        flat = model(x, t, text, mask)[0, :, 0]
        torch.testing.assert_close(flat[:, 0, 0], flat[:, 2, 2])  # translation-equivariant without them
    from kinetoscope.models.dit import canvas_features

    small, large = canvas_features((1, 2, 2), 4, "cpu"), canvas_features((1, 6, 6), 4, "cpu")
    assert small.shape == (4, 25)
    # The small grid's cell (0, 0) and the large grid's cell (1, 1) are both centred at 1/4 of each side.
    torch.testing.assert_close(small[0], large[1 * 6 + 1])
    clip = canvas_features((5, 2, 2), 4, "cpu").reshape(5, 2, 2, -1)
    assert clip[0, 0, 0, 8] == 1 and not clip[1:, :, :, 8].any()  # the first latent step is flagged
    assert not torch.allclose(clip[1, 0, 0], clip[2, 0, 0])


def test_rotary_positions_rotate_each_feature_pair_by_its_angle():
    from kinetoscope.models.dit import apply_rope, rope_frequencies

    rotations = rope_frequencies(12, (2, 3, 4), 100.0, "cpu")  # (N, pairs) complex
    x = torch.randn(1, 2, 24, 12)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = rotations.real, rotations.imag
    expected = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rotations), expected)
    torch.testing.assert_close(apply_rope(x, rotations).norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths
    assert not torch.allclose(rotations[5], rotations[6])  # different places, different angles


def test_local_mixing_lets_a_token_hear_its_neighbours_and_only_them():
    from kinetoscope.models.dit import DiTBlock

    torch.manual_seed(0)
    grid = (2, 3, 5)  # not square, so swapping height and width would show
    x = torch.randn(1, 30, 128)
    poked = x.clone()
    poked[0, 1 * 15 + 1 * 5 + 1] += 1.0  # the token at (t, h, w) = (1, 1, 1)
    for local_mixing in (False, True):
        block = DiTBlock(config_for("tiny", local_mixing=local_mixing))
        if local_mixing:
            torch.nn.init.normal_(block.local_mix.weight, std=0.1)  # starts at zero, silent
        with torch.no_grad():
            changed = (block.feed_forward(poked, grid) - block.feed_forward(x, grid)).abs().sum(-1)[0].reshape(grid) > 0
        assert changed[1, 1, 1] and not changed[1, 1, 3] and not changed[0, 1, 1]  # attention alone links latent steps
        assert changed[1, 2, 2] == changed[1, 0, 0] == changed[1, 1, 2] == local_mixing  # neighbours in the same step


def test_model_sizes_registry():
    assert {"tiny", "small", "base"} <= set(MODEL_SIZES)
    with pytest.raises(ValueError, match="unknown model size"):
        config_for("huge")


def test_checkpoint_round_trip(tmp_path):
    model = tiny_transformer()
    model.save_pretrained(tmp_path)
    loaded = DiffusionTransformer.from_pretrained(tmp_path)
    x, t, text, mask = torch.randn(1, 8, 2, 2, 2), torch.rand(1), torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text, mask), model(x, t, text, mask))


@pytest.mark.parametrize("options", [{}, {"self_condition": True}, {"local_mixing": True}], ids=["plain", "self-conditioned", "local mixing"])
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(text_encoder, options):
    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", latent_channels=8, **options))
    batch = ShapesWorldDataset().make_batch(np.random.default_rng(0), Bucket(32, 32, 5), 8)
    latents, text, mask = LatentBatches(VideoAutoencoder(TINY_AE), text_encoder, torch.device("cpu"))(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = FlowSchedule()

    def loss_at_fixed_noise():
        per_sample, _, _ = diffusion_loss(model, latents, text, mask, schedule, 0.1, torch.Generator().manual_seed(1))
        return per_sample.mean()

    before = loss_at_fixed_noise().item()
    for _ in range(30):
        loss = loss_at_fixed_noise()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_at_fixed_noise().item() < 0.7 * before
    if options.get("local_mixing"):  # the convolutions start at zero and learn
        assert all(block.local_mix.weight.abs().sum() > 0 for block in model.blocks)


# -- rectified flow ---------------------------------------------------------------------------------


def test_samplers_integrate_a_straight_path_exactly():
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    times = FlowSchedule().sampling_times(7, tokens=320)
    for sampler in (euler_sample, heun_sample):
        torch.testing.assert_close(sampler(lambda x, t: noise - x0, noise, times), x0)


def test_every_sampler_lands_on_a_single_clean_sample():
    # The exact velocity when all data is one point x0: every sampler must end exactly there.
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    times = FlowSchedule().sampling_times(7, tokens=320)
    for name, sampler in SAMPLERS.items():
        visited = []

        def velocity(x, t):
            visited.append((x, t))
            return (x - x0) / t[:, None]

        out = sampler(velocity, noise, times, draw_noise=torch.randn)
        torch.testing.assert_close(out, x0, msg=name)
        assert len(visited) >= len(times) - 1
        if name != "stochastic":  # deterministic samplers stay on the straight path from the noise to x0 at every step
            for x, t in visited:
                torch.testing.assert_close(x, x0 + t[:, None] * (noise - x0), msg=name)


def test_the_stochastic_sampler_is_euler_without_churn_and_seeded_with_it():
    def curved(x, t):
        return torch.sin(3 * x) + t[:, None]

    noise, times = torch.randn(2, 5), torch.linspace(1.0, 0.0, 6)
    torch.testing.assert_close(stochastic_sample(curved, noise, times, churn=0.0), euler_sample(curved, noise, times))

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return stochastic_sample(curved, noise, times, draw_noise=lambda shape: torch.randn(shape, generator=generator))

    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert not torch.allclose(run(1), euler_sample(curved, noise, times))


def test_the_cli_offers_every_sampler():
    from kinetoscope.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert set(next(a for a in generate._actions if a.dest == "sampler").choices) == set(SAMPLERS)


def test_heun_is_second_order_on_a_curved_path():
    # dx/dt = x, integrated from t=1 down to 0: the exact answer is x(1) / e.
    start = torch.ones(1)
    times = torch.linspace(1.0, 0.0, 9)
    exact = start / torch.e
    euler_error = (euler_sample(lambda x, t: x, start, times) - exact).abs().item()
    heun_error = (heun_sample(lambda x, t: x, start, times) - exact).abs().item()
    assert heun_error < euler_error / 5


def test_a_sample_from_part_of_the_path_starts_exactly_there():
    schedule = FlowSchedule()  # 80 tokens: no shift, so these are fractions of the path
    full = schedule.sampling_times(5, tokens=80)
    torch.testing.assert_close(schedule.sampling_times(5, tokens=80, strength=0.6), full[-4:])  # on the grid: its last times
    for strength, taken in ((0.3, 2), (0.5, 3), (0.01, 1)):  # off the grid: from there, in no wider steps
        times = schedule.sampling_times(5, tokens=80, strength=strength)
        assert times[0].item() == pytest.approx(strength) and times[-1] == 0 and len(times) == taken + 1
        assert (times[:-1] - times[1:]).max() <= 0.2 + 1e-6


def test_output_frames_round_halves_up():
    from kinetoscope.cli.generate import retime

    model_frames = np.arange(33)  # 4 s at 8 fps
    assert [len(retime(model_frames, 8.0, 1.0, seconds)) for seconds in (0.5, 1.5, 2.5)] == [2, 3, 4]
    assert len(retime(model_frames, 8.0, 8.0, 2.0)) == 17


def test_another_kind_of_model_folder_is_refused_in_one_line(weights_dir, tmp_path, capsys):
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), "--weights", str(weights_dir.parent / "autoencoder")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not describe a generator" in err, err


def test_shift_grows_with_token_count_and_keeps_the_ends():
    schedule = FlowSchedule()
    assert schedule.shift(20) < schedule.shift(80) == 1.0 < schedule.shift(320)
    assert shift_time(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    big = schedule.sample_training_times(4000, 1280, torch.Generator().manual_seed(0))
    small = schedule.sample_training_times(4000, 80, torch.Generator().manual_seed(0))
    assert 0 < small.min() and big.max() < 1 and big.mean() > small.mean() + 0.1


def test_noise_can_share_part_of_its_variance_across_latent_steps():
    shape = (64, 8, 5, 6, 6)  # (B, C, T, H, W)
    assert torch.equal(FlowSchedule().noise(shape, torch.Generator().manual_seed(1)),
                       torch.randn(shape, generator=torch.Generator().manual_seed(1)))  # older models keep their videos
    noise = FlowSchedule(frame_correlation=0.5).noise(shape, torch.Generator().manual_seed(1))
    assert abs(noise.var().item() - 1) < 0.02
    across_time = torch.corrcoef(torch.stack([noise[:, :, 0].flatten(), noise[:, :, 4].flatten()]))[0, 1]
    across_space = torch.corrcoef(torch.stack([noise[:, :, 0, 0].flatten(), noise[:, :, 0, 3].flatten()]))[0, 1]
    assert abs(across_time - 0.5) < 0.03 and abs(across_space) < 0.05
    for wrong in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="frame_correlation"):
            FlowSchedule(frame_correlation=wrong)


def test_training_and_sampling_draw_the_schedules_noise(pipe, text_encoder, monkeypatch):
    drawn = []
    real_noise = FlowSchedule.noise

    def spy(self, shape, generator=None):
        drawn.append((self.frame_correlation, tuple(shape)))
        return real_noise(self, shape, generator)

    monkeypatch.setattr(FlowSchedule, "noise", spy)
    correlated = TextToVideo(pipe.transformer, pipe.autoencoder, text_encoder, FlowSchedule(frame_correlation=0.5))
    a = correlated("a red circle moves left", width=32, height=32, frames=5, steps=3, seed=3)
    assert drawn == [(0.5, (1, 8, 2, 4, 4))] * 4  # the start, then fresh noise at each stochastic step
    assert np.array_equal(a.frames, correlated("a red circle moves left", width=32, height=32, frames=5, steps=3, seed=3).frames)
    assert not np.array_equal(a.frames, pipe("a red circle moves left", width=32, height=32, frames=5, steps=3, seed=3).frames)
    drawn.clear()
    latents, text, mask = torch.randn(2, 8, 2, 4, 4), *text_encoder.encode(["a red circle", "a blue square"])
    diffusion_loss(pipe.transformer, latents, text, mask, FlowSchedule(frame_correlation=0.3), caption_dropout=0.0)
    assert drawn == [(0.3, (2, 8, 2, 4, 4))]


# -- the pipeline -----------------------------------------------------------------------------------


def test_same_seed_same_video_other_seed_other_video(pipe):
    a = pipe("a red circle moves left", width=32, height=32, frames=5, steps=2, seed=3)
    b = pipe("a red circle moves left", width=32, height=32, frames=5, steps=2, seed=3)
    c = pipe("a red circle moves left", width=32, height=32, frames=5, steps=2, seed=4)
    assert a.frames.shape == (5, 32, 32, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    assert set(a.timings) == {"text", "denoise", "decode"}


def test_a_compiled_transformer_computes_what_the_eager_one_does(text_encoder):
    from torch._dynamo.utils import counters

    pipe = TextToVideo(tiny_transformer(), VideoAutoencoder(TINY_AE), text_encoder).compile()
    assert pipe.denoiser is not pipe.transformer
    counters.clear()
    text, mask = text_encoder.encode(["a red circle moves left"])
    x, t = torch.randn(1, 8, 2, 4, 4), torch.tensor([0.7])
    with torch.no_grad():  # float32: bf16 rounding would differ once operations are fused
        assert torch.allclose(pipe.denoiser(x, t, text, mask), pipe.transformer(x, t, text, mask), atol=1e-4)
    video = pipe("a red circle moves left", width=32, height=32, frames=5, steps=2, seed=3)
    assert video.frames.shape == (5, 32, 32, 3) and pipe.compile_failure is None
    assert counters["stats"]["unique_graphs"] >= 1  # compiled for real, not run eagerly


def count_calls(pipe, monkeypatch):
    calls = []
    forward = pipe.transformer.forward

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", counting)
    return calls


def test_steps_guidance_and_sampler_change_what_they_should(pipe, monkeypatch):
    calls = count_calls(pipe, monkeypatch)
    run = lambda **kw: pipe("two small yellow squares slide up", width=32, height=32, frames=1, seed=0, **kw).frames
    guided = run(steps=3, guidance=4.0)
    assert calls == [2, 2, 2]  # one batch of conditional + unconditional per step
    calls.clear()
    conditional = run(steps=3, guidance=1.0)
    assert calls == [1, 1, 1]  # guidance 1 is the conditional model alone
    calls.clear()
    heun = run(steps=3, guidance=1.0, sampler="heun")
    assert len(calls) == 5  # two evaluations per step but the last
    calls.clear()
    more_steps = run(steps=6, guidance=1.0)
    assert len(calls) == 6
    assert not np.array_equal(guided, conditional)
    assert not np.array_equal(heun, conditional) and not np.array_equal(more_steps, conditional)


def test_guidance_extrapolates_from_the_empty_prompt_through_the_prompt(pipe, monkeypatch):
    def fake_velocity(x, t, text, mask, clean_estimate=None, guidance=None, layout=None):  # 3 where the prompt is seen, 1 for the empty prompt
        has_prompt = mask[:, 1:].any(1).float().view(-1, 1, 1, 1, 1)
        return torch.ones_like(x) * (1 + 2 * has_prompt)

    monkeypatch.setattr(pipe.transformer, "forward", fake_velocity)
    text, mask = pipe.text_encoder.encode(["a red circle"])
    x = torch.zeros(1, 8, 1, 4, 4)
    for guidance in (1.0, 2.5, 0.0):
        velocity = pipe.guided_velocity(text, mask, guidance)(x, torch.ones(1))
        torch.testing.assert_close(velocity, torch.full_like(x, 1 + 2 * guidance))
    # The shift may leave the first time a float32 rounding above 1: still inside the whole path's interval.
    first = torch.tensor([1.0], dtype=torch.float32).nextafter(torch.tensor([2.0]))
    torch.testing.assert_close(pipe.guided_velocity(text, mask, 2.5)(x, first), torch.full_like(x, 6.0))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="x" * 1001), "1001 characters"),
        (dict(prompt="a red circle moves left " * 14), "tokens long"),  # 300 characters, but cut by the encoder
        (dict(width=100), "multiples of 16"),
        (dict(frames=6), "1 \\+ 4k frames"),
        (dict(steps=0), "steps"),
        (dict(sampler="ddim"), "unknown sampler"),
        (dict(prompt=b"a red circle"), "must be a str, not bytes"),
        (dict(width=32.0), "width must be a whole number"),
        (dict(frames=True), "frames must be a whole number"),
        (dict(seed=None), "seed must be a whole number"),
        (dict(seed=-1), "seed must be a whole number from 0"),
        (dict(seed=2**64), "seed must be a whole number"),
        (dict(seed=1.5), "seed must be a whole number"),
    ],
)
def test_pipeline_refuses_bad_requests(pipe, kwargs, message):
    request = dict(prompt="a red circle spins", width=32, height=32, frames=1, steps=1) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe(**request)


def test_pipeline_loads_from_a_folder(weights_dir):
    loaded = TextToVideo.load(weights_dir)
    assert loaded.autoencoder.cfg == TINY_AE and loaded.fps == 8.0


# -- the CLI ----------------------------------------------------------------------------------------


def test_generate_cli_writes_mp4_and_png_of_the_asked_size(weights_dir, tmp_path):
    video = tmp_path / "clip.mp4"
    assert main(["generate", "a red circle moves to the right", "-o", str(video), "--size", "48x32",
                 "--seconds", "1", "--steps", "2", "--weights", str(weights_dir)]) == 0
    info = video_info(video)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (48, 32, 9, "h264")
    image = tmp_path / "still.png"
    assert main(["generate", "a blue square", "-o", str(image), "--size", "32x64", "--steps", "2",
                 "--weights", str(weights_dir)]) == 0
    info = video_info(image)
    assert (info["width"], info["height"], info["frames"]) == (32, 64, 1)


def test_generate_cli_other_frame_rates_keep_the_duration(weights_dir, tmp_path):
    video = tmp_path / "clip.mp4"
    assert main(["generate", "a red circle moves to the right", "-o", str(video), "--size", "32x32",
                 "--seconds", "2", "--fps", "12", "--steps", "1", "--weights", str(weights_dir)]) == 0
    info = video_info(video)
    assert info["frames"] == 25 and info["fps"] == pytest.approx(12)


@pytest.mark.parametrize(
    "args",
    [
        ["", "-o", "x.mp4"],
        ["x" * 1001, "-o", "x.mp4"],
        ["a red circle", "-o", "x.mp4", "--size", "100x100"],
        ["a red circle", "-o", "x.mp4", "--size", "0x5"],
        ["a red circle", "-o", "x.mp4", "--seconds", "0"],
        ["a red circle", "-o", "x.mp4", "--seconds", "-2"],
        ["a red circle", "-o", "x.mp4", "--seconds", "60"],
        ["a red circle moves left " * 14, "-o", "x.mp4"],
        ["a red circle", "-o", "x.mp4", "--steps", "1001"],
        ["a red circle", "-o", "x.txt"],
        ["a red circle", "-o", "x.mp4", "--seed", str(2**64)],
        ["a red circle", "-o", "x.mp4", "--guidance", "nan"],
        ["a red circle", "-o", "x.mp4", "--guidance", "-1"],
        ["a red circle", "-o", "x.mp4", "--guidance", "31"],
        ["a red circle", "-o", "x.mp4", "--fps", "0.000001"],
    ],
)
def test_generate_cli_bad_inputs_exit_2_with_one_line(weights_dir, tmp_path, capsys, args):
    args = [a.replace("x.", str(tmp_path / "x.")) for a in args]
    assert main(["generate", *args, "--weights", str(weights_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not list(tmp_path.iterdir())


def test_unwritable_outputs_are_refused_before_any_generation(weights_dir, tmp_path, capsys, monkeypatch):
    from kinetoscope.cli import generate

    monkeypatch.setattr(generate, "load_pipeline", lambda weights: pytest.fail("loaded the model for an output it cannot write"))
    (tmp_path / "clip.mp4").mkdir()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    for command in (["generate", "a red circle", "-o", str(tmp_path / "clip.mp4")],
                    ["generate", "a red circle", "-o", str(tmp_path / "notes.txt" / "clip.mp4")],
                    ["generate", "a red circle", "-o", str(tmp_path / ("a" * 300 + ".mp4"))],  # a name too long
                    ["generate", "a red circle", "-o", str(tmp_path / ("a" * 245 + ".mp4"))],  # too long for its temporary name
                    ["generate", "a red circle", "-o", "/proc/clip.mp4"],  # root may "access" it, but no file can be made there
                    ["generate", "a red circle", "-o", str(tmp_path / "clip.gif"), "--fps", "120"],  # a GIF's delays are 1/100 s
                    ["reconstruct", str(tmp_path / "notes.txt"), "--output", "/proc/clip.mp4"],
                    ["eval", "--per-tier", "1", "--report", str(tmp_path / "notes.txt" / "report.json")],
                    ["eval", "--per-tier", "1", "--report", str(tmp_path)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clip.mp4", "notes.txt"]  # no probe left behind


def test_eval_from_noise_cli_prints_and_reports_each_level(weights_dir, tmp_path, capsys):
    report = tmp_path / "levels.json"
    assert main(["eval", "--from-noise", "0.5", "1", "--clips", "2", "--steps", "2", "--report", str(report),
                 "--weights", str(weights_dir)]) == 0
    out = capsys.readouterr().out
    assert "from 0.5 of the path: " in out and "from 1 of the path: " in out and "of 2 clips fully right" in out
    levels = json.loads(report.read_text())["from_noise"]
    assert list(levels) == ["0.5", "1"] and all(scores["prompts"] == 2 for scores in levels.values())
    for bad in (["--from-noise", "0"], ["--from-noise", "1.5"], ["--from-noise", "nan"], ["--from-noise", "half"], ["--clips", "3"],
                ["--from-noise", "0.5", "1", "0.5"]):
        assert main(["eval", *bad, "--weights", str(weights_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--from-noise" in err, err
    assert main(["eval", "--true-layout", "--weights", str(weights_dir)]) == 2
    assert "needs a layout model" in capsys.readouterr().err


def test_the_api_refuses_out_of_range_guidance_and_fractional_steps(pipe):
    for settings in ({"guidance": float("nan")}, {"guidance": -1.0}, {"guidance": 1e30}, {"steps": 2.5}, {"steps": True}):
        with pytest.raises(ValueError):
            pipe("a red circle", width=32, height=32, frames=5, **settings)


def test_the_api_takes_numpy_numbers_and_flipped_videos(pipe):
    plain = pipe("a red circle", width=32, height=32, frames=5, steps=2, guidance=3.0, seed=4)
    numpy = pipe("a red circle", width=np.int64(32), height=np.int32(32), frames=np.int64(5), steps=np.int64(2),
                 guidance=np.float32(3.0), seed=np.uint8(4))
    assert np.array_equal(plain.frames, numpy.frames) and type(numpy.seed) is int
    flipped = plain.frames[:, :, ::-1]  # a view with a negative stride
    edited = pipe("a red circle", video=flipped, strength=np.float64(0.5), steps=2, seed=4)
    assert np.array_equal(edited.frames, pipe("a red circle", video=flipped.copy(), strength=0.5, steps=2, seed=4).frames)


def test_a_model_folder_with_a_frame_rate_it_cannot_have_is_refused_when_it_loads(weights_dir, tmp_path, capsys):
    settings = json.loads((weights_dir / "pipeline.json").read_text())
    for fps in (0, -8, "eight", None, 1e9):
        broken = tmp_path / f"fps_{fps}"
        shutil.copytree(weights_dir, broken)
        (broken / "pipeline.json").write_text(json.dumps({**settings, "autoencoder": str(weights_dir.parent / "autoencoder"), "fps": fps}))
        assert main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), "--weights", str(broken)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and '"fps" must be a frame rate' in err, err


def test_sizes_are_checked_against_each_axis_own_patch(pipe, monkeypatch):
    monkeypatch.setattr(pipe.transformer.cfg, "patch", (1, 2, 4))  # a token twice as wide as it is high
    assert pipe.size_multiples == (32, 16)
    pipe.check_request("a red circle", 64, 48, 1)
    with pytest.raises(ValueError, match="multiples of 32 and 16"):
        pipe.check_request("a red circle", 48, 64, 1)


def test_a_sample_started_from_a_noised_video_keeps_as_much_of_it_as_the_strength_leaves(pipe, monkeypatch):
    from kinetoscope.data import world
    from kinetoscope.data.dataset import clip_to_tensor, tensor_to_clip

    prompt = "a red circle moves right"
    clip = world.render(world.sample_scene(np.random.default_rng(1), 1.0, 0.5), 32, 32, 5, 8.0)
    with torch.no_grad():
        round_trip = tensor_to_clip(pipe.autoencoder(clip_to_tensor(clip)[None])[0]).astype(float)
    calls = count_calls(pipe, monkeypatch)
    start = lambda strength: pipe(prompt, steps=20, seed=3, video=clip, strength=strength).frames
    near, far = start(0.05), start(0.6)
    assert len(calls) == 1 + 12  # that share of the 20 steps: one, then twelve
    calls.clear()
    from_noise = start(1.0)
    assert len(calls) == 20
    assert np.array_equal(from_noise, pipe(prompt, width=32, height=32, frames=5, steps=20, seed=3).frames)  # nothing of it left
    distance = lambda frames: np.abs(frames.astype(float) - round_trip).mean()
    assert distance(near) < distance(far) < distance(from_noise)
    assert near.shape == clip.shape  # the video sets size and length
    for bad, message in [({"video": clip, "strength": 0.0}, "strength"), ({"video": clip, "strength": 1.5}, "strength"),
                         ({"strength": 0.5}, "needs a video"), ({"video": clip.astype(np.float32)}, "uint8"),
                         ({"video": clip[..., :2]}, "uint8"), ({"video": clip[:4]}, "4 frames is not supported")]:
        with pytest.raises(ValueError, match=message):
            pipe(prompt, **bad)


def test_bench_counts_the_attention_flops_the_math_backend_spells_out(pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kinetoscope.eval.bench import denoiser_flops

    settings = SamplingSettings(steps=2, guidance=4.0)
    fused = denoiser_flops(pipe, 32, 32, 5, settings)  # the CPU flash kernel, which torch's counter does not know
    with sdpa_kernel(SDPBackend.MATH):  # the same attention as matmuls, which it does
        spelled_out = denoiser_flops(pipe, 32, 32, 5, settings)
    assert fused == spelled_out


def test_guidance_applies_only_within_its_interval_and_the_bench_counts_the_passes(pipe, monkeypatch):
    from kinetoscope.eval.bench import denoiser_flops

    run = lambda **kw: pipe("two small yellow squares slide up", width=32, height=32, frames=1, seed=0, steps=6, guidance=4.0, **kw).frames
    times = pipe.schedule.sampling_times(6, pipe.transformer.token_count(pipe.autoencoder.latent_shape(1, 32, 32)))[:-1].tolist()
    calls = count_calls(pipe, monkeypatch)
    everywhere = run()
    assert calls == [2] * 6
    calls.clear()
    assert np.array_equal(run(guidance_interval=(0.0, 1.0)), everywhere)  # the default interval is the whole path
    calls.clear()
    limited = run(guidance_interval=(0.3, 0.8))
    assert calls == [2 if 0.3 < t <= 0.8 else 1 for t in times] and 1 in calls and 2 in calls
    assert not np.array_equal(limited, everywhere)
    monkeypatch.undo()
    per_pass = denoiser_flops(pipe, 32, 32, 1, SamplingSettings(steps=6, guidance=1.0)) / 6
    assert denoiser_flops(pipe, 32, 32, 1, SamplingSettings(steps=6, guidance=4.0, guidance_interval=(0.3, 0.8))) == pytest.approx(
        sum(calls) * per_pass, rel=0.01)
    for bad in ((0.5, 0.5), (0.8, 0.3), (-0.1, 0.5), (0.2, 1.5), (0.2,), "ab", (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="guidance_interval must be two times"):
            run(guidance_interval=bad)


def test_bench_cli_reports_every_figure_the_issue_asks_for(weights_dir, capsys):
    assert main(["bench", "--weights", str(weights_dir), "--size", "32x32", "--steps", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for figure in ("seconds per clip:", "text", "denoise", "decode", "real-time factor:", "matmul rate measured now", "peak memory:"):
        assert figure in out


def test_bench_times_held_out_prompts_once_each_and_reports_the_mean_clip(weights_dir, monkeypatch, capsys):
    from kinetoscope.eval import bench
    from kinetoscope.eval.generation import held_out_prompts
    from kinetoscope.pipelines.text_to_video import TextToVideo

    asked, call = [], TextToVideo.__call__
    monkeypatch.setattr(TextToVideo, "__call__", lambda pipe, prompt, **kw: asked.append((prompt, kw.get("seed"))) or call(pipe, prompt, **kw))
    assert main(["bench", "--weights", str(weights_dir), "--size", "32x32", "--steps", "2", "--held-out", "2", "--repeats", "9"]) == 0
    assert asked[1:] == [(item.prompt, i) for i, item in enumerate(held_out_prompts(2))]  # after the warm-up, eval's prompts and seeds
    out = capsys.readouterr().out
    assert "the held-out prompts" in out and re.search(r"seconds per clip: [\d.]+ median \(.*\); [\d.]+ mean", out)
    assert main(["bench", "--weights", str(weights_dir), "--held-out", "0"]) == 2

    class ThreeClips:  # a clip redrawn four times between two painted once
        device, fps, text_encoder = torch.device("cpu"), 8.0, SimpleNamespace(clear_cache=lambda: None)
        clips = iter([{"text": 1.0, "denoise": 2.0}, {"text": 1.0, "denoise": 8.0}, {"text": 1.0, "denoise": 2.0}])

        def __call__(self, prompt, **settings):
            timings = next(self.clips, {"text": 1.0, "denoise": 2.0})  # the warm-up, then the three timed
            return SimpleNamespace(timings=timings, draws=4 if timings["denoise"] == 8.0 else 1)

    monkeypatch.setattr(bench, "denoiser_flops", lambda *args: 1.0)
    monkeypatch.setattr(bench, "matmul_rate", lambda *args, **kwargs: 1.0)
    result = bench.benchmark_generation(ThreeClips(), sampling=SamplingSettings(steps=2, guidance=1.0, sampler="euler"), repeats=3)
    assert result["total_s"] == 3.0 and result["mean_total_s"] == 5.0  # the median clip hides the redrawn one; the mean does not


def test_bench_runs_with_a_compact_text_encoder_and_pays_for_every_prompt(weights_dir, tmp_path, monkeypatch, capsys):
    """A lent GPU has only the compact copy, whose vocabulary is Shapes World's: the bench's own
    prompts and probes must stay inside it; and text encoding is timed uncached on every run."""
    from kinetoscope.eval import bench
    from kinetoscope.models import text_encoder

    compact = text_encoder.write_compact_copy(tmp_path / "compact", [bench.WARM_UP_PROMPT, *bench.BENCH_PROMPTS, common.PROBE_PROMPT])
    monkeypatch.setenv(text_encoder.MODEL_DIR_VARIABLE, str(compact))
    encoded = []
    run_model = text_encoder.TextEncoder._run_model
    monkeypatch.setattr(text_encoder.TextEncoder, "_run_model", lambda self, prompts, n: encoded.extend(prompts) or run_model(self, prompts, n))
    repeats = len(bench.BENCH_PROMPTS) + 2
    assert main(["bench", "--weights", str(weights_dir), "--size", "32x32", "--steps", "1", "--repeats", str(repeats)]) == 0
    assert "seconds per clip:" in capsys.readouterr().out
    timed = [prompt for prompt in encoded if prompt in bench.BENCH_PROMPTS]
    assert len(timed) >= repeats  # none of the timed runs found its prompt cached


def test_without_a_working_compiler_generation_goes_on_eagerly_and_bench_compile_says_why(weights_dir, tmp_path):
    """A machine without g++: run in child processes, so the failed compiler probe is not remembered here."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    generate = (f"from kinetoscope.pipelines.text_to_video import TextToVideo\n"
                f"pipe = TextToVideo.load({str(weights_dir)!r}).compile()\n"
                f"video = pipe('a red circle', width=32, height=32, frames=5, steps=2)\n"
                f"print(video.frames.shape, pipe.denoiser is pipe.transformer, pipe.compile_failure is not None)")
    done = subprocess.run([sys.executable, "-c", generate], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "(5, 32, 32, 3) True True", done.stderr[-2000:]
    assert "torch.compile failed" in done.stderr  # a warning, not a traceback
    bench = [sys.executable, "-m", "kinetoscope", "bench", "--weights", str(weights_dir), "--size", "32x32", "--steps", "1",
             "--repeats", "1", "--compile"]
    done = subprocess.run(bench, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "run without --compile" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_generate_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), "--weights", str(tmp_path / "none")]) == 2
    assert "no generator checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage weights", "foreign weights", "broken config", "another autoencoder"])
def test_generate_cli_corrupt_checkpoint_is_one_line(weights_dir, tmp_path, capsys, damage):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "pipeline.json"):
        (broken / name).write_bytes((weights_dir / name).read_bytes())
    (broken / "pipeline.json").write_text(json.dumps({"autoencoder": str(weights_dir.parent / "autoencoder")}))
    if damage == "garbage weights":
        (broken / "model.safetensors").write_bytes(b"not a safetensors file at all")
    elif damage == "foreign weights":
        (broken / "config.json").write_text(json.dumps({"dim": 64, "depth": 1, "heads": 2, "latent_channels": 8}))
    elif damage == "another autoencoder":  # no autoencoder named: the default one, of other latent channels
        (broken / "pipeline.json").write_text(json.dumps({"fps": 8.0}))
    else:
        (broken / "config.json").write_text("{ not json")
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), "--weights", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load" in err
    assert not (tmp_path / "x.mp4").exists()



# -- evaluation -----------------------------------------------------------------------------------------


class RenderingPipe:
    """A stand-in generator that draws each prompt's true scene, or a blank canvas for `blank`."""

    def __init__(self, scenes: dict, blank: bool = False, fps: float = 8.0):
        self.scenes, self.blank, self.fps = scenes, blank, fps
        self.lengths, self.seeds = set(), []  # the frame counts and noise seeds asked for

    def frames_for(self, seconds: float) -> int:
        return 1 + round(seconds * self.fps)

    def __call__(self, prompt, frames=17, seed=0, **settings):
        from kinetoscope.data import world

        self.lengths.add(frames)
        self.seeds.append(seed)
        frames = world.render(self.scenes[prompt], 128, 128, frames, self.fps)
        return SimpleNamespace(frames=np.zeros_like(frames) if self.blank else frames, fps=self.fps, draws=1)


def test_eval_scores_true_renders_right_and_blank_ones_wrong(monkeypatch):
    from kinetoscope.data import captions
    from kinetoscope.eval import generation

    scenes, caption_variants = {}, captions.caption_variants

    def recording_variants(scene, rng, count=4, split="train"):
        texts = caption_variants(scene, rng, count, split)
        scenes.update(dict.fromkeys(texts, scene))
        return texts

    prompts = generation.held_out_prompts(4)
    monkeypatch.setattr(captions, "caption_variants", recording_variants)
    assert generation.held_out_prompts(4) == prompts  # the same seeded prompts on every call
    assert generation.held_out_prompts(4, seed=778) != prompts  # `eval --prompt-seed`: another sample
    assert {item.tier for item in prompts} == set(generation.TIERS) and len(prompts) == 8
    assert not any(captions.is_heldout_scene(scenes[p.prompt]) for p in prompts if p.tier == "unseen phrasings")
    assert all(captions.is_heldout_scene(scenes[p.prompt]) for p in prompts if p.tier == "unseen combinations")
    assert all(captions.is_heldout_phrasing(p.prompt) for p in prompts if p.tier == "unseen phrasings")

    truth = generation.evaluate_generator(RenderingPipe(scenes), per_tier=4)
    assert {tier: scores["prompts"] for tier, scores in truth["tiers"].items()} == dict.fromkeys(generation.TIERS, 4)
    assert all(scores["fully_right"] >= 0.75 for scores in truth["tiers"].values()), truth["failures"]
    faster = RenderingPipe(scenes, fps=16.0)
    scored = generation.evaluate_generator(faster, per_tier=4)
    assert faster.lengths == {33}  # the scenes' 2 seconds at the model's own frame rate
    assert faster.seeds == list(range(8))  # each prompt its own noise, the same for every model
    assert all(scores["fully_right"] >= 0.75 for scores in scored["tiers"].values()), scored["failures"]
    blank = generation.evaluate_generator(RenderingPipe(scenes, blank=True), per_tier=4)
    assert all(scores["fully_right"] == 0 for scores in blank["tiers"].values())
    assert len(blank["failures"]) == 8 and all(scores["attributes"]["count"] == 0 for scores in blank["tiers"].values())
    named = {p.prompt: len(captions.parse_prompt(p.prompt).objects) for p in prompts}
    assert {count: tally["prompts"] for count, tally in blank["by_objects"].items()} == {
        count: list(named.values()).count(count) for count in sorted(set(named.values()))}
    assert all(tally["fully_right"] == 0 for tally in blank["by_objects"].values())
    assert sum(tally["fully_right"] for tally in truth["by_objects"].values()) == 8 - len(truth["failures"])
    for scores in blank["tiers"].values():  # every named object's count checked once, none passed
        assert scores["checks"]["count"]["passed"] == 0 and scores["checks"]["count"]["of"] >= 4
        assert all(0 <= c["passed"] <= c["of"] for c in scores["checks"].values())
    for scores in truth["tiers"].values():
        assert all(c["passed"] / c["of"] == scores["attributes"][name] for name, c in scores["checks"].items())


def eval_report(prompt_seed=777, count=(36, 341), fully_right=0.0):
    """A report as `kinetoscope eval --report` writes it, two tiers, with `count` passed of checked."""
    def tier():
        return {"prompts": 100, "fully_right": fully_right, "attributes": {},
                "checks": {"count": {"passed": count[0], "of": count[1]}, "background": {"passed": 0, "of": 50}}}

    return {"prompt_seed": prompt_seed, "sampling": {"steps": 20, "guidance": 4.0, "sampler": "stochastic"}, "noise_seeds": "the prompt's index",
            "tiers": {"unseen combinations": tier(), "unseen phrasings": tier()}, "failures": []}


def test_compare_reports_pairs_every_shared_rate_and_sums_them():
    from kinetoscope.eval.generation import compare_reports

    changes = {(c.section, c.rate): c for c in compare_reports(eval_report(), eval_report(count=(63, 341), fully_right=0.04))}
    assert list(changes)[:3] == [("unseen combinations", "fully right"), ("unseen combinations", "count"),
                                 ("unseen combinations", "background")]
    assert changes["unseen phrasings", "fully right"].other == (4, 100)
    assert changes["all", "count"].base == (72, 682) and changes["all", "count"].other == (126, 682)
    assert changes["all", "all checks"].base == (72, 782)
    assert changes["unseen combinations", "count"].z == pytest.approx(2.93, abs=0.01)  # (63 - 36) / 341 over the pooled error
    assert changes["all", "background"].z == 0  # 0% against 0%: nothing could have come out otherwise
    assert compare_reports(eval_report(count=(63, 341)), eval_report())[1].z == pytest.approx(-2.93, abs=0.01)
    one_level = {"from_noise": {"1": eval_report()["tiers"]["unseen phrasings"]}}
    assert [(c.section, c.rate) for c in compare_reports(one_level, one_level)] == [
        ("from 1 of the path", "fully right"), ("from 1 of the path", "count"), ("from 1 of the path", "background"),
        ("all", "all checks")]


def test_compare_cli_prints_each_change_and_refuses_what_it_cannot_read(tmp_path, capsys):
    base, other = tmp_path / "base.json", tmp_path / "other.json"
    base.write_text(json.dumps(eval_report()))
    other.write_text(json.dumps(eval_report(prompt_seed=778, count=(63, 341))))
    assert main(["compare", str(base), str(other)]) == 0
    out = capsys.readouterr().out
    assert "36/341" in out and "63/341" in out and "+7.9 pts" in out and "+2.9" in out
    assert "different samples of prompts" in out and "noise" not in out  # 777 against 778, both seeded by index
    older = eval_report()
    del older["noise_seeds"]  # before 2026-12-01 every prompt started from noise seed 0
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert main(["compare", str(tmp_path / "older.json"), str(base)]) == 0
    assert "drew their noise differently" in capsys.readouterr().out
    (tmp_path / "hand_edited.json").write_text(json.dumps({**eval_report(), "sampling": "twenty steps"}))
    assert main(["compare", str(tmp_path / "hand_edited.json"), str(base)]) == 0  # what it can read, it compares
    assert "? steps of ?" in capsys.readouterr().out
    old = eval_report()
    for scores in old["tiers"].values():
        del scores["checks"]
    impossible = eval_report(count=(400, 341))
    noise_levels = {"from_noise": {"1": eval_report()["tiers"]["unseen phrasings"]}}
    for name, text in (("old.json", json.dumps(old)), ("impossible.json", json.dumps(impossible)), ("list.json", "[1, 2]"),
                       ("broken.json", "{"), ("levels.json", json.dumps(noise_levels)),
                       ("odd.json", json.dumps({**eval_report(), "from_noise": [1]})), ("empty.json", json.dumps({"tiers": {}}))):
        (tmp_path / name).write_text(text)
    for arguments in ([str(tmp_path / "missing.json"), str(base)], [str(base), str(tmp_path / "old.json")],
                      [str(tmp_path / "impossible.json"), str(base)], [str(tmp_path / "list.json"), str(base)],
                      [str(base), str(tmp_path / "broken.json")], [str(base), str(tmp_path / "levels.json")],
                      [str(tmp_path / "odd.json"), str(base)], [str(base), str(tmp_path / "empty.json")], [str(tmp_path), str(base)]):
        assert main(["compare", *arguments]) == 2, arguments
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("kinetoscope compare: error: "), err


def test_eval_from_noise_judges_true_clips_sampled_back_from_each_level():
    from kinetoscope.data import captions
    from kinetoscope.eval import generation

    class ReturningPipe:  # keeps the video it is given at every level, or draws nothing
        fps = 8.0

        def __init__(self, blank=False):
            self.blank, self.asked = blank, []

        def frames_for(self, seconds):
            return 17

        def __call__(self, prompt, video=None, strength=1.0, seed=0, **settings):
            self.asked.append((prompt, strength, seed, video.shape))
            return SimpleNamespace(frames=np.zeros_like(video) if self.blank else video, fps=self.fps)

    pipe = ReturningPipe()
    levels = generation.evaluate_from_noise(pipe, [0.5, 1.0], clips=6)
    assert list(levels) == [0.5, 1.0] and all(scores["prompts"] == 6 for scores in levels.values())
    assert all(scores["fully_right"] >= 5 / 6 for scores in levels.values())  # the judge on true renders
    assert [strength for _, strength, _, _ in pipe.asked] == [0.5] * 6 + [1.0] * 6
    assert {shape for *_, shape in pipe.asked} == {(17, 128, 128, 3)}
    assert pipe.asked[:6] == [(p, 0.5, s, shape) for p, _, s, shape in pipe.asked[6:]]  # the same clips, seeds and captions
    assert not any(captions.is_heldout_phrasing(prompt) for prompt, *_ in pipe.asked)  # training scenes and phrasings
    blank = generation.evaluate_from_noise(ReturningPipe(blank=True), [1.0], clips=3)
    assert blank[1.0]["fully_right"] == 0 and blank[1.0]["checks"]["count"]["passed"] == 0


# -- the shipped default model ------------------------------------------------------------------------


def test_the_shipped_model_is_small_and_records_how_it_was_trained():
    from kinetoscope.pipelines.text_to_video import DEFAULT_WEIGHTS

    assert (DEFAULT_WEIGHTS / "model.safetensors").stat().st_size < 32 * 2**20
    config = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())
    assert config["trained_steps"] > 0 and "hardware" in config


def test_the_shipped_model_generates_what_the_readme_promises(tmp_path):
    from kinetoscope.media.video import read_video

    output = tmp_path / "out.mp4"
    assert main(["generate", "a red circle moves to the right on a black background", "-o", str(output), "--steps", "8"]) == 0
    info = video_info(output)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (128, 128, 17, "h264")
    frames, _ = read_video(output)
    pixels = frames.reshape(-1, 3).astype(int)
    dark = (pixels.max(1) < 40).mean()
    red = ((pixels[:, 0] > 150) & (pixels[:, 1] < 90) & (pixels[:, 2] < 90)).mean()
    assert dark > 0.8 and red > 0.001  # a black background with something red on it


def test_self_conditioning_refines_the_estimate_of_the_previous_step(text_encoder, monkeypatch):
    torch.manual_seed(0)
    transformer = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1, self_condition=True)).eval()
    pipe = TextToVideo(transformer, VideoAutoencoder(TINY_AE), text_encoder)
    seen = []  # (x, t, clean estimate) of every call, and the guided velocity it led to

    def fake_velocity(x, t, text, mask, clean_estimate=None, guidance=None, layout=None):
        v = x * (0.5 + t.view(-1, 1, 1, 1, 1)) + mask[:, 1:].any(1).float().view(-1, 1, 1, 1, 1)
        seen.append((x[:1].clone(), t[:1].clone(), clean_estimate))
        return v

    monkeypatch.setattr(pipe.transformer, "forward", fake_velocity)
    pipe("a red circle", width=32, height=32, frames=1, steps=3, guidance=3.0, sampler="euler")
    assert seen[0][2] is None  # nothing to refine at the first step
    for (x, t, _), (_, _, estimate) in zip(seen, seen[1:]):
        guided = x * (0.5 + t) + 3.0  # unconditional x(0.5+t), plus 3 times the prompt's +1
        assert estimate.shape[0] == 2  # the same estimate for the conditional and unconditional halves
        torch.testing.assert_close(estimate, (x - t * guided).repeat(2, 1, 1, 1, 1))


def test_only_a_self_conditioned_transformer_takes_an_estimate():
    x, t, text, mask = torch.randn(1, 8, 2, 2, 2), torch.rand(1), torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="self-conditioning"):
        tiny_transformer()(x, t, text, mask, torch.zeros_like(x))
    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=1, self_condition=True)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():  # no estimate means zeros; another estimate changes the prediction
        torch.testing.assert_close(model(x, t, text, mask), model(x, t, text, mask, torch.zeros_like(x)))
        assert not torch.allclose(model(x, t, text, mask), model(x, t, text, mask, torch.randn_like(x)))


def test_models_compute_in_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    """Emulated bf16 matmuls run about 100x slower than fp32 on an AVX2 CPU, so autocast there makes
    every model crawl; with AVX-512 BF16 or AMX they run several times faster than fp32."""
    from kinetoscope.models import precision

    flags = Path("/proc/cpuinfo").read_text().split()
    assert precision.cpu_multiplies_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    cpu = torch.device("cpu")
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda native=native: native)
        assert precision.compute_dtype(cpu) == dtype
        with precision.autocast_for(cpu):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    assert precision.compute_dtype(torch.device("cuda")) == torch.bfloat16


# -- guidance distillation --------------------------------------------------------------------------


def distilled_student(teacher, guidance_range=(1.0, 6.0)):
    """A guidance-distilled copy of `teacher`, its guidance input still silent."""
    student = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=2, distilled_guidance=guidance_range)).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student


def test_a_distilled_transformer_takes_the_guidance_scale_and_others_refuse_it():
    teacher = tiny_transformer()
    student = distilled_student(teacher)
    x, t, text, mask = torch.randn(2, 8, 2, 4, 4), torch.rand(2), torch.randn(2, 3, 384), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs the guidance scale"):
            student(x, t, text, mask)
        with pytest.raises(ValueError, match="not guidance-distilled"):
            teacher(x, t, text, mask, guidance=torch.full((2,), 4.0))
        # Silent at first: the student is its teacher's conditional model at every scale.
        for scale in (1.0, 4.0):
            torch.testing.assert_close(student(x, t, text, mask, guidance=torch.full((2,), scale)), teacher(x, t, text, mask))
        for p in student.guidance_mlp.parameters():
            torch.nn.init.normal_(p, std=0.05)
        assert not torch.allclose(student(x, t, text, mask, guidance=torch.full((2,), 1.0)),
                                  student(x, t, text, mask, guidance=torch.full((2,), 4.0)))
    with pytest.raises(ValueError, match="distilled_guidance"):
        config_for("tiny", distilled_guidance=(4.0, 2.0))


def test_distillation_targets_the_teachers_guided_velocity(text_encoder):
    from kinetoscope.training.generator import distillation_loss

    teacher = tiny_transformer()
    student = distilled_student(teacher)
    latents = torch.randn(3, 8, 2, 4, 4)
    text, mask = text_encoder.encode(["a red circle moves left", "two blue squares", "a pink disc grows"])
    schedule = FlowSchedule()

    def loss(scale):  # the same times and noise every call; only the scale differs
        per_sample, t = distillation_loss(student, teacher, latents, text, mask, schedule, (scale, scale), torch.Generator().manual_seed(0))
        return per_sample

    # The silent student gives the conditional velocity v_c; the target v_u + g (v_c - v_u) is off
    # from it by (g - 1)(v_c - v_u): nothing at g = 1, nine times as much squared at 4 as at 2.
    with torch.no_grad():
        assert loss(1.0).max() < 1e-10
        torch.testing.assert_close(loss(4.0), 9 * loss(2.0))
    # A few steps on the same batch learn the correction.
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    before = distillation_loss(student, teacher, latents, text, mask, schedule, (1.0, 6.0), torch.Generator().manual_seed(1))[0].mean().item()
    for _ in range(30):
        step_loss = distillation_loss(student, teacher, latents, text, mask, schedule, (1.0, 6.0), torch.Generator().manual_seed(1))[0].mean()
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
    assert step_loss.item() < 0.5 * before


def test_a_distilled_pipeline_takes_one_pass_per_step_and_only_its_guidance_range(text_encoder, monkeypatch):
    torch.manual_seed(0)
    pipe = TextToVideo(distilled_student(tiny_transformer(), (1.0, 5.0)), VideoAutoencoder(TINY_AE), text_encoder)
    seen = []

    def fake_velocity(x, t, text, mask, clean_estimate=None, guidance=None, layout=None):
        seen.append((x.shape[0], guidance.tolist()))
        return torch.zeros_like(x)

    from kinetoscope.eval.bench import denoiser_flops

    guided_flops = denoiser_flops(pipe, 32, 32, 5, SamplingSettings(steps=3, guidance=4.0))
    monkeypatch.setattr(pipe.transformer, "forward", fake_velocity)
    pipe("a red circle", width=32, height=32, frames=1, steps=3, guidance=4.0)
    assert seen == [(1, [4.0])] * 3  # the prompt alone, with the scale, once per step
    monkeypatch.undo()
    plain = TextToVideo(tiny_transformer(), pipe.autoencoder, text_encoder)
    # The benchmark counts the pass it makes: half of what classifier-free guidance costs, plus the scale's embedding.
    assert (denoiser_flops(plain, 32, 32, 5, SamplingSettings(steps=3, guidance=1.0)) < guided_flops
            < 0.51 * denoiser_flops(plain, 32, 32, 5, SamplingSettings(steps=3, guidance=4.0)))
    for scale in (0.5, 5.5):
        with pytest.raises(ValueError, match="between 1 and 5 for this model"):
            pipe("a red circle", width=32, height=32, frames=1, steps=1, guidance=scale)


def test_the_cli_refuses_a_guidance_the_distilled_model_does_not_know(tmp_path, capsys):
    weights = tmp_path / "distilled"
    distilled_student(tiny_transformer(), (1.0, 5.0)).save_pretrained(weights)
    VideoAutoencoder(TINY_AE).save_pretrained(tmp_path / "autoencoder")
    (weights / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder", "fps": 8.0}))
    for command in (["generate", "a red circle", "-o", str(tmp_path / "x.mp4")], ["eval", "--per-tier", "1"],
                    ["bench", "--repeats", "1"]):
        assert main([*command, "--guidance", "6", "--weights", str(weights)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "between 1 and 5 for this model" in err
    assert not (tmp_path / "x.mp4").exists()


def test_a_model_folder_names_its_own_sampling_settings(tmp_path, capsys, monkeypatch):
    """A distilled model may need other settings than the shipped model's 16 steps at guidance 4:
    its pipeline.json says so, and every entry point follows it unless told otherwise."""
    weights = tmp_path / "distilled"
    distilled_student(tiny_transformer(), (1.0, 3.0)).save_pretrained(weights)
    VideoAutoencoder(TINY_AE).save_pretrained(tmp_path / "autoencoder")

    sampling = {"steps": 3, "guidance": 2.5, "sampler": "euler", "guidance_interval": [0.0, 1.0]}
    (weights / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder", "fps": 8.0, "sampling": sampling}))
    pipe = TextToVideo.load(weights)
    assert pipe.sampling == SamplingSettings(3, 2.5, "euler")
    seen = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, *args, **kwargs: seen.append(args[-1].tolist()) or forward(x, *args, **kwargs))
    pipe("a red circle", width=32, height=32, frames=1)
    assert seen == [[2.5]] * 3  # Euler: one pass a step
    seen.clear()
    pipe("a red circle", width=32, height=32, frames=1, steps=2, guidance=1.5, sampler="heun")
    assert seen == [[1.5]] * 3  # what the caller names wins
    monkeypatch.undo()

    assert main(["bench", "--repeats", "1", "--size", "32x32", "--seconds", "1", "--weights", str(weights)]) == 0
    assert "3 steps of euler, guidance 2.5" in capsys.readouterr().out
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--weights", str(weights)]) == 0
    assert "3/3" in capsys.readouterr().err  # the progress bar counts the model's steps
    assert main(["eval", "--per-tier", "1", "--report", str(tmp_path / "eval.json"), "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "sampling: 3 steps of euler, guidance 2.5" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["sampling"] == sampling and report["prompt_seed"] == 777 and report["noise_seeds"] == "the prompt's index"
    assert main(["compare", str(tmp_path / "eval.json"), str(tmp_path / "eval.json")]) == 0  # what eval writes, compare reads
    assert "all checks" in capsys.readouterr().out
    checks = [c for scores in report["tiers"].values() for c in scores["checks"].values()]
    assert f"attribute checks passed: {sum(c['passed'] for c in checks)} of {sum(c['of'] for c in checks)}" in out
    by_objects = report["by_objects"]
    assert sum(tally["prompts"] for tally in by_objects.values()) == 2 and "fully right by objects named: " in out
    assert all(f"{count} object" in out for count in by_objects)
    assert main(["eval", "--per-tier", "1", "--sampler", "heun", "--report", str(tmp_path / "eval.json"), "--weights", str(weights)]) == 0
    assert "sampling: 3 steps of heun" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["sampling"]["sampler"] == "heun"
    assert main(["bench", "--repeats", "1", "--size", "32x32", "--seconds", "1", "--sampler", "heun", "--weights", str(weights)]) == 0
    assert "3 steps of heun" in capsys.readouterr().out

    (weights / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder"}))  # names none: the usual ones,
    assert TextToVideo.load(weights).sampling == SamplingSettings(20, 3.0, "stochastic")  # 4 brought into its range
    for broken, message in [({"sampling": {"stepz": 3}}, "unknown sampling setting(s) stepz"),
                            ({"sampling": "fast"}, '"sampling" must be an object'),
                            ({"sampling": {"guidance": 4.0}}, 'own sampling settings (pipeline.json "sampling") are not ones it can take: '
                                                              "guidance must be between 1 and 3"),
                            ({"sampling": {"guidance": "2"}}, "guidance must be between 1 and 3 for this model, got '2'"),
                            ({"sampling": {"steps": 0}}, "steps must be a whole number"),
                            ({"sampling": {"guidance": 2.0, "guidance_interval": 0.5}}, "guidance_interval must be two times (low, high)"),
                            ({"planning": {"small": 0.5}}, '"planning" must be an object of "small_cost"'),
                            ({"planning": {"small_cost": 2}}, "small_cost must be a share of its draws from 0 to 1, not 2")]:
        (weights / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder", **broken}))
        assert main(["generate", "a red circle", "-o", str(tmp_path / "y.png"), "--weights", str(weights)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "y.png").exists()


def test_a_low_noise_transformer_denoises_the_cleaner_stretch_of_the_path(text_encoder, monkeypatch):
    """Wan 2.2's split: the transformer takes the steps above the boundary, the low-noise one the
    rest, the boundary being a share of the path before the shift, as a recipe's [train] times is."""
    autoencoder, high, low = VideoAutoencoder(TINY_AE), tiny_transformer(0), tiny_transformer(1)
    single = TextToVideo(high, autoencoder, text_encoder)
    split = TextToVideo(high, autoencoder, text_encoder, low_noise_transformer=low, boundary=0.5)
    seen = []
    for name, model in (("high", high), ("low", low)):
        monkeypatch.setattr(model, "forward", lambda x, t, *a, _f=model.forward, _n=name, **k: seen.append((_n, float(t[0]))) or _f(x, t, *a, **k))
    run = lambda pipe: pipe("a red circle moves left", width=32, height=32, frames=5, steps=4, seed=1, sampler="euler").frames
    alone = run(single)
    seen.clear()
    both = run(split)
    latent_shape = autoencoder.latent_shape(5, 32, 32)
    times = split.schedule.sampling_times(4, high.token_count(latent_shape))[:-1].tolist()
    assert split.schedule.shift(high.token_count(latent_shape)) != 1  # so the boundary is shifted, as the steps are
    assert split.boundary_time(latent_shape) == pytest.approx(times[2])  # path 0.5: the third of the four steps
    assert seen == [("high", times[0]), ("high", times[1]), ("low", times[2]), ("low", times[3])]
    assert not np.array_equal(alone, both)
    twin = TextToVideo(high, autoencoder, text_encoder, low_noise_transformer=tiny_transformer(0), boundary=0.5)
    assert np.array_equal(run(twin), alone)  # the same weights on both sides: the single transformer's video

    other = DiffusionTransformer(config_for("tiny", latent_channels=8, depth=3))
    with pytest.raises(ValueError, match="the transformer's architecture"):
        TextToVideo(high, autoencoder, text_encoder, low_noise_transformer=other)
    with pytest.raises(ValueError, match="above 0 and below 1"):
        TextToVideo(high, autoencoder, text_encoder, low_noise_transformer=low, boundary=1.0)


def test_join_experts_makes_one_folder_that_loads_both_and_refuses_what_cannot_be_joined(weights_dir, tmp_path, capsys):
    """`kinetoscope join-experts NOISY CLEAN --boundary B -o DIR`: the folder it writes names the
    clean export's transformer under pipeline.json's "low_noise"; a broken "low_noise" is one line."""
    shutil.copytree(weights_dir.parent / "autoencoder", tmp_path / "autoencoder")
    shutil.copytree(weights_dir, tmp_path / "noisy")
    shutil.copytree(weights_dir, tmp_path / "clean")
    tiny_transformer(1).save_pretrained(tmp_path / "clean")
    joined = tmp_path / "joined"
    assert main(["join-experts", str(tmp_path / "noisy"), str(tmp_path / "clean"), "--boundary", "0.4", "-o", str(joined)]) == 0
    assert "joined" in capsys.readouterr().out
    pipe = TextToVideo.load(joined)
    assert pipe.boundary == 0.4 and pipe.planner is None and pipe.autoencoder.cfg == TINY_AE
    assert all(torch.equal(a, b) for a, b in zip(pipe.low_noise_transformer.parameters(), tiny_transformer(1).parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), TextToVideo.load(weights_dir).transformer.parameters()))
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--steps", "2", "--weights", str(joined)]) == 0
    assert (tmp_path / "x.png").is_file()
    capsys.readouterr()
    deeper_down = tmp_path / "models" / "joined"  # elsewhere, the noisy folder's "../autoencoder" is named in full
    assert main(["join-experts", str(tmp_path / "noisy"), str(tmp_path / "clean"), "--boundary", "0.4", "-o", str(deeper_down)]) == 0
    assert TextToVideo.load(deeper_down).autoencoder.cfg == TINY_AE
    capsys.readouterr()

    shutil.copytree(weights_dir, tmp_path / "deeper")
    DiffusionTransformer(config_for("tiny", latent_channels=8, depth=3)).save_pretrained(tmp_path / "deeper")
    shutil.copytree(weights_dir, tmp_path / "elsewhere")
    VideoAutoencoder(TINY_AE).save_pretrained(tmp_path / "other_autoencoder")  # the same shape, other weights
    (tmp_path / "elsewhere" / "pipeline.json").write_text(json.dumps({"autoencoder": "../other_autoencoder"}))
    before = {path.name: path.read_bytes() for path in joined.rglob("*") if path.is_file()}
    for args, message in [(["noisy", "clean", "--boundary", "1"], "above 0 and below 1"),
                          (["noisy", "deeper", "--boundary", "0.5"], "differ in architecture"),
                          (["noisy", "elsewhere", "--boundary", "0.5"], "different autoencoders' latents"),
                          (["joined", "clean", "--boundary", "0.5"], "already has a low-noise transformer"),
                          (["noisy", "nowhere", "--boundary", "0.5"], "is not a generator folder"),
                          (["joined", "clean", "--boundary", "0.5", "-o", str(joined)], "must be a new folder")]:
        folders = [str(tmp_path / name) if i < 2 else name for i, name in enumerate(args)]
        output = [] if "-o" in args else ["-o", str(tmp_path / "again")]
        assert main(["join-experts", *folders, *output]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert {path.name: path.read_bytes() for path in joined.rglob("*") if path.is_file()} == before  # a refusal writes nothing
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.tmp").exists()

    write = lambda low_noise: (joined / "pipeline.json").write_text(
        json.dumps({"autoencoder": "../autoencoder", "fps": 8.0, "low_noise": low_noise}))
    for broken, message in [("low_noise", '"low_noise" must be an object of "transformer"'),
                            ({"transformer": "low_noise", "bound": 0.4}, '"low_noise" must be an object of "transformer"'),
                            ({"transformer": "low_noise", "boundary": 2}, "above 0 and below 1"),
                            ({"transformer": str(tmp_path / "deeper")}, "the transformer's architecture"),
                            ({"transformer": "nowhere"}, "nowhere")]:
        write(broken)
        assert main(["generate", "a red circle", "-o", str(tmp_path / "y.png"), "--weights", str(joined)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "y.png").exists()
