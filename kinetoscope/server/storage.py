"""A finished video's files: the MP4, a WebP thumbnail and a JPEG spritesheet, as OpenAI serves them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kinetoscope.media.frames import evenly_spaced_indices
from kinetoscope.media.video import write_video

VARIANTS = {  # variant -> (file name, media type)
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
}
SPRITESHEET_COLUMNS = 4
SPRITESHEET_MAX_FRAMES = 16


class VideoStorage:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, video_id: str, variant: str) -> Path:
        return self.root / video_id / VARIANTS[variant][0]

    def save(self, video_id: str, frames: np.ndarray, fps: float) -> None:
        folder = self.root / video_id
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / VARIANTS["video"][0], frames, fps)
        Image.fromarray(frames[len(frames) // 2]).save(folder / VARIANTS["thumbnail"][0], quality=90)
        Image.fromarray(spritesheet(frames)).save(folder / VARIANTS["spritesheet"][0], quality=90)

    def video_ids(self) -> set[str]:
        """The videos that have files here."""
        return {folder.name for folder in self.root.iterdir() if folder.is_dir()} if self.root.is_dir() else set()

    def remove(self, video_id: str) -> None:
        shutil.rmtree(self.root / video_id, ignore_errors=True)


def spritesheet(frames: np.ndarray) -> np.ndarray:
    """Up to 16 evenly spaced frames in a grid, row by row; unused cells stay black."""
    picks = frames[evenly_spaced_indices(len(frames), SPRITESHEET_MAX_FRAMES)]
    columns = min(SPRITESHEET_COLUMNS, len(picks))
    rows = -(-len(picks) // columns)
    _, height, width, channels = picks.shape
    grid = np.zeros((rows * columns, height, width, channels), np.uint8)
    grid[:len(picks)] = picks
    return grid.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, channels)
