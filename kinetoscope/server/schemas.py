"""The wire format: OpenAI's Videos API objects, field for field, plus its error envelope."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from kinetoscope.server import db

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
UNFINISHED = ("queued", "in_progress")


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's `Video`, plus `seed`: clients ignore it, and it makes a result reproducible."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None
    expires_at: int | None  # files are kept until the video is deleted
    error: VideoError | None
    model: str
    progress: int
    prompt: str
    remixed_from_video_id: str | None
    seconds: str
    size: str
    status: VideoStatus
    seed: int

    @classmethod
    def of(cls, video: db.Video) -> "VideoObject":
        error = VideoError(code=video.error_code, message=video.error_message or "") if video.error_code else None
        return cls(
            id=video.id,
            created_at=int(video.created_at),
            completed_at=int(video.completed_at) if video.completed_at else None,
            expires_at=None,
            error=error,
            model=video.model,
            progress=video.progress,
            prompt=video.prompt,
            remixed_from_video_id=video.remixed_from_video_id,
            seconds=video.seconds,
            size=f"{video.width}x{video.height}",
            status=video.status,
            seed=video.seed,
        )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class InputReference(BaseModel):
    """OpenAI's reference object; an uploaded file arrives as a multipart file instead."""

    model_config = ConfigDict(extra="forbid")
    file_id: str | None = None
    image_url: str | None = None


class UploadedImage(BaseModel):
    """An `input_reference` sent as a multipart file upload."""

    model_config = ConfigDict(extra="forbid")
    filename: str | None
    content_type: str | None


class CreateVideoRequest(BaseModel):
    """`seconds` may be a string ("4", as OpenAI's client sends it) or an integer; `seed` is
    our one addition, to reproduce a result. Unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    seconds: StrictStr | StrictInt | None = None
    size: str | None = None
    input_reference: InputReference | UploadedImage | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**31)


class RemixVideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
