"""`kinetoscope serve` (the OpenAI-compatible Videos API) and its operator commands: `keys`,
`access` and `audit`, which work on the same data folder or database as the server."""

from __future__ import annotations

import argparse
import os
import time

from kinetoscope.cli import common


def add_storage_arguments(parser: argparse.ArgumentParser):
    from kinetoscope.server.settings import DEFAULT_DATA_DIR

    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR),
                        help=f"data folder: database and video files (default {DEFAULT_DATA_DIR}, or $KINETOSCOPE_DATA)")
    parser.add_argument("--database", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in --data)")


def register(subparsers):
    serve = subparsers.add_parser("serve", help="serve OpenAI's Videos API (/v1/videos) with the local model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=common.whole_number_in(0, 65535), default=8000)
    add_storage_arguments(serve)
    serve.add_argument("--weights", help="generator folder (default: the shipped model)")
    serve.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    common.add_sampling_arguments(serve)
    serve.add_argument("--compile", action="store_true",
                       help="compile the transformer with torch.compile at start-up (slower start, faster videos)")
    serve.add_argument("--default-size", type=common.parse_size, default=(128, 128), help="size when a request names none")
    serve.add_argument("--workers", type=common.positive_int, default=1, help="videos generated at once")
    serve.add_argument("--quota", type=common.positive_int, default=200, help="videos per day per key, unless the key has its own")
    serve.add_argument("--rate-limit", type=common.positive_int, default=600, help="requests per minute per key")
    serve.add_argument("--max-concurrent", type=common.positive_int, default=4, help="unfinished videos per key")
    serve.add_argument("--lease-seconds", type=common.positive_float, default=60.0,
                       help="a job whose worker stops reporting for this long (a crash) runs again")
    serve.add_argument("--webhook-retry-seconds", type=common.positive_float, default=5.0,
                       help="first webhook retry delay; each later one doubles")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(handler=run_serve)

    keys = subparsers.add_parser("keys", help="API keys: create, list, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=common.ErrorExitParser)
    create = key_commands.add_parser("create", help="create a key; its secret is printed once, on the last line")
    create.add_argument("--name", required=True)
    create.add_argument("--quota", type=int, help="videos per day (default: the server's --quota)")
    create.add_argument("--webhook-url", help="where video.completed and video.failed events are sent")
    add_storage_arguments(create)
    create.set_defaults(handler=run_keys_create)
    listing = key_commands.add_parser("list", help="every key, revoked ones included")
    add_storage_arguments(listing)
    listing.set_defaults(handler=run_keys_list)
    revoke = key_commands.add_parser("revoke", help="refuse a key from its next request on")
    revoke.add_argument("name")
    add_storage_arguments(revoke)
    revoke.set_defaults(handler=run_keys_revoke)

    access_parser = subparsers.add_parser("access", help="pause or resume access for every key at once")
    access_parser.add_argument("switch", choices=("pause", "resume", "status"))
    add_storage_arguments(access_parser)
    access_parser.set_defaults(handler=run_access)

    audit = subparsers.add_parser("audit", help="who did what, when")
    audit.add_argument("--key", help="only this key's actions")
    audit.add_argument("--limit", type=common.positive_int, default=100, help="the latest N events")
    add_storage_arguments(audit)
    audit.set_defaults(handler=run_audit)


def open_sessions(args):
    from sqlalchemy.exc import SQLAlchemyError

    from kinetoscope.server import db

    try:
        return db.open_database(args.database or db.database_url_for(args.data))
    except (SQLAlchemyError, OSError, ImportError) as error:  # ImportError: a URL whose driver is not installed
        raise common.UsageError(f"cannot open the database: {str(error).splitlines()[0]}") from None


# Idle keep-alive connections stay open longer than clients keep them (the openai client forgets
# them after 5 s, which is also uvicorn's default), so a client never sends a request on a
# connection that the server is closing at that moment, which it would see as a connection error.
KEEP_ALIVE_SECONDS = 65


def format_time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def run_serve(args) -> int:
    import torch
    import uvicorn

    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.server.app import create_app
    from kinetoscope.server.settings import ServerSettings

    settings = ServerSettings(
        data_dir=args.data, database_url=args.database, steps=args.steps,
        guidance=args.guidance, sampler=args.sampler, default_size=args.default_size, videos_per_day=args.quota,
        requests_per_minute=args.rate_limit, concurrent_jobs_per_key=args.max_concurrent, lease_seconds=args.lease_seconds,
        webhook_retry_seconds=args.webhook_retry_seconds,
    )
    # Workers share all cores but one, which keeps the API answering while the rest generate.
    torch.set_num_threads(max(1, ((os.cpu_count() or 1) - 1) // args.workers))
    pipelines = [common.load_weights(lambda weights: TextToVideo.load(weights, args.device), args.weights)
                 for _ in range(args.workers)]
    width, height = settings.default_size
    frames = pipelines[0].frames_for(settings.default_seconds)
    try:
        pipelines[0].check_request(common.PROBE_PROMPT, width, height, frames)
    except ValueError as error:
        raise common.UsageError(f"--default-size: {error}") from None
    try:
        sampling = pipelines[0].sampling_for(settings.steps, settings.guidance, settings.sampler)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    for pipe in pipelines:
        common.set_redraws(pipe, args.redraws)
    open_sessions(args)  # a bad database is one line here, not a traceback from inside uvicorn
    if args.compile:  # compiled now, so the first request does not wait for the compiler
        for pipe in pipelines:
            print(f"compiling the transformer for {width}x{height}, {frames} frames ...", flush=True)
            common.compile_and_warm_up(pipe, width, height, frames, sampling.guidance)
    uvicorn.run(create_app(settings, pipelines), host=args.host, port=args.port, log_level=args.log_level,
                timeout_keep_alive=KEEP_ALIVE_SECONDS)
    return 0


def run_keys_create(args) -> int:
    from kinetoscope.server import access

    try:
        key = access.create_key(open_sessions(args), args.name, args.quota, args.webhook_url)
    except access.AccessError as error:
        raise common.UsageError(str(error)) from None
    quota = f"{args.quota} videos per day" if args.quota is not None else "the server's default quota"
    print(f"created key {key.name!r} ({quota})")
    if key.webhook_secret:
        print(f"webhook secret (verifies video.completed / video.failed events): {key.webhook_secret}")
    print("the API key follows; it is shown only this once:")
    print(key.secret)
    return 0


def run_keys_list(args) -> int:
    from kinetoscope.server import access

    keys = access.list_keys(open_sessions(args))
    if not keys:
        print("no keys yet: kinetoscope keys create --name NAME")
        return 0
    print(f"{'name':20} {'key':14} {'quota/day':>9}  {'created':19}  {'status':27}  webhook")
    for key in keys:
        status = f"revoked {format_time(key.revoked_at)}" if key.revoked_at else "active"
        quota = str(key.videos_per_day) if key.videos_per_day is not None else "default"
        print(f"{key.name:20} {key.secret_hint + '...':14} {quota:>9}  {format_time(key.created_at)}  {status:27}  {key.webhook_url or '-'}")
    return 0


def run_keys_revoke(args) -> int:
    from kinetoscope.server import access

    try:
        access.revoke_key(open_sessions(args), args.name)
    except access.AccessError as error:
        raise common.UsageError(str(error)) from None
    print(f"revoked key {args.name!r}: its next request gets 401")
    return 0


def run_access(args) -> int:
    from kinetoscope.server import access, db

    sessions = open_sessions(args)
    if args.switch == "status":
        with db.transaction(sessions, write=False) as session:
            print("paused" if access.is_paused(session) else "open")
        return 0
    access.set_paused(sessions, args.switch == "pause")
    print("access paused: every request gets 503 until `kinetoscope access resume`" if args.switch == "pause"
          else "access resumed")
    return 0


def run_audit(args) -> int:
    from kinetoscope.server import access

    for event in access.audit_events(open_sessions(args), args.key, args.limit):
        print(f"{format_time(event.at)}  {event.actor:20} {event.action:15} {event.target or '-':40} {event.detail or ''}".rstrip())
    return 0
