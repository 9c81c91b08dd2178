import struct
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from kinetoscope.media import video
from kinetoscope.media.frames import SEPARATOR_PX, contact_sheet, save_contact_sheet
from kinetoscope.media.video import VideoError, read_video, video_info, write_video

# Measured worst case over these sizes is about 2.1 (64x64): yuv420p halves chroma
# resolution, which blurs colour across the sharp rectangle edges.
MP4_MAX_MEAN_ERROR = 3.0
WEBP_MAX_MEAN_ERROR = 6.0  # lossy WebP, measured about 3.6 on the same content


def moving_rectangles(count: int, width: int, height: int) -> np.ndarray:
    """Two flat-coloured squares sliding diagonally, so no two consecutive frames are equal."""
    frames = np.empty((count, height, width, 3), np.uint8)
    frames[:] = (30, 30, 30)
    side = max(4, min(width, height) // 3)
    for t in range(count):
        x, y = (3 * t + 1) % (width - side), (2 * t + 1) % (height - side)
        frames[t, y : y + side, x : x + side] = (220, 40, 40)
        frames[t, height - side - y : height - y, width - side - x : width - x] = (40, 80, 230)
    return frames


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def top_level_boxes(path) -> list[str]:
    """The types of an MP4 file's top-level boxes, in file order."""
    data, boxes, offset = path.read_bytes(), [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("ascii"))
        offset += size
    return boxes


# ---------------------------------------------------------------------------------------------
# MP4


@pytest.mark.parametrize("frame_count", [1, 5, 17])
@pytest.mark.parametrize("width, height", [(64, 64), (96, 64), (128, 128), (65, 33)])
def test_mp4_round_trip(tmp_path, width, height, frame_count):
    frames = moving_rectangles(frame_count, width, height)
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)

    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert fps == 8
    assert mean_abs_error(decoded, frames) < MP4_MAX_MEAN_ERROR

    info = video_info(path)
    even = width % 2 == 0 and height % 2 == 0
    assert info == {
        "width": width,
        "height": height,
        "frames": frame_count,
        "fps": 8.0,
        "codec": "h264",
        "pix_fmt": "yuv420p" if even else "yuv444p",
    }


@pytest.mark.parametrize("frame_count", [1, 4, 9])  # 4, 9: B-frame edit lists skew durations
@pytest.mark.parametrize("fps", [30000 / 1001, 12.5, 7.3])
def test_mp4_keeps_fractional_frame_rates(tmp_path, fps, frame_count):
    path = write_video(tmp_path / "clip.mp4", moving_rectangles(frame_count, 32, 32), fps)
    assert read_video(path)[1] == pytest.approx(fps, rel=1e-9)


def test_mp4_index_precedes_media_data_for_streaming(tmp_path):
    boxes = top_level_boxes(write_video(tmp_path / "clip.mp4", moving_rectangles(5, 64, 64), 8))
    assert boxes.index("moov") < boxes.index("mdat")


def test_mp4_quality_is_the_crf(tmp_path):
    frames = moving_rectangles(5, 64, 64)
    best = write_video(tmp_path / "best.mp4", frames, 8, quality=0)
    worst = write_video(tmp_path / "worst.mp4", frames, 8, quality=45)
    assert best.stat().st_size > worst.stat().st_size
    with pytest.raises(ValueError, match="CRF"):
        write_video(tmp_path / "bad.mp4", frames, 8, quality=52)


# ---------------------------------------------------------------------------------------------
# Previews and stills


@pytest.mark.parametrize("suffix, max_error", [(".gif", 1.0), (".webp", WEBP_MAX_MEAN_ERROR)])
def test_looping_previews_keep_every_frame(tmp_path, suffix, max_error):
    frames = moving_rectangles(9, 64, 48)
    path = write_video(tmp_path / f"preview{suffix}", frames, fps=8)

    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape
    assert fps == pytest.approx(8, rel=0.05)  # GIF delays are whole 1/100 s
    assert mean_abs_error(decoded, frames) < max_error
    assert video_info(path)["frames"] == 9


def test_gif_keeps_identical_consecutive_frames(tmp_path):
    still = np.repeat(moving_rectangles(1, 32, 32), 6, axis=0)
    assert read_video(write_video(tmp_path / "still.gif", still, 8))[0].shape == still.shape


def test_png_is_a_single_frame(tmp_path):
    frame = moving_rectangles(1, 40, 30)
    path = write_video(tmp_path / "still.png", frame, fps=8)
    decoded, _ = read_video(path)
    np.testing.assert_array_equal(decoded, frame)
    with pytest.raises(ValueError, match="one frame"):
        write_video(tmp_path / "many.png", moving_rectangles(2, 40, 30), fps=8)


def test_reads_still_images_and_other_containers(tmp_path):
    frames = moving_rectangles(6, 64, 48)
    Image.fromarray(frames[0]).save(tmp_path / "still.jpg", quality=95)
    assert read_video(tmp_path / "still.jpg")[0].shape == (1, 48, 64, 3)

    # WebM (Matroska) stores no frame count, so video_info must count frames itself.
    with av.open(str(tmp_path / "clip.webm"), "w") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    decoded, fps = read_video(tmp_path / "clip.webm")
    assert decoded.shape == frames.shape and fps == 10
    assert video_info(tmp_path / "clip.webm")["frames"] == 6


def test_max_frames_stops_early(tmp_path):
    path = write_video(tmp_path / "clip.mp4", moving_rectangles(9, 32, 32), 8)
    assert read_video(path, max_frames=4)[0].shape[0] == 4


# ---------------------------------------------------------------------------------------------
# Writing safely


def test_creates_parent_directories(tmp_path):
    path = write_video(tmp_path / "a" / "b" / "clip.mp4", moving_rectangles(2, 32, 32), 8)
    assert path.is_file()


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", moving_rectangles(5, 32, 32), 8)
    before = path.read_bytes()

    convert = video._to_bt709
    converted = []

    def crash_on_third_frame(frame, pix_fmt):
        if len(converted) == 2:
            raise RuntimeError("simulated crash")
        converted.append(frame)
        return convert(frame, pix_fmt)

    monkeypatch.setattr(video, "_to_bt709", crash_on_third_frame)
    with pytest.raises(RuntimeError):
        write_video(path, moving_rectangles(5, 32, 32)[::-1], 8)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no partial file left


@pytest.mark.parametrize(
    "frames, fps, name",
    [
        (np.zeros((2, 8, 8, 3), np.float32), 8, "clip.mp4"),  # not uint8
        (np.zeros((2, 8, 8), np.uint8), 8, "clip.mp4"),  # no channel axis
        (np.zeros((0, 8, 8, 3), np.uint8), 8, "clip.mp4"),  # no frames
        (np.zeros((2, 8, 8, 3), np.uint8), 0, "clip.mp4"),
        (np.zeros((2, 8, 8, 3), np.uint8), 1e-4, "clip.mp4"),  # rounds to a rate of 0
        (np.zeros((2, 8, 8, 3), np.uint8), 8, "clip.avi"),
        (np.zeros((2, 8, 8, 3), np.uint8), 120, "clip.gif"),  # a GIF stores delays in 1/100 s
    ],
)
def test_write_rejects_bad_arguments(tmp_path, frames, fps, name):
    with pytest.raises(ValueError):
        write_video(tmp_path / name, frames, fps)
    assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------------------------------
# Unreadable files


def missing(tmp_path):
    return tmp_path / "missing.mp4"


def directory(tmp_path):
    return tmp_path


def text_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n")
    return path


def text_renamed_webp(tmp_path):
    path = tmp_path / "notes.webp"
    path.write_text("nor these\n")
    return path


def zero_bytes(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    return path


def truncated_mp4(tmp_path):
    path = write_video(tmp_path / "clip.mp4", moving_rectangles(9, 64, 64), 8)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def name_too_long(tmp_path):
    return tmp_path / ("a" * 300 + ".mp4")


@pytest.mark.parametrize(
    "make_path",
    [missing, directory, text_renamed_mp4, text_renamed_webp, zero_bytes, truncated_mp4, name_too_long],
)
@pytest.mark.parametrize("reader", [read_video, video_info])
def test_unreadable_files_raise_a_one_line_video_error(tmp_path, make_path, reader):
    path = make_path(tmp_path)
    with pytest.raises(VideoError) as raised:
        reader(path)
    message = str(raised.value)
    assert message.startswith(f"not a readable video: {path} (")
    assert "\n" not in message
    assert isinstance(raised.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Contact sheets


def test_contact_sheet_layout():
    long_clip = moving_rectangles(17, 48, 32)  # more frames than columns: 9 are picked
    short_clip = moving_rectangles(5, 24, 40)  # fewer: all 5 are shown

    sheet = contact_sheet([long_clip, short_clip])
    long_row_width = 9 * 48 + 8 * SEPARATOR_PX
    assert sheet.size == (long_row_width, 32 + SEPARATOR_PX + 40)

    pixels = np.asarray(sheet)
    np.testing.assert_array_equal(pixels[:32, :48], long_clip[0])
    np.testing.assert_array_equal(pixels[:32, long_row_width - 48 :], long_clip[-1])
    second_row = pixels[32 + SEPARATOR_PX :]
    np.testing.assert_array_equal(second_row[:, 4 * (24 + SEPARATOR_PX) :][:, :24], short_clip[-1])


def test_contact_sheet_labels_add_a_band_above_each_row():
    clips = [moving_rectangles(5, 32, 32), moving_rectangles(3, 32, 32)]
    plain = contact_sheet(clips)
    labelled = contact_sheet(clips, labels=["a", "b"])
    assert labelled.width == plain.width
    band = (labelled.height - plain.height) / 2
    assert band > 0 and band == int(band)

    wide = contact_sheet(clips, labels=["a red circle moving left above a blue square", "b"])
    assert wide.width > plain.width  # the sheet widens rather than cutting the label off

    with pytest.raises(ValueError):
        contact_sheet(clips, labels=["only one"])


def test_training_needs_no_video_codec():
    # Trainers write contact sheets, never videos, so they run where PyAV is absent (the lent GPU).
    code = "import sys; sys.modules['av'] = None; import kinetoscope.training.autoencoder, kinetoscope.training.generator"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_contact_sheet_writes_a_png(tmp_path):
    clips = [moving_rectangles(12, 32, 24)]
    path = save_contact_sheet(tmp_path / "sheets" / "sheet.png", clips, ["clip"], max_columns=4)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == contact_sheet(clips, ["clip"], max_columns=4).size
