"""The causal video autoencoder: shapes, causality, images, chunking, weights, training, CLI."""

import numpy as np
import pytest
import torch

from kinetoscope.cli import main
from kinetoscope.data import world
from kinetoscope.data.dataset import DEFAULT_BUCKETS, Bucket, ShapesWorldDataset
from kinetoscope.eval.reconstruction import evaluate_autoencoder, psnr
from kinetoscope.media.video import read_video, video_info, write_video
from kinetoscope.models.autoencoder import AutoencoderConfig, VideoAutoencoder, default_weights_dir
from kinetoscope.training.autoencoder import reconstruction_loss

SMALL = AutoencoderConfig(latent_channels=8, widths=(12, 24), blocks_per_level=1, refine_width=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = VideoAutoencoder(SMALL).eval()
    for p in model.parameters():  # zero-initialised branches would hide the time path; open them
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("bucket", DEFAULT_BUCKETS, ids=str)
def test_shapes_for_every_bucket(model, bucket):
    video = torch.rand(1, 3, bucket.frames, bucket.height, bucket.width) * 2 - 1
    with torch.no_grad():
        latents = model.encode(video)
        assert latents.shape == (1, 8, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
        assert latents.shape[1:] == model.latent_shape(bucket.frames, bucket.height, bucket.width)
        assert model.decode(latents).shape == video.shape


def test_changing_a_later_frame_never_changes_an_earlier_latent(model):
    video = torch.rand(1, 3, 17, 64, 64) * 2 - 1
    edited = video.clone()
    edited[:, :, 9:] = -video[:, :, 9:]  # frames 9.. belong to latent steps 3 and 4
    with torch.no_grad():
        a, b = model.encode(video), model.encode(edited)
    assert torch.equal(a[:, :, :3], b[:, :, :3])
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_changing_a_later_latent_never_changes_an_earlier_frame(model):
    latents = torch.randn(1, 8, 5, 4, 4)
    edited = latents.clone()
    edited[:, :, 3:] = -latents[:, :, 3:]  # latent steps 3 and 4 decode to frames 9..16
    with torch.no_grad():
        a, b = model.decode(latents), model.decode(edited)
    assert torch.equal(a[:, :, :9], b[:, :, :9])
    assert not torch.allclose(a[:, :, 9:], b[:, :, 9:])


def test_an_image_is_a_one_frame_video(model):
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        image_latent = model.encode(video[:, :, :1])
        assert image_latent.shape[2] == 1
        torch.testing.assert_close(image_latent, model.encode(video)[:, :, :1])
        assert model.decode(image_latent).shape == (2, 3, 1, 32, 48)


def test_chunked_encode_and_decode_match_whole_clip(model):
    video = torch.rand(1, 3, 33, 32, 32) * 2 - 1
    with torch.no_grad():
        whole = model.encode(video)
        torch.testing.assert_close(model.encode(video, chunk_steps=2), whole)
        torch.testing.assert_close(model.decode(whole, chunk_steps=3), model.decode(whole))


def test_unsupported_shapes_are_refused(model):
    with pytest.raises(ValueError, match="1\\+4k frames"):
        model.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(torch.zeros(1, 3, 5, 36, 32))


def test_save_and_load_round_trip(model, tmp_path):
    model.latent_mean.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = VideoAutoencoder.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video), model.encode(video))
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint"):
        VideoAutoencoder.from_pretrained(tmp_path / "missing")


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = VideoAutoencoder(SMALL)
    dataset = ShapesWorldDataset(with_captions=False)
    video = dataset.make_batch(np.random.default_rng(0), Bucket(32, 32, 5), 4)["video"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = reconstruction_loss(video, model(video))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- the shipped weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return VideoAutoencoder.from_pretrained()


def test_shipped_weights_reconstruct_held_out_clips(shipped):
    # A guard against regressions of the shipped weights; the full evaluation is in their README.
    results = evaluate_autoencoder(shipped, clips_per_bucket=8, buckets=(Bucket(128, 128, 17),))
    assert results["128x128x17"]["psnr"] > 32  # the target; these 8 clips gave 34.8 dB when shipped
    assert results["128x128x17"]["palette_colours_kept"] == 1.0


def test_shipped_latents_are_normalised(shipped):
    batch = ShapesWorldDataset(with_captions=False).make_batch(np.random.default_rng(1), Bucket(64, 64, 17), 8)
    with torch.no_grad():
        latents = shipped.encode(batch["video"])
    assert abs(latents.mean().item()) < 0.3
    assert 0.6 < latents.std().item() < 1.5


def test_reconstruct_cli_keeps_size_and_length_of_any_input(tmp_path):
    scene = world.sample_scene(np.random.default_rng(4))
    frames = world.render(scene, 70, 50, 11, 8)  # neither size nor length fits the model: padded, then cropped
    source, output = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(source, frames, 8)
    assert main(["reconstruct", str(source), "--output", str(output)]) == 0
    info = video_info(output)
    assert (info["width"], info["height"], info["frames"]) == (70, 50, 11)
    restored, fps = read_video(output)
    assert fps == pytest.approx(8)
    original, restored = (torch.from_numpy(v)[None].float() / 127.5 - 1 for v in (frames, restored))
    assert psnr(original, restored).item() > 22


def test_reconstruct_cli_bad_inputs(tmp_path, capsys, monkeypatch):
    from kinetoscope.pipelines import reconstruction

    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert main(["reconstruct", str(tmp_path / "missing.mp4"), "--output", str(tmp_path / "o.mp4")]) == 2
    assert main(["reconstruct", str(text), "--output", str(tmp_path / "o.mp4")]) == 2
    source = tmp_path / "in.mp4"
    write_video(source, np.zeros((5, 32, 32, 3), np.uint8), 8)
    assert main(["reconstruct", str(source), "--output", str(tmp_path / "o.mp4"), "--weights", str(tmp_path)]) == 2
    assert main(["reconstruct", str(source), "--output", str(tmp_path / "o.txt")]) == 2
    assert main(["reconstruct", str(source), "--output", str(text / "under_a_file.mp4")]) == 2
    monkeypatch.setattr(reconstruction, "MAX_PIXELS", 4 * 32 * 32)  # a 5-frame clip is then one frame too long
    assert main(["reconstruct", str(source), "--output", str(tmp_path / "o.mp4")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "too long to reconstruct: at 32x32, at most 4 frames" in errors[-1]
    assert len(errors) == 6 and all(line.startswith("kinetoscope reconstruct: error:") for line in errors)
    assert not (tmp_path / "o.mp4").exists()


def test_default_weights_are_shipped_small():
    weights = default_weights_dir() / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20
