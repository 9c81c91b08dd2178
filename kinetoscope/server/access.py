"""Invite-only access: API keys (stored as hashes), the operator's pause switch, per-key limits
(videos per day, requests per minute, jobs at once) and the audit log."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from kinetoscope.server import db
from kinetoscope.server.errors import ApiError
from kinetoscope.server.schemas import UNFINISHED

SECRET_PREFIX = "sk-kin-"
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
PAUSED_SWITCH = "access_paused"
DAY_SECONDS = 86_400
OPERATOR = "operator"


class AccessError(ValueError):
    """An operator mistake in a `keys` or `access` command (unknown name, duplicate, ...)."""


def hash_secret(secret: str) -> str:
    # Secrets are 256 random bits, so a fast hash is safe and lets a request find its key by index.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class NewKey:
    name: str
    secret: str
    webhook_secret: str | None


def create_key(sessions: sessionmaker[Session], name: str, videos_per_day: int | None = None,
               webhook_url: str | None = None) -> NewKey:
    if not KEY_NAME_PATTERN.fullmatch(name):
        raise AccessError(f"key name {name!r} must be 1-100 letters, digits or . _ @ - (starting with a letter or digit)")
    if videos_per_day is not None and videos_per_day < 0:
        raise AccessError("the quota must be zero or more videos per day")
    if webhook_url is not None and not re.match(r"https?://", webhook_url):
        raise AccessError(f"webhook URL {webhook_url!r} must start with http:// or https://")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    # Standard Webhooks' secret format, which OpenAI's client decodes: whsec_ + base64 bytes.
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode() if webhook_url else None
    with db.transaction(sessions) as session:
        if session.scalar(select(db.ApiKey).where(db.ApiKey.name == name)) is not None:
            raise AccessError(f"a key named {name!r} already exists (names stay taken after revoking, for the audit log)")
        session.add(db.ApiKey(name=name, secret_hash=hash_secret(secret), secret_hint=secret[:len(SECRET_PREFIX) + 4],
                              videos_per_day=videos_per_day, webhook_url=webhook_url, webhook_secret=webhook_secret))
        record(session, OPERATOR, "key.create", name, f"quota={videos_per_day}" + (f" webhook={webhook_url}" if webhook_url else ""))
    return NewKey(name, secret, webhook_secret)


def revoke_key(sessions: sessionmaker[Session], name: str) -> None:
    with db.transaction(sessions) as session:
        key = session.scalar(select(db.ApiKey).where(db.ApiKey.name == name))
        if key is None:
            raise AccessError(f"no key named {name!r}")
        if key.revoked_at is not None:
            raise AccessError(f"key {name!r} is already revoked")
        key.revoked_at = db.now()
        record(session, OPERATOR, "key.revoke", name)


def list_keys(sessions: sessionmaker[Session]) -> list[db.ApiKey]:
    with db.transaction(sessions, write=False) as session:
        return list(session.scalars(select(db.ApiKey).order_by(db.ApiKey.id)))


def set_paused(sessions: sessionmaker[Session], paused: bool) -> None:
    with db.transaction(sessions) as session:
        session.merge(db.Switch(name=PAUSED_SWITCH, value="1" if paused else "0"))
        record(session, OPERATOR, "access.pause" if paused else "access.resume")


def is_paused(session: Session) -> bool:
    switch = session.get(db.Switch, PAUSED_SWITCH)
    return switch is not None and switch.value == "1"


def record(session: Session, actor: str, action: str, target: str | None = None, detail: str | None = None) -> None:
    session.add(db.AuditEvent(actor=actor, action=action, target=target, detail=detail))


def audit_events(sessions: sessionmaker[Session], actor: str | None = None, limit: int = 100) -> list[db.AuditEvent]:
    """The latest `limit` events, oldest first."""
    with db.transaction(sessions, write=False) as session:
        query = select(db.AuditEvent).order_by(db.AuditEvent.id.desc()).limit(limit)
        if actor is not None:
            query = query.where(db.AuditEvent.actor == actor)
        return list(reversed(session.scalars(query).all()))


# -- per request ------------------------------------------------------------------------------


def authenticate(session: Session, authorization: str | None) -> db.ApiKey:
    """The key behind an `Authorization: Bearer ...` header, read fresh from the database on every
    request, so a revoked key is refused from its very next request on."""
    if is_paused(session):
        raise ApiError(503, "Access to this server is paused by its operator.", code="access_paused",
                       headers={"x-should-retry": "false"})
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key")
    key = session.scalar(select(db.ApiKey).where(db.ApiKey.secret_hash == hash_secret(secret.strip())))
    if key is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if key.revoked_at is not None:
        raise ApiError(401, "This API key has been revoked.", code="invalid_api_key")
    return key


def too_many(message: str, retry_after: float, code: str, type: str = "requests") -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(429, message, code=code, type=type, headers={"retry-after": str(seconds)})


class RateLimiter:
    """A token bucket per key: `per_minute` requests in a burst, refilled evenly over a minute."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self.buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self.lock = threading.Lock()

    def take(self, key: db.ApiKey) -> None:
        with self.lock:
            now = time.monotonic()
            tokens, last = self.buckets.get(key.id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_second)
            if tokens < 1:
                self.buckets[key.id] = (tokens, now)
                raise too_many(f"Rate limit reached for key '{key.name}': {self.capacity:.0f} requests per minute.",
                               (1 - tokens) / self.refill_per_second, "rate_limit_exceeded")
            self.buckets[key.id] = (tokens - 1, now)


def check_job_limits(session: Session, key: db.ApiKey, default_per_day: int, concurrent: int) -> None:
    """Raise 429 if `key` may not start another video now: its daily quota (a rolling 24 hours,
    so Retry-After is exact) or its number of unfinished jobs."""
    per_day = key.videos_per_day if key.videos_per_day is not None else default_per_day
    window_start = db.now() - DAY_SECONDS
    recent = select(db.IssuedVideo.created_at).where(db.IssuedVideo.key_id == key.id, db.IssuedVideo.created_at > window_start)
    count = session.scalar(select(func.count()).select_from(recent.subquery()))
    if count >= per_day:
        oldest = session.scalar(recent.order_by(db.IssuedVideo.created_at).offset(count - per_day).limit(1))
        retry_after = oldest + DAY_SECONDS - db.now() if oldest is not None else DAY_SECONDS
        raise too_many(f"You exceeded your quota of {per_day} videos per day.", retry_after, "insufficient_quota", "insufficient_quota")
    unfinished = session.scalar(select(func.count()).where(db.Video.key_id == key.id, db.Video.status.in_(UNFINISHED)))
    if unfinished >= concurrent:
        raise too_many(f"You have {unfinished} videos queued or in progress; at most {concurrent} at once.", 5, "concurrent_jobs_exceeded")
