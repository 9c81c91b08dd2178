"""Durable generation jobs. The videos table is the queue: a worker claims the oldest queued
video (or one whose lease ran out because its worker died) with a conditional UPDATE, renews
the lease as sampling progresses, and writes the result only while it still holds the lease.
So a crash loses nothing (the job is claimed again), a deleted video stops its job at the next
step, and several servers may share one PostgreSQL database."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from kinetoscope.server import db, webhooks
from kinetoscope.server.settings import ServerSettings
from kinetoscope.server.storage import VideoStorage

log = logging.getLogger("kinetoscope.server")

IDLE_POLL_SECONDS = 0.2
PROGRESS_WRITE_SECONDS = 0.25  # at most this often per job, to keep database writes cheap
SAMPLING_SHARE = 95  # progress reaches this when sampling ends; decoding and writing are the rest


class JobStopped(Exception):
    """The job lost its lease: its video was deleted, or the server is shutting down."""


class JobRunner:
    """Worker threads, one pipeline each (the text encoder's tokenizer and cache are not
    thread-safe). Torch kernels release the GIL, and the API never waits on a worker."""

    def __init__(self, sessions: sessionmaker[Session], settings: ServerSettings, pipelines: list, storage: VideoStorage):
        self.sessions = sessions
        self.settings = settings
        self.pipelines = pipelines
        self.storage = storage
        self.stopping = threading.Event()
        self.instance = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.threads = [threading.Thread(target=self.work, args=(index,), name=f"kinetoscope-worker-{index}", daemon=True)
                        for index in range(len(pipelines))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt running jobs at their next step and hand them back to the queue."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)

    def work(self, index: int) -> None:
        pipeline = self.pipelines[index]
        while not self.stopping.is_set():
            try:
                claimed = self.claim()
                if claimed is None:
                    self.stopping.wait(IDLE_POLL_SECONDS)
                    continue
                self.run(pipeline, *claimed)
            except Exception:  # a database hiccup must not kill the worker; the lease covers the job
                log.exception("worker %d: unexpected error", index)
                self.stopping.wait(1.0)

    # -- the queue --------------------------------------------------------------------------------

    def claim(self) -> tuple[db.Video, str] | None:
        token = f"{self.instance}:{uuid.uuid4().hex}"
        now = db.now()
        claimable = or_(db.Video.status == "queued",
                        and_(db.Video.status == "in_progress", db.Video.lease_expires_at < now))
        oldest = select(db.Video.seq).where(claimable).order_by(db.Video.seq).limit(1).scalar_subquery()
        with db.transaction(self.sessions) as session:
            claimed = session.execute(
                update(db.Video).where(db.Video.seq == oldest, claimable).values(
                    status="in_progress", lease_owner=token, lease_expires_at=now + self.settings.lease_seconds,
                    attempts=db.Video.attempts + 1, started_at=now, progress=0)
            ).rowcount
        if not claimed:
            return None
        with db.transaction(self.sessions, write=False) as session:
            video = session.scalar(select(db.Video).where(db.Video.lease_owner == token))
        return (video, token) if video is not None else None

    def renew(self, video: db.Video, token: str, progress: int) -> None:
        """Record progress and extend the lease; stop if the lease is gone (the video was deleted)."""
        if self.stopping.is_set():
            raise JobStopped
        with db.transaction(self.sessions) as session:
            held = session.execute(
                update(db.Video).where(db.Video.id == video.id, db.Video.lease_owner == token).values(
                    progress=progress, lease_expires_at=db.now() + self.settings.lease_seconds)
            ).rowcount
        if not held:
            raise JobStopped

    def finish(self, video: db.Video, token: str, **outcome) -> bool:
        """Store the outcome if we still hold the lease; queue the key's webhook with it."""
        with db.transaction(self.sessions) as session:
            held = session.execute(
                update(db.Video).where(db.Video.id == video.id, db.Video.lease_owner == token).values(
                    lease_owner=None, lease_expires_at=None, completed_at=db.now(), **outcome)
            ).rowcount
            if held:
                webhooks.enqueue(session, video.key_id, video.id, f"video.{outcome['status']}")
        return bool(held)

    def release(self, token: str) -> None:
        """Shutdown: back to the queue at once, and the interruption does not count as an attempt."""
        with db.transaction(self.sessions) as session:
            session.execute(update(db.Video).where(db.Video.lease_owner == token).values(
                status="queued", progress=0, lease_owner=None, lease_expires_at=None, attempts=db.Video.attempts - 1))

    # -- one job ----------------------------------------------------------------------------------

    def run(self, pipeline, video: db.Video, token: str) -> None:
        if video.attempts > self.settings.max_attempts:
            self.finish(video, token, status="failed", error_code="job_interrupted",
                        error_message=f"Generation was interrupted {video.attempts - 1} times (server restarts or "
                                      "crashes) and was not retried again. Create the video again to retry.")
            return
        last_write, shown = 0.0, 0

        def on_step(done: int, total: int):
            nonlocal last_write, shown
            if done == total or time.monotonic() - last_write >= PROGRESS_WRITE_SECONDS:
                shown = max(shown, done * SAMPLING_SHARE // total)  # a redraw adds steps to the total; progress never goes back
                self.renew(video, token, shown)
                last_write = time.monotonic()

        log.info("generating %s (attempt %d, seed %d)", video.id, video.attempts, video.seed)
        try:
            result = pipeline(video.prompt, width=video.width, height=video.height, frames=video.frames,
                              steps=video.steps, guidance=video.guidance, sampler=video.sampler, seed=video.seed, on_step=on_step)
            self.storage.save(video.id, result.frames, result.fps)
        except JobStopped:
            if self.stopping.is_set():
                self.release(token)
            else:
                self.discard_if_deleted(video.id)
            return
        except Exception as error:
            log.exception("generating %s failed", video.id)
            if self.finish(video, token, status="failed", error_code="generation_failed",
                           error_message=str(error) or type(error).__name__):
                self.storage.remove(video.id)  # whatever part got written; the video is still ours alone
            else:
                self.discard_if_deleted(video.id)
            return
        if not self.finish(video, token, status="completed", progress=100):
            self.discard_if_deleted(video.id)

    def discard_if_deleted(self, video_id: str) -> None:
        """We lost the lease. If the video was deleted, its files are orphans; if another worker
        claimed it again (ours ran out while we were slow, compiling say), the files are that
        worker's (the same seeded frames), and removing them would lose a finished video."""
        with db.transaction(self.sessions, write=False) as session:
            exists = session.scalar(select(db.Video.seq).where(db.Video.id == video_id)) is not None
        if not exists:
            self.storage.remove(video_id)
