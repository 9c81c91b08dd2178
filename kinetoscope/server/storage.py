"""A finished video's files: the MP4, a WebP thumbnail and a JPEG spritesheet, as OpenAI serves them."""

from __future__ import annotations

import os
import shutil
import uuid
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
DOWNLOADS = ".downloads"  # under the root; not a video


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
        if not self.root.is_dir():
            return set()
        return {folder.name for folder in self.root.iterdir() if folder.is_dir() and folder.name != DOWNLOADS}

    def remove(self, video_id: str) -> None:
        shutil.rmtree(self.root / video_id, ignore_errors=True)

    def link_for_download(self, video_id: str, variant: str) -> Path | None:
        """A private hard link to a variant's file, or None once the file is gone. A response sent
        from the link survives a delete that removes the video's folder while the bytes go out."""
        links = self.root / DOWNLOADS
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"{uuid.uuid4().hex}-{VARIANTS[variant][0]}"
        try:
            os.link(self.path(video_id, variant), link)
        except FileNotFoundError:
            return None
        return link

    def remove_download_links(self) -> None:
        """Links a stopped server was still sending from."""
        shutil.rmtree(self.root / DOWNLOADS, ignore_errors=True)


def spritesheet(frames: np.ndarray) -> np.ndarray:
    """Up to 16 evenly spaced frames in a grid, row by row; unused cells stay black."""
    picks = frames[evenly_spaced_indices(len(frames), SPRITESHEET_MAX_FRAMES)]
    columns = min(SPRITESHEET_COLUMNS, len(picks))
    rows = -(-len(picks) // columns)
    _, height, width, channels = picks.shape
    grid = np.zeros((rows * columns, height, width, channels), np.uint8)
    grid[:len(picks)] = picks
    return grid.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, channels)
