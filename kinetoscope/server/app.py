"""OpenAI's Videos API under /v1, served from your own machine.

Route handlers are plain `def`s: FastAPI runs them in its thread pool, so database work never
blocks the event loop, and generation runs in the job runner's own threads.
"""

from __future__ import annotations

import re
import secrets
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import delete, select
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from kinetoscope.server import access, db
from kinetoscope.server.errors import ApiError, bad_request, describe_validation_error, install_error_handlers, not_found
from kinetoscope.server.jobs import JobRunner
from kinetoscope.server.schemas import (
    UNFINISHED, CreateVideoRequest, ModelList, ModelObject, RemixVideoRequest, VideoDeleted, VideoList, VideoObject,
)
from kinetoscope.server.settings import MODEL_ID, OPENAI_MODEL_ALIASES, ServerSettings
from kinetoscope.server.storage import VARIANTS, VideoStorage
from kinetoscope.server.webhooks import WebhookSender

MAX_BODY_BYTES = 8 * 1024 * 1024
SIZE_PATTERN = re.compile(r"(\d{1,5})x(\d{1,5})")
BRACKETED_FIELD = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
SIZE_EXAMPLES = "128x128, 256x256, 256x144, 144x256"


class Server:
    """What the routes share: settings, database, storage, limits and the job runner."""

    def __init__(self, settings: ServerSettings, pipelines: list):
        sampling = pipelines[0].sampling_for(settings.steps, settings.guidance, settings.sampler)  # settings left None: the model's own
        settings = self.settings = replace(settings, steps=sampling.steps, guidance=sampling.guidance, sampler=sampling.sampler)
        self.sessions = db.open_database(settings.database)
        self.storage = VideoStorage(settings.videos_dir)
        self.limiter = access.RateLimiter(settings.requests_per_minute)
        self.model = pipelines[0]  # what the model can make; every worker's pipeline is the same model
        self.max_seconds = int(self.model.max_seconds)
        self.runner = JobRunner(self.sessions, settings, pipelines, self.storage)
        self.webhooks = WebhookSender(self.sessions, settings)
        self.created = int(db.now())
        self.remove_orphaned_files()

    def remove_orphaned_files(self) -> None:
        """A server stopped between a delete's commit and the removal of the files leaves them
        behind with no video to reach them by, and one stopped mid-download leaves its download
        links; the next start removes both."""
        with db.transaction(self.sessions, write=False) as session:
            known = set(session.scalars(select(db.Video.id)))
        for video_id in self.storage.video_ids() - known:
            self.storage.remove(video_id)
        self.storage.remove_download_links()

    # -- what a request asks for ------------------------------------------------------------------

    def plan(self, prompt: str, model: str | None, seconds: str | int | None, size: str | None) -> dict:
        """Validate a generation request against what the model can make; 400s list the choices."""
        if model is not None and model not in (MODEL_ID, *OPENAI_MODEL_ALIASES):
            raise bad_request(f"Invalid 'model': {model!r}. Available: '{MODEL_ID}' (OpenAI's names "
                              f"{', '.join(OPENAI_MODEL_ALIASES)} are accepted and run it too).", "model", "invalid_model")
        whole_seconds = self.parse_seconds(seconds)
        width, height = self.parse_size(size)
        frames = self.model.frames_for(whole_seconds)
        smallest = self.model.size_multiples
        for param, args in (("prompt", (prompt, *smallest, 1)), ("size", ("x", width, height, 1)),
                            ("seconds", ("x", *smallest, frames))):
            try:
                self.model.check_request(*args)
            except ValueError as error:
                hint = f" For example {SIZE_EXAMPLES}." if param == "size" else ""
                raise bad_request(f"Invalid '{param}': {error}.{hint}", param) from None
        return {"prompt": prompt, "model": MODEL_ID, "seconds": str(whole_seconds), "width": width, "height": height, "frames": frames}

    def parse_seconds(self, seconds: str | int | None) -> int:
        if seconds is None:
            return self.settings.default_seconds
        text = str(seconds).strip()
        if not re.fullmatch(r"[0-9]{1,4}", text) or not 1 <= int(text) <= self.max_seconds:
            raise bad_request(f"Invalid 'seconds': {seconds!r}. This model makes whole seconds from 1 to "
                              f"{self.max_seconds}, as a string or an integer (e.g. '4', '8', '12').", "seconds")
        return int(text)

    def parse_size(self, size: str | None) -> tuple[int, int]:
        if size is None:
            return self.settings.default_size
        match = SIZE_PATTERN.fullmatch(size.strip())
        if not match:
            raise bad_request(f"Invalid 'size': {size!r}. Send WIDTHxHEIGHT, {self.model.size_rule} (e.g. {SIZE_EXAMPLES}).", "size")
        return int(match.group(1)), int(match.group(2))

    # -- videos -----------------------------------------------------------------------------------

    def submit(self, key: db.ApiKey, plan: dict, seed: int | None, remixed_from: str | None) -> db.Video:
        with db.transaction(self.sessions) as session:
            access.check_job_limits(session, key, self.settings.videos_per_day, self.settings.concurrent_jobs_per_key)
            video = db.Video(id=f"video_{uuid.uuid4().hex}", key_id=key.id, status="queued", progress=0,
                             seed=seed if seed is not None else secrets.randbelow(2**31), steps=self.settings.steps,
                             guidance=self.settings.guidance, sampler=self.settings.sampler, remixed_from_video_id=remixed_from, **plan)
            session.add(video)
            session.flush()  # assigns seq
            session.add(db.IssuedVideo(video_id=video.id, key_id=key.id, seq=video.seq, created_at=video.created_at))
            access.record(session, key.name, "video.remix" if remixed_from else "video.create", video.id,
                          f"{plan['width']}x{plan['height']} {plan['seconds']}s seed={video.seed}")
        return video

    def owned_video(self, session, key: db.ApiKey, video_id: str) -> db.Video:
        video = session.scalar(select(db.Video).where(db.Video.id == video_id, db.Video.key_id == key.id))
        if video is None:
            raise not_found(video_id)
        return video


# -- dependencies --------------------------------------------------------------------------------


def get_server(request: Request) -> Server:
    return request.app.state.server


def authenticated_key(request: Request, server: Annotated[Server, Depends(get_server)]) -> db.ApiKey:
    with db.transaction(server.sessions, write=False) as session:
        key = access.authenticate(session, request.headers.get("authorization"))
    server.limiter.take(key)
    return key


async def read_bounded_body(request: Request) -> None:
    """Read the body, refusing it (413) once it passes MAX_BODY_BYTES: by its declared length, or,
    for a chunked body that declares none, as it arrives. Parsing then reads the cached body."""
    too_large = ApiError(413, f"The request body is larger than {MAX_BODY_BYTES // 2**20} MB.", code="request_too_large")
    declared_length = request.headers.get("content-length", "0")
    if declared_length.isdigit() and int(declared_length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    request._body = bytes(body)  # where Request.body() caches it, and json() and form() look first


async def request_fields(request: Request) -> dict:
    """A JSON object, or form fields with OpenAI's bracketed names (`input_reference[image_url]`)
    folded into nested objects; anything else is a 400."""
    await read_bounded_body(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            fields = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: thousands of nested brackets
            raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
        if not isinstance(fields, dict):
            raise bad_request("The JSON body must be an object.", code="invalid_json")
        return fields
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=MAX_BODY_BYTES)
        return nest_form_fields(form.multi_items())
    raise bad_request(f"Unsupported content type {content_type or '(none)'!r}: send application/json or "
                      "multipart/form-data.", code="unsupported_content_type")


def nest_form_fields(items) -> dict:
    fields: dict = {}
    for name, value in items:
        if isinstance(value, UploadFile):
            value = {"filename": value.filename, "content_type": value.content_type}
        match = BRACKETED_FIELD.fullmatch(name)
        if match is None:
            raise bad_request(f"Malformed form field name {name!r}.", name)
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        target = fields
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise bad_request(f"Form field {name!r} conflicts with another field.", name)
        target[path[-1]] = value
    return fields


def parsed(model_class, fields: dict):
    try:
        return model_class.model_validate(fields)
    except ValidationError as error:
        message, param = describe_validation_error(error.errors()[0])
        raise bad_request(message, param) from None


async def create_video_body(fields: Annotated[dict, Depends(request_fields)]) -> CreateVideoRequest:
    return parsed(CreateVideoRequest, fields)


async def remix_video_body(fields: Annotated[dict, Depends(request_fields)]) -> RemixVideoRequest:
    return parsed(RemixVideoRequest, fields)


ServerDep = Annotated[Server, Depends(get_server)]
KeyDep = Annotated[db.ApiKey, Depends(authenticated_key)]


def poll_hint(response: Response, video: db.Video, server: Server) -> VideoObject:
    if video.status in UNFINISHED:
        response.headers["openai-poll-after-ms"] = str(server.settings.poll_after_ms)
    return VideoObject.of(video)


# -- routes --------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1")


@router.post("/videos", response_model=VideoObject)
def create_video(key: KeyDep, body: Annotated[CreateVideoRequest, Depends(create_video_body)], server: ServerDep,
                 response: Response):
    if body.input_reference is not None:
        raise bad_request("Image-to-video is not available yet: this model generates from a text prompt only. "
                          "Send the request without 'input_reference'.", "input_reference", "unsupported_parameter")
    video = server.submit(key, server.plan(body.prompt, body.model, body.seconds, body.size), body.seed, None)
    return poll_hint(response, video, server)


@router.get("/videos", response_model=VideoList)
def list_videos(key: KeyDep, server: ServerDep, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "desc"):
    with db.transaction(server.sessions, write=False) as session:
        query = select(db.Video).where(db.Video.key_id == key.id)
        if after is not None:
            cursor = session.scalar(select(db.IssuedVideo.seq).where(db.IssuedVideo.video_id == after, db.IssuedVideo.key_id == key.id))
            if cursor is None:
                raise bad_request(f"Invalid 'after': no video with id '{after}'.", "after")
            query = query.where(db.Video.seq > cursor if order == "asc" else db.Video.seq < cursor)
        ordering = db.Video.seq.asc() if order == "asc" else db.Video.seq.desc()
        rows = list(session.scalars(query.order_by(ordering).limit(limit + 1)))
    page = [VideoObject.of(video) for video in rows[:limit]]
    return VideoList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                     has_more=len(rows) > limit)


@router.get("/videos/{video_id}", response_model=VideoObject)
def retrieve_video(video_id: str, key: KeyDep, server: ServerDep, response: Response):
    with db.transaction(server.sessions, write=False) as session:
        video = server.owned_video(session, key, video_id)
    return poll_hint(response, video, server)


@router.delete("/videos/{video_id}", response_model=VideoDeleted)
def delete_video(video_id: str, key: KeyDep, server: ServerDep):
    """Deleting a queued or running video cancels its job: the worker loses its lease."""
    with db.transaction(server.sessions) as session:
        video = server.owned_video(session, key, video_id)
        session.execute(delete(db.Video).where(db.Video.seq == video.seq))
        access.record(session, key.name, "video.delete", video_id, f"was {video.status}")
    server.storage.remove(video_id)
    return VideoDeleted(id=video_id)


@router.get("/videos/{video_id}/content")
def download_video_content(video_id: str, key: KeyDep, server: ServerDep,
                           variant: Literal["video", "thumbnail", "spritesheet"] = "video"):
    with db.transaction(server.sessions) as session:
        video = server.owned_video(session, key, video_id)
        if video.status != "completed":
            raise bad_request(f"Video '{video_id}' is {video.status.replace('_', ' ')}; its content is available once "
                              "it has completed.", "video_id", "video_not_ready")
        access.record(session, key.name, "video.download", video_id, variant)
    link = server.storage.link_for_download(video_id, variant)
    if link is None:  # deleted since the check
        raise not_found(video_id)
    return FileResponse(link, media_type=VARIANTS[variant][1], background=BackgroundTask(link.unlink, missing_ok=True))


@router.post("/videos/{video_id}/remix", response_model=VideoObject)
def remix_video(video_id: str, key: KeyDep, body: Annotated[RemixVideoRequest, Depends(remix_video_body)],
                server: ServerDep, response: Response):
    """A new video from the original's model, size, length and seed, with the new prompt."""
    with db.transaction(server.sessions, write=False) as session:
        source = server.owned_video(session, key, video_id)
    if source.status != "completed":
        raise bad_request(f"Video '{video_id}' is {source.status.replace('_', ' ')}; only completed videos can be remixed.",
                          "video_id", "video_not_ready")
    plan = server.plan(body.prompt, None, source.seconds, f"{source.width}x{source.height}")
    video = server.submit(key, plan, source.seed, remixed_from=source.id)
    return poll_hint(response, video, server)


@router.get("/models", response_model=ModelList)
def list_models(_key: KeyDep, server: ServerDep):
    return ModelList(data=[ModelObject(id=MODEL_ID, created=server.created, owned_by="kinetoscope")])


@router.get("/models/{model_id}", response_model=ModelObject)
def retrieve_model(model_id: str, _key: KeyDep, server: ServerDep):
    if model_id != MODEL_ID:
        raise ApiError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return ModelObject(id=MODEL_ID, created=server.created, owned_by="kinetoscope")


def create_app(settings: ServerSettings, pipelines: list) -> FastAPI:
    """The app; `pipelines` holds one loaded TextToVideo per worker."""
    server = Server(settings, pipelines)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.runner.start()
        server.webhooks.start()
        yield
        server.runner.stop()
        server.webhooks.stop()
        db.dispose(server.sessions)

    app = FastAPI(title="Kinetoscope", summary="OpenAI-compatible Videos API", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.include_router(router)

    @app.get("/health", include_in_schema=False)
    def health():
        return {"status": "ok"}

    return app

