"""Reading and writing videos (PyAV for MP4/H.264, GIF and WebP; PIL for PNG).

Frames are always numpy uint8 arrays shaped (T, H, W, 3), RGB. Writers choose the format by
the file extension: .mp4 (H.264), .gif and .webp (looping previews) and .png (one frame).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace, Interpolation
from PIL import Image, ImageSequence, UnidentifiedImageError

from kinetoscope.media.frames import as_video_frames, atomic_output, evenly_spaced_indices

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
WRITABLE_SUFFIXES = (*VIDEO_SUFFIXES, ".png")  # a .png is one still frame
MAX_CRF = 51  # libx264's worst quality for 8-bit video
WEBP_QUALITY = 90  # lossy: generated frames are too noisy for lossless WebP to stay small
MAX_GIF_FPS = 100.0  # a .gif stores each frame's delay in whole 1/100 s
STILL_IMAGE_FPS = 25.0  # what FFmpeg's image demuxers report, so every still image reads alike


class VideoError(ValueError):
    """A file that cannot be read as a video; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# Writing


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, quality: int = 18) -> Path:
    """Write `frames` to `path` in the format its extension names; returns the path.

    `quality` is the H.264 CRF for .mp4 (lower is better, 18 is visually near-lossless) and is
    ignored by the other formats. The file appears under its final name only once complete.

    Caveats: .mp4 with an odd width or height is stored as yuv444p (High 4:4:4 profile), which
    many browsers and hardware decoders cannot play; keep web output even-sized. A .gif stores
    delays in 1/100 s and browsers slow down delays under 2/100 s (above 50 fps). A .webp
    stores a run of identical frames as one longer frame, so a partly static clip reads back
    with fewer frames; use .mp4 or .gif when the frame count matters.
    """
    path = Path(path)
    frames = as_video_frames(frames)
    rate = _as_rate(fps)
    check_video_output(path, fps)
    suffix = path.suffix.lower()
    if suffix == ".mp4" and not 0 <= quality <= MAX_CRF:
        raise ValueError(f"quality is an H.264 CRF and must be in 0..{MAX_CRF}, got {quality}")
    if suffix == ".png" and len(frames) != 1:
        raise ValueError(f"cannot write {path}: a .png holds one frame, got {len(frames)}")

    with atomic_output(path) as temp:
        if suffix == ".mp4":
            _write_mp4(temp, frames, rate, quality)
        elif suffix == ".gif":
            _write_gif(temp, frames, rate)
        elif suffix == ".webp":
            _write_webp(temp, frames, rate)
        else:
            Image.fromarray(frames[0]).save(temp, format="PNG")
    return path


def check_video_output(path: str | os.PathLike, fps: float) -> None:
    """A ValueError (one line) if `write_video` could not write `path` at `fps` whatever the frames:
    an extension it does not write, or a frame rate the format cannot store. For callers to ask
    before the work that makes the frames."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"cannot write {path}: the extension must be one of {', '.join(WRITABLE_SUFFIXES)}")
    if suffix == ".gif" and fps > MAX_GIF_FPS:
        raise ValueError(f"cannot write {path} at {fps:g} fps: a .gif stores frame delays in 1/100 s, so at most {MAX_GIF_FPS:g} fps")


def _as_rate(fps: float) -> Fraction:
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    # NTSC rates are n * 1000/1001, so a denominator up to 1001 turns 29.97002997 back into
    # exactly 30000/1001 while keeping plain rates like 12.5 exact.
    rate = Fraction(fps).limit_denominator(1001)
    if rate == 0:
        raise ValueError(f"fps {fps} is too low to write; at least 1/1001")
    return rate


def _write_mp4(temp: Path, frames: np.ndarray, rate: Fraction, crf: int) -> None:
    height, width = frames.shape[1:3]
    # yuv420p halves chroma resolution, so libx264 needs even sizes for it; yuv444p keeps
    # every chroma sample and decodes back to exactly the requested odd size.
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    # faststart moves the index ('moov') before the media data, so browsers can start
    # playing before the download ends.
    with av.open(str(temp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = _add_stream(container, "libx264", width, height, rate, pix_fmt)
        stream.options = {"crf": str(crf)}
        # Tag BT.709 explicitly: untagged video makes players guess the matrix from the size.
        context = stream.codec_context
        context.colorspace = Colorspace.ITU709  # same number as FFmpeg's AVCOL_SPC_BT709
        context.color_primaries = ColorPrimaries.BT709
        context.color_trc = ColorTrc.BT709
        context.color_range = ColorRange.MPEG
        _encode(container, stream, (_to_bt709(frame, pix_fmt) for frame in frames))


def _to_bt709(frame: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    # Area averaging when halving chroma blurs colour edges less than the bilinear default.
    return rgb.reformat(
        format=pix_fmt,
        dst_colorspace=Colorspace.ITU709,
        dst_color_range=ColorRange.MPEG,
        interpolation=Interpolation.AREA,
    )


def _write_gif(temp: Path, frames: np.ndarray, rate: Fraction) -> None:
    # PyAV rather than Pillow: Pillow merges identical consecutive frames, changing the count.
    palette = _shared_palette(frames)
    argb = _argb_table(palette)
    height, width = frames.shape[1:3]
    with av.open(str(temp), "w", format="gif", options={"loop": "0"}) as container:  # 0: forever
        stream = _add_stream(container, "gif", width, height, rate, "pal8")
        _encode(container, stream, (_indexed_frame(frame, palette, argb) for frame in frames))


def _argb_table(palette: Image.Image) -> np.ndarray:
    """The opaque (256, 4) ARGB colour table PyAV expects alongside pal8 frames."""
    colors = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)[:256]
    argb = np.zeros((256, 4), np.uint8)
    argb[:, 0] = 255
    argb[: len(colors), 1:] = colors
    return argb


def _indexed_frame(frame: np.ndarray, palette: Image.Image, argb: np.ndarray) -> av.VideoFrame:
    # No dithering: its noise changes from frame to frame, which flickers and bloats GIFs.
    indices = Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE)
    return av.VideoFrame.from_ndarray((np.asarray(indices), argb), format="pal8")


def _shared_palette(frames: np.ndarray, max_sample_frames: int = 16) -> Image.Image:
    """A 256-colour palette for the whole clip, so colours don't shift between frames."""
    sample = frames[evenly_spaced_indices(len(frames), max_sample_frames)]
    return Image.fromarray(np.concatenate(list(sample), axis=0)).quantize(colors=256)


def _add_stream(container, codec: str, width: int, height: int, rate: Fraction, pix_fmt: str):
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.time_base = 1 / rate  # one tick per frame, exact even for fractional rates
    return stream


def _encode(container, stream, video_frames) -> None:
    for index, video_frame in enumerate(video_frames):
        video_frame.pts = index
        container.mux(stream.encode(video_frame))
    container.mux(stream.encode(None))  # flush frames the encoder still holds


def _write_webp(temp: Path, frames: np.ndarray, rate: Fraction) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(
        temp,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=_frame_durations_ms(len(frames), rate),
        loop=0,  # forever
        quality=WEBP_QUALITY,
    )


def _frame_durations_ms(count: int, rate: Fraction) -> list[int]:
    # Whole-millisecond delays drift at rates like 30 fps (33.3 ms); rounding each frame's
    # start time instead keeps the clip's total length, and so its average rate, exact.
    starts = [round(index * 1000 / rate) for index in range(count + 1)]
    return [end - start for start, end in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------------------------
# Reading


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video (or a still image, as one frame) into (T, H, W, 3) uint8 RGB and its fps.

    Reads at most `max_frames` frames when given. Raises VideoError for anything unreadable.
    Still images report FFmpeg's default of 25 fps.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    path = _existing_file(path)
    with _unreadable_as_video_error(path):
        if _is_webp(path):
            frames, fps = _read_webp(path, max_frames)
        else:
            frames, fps = _read_with_pyav(path, max_frames)
    if not frames:
        raise _unreadable(path, "no frames")
    return np.stack(frames), fps


def video_info(path: str | os.PathLike) -> dict:
    """width, height, frames, fps, codec and pix_fmt of a video, for validating outputs.

    pix_fmt is None for WebP, whose decoder (Pillow) does not expose it.
    """
    path = _existing_file(path)
    with _unreadable_as_video_error(path):
        return _webp_info(path) if _is_webp(path) else _pyav_info(path)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        if not path.exists():
            raise _unreadable(path, "no such file")
        if not path.is_file():
            raise _unreadable(path, "not a regular file")
        if path.stat().st_size == 0:
            raise _unreadable(path, "empty file")
    except OSError as error:  # e.g. a name too long for the file system
        raise _unreadable(path, error.strerror or error) from None
    return path


def _unreadable(path: Path, reason: object) -> VideoError:
    one_line = " ".join(str(reason).split())
    return VideoError(f"not a readable video: {path} ({one_line})")


@contextmanager
def _unreadable_as_video_error(path: Path) -> Iterator[None]:
    # PyAV raises FFmpegError (not an OSError) for bad data; Pillow raises OSError subclasses.
    try:
        yield
    except av.FFmpegError as error:
        raise _unreadable(path, error.strerror or error) from error
    except UnidentifiedImageError as error:
        raise _unreadable(path, "unrecognised format") from error
    except Image.DecompressionBombError as error:  # not an OSError
        raise _unreadable(path, error) from error
    except OSError as error:
        raise _unreadable(path, error) from error


def _is_webp(path: Path) -> bool:
    # FFmpeg cannot decode animated WebP, so WebP goes through Pillow.
    return path.suffix.lower() == ".webp"


def _read_with_pyav(path: Path, max_frames: int | None) -> tuple[list[np.ndarray], float]:
    frames = []
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        for video_frame in container.decode(stream):
            frames.append(video_frame.to_ndarray(format="rgb24"))
            if len(frames) == max_frames:
                break
        return frames, _stream_fps(stream)


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise _unreadable(path, "no video stream")
    return container.streams.video[0]


def _stream_fps(stream) -> float:
    # GIF delays are whole 1/100 s, so 8 fps is written as delays of 12 and 13; FFmpeg's
    # average rate looks at the first few delays only, while frames / duration sees them all.
    # For constant-rate video the average rate is exact, while the duration need not be:
    # MP4 edit lists round it to milliseconds.
    if stream.codec_context.name == "gif" and stream.frames and stream.duration:
        return float(stream.frames / (stream.duration * stream.time_base))
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else STILL_IMAGE_FPS


def _pyav_info(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        # Decoding every frame (without converting to RGB) proves the file is whole, which
        # container metadata alone does not: a truncated MP4 still reports its full length.
        frames = sum(1 for _ in container.decode(stream))
        if frames == 0:
            raise _unreadable(path, "no frames")
        context = stream.codec_context
        return {
            "width": context.width,
            "height": context.height,
            "frames": frames,
            "fps": _stream_fps(stream),
            "codec": context.name,
            "pix_fmt": context.pix_fmt,
        }


def _webp_info(path: Path) -> dict:
    frames, fps = _read_webp(path, max_frames=None)  # previews are small; decoding is cheap
    height, width = frames[0].shape[:2]
    return {
        "width": width,
        "height": height,
        "frames": len(frames),
        "fps": fps,
        "codec": "webp",
        "pix_fmt": None,
    }


def _read_webp(path: Path, max_frames: int | None) -> tuple[list[np.ndarray], float]:
    frames, durations_ms = [], []
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            frames.append(np.asarray(frame.convert("RGB")))
            durations_ms.append(frame.info.get("duration", 0))
            if len(frames) == max_frames:
                break
    total_s = sum(durations_ms) / 1000
    return frames, len(frames) / total_s if total_s > 0 else STILL_IMAGE_FPS
