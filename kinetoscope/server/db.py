"""What the server stores: keys, videos (which are also the job queue), the ledger of videos
issued, webhook deliveries, the audit log and operator switches. SQLite in WAL mode by default; any SQLAlchemy URL (PostgreSQL)
works because the queue needs nothing but conditional UPDATEs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Float, ForeignKey, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DATABASE_FILE = "kinetoscope.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 hex of the secret
    secret_hint: Mapped[str] = mapped_column(String(20))  # the secret's first characters, for humans
    videos_per_day: Mapped[int | None] = mapped_column(Integer)  # None: the server's default
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(100))  # kept in clear: it signs
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class Video(Base):
    """One video and its generation job. `seq` orders the list and its cursors; `id` is public."""

    __tablename__ = "videos"
    __table_args__ = {"sqlite_autoincrement": True}  # a deleted video's seq is never reused: cursors stay unambiguous

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)  # queued, in_progress, completed, failed
    progress: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(100))
    seconds: Mapped[str] = mapped_column(String(10))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    sampler: Mapped[str | None] = mapped_column(String(20))  # None in a database older than the column: the model's own
    remixed_from_video_id: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far, interrupted ones included
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)


class IssuedVideo(Base):
    """Every video a key has started, kept when the video is deleted: the daily quota counts it
    (deleting never refunds quota), and a list cursor may still name it (the official client pages
    with the last id it saw, which a loop deleting as it goes has just removed)."""

    __tablename__ = "issued_videos"

    video_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # the video's place in its key's list
    created_at: Mapped[float] = mapped_column(Float, index=True)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the event id, also `webhook-id`
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body that gets signed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    abandoned_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=now, index=True)
    actor: Mapped[str] = mapped_column(String(100))  # a key's name, or "operator" for the CLI
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[str | None] = mapped_column(Text)


class Switch(Base):
    """Operator switches that every server process reads on each request (e.g. access paused)."""

    __tablename__ = "switches"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(String(100))


def database_url_for(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DATABASE_FILE}"


def open_database(url: str) -> sessionmaker[Session]:
    """Create the tables if needed and return a session factory."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _tune_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    # One write transaction from the start (BEGIN IMMEDIATE on SQLite): it reads the schema and then
    # may write, and a deferred one would fail at once if a running server wrote in between.
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection, connection.begin():
        if "sampler" not in {column["name"] for column in inspect(connection).get_columns("videos")}:
            connection.execute(text("ALTER TABLE videos ADD COLUMN sampler VARCHAR(20)"))  # older videos: the model's own
        # a database older than the ledger: enter the videos it still has
        connection.execute(text("INSERT INTO issued_videos (video_id, key_id, seq, created_at) "
                                "SELECT id, key_id, seq, created_at FROM videos "
                                "WHERE id NOT IN (SELECT video_id FROM issued_videos)"))
    return sessionmaker(engine, expire_on_commit=False)


def _tune_sqlite(connection, _record):
    # WAL lets the API read while a worker writes; waiting on a lock beats failing a request.
    # SQLAlchemy emits BEGIN itself (see _begin_sqlite), so the driver must not.
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite(connection):
    # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY when
    # another writer committed in between (busy_timeout does not apply); BEGIN IMMEDIATE takes
    # the write lock up front and waits for it instead. Readers stay deferred: WAL never blocks them.
    write = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


WRITE_OPTION = "kinetoscope_write"


@contextmanager
def transaction(sessions: sessionmaker[Session], write: bool = True):
    """A session that commits on success and rolls back on any error; `write=False` for reads."""
    with sessions() as session, session.begin():
        session.connection(execution_options={WRITE_OPTION: write})
        yield session


def dispose(sessions: sessionmaker[Session]) -> None:
    engine: Engine = sessions.kw["bind"]
    engine.dispose()
