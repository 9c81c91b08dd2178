"""`video.completed` and `video.failed` events to a key's webhook URL, signed the way OpenAI signs
them (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
HMAC-SHA256 of "id.timestamp.body">`), so `client.webhooks.unwrap(...)` verifies them. Deliveries
live in the database, so a restart does not drop them; failures retry with doubling delays."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kinetoscope.server import db
from kinetoscope.server.settings import ServerSettings

log = logging.getLogger("kinetoscope.server")

POLL_SECONDS = 0.5
DELIVERY_TIMEOUT_SECONDS = 10.0
MAX_RETRY_DELAY_SECONDS = 6 * 3600.0
BATCH = 20


def enqueue(session: Session, key_id: int, video_id: str, event_type: str) -> None:
    """Queue an event for the key's webhook, if it has one, in the caller's transaction."""
    key = session.get(db.ApiKey, key_id)
    if key is None or not key.webhook_url:
        return
    event_id = f"evt_{uuid.uuid4().hex}"
    payload = {"id": event_id, "object": "event", "created_at": int(db.now()), "type": event_type, "data": {"id": video_id}}
    session.add(db.WebhookDelivery(id=event_id, key_id=key_id, url=key.webhook_url, payload=json.dumps(payload)))


def sign(secret: str, event_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{event_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    def __init__(self, sessions: sessionmaker[Session], settings: ServerSettings):
        self.sessions = sessions
        self.settings = settings
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="kinetoscope-webhooks", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(DELIVERY_TIMEOUT_SECONDS + 1)

    def loop(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self.deliver_due()
            except Exception:
                log.exception("webhook delivery loop failed; retrying")

    def deliver_due(self) -> None:
        with db.transaction(self.sessions, write=False) as session:
            due = session.execute(
                select(db.WebhookDelivery, db.ApiKey.webhook_secret)
                .join(db.ApiKey, db.ApiKey.id == db.WebhookDelivery.key_id)
                .where(db.WebhookDelivery.delivered_at.is_(None), db.WebhookDelivery.abandoned_at.is_(None),
                       db.WebhookDelivery.next_attempt_at <= db.now())
                .order_by(db.WebhookDelivery.next_attempt_at).limit(BATCH)
            ).all()
        for delivery, secret in due:
            if self.stopping.is_set():
                return
            error = self.post(delivery, secret)
            self.record(delivery, error)

    def post(self, delivery: db.WebhookDelivery, secret: str) -> str | None:
        """None on a 2xx answer, else what went wrong."""
        timestamp = int(time.time())  # signed per attempt: receivers reject stale timestamps
        request = urllib.request.Request(delivery.url, data=delivery.payload.encode(), method="POST", headers={
            "content-type": "application/json",
            "user-agent": "kinetoscope-webhooks",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, delivery.payload),
        })
        try:
            with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT_SECONDS) as response:
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            return str(getattr(error, "reason", error))

    def record(self, delivery: db.WebhookDelivery, error: str | None) -> None:
        attempts = delivery.attempts + 1
        with db.transaction(self.sessions) as session:
            stored = session.get(db.WebhookDelivery, delivery.id)
            stored.attempts = attempts
            stored.last_error = error
            if error is None:
                stored.delivered_at = db.now()
            elif attempts >= self.settings.webhook_max_attempts:
                stored.abandoned_at = db.now()
                log.warning("webhook %s to %s abandoned after %d attempts: %s", delivery.id, delivery.url, attempts, error)
            else:
                delay = min(MAX_RETRY_DELAY_SECONDS, self.settings.webhook_retry_seconds * 2 ** (attempts - 1))
                stored.next_attempt_at = db.now() + delay
