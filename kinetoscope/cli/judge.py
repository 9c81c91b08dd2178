"""`kinetoscope judge VIDEO --prompt "..."`: does a clip show what its prompt says?

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


def run_judge(args) -> int:
    from kinetoscope.data.captions import PromptError, parse_prompt
    from kinetoscope.eval.judge import judge
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
