"""Frame arrays and what is made from them without a video codec: checks, atomic writes, contact sheets.

Frames are numpy uint8 arrays shaped (T, H, W, 3), RGB. This module needs only numpy and PIL,
so training and evaluation (which write contact sheets, never videos) run where PyAV is absent.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SEPARATOR_PX = 2
LABEL_HEIGHT_PX = 16
LABEL_PADDING_PX = 3
SHEET_BACKGROUND = (24, 24, 24)
LABEL_COLOR = (235, 235, 235)


def as_video_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(
            f"frames must be a non-empty uint8 array shaped (T, H, W, 3), "
            f"got {frames.dtype} {frames.shape}"
        )
    return frames


def partial_sibling(path: Path) -> Path:
    """The hidden temporary name `atomic_output` writes `path` under first (longer than the final name)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` that replaces `path` only once fully written.

    The sibling lives in the same directory so the final rename is atomic; a crash leaves at
    most a hidden `.partial` file, never a truncated file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = partial_sibling(path)
    try:
        yield temp
        with open(temp, "rb") as written:
            os.fsync(written.fileno())  # data on disk before the name points at it
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def contact_sheet(
    clips: Sequence[np.ndarray], labels: Sequence[str] | None = None, max_columns: int = 9
) -> Image.Image:
    """One row per clip of up to `max_columns` evenly spaced frames, first and last included.

    Clips may differ in size and length. Rows and frames are split by thin separators; each
    `labels` entry is written above its row, and the sheet widens to fit long labels.
    """
    if not clips:
        raise ValueError("contact_sheet needs at least one clip")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"got {len(labels)} labels for {len(clips)} clips")
    if max_columns < 2:
        raise ValueError(f"max_columns must be at least 2 (first and last), got {max_columns}")

    rows = [_contact_row(as_video_frames(clip), max_columns) for clip in clips]
    font = ImageFont.load_default()
    label_height = 0 if labels is None else LABEL_HEIGHT_PX
    label_widths = [
        math.ceil(font.getlength(label)) + 2 * LABEL_PADDING_PX for label in labels or []
    ]
    width = max([row.shape[1] for row in rows] + label_widths)
    height = sum(label_height + row.shape[0] for row in rows) + SEPARATOR_PX * (len(rows) - 1)

    sheet = Image.new("RGB", (width, height), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = 0
    for index, row in enumerate(rows):
        if labels is not None:
            draw.text((LABEL_PADDING_PX, top + 2), labels[index], fill=LABEL_COLOR, font=font)
        top += label_height
        sheet.paste(Image.fromarray(row), (0, top))
        top += row.shape[0] + SEPARATOR_PX
    return sheet


def save_contact_sheet(
    path: str | os.PathLike,
    clips: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    max_columns: int = 9,
) -> Path:
    """Write `contact_sheet(clips, labels, max_columns)` to `path` as a PNG; returns the path."""
    path = Path(path)
    sheet = contact_sheet(clips, labels, max_columns)
    with atomic_output(path) as temp:
        sheet.save(temp, format="PNG")
    return path


def _contact_row(frames: np.ndarray, max_columns: int) -> np.ndarray:
    picks = evenly_spaced_indices(len(frames), max_columns)
    height, width = frames.shape[1:3]
    stride = width + SEPARATOR_PX
    row = np.empty((height, len(picks) * stride - SEPARATOR_PX, 3), np.uint8)
    row[:] = SHEET_BACKGROUND
    for column, index in enumerate(picks):
        row[:, column * stride : column * stride + width] = frames[index]
    return row


def evenly_spaced_indices(count: int, max_picks: int) -> np.ndarray:
    # Spacing is at least one frame when picks <= count, so the rounded indices are distinct
    # and always include the first and the last frame.
    return np.linspace(0, count - 1, min(count, max_picks)).round().astype(int)
