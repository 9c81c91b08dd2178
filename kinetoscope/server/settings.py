"""Everything `kinetoscope serve` can be told, in one object the app, workers and tests share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kinetoscope.server import db

DEFAULT_DATA_DIR = Path(os.environ.get("KINETOSCOPE_DATA", Path.home() / ".kinetoscope"))
MODEL_ID = "kinetoscope-shapes"
# Names OpenAI's clients send; they run against our model, so code written for OpenAI works unchanged.
OPENAI_MODEL_ALIASES = ("sora-2", "sora-2-pro", "sora-2-2025-10-06", "sora-2-pro-2025-10-06", "sora-2-2025-12-08")


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None  # default: SQLite in data_dir
    steps: int | None = None  # None: the model's own sampling settings (TextToVideo.sampling)
    guidance: float | None = None
    sampler: str | None = None
    default_size: tuple[int, int] = (128, 128)
    default_seconds: int = 4  # OpenAI's default
    videos_per_day: int = 200  # per key, unless the key has its own quota
    requests_per_minute: int = 600  # per key
    concurrent_jobs_per_key: int = 4  # queued plus in progress
    lease_seconds: float = 60.0  # a job whose worker stops renewing this is claimed again
    max_attempts: int = 3  # claims of one job before it fails as interrupted
    poll_after_ms: int = 1000
    webhook_retry_seconds: float = 5.0  # the first retry's delay; each later one doubles
    webhook_max_attempts: int = 8

    @property
    def database(self) -> str:
        return self.database_url or db.database_url_for(self.data_dir)

    @property
    def videos_dir(self) -> Path:
        return Path(self.data_dir) / "videos"
