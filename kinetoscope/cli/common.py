"""Shared argument types and the error convention: bad input is one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2, never a traceback."""


class ErrorExitParser(argparse.ArgumentParser):
    """argparse already exits 2 on bad arguments; keep its message to one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """Also record the innermost command's name ("kinetoscope world sample") as `command_prog`,
        so a handler's errors name the command as argparse's own do; subcommands parse first."""
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "command_prog", None) is None:
            namespace.command_prog = self.prog
        return namespace, extras


MIN_FPS, MAX_FPS = 1.0, 120.0  # MAX_FPS is text_to_video.MAX_FPS, named here so --help needs no torch
MAX_GUIDANCE = 30.0  # text_to_video.MAX_GUIDANCE, named here so --help needs no torch
# What request checks and compile warm-ups send: words every text encoder has, compact copies included.
PROBE_PROMPT = "a red circle moves to the right"


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), both positive."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 128x128), got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1 or width > 4096 or height > 4096:
        raise argparse.ArgumentTypeError(f"size {width}x{height} is out of range (1..4096 per side)")
    return width, height


def path_fraction(text: str) -> float:
    """A point on the sampler's path: above 0 (clean) and at most 1 (pure noise)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the path above 0 and at most 1, got {text!r}")
    return value


def share(text: str) -> float:
    """A share from 0 to 1."""
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def guidance_scale(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {text!r}")
    return value


def frame_rate(text: str) -> float:
    value = positive_float(text)
    if not MIN_FPS <= value <= MAX_FPS:
        raise argparse.ArgumentTypeError(f"frame rate must be between {MIN_FPS:g} and {MAX_FPS:g} fps, got {text!r}")
    return value


def whole_number_in(low: int, high: int | None = None):
    """An argparse type for a whole number in low..high (no upper bound when high is None)."""
    expected = f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


seed = whole_number_in(0, 2**63 - 1)
positive_int = whole_number_in(1)
sampling_steps = whole_number_in(1, 1000)  # text_to_video.MAX_STEPS, named here so --help needs no torch
redraw_count = whole_number_in(0, 8)  # text_to_video.MAX_REDRAWS, likewise


def check_writable_file(path: str | Path, option: str) -> Path:
    """Refuse an output path before any work is done for it, rather than after: a folder, or a
    place where no file can be made. Asking os.access is not enough (it says yes to root, and
    knows nothing of names too long or file systems such as /proc), so this creates and removes
    the very temporary file the output is first written to, in the nearest existing folder."""
    from kinetoscope.media.frames import partial_sibling

    path = Path(path)
    try:
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; name a file")
        parent = path.absolute().parent
        while not parent.exists():  # missing folders will be made under the nearest existing one
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"{option} {path}: cannot write in {parent}, which is not a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"{option} {path}: the file exists and is not writable")
        probe = parent / partial_sibling(path).name
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
    return path


def add_train_command(commands, default_recipe: str, handler):
    """A command group's `train` (the autoencoder's, the planner's): a recipe, resumed from OUTPUT/checkpoint."""
    train = commands.add_parser("train", help="train from a recipe (resumes from OUTPUT/checkpoint)")
    add_training_arguments(train, default_recipe)
    train.set_defaults(handler=handler)


def add_training_arguments(parser: argparse.ArgumentParser, default_recipe: str):
    parser.add_argument("--recipe", default=default_recipe)
    parser.add_argument("--output", help="run directory (default: the recipe's)")
    parser.add_argument("--minutes", type=positive_float, help="wall-time budget (default: the recipe's)")
    parser.add_argument("--steps", type=positive_int, help="step budget (default: the recipe's)")


def run_training(train, args) -> int:
    """Call a trainer with the arguments add_training_arguments declared."""
    from kinetoscope.training.common import RecipeError

    try:
        train(args.recipe, output=args.output, minutes=args.minutes, steps=args.steps)
    except RecipeError as error:
        raise UsageError(str(error)) from None
    return 0


def load_weights(loader, weights: str | None):
    """Load a model or pipeline; a missing checkpoint is the user's to fix, not a traceback."""
    try:
        return loader(weights)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # corrupt or foreign files fail in many library-specific ways
        where = weights or "the shipped weights"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot load {where}: {message}") from None


def add_sampling_arguments(parser):
    """--steps, --guidance and --sampler, left None unless given, so a model's own defaults apply."""
    parser.add_argument("--steps", type=sampling_steps, help="sampling steps (default: the model's own, 16 for the shipped model)")
    parser.add_argument("--guidance", type=guidance_scale, help="classifier-free guidance scale (default: the model's own, 4 for the shipped model)")
    parser.add_argument("--sampler", choices=("euler", "heun", "stochastic"),  # rectified_flow.SAMPLERS, named here so --help needs no torch
                        help="default: the model's own (stochastic for the shipped model)")
    parser.add_argument("--redraws", type=redraw_count,
                        help="a layout model paints a clip again from new noise, at most this many times, while the judge reads "
                             "it as missing its plan, from the planner's next plan after four misses (default: the model's own, 7 "
                             "for the shipped model; 0 keeps the first painting)")


def set_redraws(pipe, redraws: int | None):
    """`--redraws`, where given, in place of the model's own, once the model can take it."""
    from kinetoscope.pipelines.text_to_video import checked_redraws

    if redraws is not None:
        try:
            pipe.redraws = checked_redraws(redraws, pipe.planner)
        except ValueError as error:
            raise UsageError(f"--redraws: {error}") from None


def compile_and_warm_up(pipe, width: int, height: int, frames: int, guidance: float):
    """`--compile`: compile the transformer and take a sampling step at this size and length with
    guidance and one without (the prompt's pass alone, as outside the guidance interval), so what
    follows does not wait for the compiler; a machine where it cannot compile gets one line."""
    with warnings.catch_warnings():  # the pipeline warns and goes on eagerly; here the user asked for compiling
        warnings.simplefilter("ignore")
        compiled = pipe.compile()
        for interval in ((0.0, 1.0), (0.0, 0.5)):  # the one step, at t = 1, inside the interval, then outside it
            compiled(PROBE_PROMPT, width=width, height=height, frames=frames, steps=1, guidance=guidance, guidance_interval=interval)
    if pipe.compile_failure:
        raise UsageError(f"torch.compile could not compile the transformer ({pipe.compile_failure}); run without --compile")
