"""The server, end to end: `kinetoscope serve` as a real process (uvicorn on 127.0.0.1), driven by
OpenAI's own Python client. The generator is the real pipeline with tiny random weights."""

import contextlib
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from PIL import Image
from sqlalchemy import select, update

from kinetoscope.cli import main
from kinetoscope.media.video import read_video, video_info
from kinetoscope.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from kinetoscope.models.dit import DiffusionTransformer, config_for
from kinetoscope.server import access, db
from kinetoscope.server.errors import ApiError
from kinetoscope.server.storage import spritesheet

# OpenAI marks its Videos API deprecated in the client; the API we serve is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STARTUP_SECONDS = 120
SMALL = {"size": "32x32", "seconds": "1"}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    VideoAutoencoder(AutoencoderConfig(latent_channels=8, widths=(12, 24), blocks_per_level=1)).save_pretrained(root / "autoencoder")
    DiffusionTransformer(config_for("tiny", latent_channels=8, depth=2)).save_pretrained(root / "generator")
    (root / "generator" / "pipeline.json").write_text(json.dumps({"autoencoder": "../autoencoder", "fps": 8.0}))
    return root / "generator"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`kinetoscope serve` in a child process, on a free port."""

    def __init__(self, data, weights, *options):
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kinetoscope", "serve", "--port", str(self.port), "--data", str(data),
                   "--weights", str(weights), "--log-level", "warning", *options]
        self.log = open(data / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (data / f"server-{self.port}.log").read_text()
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


def run_cli(*args) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(list(args)) == 0
    return output.getvalue()


def new_key(data, name, *options) -> str:
    return run_cli("keys", "create", "--name", name, "--data", str(data), *options).splitlines()[-1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, weights_dir):
    data = tmp_path_factory.mktemp("data")
    process = ServerProcess(data, weights_dir, "--steps", "2", "--webhook-retry-seconds", "0.2", "--default-size", "32x32")
    yield process
    process.stop()


@pytest.fixture
def client(server, request):
    return server.client(new_key(server.data, f"{request.node.originalname[:40]}-{uuid.uuid4().hex[:8]}"))


# -- the Videos API -------------------------------------------------------------------------------


def test_create_and_poll_then_download_gives_a_playable_mp4_of_the_asked_size(client, tmp_path):
    video = client.videos.create_and_poll(prompt="a red circle moves to the right", size="48x32", seconds="1", poll_interval_ms=50)
    assert (video.status, video.progress, video.size, video.seconds, video.error) == ("completed", 100, "48x32", "1", None)
    assert video.completed_at >= video.created_at and video.model == "kinetoscope-shapes"
    path = tmp_path / "video.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    info = video_info(path)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (48, 32, 9, "h264")
    assert read_video(path)[0].shape == (9, 32, 48, 3)
    thumbnail = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (48, 32))
    assert (sheet.format, sheet.size) == ("JPEG", (4 * 48, 3 * 32))  # 9 frames in rows of 4


def test_an_idle_connection_outlives_the_clients_keep_alive(server):
    """The openai client reuses a connection idle for up to 5 s; the server must not close it first."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sockets = []
    for _ in range(2):
        connection.request("GET", "/health")
        response = connection.getresponse()  # RemoteDisconnected here if the server closed the idle connection
        assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        sockets.append(connection.sock)
        time.sleep(openai.DEFAULT_CONNECTION_LIMITS.keepalive_expiry + 1)
    connection.close()
    assert sockets[0] is sockets[1]  # one connection served both


def test_a_server_started_with_compile_is_warm_for_its_default_size(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("TORCH_LOGS", "recompiles")  # torch logs every compile after the first
    process = ServerProcess(tmp_path, weights_dir, "--steps", "2", "--default-size", "32x32", "--compile")
    log = tmp_path / f"server-{process.port}.log"
    try:
        assert "compiling the transformer for 32x32, 33 frames" in log.read_text()
        started = len(log.read_text())  # start-up compiled a guided pass and an unguided one (outside the guidance interval)
        client = process.client(new_key(tmp_path, "compiled"))
        video = client.videos.create_and_poll(prompt="a red circle moves to the right", poll_interval_ms=50)
        assert (video.status, video.size, video.seconds) == ("completed", "32x32", "4")
    finally:
        process.stop()
    assert "Recompiling" not in log.read_text()[started:]  # the request ran on what start-up compiled


def test_a_default_size_the_model_cannot_make_is_refused_at_start(tmp_path, weights_dir, capsys):
    assert main(["serve", "--data", str(tmp_path), "--weights", str(weights_dir), "--default-size", "36x36"]) == 2
    assert "--default-size" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--guidance", "nan"], "--guidance"),
    (["--port", "70000"], "--port"),
    (["--steps", "5000"], "--steps"),
    (["--database", "postgresql+psycopg://localhost/kinetoscope"], "cannot open the database"),
    (["--redraws", "1"], "--redraws: redraws check a painting against its layout plan; this model plans no layout"),
], ids=["guidance-nan", "port-out-of-range", "too-many-steps", "database-driver-missing", "redraws-without-a-planner"])
def test_bad_serve_arguments_are_one_line_and_exit_2(tmp_path, weights_dir, capsys, args, named):
    assert main(["serve", "--data", str(tmp_path), "--weights", str(weights_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1


def test_unfinished_videos_say_when_to_poll_and_models_are_listed(client):
    response = client.videos.with_raw_response.create(prompt="a blue square", **SMALL)
    video = response.parse()
    assert video.status in ("queued", "in_progress") and int(response.headers["openai-poll-after-ms"]) > 0
    assert [model.id for model in client.models.list()] == ["kinetoscope-shapes"]
    client.videos.poll(video.id, poll_interval_ms=50)


def test_json_body_with_integer_seconds_and_a_seed_reproduces_the_video(server, client, tmp_path):
    headers = {"Authorization": f"Bearer {client.api_key}"}
    body = {"prompt": "a green triangle spins", "seconds": 1, "size": "32x32", "model": "sora-2", "seed": 7}
    first, second = (httpx2.post(f"{server.url}/v1/videos", json=body, headers=headers).json() for _ in range(2))
    assert (first["seconds"], first["seed"], second["seed"]) == ("1", 7, 7)
    clips = []
    for video in (first, second):
        client.videos.poll(video["id"], poll_interval_ms=50)
        client.videos.download_content(video["id"]).write_to_file(tmp_path / f"{video['id']}.mp4")
        clips.append(read_video(tmp_path / f"{video['id']}.mp4")[0])
    assert (clips[0] == clips[1]).all()


def test_list_pages_with_cursors_in_both_orders(client):
    created = [client.videos.create_and_poll(prompt=f"a red circle number {i}", poll_interval_ms=50, **SMALL).id for i in range(5)]
    page = client.videos.list(limit=2)
    assert [video.id for video in page.data] == created[::-1][:2]
    assert page.has_more and page.last_id == created[3]
    raw = client.videos.with_raw_response.list(limit=2, after=created[3]).http_response.json()
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (created[2], created[1], True)
    assert [video.id for video in client.videos.list(limit=2)] == created[::-1]  # the client follows the cursor
    ascending = client.videos.list(limit=3, order="asc")
    assert [video.id for video in ascending.data] == created[:3]
    last = client.videos.list(limit=3, order="asc", after=created[2])
    assert [video.id for video in last.data] == created[3:] and not last.has_more
    with pytest.raises(openai.BadRequestError):
        client.videos.list(after="video_unknown")
    for video in client.videos.list(limit=2):  # deleting as it pages: the next cursor names a deleted video
        client.videos.delete(video.id)
    assert client.videos.list().data == []


def test_remix_keeps_size_length_and_seed_with_the_new_prompt(client):
    source = client.videos.create_and_poll(prompt="a red circle", size="32x48", seconds="1", poll_interval_ms=50)
    remix = client.videos.remix(source.id, prompt="a blue square")
    assert (remix.remixed_from_video_id, remix.prompt, remix.size, remix.seconds, remix.seed) == (
        source.id, "a blue square", "32x48", "1", source.seed)
    assert client.videos.poll(remix.id, poll_interval_ms=50).status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.videos.remix("video_nope", prompt="a blue square")


def test_deleting_a_video_cancels_its_job_and_removes_its_files(server, client):
    video = client.videos.create(prompt="a yellow circle", **SMALL)
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    # the worker is free again and nothing of the deleted video remains on disk
    assert client.videos.create_and_poll(prompt="a cyan square", poll_interval_ms=50, **SMALL).status == "completed"
    assert not (server.data / "videos" / video.id).exists()


# -- access ---------------------------------------------------------------------------------------


def test_two_keys_never_see_each_others_videos(server):
    alice, bob = (server.client(new_key(server.data, name)) for name in ("alice", "bob"))
    video = alice.videos.create_and_poll(prompt="a red circle", poll_interval_ms=50, **SMALL)
    for attempt in (lambda: bob.videos.retrieve(video.id), lambda: bob.videos.download_content(video.id),
                    lambda: bob.videos.remix(video.id, prompt="a blue square"), lambda: bob.videos.delete(video.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert [v.id for v in bob.videos.list()] == []
    assert [v.id for v in alice.videos.list()] == [video.id]


def test_a_revoked_key_is_refused_at_its_next_request(server):
    client = server.client(new_key(server.data, "carol"))
    client.models.list()
    run_cli("keys", "revoke", "carol", "--data", str(server.data))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert "revoked" in run_cli("keys", "list", "--data", str(server.data))
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-kin-not-a-key").models.list()


def test_the_daily_quota_gives_429_with_retry_after(server):
    client = server.client(new_key(server.data, "dave", "--quota", "1"))
    client.videos.create(prompt="a red circle", **SMALL)
    with pytest.raises(openai.RateLimitError) as refused:
        client.videos.create(prompt="a red circle", **SMALL)
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"
    assert 86_000 < int(refused.value.response.headers["retry-after"]) <= 86_400
    client.videos.delete(client.videos.list().data[0].id)  # deleting never refunds quota
    with pytest.raises(openai.RateLimitError):
        client.videos.create(prompt="a red circle", **SMALL)


def test_pausing_access_refuses_everyone_until_resumed(server, client):
    run_cli("access", "pause", "--data", str(server.data))
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            client.models.list()
        assert refused.value.status_code == 503 and refused.value.code == "access_paused"
    finally:
        run_cli("access", "resume", "--data", str(server.data))
    client.videos.create(prompt="a red circle", **SMALL)  # the key works again, and its request is audited
    log = run_cli("audit", "--data", str(server.data))
    assert "access.pause" in log and "access.resume" in log and "video.create" in log


def test_too_many_unfinished_jobs_give_429_until_one_finishes(tmp_path):
    sessions = db.open_database(db.database_url_for(tmp_path))
    access.create_key(sessions, "gina")
    with db.transaction(sessions) as session:
        key = session.scalar(select(db.ApiKey))
        for index, status in enumerate(["queued", "in_progress", "completed"]):
            session.add(db.Video(id=f"video_{index}", key_id=key.id, status=status, prompt="a red circle", model="m",
                                 seconds="1", width=32, height=32, frames=9, seed=0, steps=2, guidance=4.0))
    with db.transaction(sessions, write=False) as session:
        access.check_job_limits(session, key, default_per_day=10, concurrent=3)
        with pytest.raises(ApiError) as refused:
            access.check_job_limits(session, key, default_per_day=10, concurrent=2)
    assert refused.value.status == 429 and refused.value.body.code == "concurrent_jobs_exceeded"
    assert int(refused.value.headers["retry-after"]) > 0
    db.dispose(sessions)


def test_the_rate_limiter_refills_over_a_minute(monkeypatch):
    class Key:
        id, name = 1, "erin"

    clock = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: clock[0])
    limiter = access.RateLimiter(per_minute=2)
    limiter.take(Key)
    limiter.take(Key)
    with pytest.raises(ApiError) as refused:
        limiter.take(Key)
    assert refused.value.status == 429 and int(refused.value.headers["retry-after"]) == 30
    clock[0] += 29  # one request refills in 30 s
    with pytest.raises(ApiError):
        limiter.take(Key)
    clock[0] += 1
    limiter.take(Key)
    clock[0] += 600  # a long pause refills the burst, but no more than it
    limiter.take(Key)
    limiter.take(Key)
    with pytest.raises(ApiError):
        limiter.take(Key)


# -- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"size": "100x100"}, "size"),
    ({"size": "big"}, "size"),
    ({"size": "1024x1024"}, "size"),
    ({"seconds": "0"}, "seconds"),
    ({"seconds": "4.5"}, "seconds"),
    ({"seconds": "99"}, "seconds"),
    ({"seconds": "\u00b2"}, "seconds"),  # a digit to str.isdigit, not to int()
    ({"seconds": "4" * 5000}, "seconds"),  # past Python's limit on converting digits
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 1_000_000}, "prompt"),
    ({"model": "dall-e-3"}, "model"),
    ({"extra_body": {"steps": 100}}, "steps"),
    ({"extra_body": {"input_reference": {"image_url": "https://example.com/a.png"}}}, "input_reference"),
    ({"input_reference": ("first.png", b"\x89PNG", "image/png")}, "input_reference"),
], ids=["size-not-multiple", "size-words", "size-too-big", "seconds-0", "seconds-fraction", "seconds-too-long",
        "seconds-superscript", "seconds-5000-digits",
        "empty-prompt", "1MB-prompt", "unknown-model", "unknown-field", "reference-url", "reference-upload"])
def test_malformed_create_requests_get_400_in_openai_envelope(client, fields, param):
    arguments = {"prompt": "a red circle", **SMALL, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.create(**arguments)
    error = refused.value.body
    assert (refused.value.status_code, error["type"], error["param"]) == (400, "invalid_request_error", param)
    assert error["message"]
    assert client.videos.list().data == []  # nothing was stored


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b"prompt=a red circle"),
    ("application/json", b"{not json"),
    ("application/json", b"[1, 2]"),
    ("application/json", b'{"prompt": 5}'),
    (None, b""),
    ("application/json", b"[" * 100_000),
], ids=["text-plain", "broken-json", "json-array", "prompt-number", "no-body", "deeply-nested-json"])
def test_malformed_bodies_get_400_in_openai_envelope(server, client, content_type, body):
    headers = {"Authorization": f"Bearer {client.api_key}"} | ({"Content-Type": content_type} if content_type else {})
    response = httpx2.post(f"{server.url}/v1/videos", content=body, headers=headers)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_bodies_over_8_mb_get_413_whether_declared_or_chunked(server, client):
    headers = {"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"}
    body = b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}'
    declared = httpx2.post(f"{server.url}/v1/videos", content=body, headers=headers)
    chunked = httpx2.post(f"{server.url}/v1/videos", content=iter([body[i:i + 2**20] for i in range(0, len(body), 2**20)]),
                          headers=headers)  # an iterator: sent chunked, with no Content-Length
    for response in (declared, chunked):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert client.videos.list().data == []


def test_unknown_routes_and_bad_queries_answer_in_the_envelope(server, client):
    headers = {"Authorization": f"Bearer {client.api_key}"}
    assert httpx2.get(f"{server.url}/v1/nothing", headers=headers).json()["error"]["code"] == "not_found"
    response = httpx2.get(f"{server.url}/v1/videos?limit=0", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "limit"
    response = httpx2.get(f"{server.url}/v1/videos/video_x/content?variant=poster", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "variant"


# -- webhooks -------------------------------------------------------------------------------------


class Receiver(BaseHTTPRequestHandler):
    """Refuses the first delivery (so the server must retry), accepts the rest."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        Receiver.received.append(({name.lower(): value for name, value in self.headers.items()}, body))
        self.send_response(500 if len(Receiver.received) == 1 else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhooks_are_signed_like_openai_and_retried(server):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        lines = run_cli("keys", "create", "--name", "hooked", "--data", str(server.data),
                        "--webhook-url", f"http://127.0.0.1:{receiver.server_port}/hook").splitlines()
        secret = lines[1].split()[-1]
        client = server.client(lines[-1])
        video = client.videos.create_and_poll(prompt="a red circle", poll_interval_ms=50, **SMALL)
        deadline = time.monotonic() + 20
        while len(Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        receiver.shutdown()
    (first_headers, first_body), (headers, body) = Receiver.received[:2]
    assert first_headers["webhook-id"] == headers["webhook-id"] and first_body == body  # the same event, retried
    client.webhooks.verify_signature(body, headers, secret=secret)
    event = json.loads(body)
    assert (event["type"], event["object"], event["data"]["id"]) == ("video.completed", "event", video.id)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body.replace(video.id, "video_other"), headers, secret=secret)


# -- durability -----------------------------------------------------------------------------------


def test_a_server_killed_mid_job_finishes_the_job_after_restart(tmp_path, weights_dir):
    first = ServerProcess(tmp_path, weights_dir, "--steps", "300", "--lease-seconds", "2")
    key = new_key(tmp_path, "frank")
    client = first.client(key)
    try:
        video = client.videos.create(prompt="a red circle moves to the right", size="64x64", seconds="2")
        doomed = client.videos.create(prompt="a blue square", **SMALL)  # queued behind it: one worker
        deadline = time.monotonic() + 60
        while (running := client.videos.retrieve(video.id)).progress == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.status == "in_progress" and 0 < running.progress < 100
    finally:
        first.kill()
    # as if `doomed` had been interrupted by crashes as often as a job may be: it must fail, with a reason
    sessions = db.open_database(db.database_url_for(tmp_path))
    with db.transaction(sessions) as session:
        session.execute(update(db.Video).where(db.Video.id == doomed.id).values(
            status="in_progress", attempts=3, lease_owner="dead-server", lease_expires_at=db.now() - 1))
    db.dispose(sessions)

    second = ServerProcess(tmp_path, weights_dir)
    try:
        client = second.client(key)
        done = client.videos.poll(video.id, poll_interval_ms=100)
        assert (done.status, done.seed, done.size) == ("completed", video.seed, "64x64")
        assert [v.id for v in client.videos.list()] == [doomed.id, video.id]  # nothing lost, nothing doubled
        client.videos.download_content(video.id).write_to_file(tmp_path / "resumed.mp4")
        assert video_info(tmp_path / "resumed.mp4")["frames"] == 17
        failed = client.videos.poll(doomed.id, poll_interval_ms=100)
        assert failed.status == "failed" and failed.error.code == "job_interrupted" and "interrupted 3 times" in failed.error.message
    finally:
        second.stop()


def test_spritesheet_lays_frames_out_row_by_row():
    frames = torch.arange(5).view(5, 1, 1, 1).expand(5, 2, 3, 3).numpy().astype("uint8")
    sheet = spritesheet(frames)
    assert sheet.shape == (4, 12, 3)
    assert sheet[0, ::3, 0].tolist() == [0, 1, 2, 3] and sheet[2, ::3, 0].tolist() == [4, 0, 0, 0]


@pytest.mark.parametrize("a_loses_it_while", ["sampling", "saving"])
def test_a_worker_that_lost_its_lease_to_another_never_removes_that_workers_video(tmp_path, weights_dir, a_loses_it_while):
    """Worker A stalls past its lease (a long compile, say) and worker B claims the job again and
    completes it; when A goes on, the completed video and its files must survive."""
    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.server.jobs import JobRunner
    from kinetoscope.server.settings import ServerSettings
    from kinetoscope.server.storage import VideoStorage

    sessions = db.open_database(db.database_url_for(tmp_path))
    access.create_key(sessions, "artist")
    pipe = TextToVideo.load(weights_dir)
    storage = VideoStorage(tmp_path / "videos")
    runner = JobRunner(sessions, ServerSettings(data_dir=tmp_path), [pipe], storage)
    with db.transaction(sessions) as session:
        session.add(db.Video(id="video_1", key_id=session.scalar(select(db.ApiKey.id)), status="queued", prompt="a red circle",
                             model="kinetoscope-shapes", seconds="1", width=32, height=32, frames=9, seed=1, steps=2, guidance=4.0))

    def worker_b_takes_over():
        with db.transaction(sessions) as session:
            session.execute(update(db.Video).values(lease_expires_at=db.now() - 1))
        runner.run(pipe, *runner.claim())

    def stalling_pipeline(*args, **kwargs):
        if a_loses_it_while == "sampling":  # A's next progress report finds the lease gone
            worker_b_takes_over()
            return pipe(*args, **kwargs)
        result = pipe(*args, **kwargs)  # A samples in time, then loses the lease before it saves
        worker_b_takes_over()
        return result

    runner.run(stalling_pipeline, *runner.claim())
    with db.transaction(sessions, write=False) as session:
        assert session.scalar(select(db.Video.status)) == "completed"
    assert all(storage.path("video_1", variant).is_file() for variant in ("video", "thumbnail", "spritesheet"))


def test_progress_never_goes_back_when_a_redraw_adds_steps_to_the_work(tmp_path, weights_dir, monkeypatch):
    """A layout model that paints a clip again reports the redraw's steps on a grown total
    (text_to_video: step 3 of 4 after 2 of 2); the video's progress holds instead of falling."""
    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.server import jobs
    from kinetoscope.server.settings import ServerSettings
    from kinetoscope.server.storage import VideoStorage

    monkeypatch.setattr(jobs, "PROGRESS_WRITE_SECONDS", 0.0)  # every report written
    sessions = db.open_database(db.database_url_for(tmp_path))
    access.create_key(sessions, "artist")
    pipe = TextToVideo.load(weights_dir)
    runner = jobs.JobRunner(sessions, ServerSettings(data_dir=tmp_path), [pipe], storage := VideoStorage(tmp_path / "videos"))
    with db.transaction(sessions) as session:
        session.add(db.Video(id="video_1", key_id=session.scalar(select(db.ApiKey.id)), status="queued", prompt="a red circle",
                             model="kinetoscope-shapes", seconds="1", width=32, height=32, frames=9, seed=1, steps=2, guidance=4.0))
    shown = []

    def redrawing_pipeline(prompt, on_step, **kwargs):
        for done, total in ((1, 2), (2, 2), (3, 4), (4, 4)):
            on_step(done, total)
            with db.transaction(sessions, write=False) as session:
                shown.append(session.scalar(select(db.Video.progress)))
        return pipe(prompt, **kwargs)

    runner.run(redrawing_pipeline, *runner.claim())
    share = jobs.SAMPLING_SHARE
    assert shown == [share // 2, share, share, share] and storage.path("video_1", "video").is_file()


def test_files_a_stopped_server_left_behind_for_deleted_videos_and_downloads_go_at_the_next_start(tmp_path, weights_dir):
    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.server.app import Server
    from kinetoscope.server.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path)
    sessions = db.open_database(settings.database)
    access.create_key(sessions, "artist")
    with db.transaction(sessions) as session:
        session.add(db.Video(id="video_kept", key_id=session.scalar(select(db.ApiKey.id)), status="completed", prompt="a red circle",
                             model="kinetoscope-shapes", seconds="1", width=32, height=32, frames=9, seed=1, steps=2, guidance=4.0))
    for video_id in ("video_kept", "video_deleted"):
        (settings.videos_dir / video_id).mkdir(parents=True)
        (settings.videos_dir / video_id / "video.mp4").write_bytes(b"frames")
    (settings.videos_dir / ".downloads").mkdir()
    (settings.videos_dir / ".downloads" / "stale-video.mp4").write_bytes(b"frames")  # a download cut off by the stop
    Server(settings, [TextToVideo.load(weights_dir)])
    assert sorted(p.name for p in settings.videos_dir.iterdir()) == ["video_kept"]


def test_a_download_that_a_delete_overtakes_still_sends_the_whole_file(tmp_path, weights_dir, monkeypatch):
    from fastapi.responses import FileResponse
    from fastapi.testclient import TestClient

    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.server.app import create_app
    from kinetoscope.server.settings import ServerSettings
    from kinetoscope.server.storage import DOWNLOADS

    settings = ServerSettings(data_dir=tmp_path)
    secret = access.create_key(db.open_database(settings.database), "artist").secret
    app = create_app(settings, [TextToVideo.load(weights_dir)])
    with db.transaction(app.state.server.sessions) as session:
        session.add(db.Video(id="video_1", key_id=session.scalar(select(db.ApiKey.id)), status="completed", prompt="a red circle",
                             model="kinetoscope-shapes", seconds="1", width=32, height=32, frames=9, seed=1, steps=2, guidance=4.0))
    mp4 = bytes(range(256)) * 64
    (settings.videos_dir / "video_1").mkdir(parents=True)
    (settings.videos_dir / "video_1" / "video.mp4").write_bytes(mp4)

    send_file = FileResponse.__call__

    async def delete_lands_before_the_bytes_go_out(response, scope, receive, send):
        app.state.server.storage.remove("video_1")
        await send_file(response, scope, receive, send)

    monkeypatch.setattr(FileResponse, "__call__", delete_lands_before_the_bytes_go_out)
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(app) as http:
        whole = http.get("/v1/videos/video_1/content", headers=headers)
        assert whole.status_code == 200 and whole.content == mp4
        assert not (settings.videos_dir / "video_1").exists()
        assert list((settings.videos_dir / DOWNLOADS).iterdir()) == []  # the link went with the response
        gone = http.get("/v1/videos/video_1/content", headers=headers)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "video_not_found"


def test_videos_sample_with_the_models_own_settings_unless_the_server_is_told_others(tmp_path, weights_dir):
    from fastapi.testclient import TestClient

    from kinetoscope.pipelines.text_to_video import SamplingSettings, TextToVideo
    from kinetoscope.server.app import create_app
    from kinetoscope.server.settings import ServerSettings

    pipe = TextToVideo.load(weights_dir)
    pipe.sampling = SamplingSettings(steps=3, guidance=2.5, sampler="euler")  # as a pipeline.json "sampling" would name them
    for settings, expected in [(ServerSettings(data_dir=tmp_path / "own"), (3, 2.5, "euler")),
                               (ServerSettings(data_dir=tmp_path / "told", steps=5, guidance=1.0, sampler="heun"), (5, 1.0, "heun"))]:
        secret = access.create_key(db.open_database(settings.database), "artist").secret
        app = create_app(settings, [pipe])
        response = TestClient(app).post("/v1/videos", json={"prompt": "a red circle", **SMALL},
                                        headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 200, response.text
        with db.transaction(app.state.server.sessions, write=False) as session:
            assert session.execute(select(db.Video.steps, db.Video.guidance, db.Video.sampler)).one() == expected


def test_a_database_from_before_videos_recorded_their_sampler_opens_with_its_videos(tmp_path):
    import sqlite3

    url = db.database_url_for(tmp_path)
    sessions = db.open_database(url)
    access.create_key(sessions, "artist")
    with db.transaction(sessions) as session:
        session.add(db.Video(id="video_old", key_id=session.scalar(select(db.ApiKey.id)), status="completed", prompt="a red circle", model="m",
                             seconds="1", width=32, height=32, frames=9, seed=1, steps=3, guidance=2.0))
    db.dispose(sessions)
    with sqlite3.connect(tmp_path / db.DATABASE_FILE) as connection:  # the table as it was before the column
        connection.execute("ALTER TABLE videos DROP COLUMN sampler")
    sessions = db.open_database(url)
    with db.transaction(sessions, write=False) as session:
        assert session.execute(select(db.Video.id, db.Video.steps, db.Video.sampler)).one() == ("video_old", 3, None)


def test_the_server_load_benchmark_runs_its_clients_against_a_real_server(weights_dir):
    script = Path(__file__).resolve().parents[1] / "scripts" / "server_load_benchmark.py"
    result = subprocess.run([sys.executable, str(script), "--weights", str(weights_dir), "--pollers", "3", "--creators", "2",
                             "--videos-per-creator", "2", "--size", "32x32", "--seconds", "1", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jobs completed: 4/4; failed: 0; request errors: 0" in result.stdout
    assert "status requests: " in result.stdout and "create requests: 4, p50 " in result.stdout


def test_opening_the_database_waits_for_a_running_servers_write_instead_of_failing(tmp_path):
    import sqlite3

    url = db.database_url_for(tmp_path)
    db.dispose(db.open_database(url))
    writer = sqlite3.connect(tmp_path / db.DATABASE_FILE, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # a server's worker, mid-write
    writer.execute("INSERT INTO switches (name, value) VALUES ('paused', 'no')")
    committer = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    committer.start()
    try:
        sessions = db.open_database(url)  # reads the schema, then writes: it must wait, not fail on a stale read
    finally:
        committer.join()
        writer.close()
    with db.transaction(sessions, write=False) as session:
        assert session.scalar(select(db.Switch.value)) == "no"
