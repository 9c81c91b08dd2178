"""`kinetoscope judge VIDEO --prompt "..."`: does a clip show what its prompt says?
`kinetoscope calibrate`: how far to trust that answer.

Prints one line per checked attribute; exits 0 when every one holds, 1 when the clip fails the
prompt, and 2 (one line on stderr) for a prompt or file it cannot use.
"""

from __future__ import annotations

from kinetoscope.cli import common


def register(subparsers):
    parser = subparsers.add_parser(
        "judge",
        help="check a Shapes World clip against its prompt",
        description="Check a Shapes World clip against its prompt, attribute by attribute (shared/world.md). "
        "Exit status: 0 all checks pass, 1 the clip fails the prompt, 2 bad input.",
    )
    parser.add_argument("video", help="the clip (.mp4, .gif, .webp, or a still image)")
    parser.add_argument("--prompt", required=True, help='what it should show, e.g. "a red circle moves to the right"')
    parser.set_defaults(handler=run_judge)

    calibrate = subparsers.add_parser("calibrate", help="how often the judge is right on rendered ground truth")
    calibrate.add_argument("--count", type=common.positive_int, default=100, help="scenes per canvas size (default 100)")
    calibrate.add_argument("--seed", type=common.seed, default=0)
    calibrate.add_argument("--canvas", type=common.parse_size, action="append", metavar="WxH",
                           help="canvas size, repeatable (default 64x64, 96x64 and 128x128)")
    calibrate.add_argument("--crf", type=common.whole_number_in(0, 51), metavar="0..51",
                           help="H.264 CRF of the compressed condition (default: a visibly lossy 30)")
    calibrate.add_argument("--show-failures", type=common.whole_number_in(0), default=0, metavar="N", help="print up to N failed checks per condition")
    calibrate.set_defaults(handler=run_calibrate)


def run_judge(args) -> int:
    from kinetoscope.data.captions import PromptError, parse_prompt
    from kinetoscope.data.judge import judge
    from kinetoscope.media.video import VideoError, read_video

    try:
        expected = parse_prompt(args.prompt)
    except PromptError as error:
        raise common.UsageError(str(error)) from None
    try:
        frames, fps = read_video(args.video)
    except VideoError as error:
        raise common.UsageError(str(error)) from None
    verdict = judge(frames, expected, fps)
    print(verdict)
    return 0 if verdict.passed else 1


def run_calibrate(args) -> int:
    import time

    from kinetoscope.eval import calibrate

    if args.count < 2:
        raise common.UsageError("--count must be at least 2 (each scene is also judged against another)")
    start = time.perf_counter()
    crf = calibrate.H264_CRF if args.crf is None else args.crf
    tallies = calibrate.calibrate(args.count, args.seed, args.canvas or calibrate.CANVASES, crf)
    print(calibrate.format_table(tallies))
    print(f"\n{args.count} scenes per canvas, {calibrate.FRAMES} frames at {calibrate.FPS:g} fps; blur sigma "
          f"{calibrate.BLUR_SIGMA:g} px, noise sigma {calibrate.NOISE_SIGMA:g}; {time.perf_counter() - start:.0f} s")
    for condition, tally in tallies.items():
        for line in tally.failures[: args.show_failures]:
            print(f"{condition}: {line}")
    return 0
