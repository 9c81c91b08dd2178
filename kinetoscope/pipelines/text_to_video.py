"""Text to video, in the style of diffusers pipelines:

    from kinetoscope.pipelines.text_to_video import TextToVideo
    pipe = TextToVideo.load()                      # the shipped default model
    video = pipe("a red circle moves to the right on a black background", seed=0)
    video.frames  # uint8 (T, H, W, 3)

The prompt is encoded by the text encoder, noise in the autoencoder's latent space is carried to
a clean latent by the diffusion transformer (rectified flow, classifier-free guidance), and the
autoencoder decodes it to frames. For a layout model, a layout planner first places the prompt's
objects (pipelines/layout.py), and the transformer is shown where (data/layout.py); the judge
then reads the painting against that plan, and one that misses it is painted again (`redraws`),
from the planner's next plan once the first has been missed a few times.

A pipeline may split the path between two transformers of one architecture (Wan 2.2's experts):
its `transformer` denoises the noisier stretch and its `low_noise_transformer` the cleaner one,
below `boundary`, a share of the sampler's path before the time shift (as a recipe's `[train]
times` gives it, so an expert denoises the very stretch it was trained on at any size).
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kinetoscope.data import world
from kinetoscope.data.dataset import clip_to_tensor, tensor_to_clip
from kinetoscope.data.layout import LAYOUT_CHANNELS, MAX_OBJECTS, layout_inputs, silhouette_channels
from kinetoscope.diffusion.rectified_flow import SAMPLERS, FlowSchedule, add_noise, predicted_clean, shift_time
from kinetoscope.models.autoencoder import VideoAutoencoder
from kinetoscope.models.dit import DiffusionTransformer
from kinetoscope.models.planner import LayoutPlanner, PlanScorer
from kinetoscope.models.precision import autocast_for
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.pipelines.layout import check_planner, load_planning, painting_verdict, ranked_plans

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "generator"
MAX_PROMPT_CHARS = 1000
MAX_SIDE = 512
MAX_FRAMES = 129  # 16 s at 8 fps
MAX_FPS = 120.0
MAX_STEPS = 1000
MAX_GUIDANCE = 30.0  # far past any useful scale; beyond it velocities blow up and frames saturate
MAX_SEED = 2**63 - 1  # torch.Generator takes a signed 64-bit seed
MAX_REDRAWS = 8
FIRST_PLAN_PAINTINGS = 4
COMPILED_TEXT_MULTIPLE = 32  # prompt tokens padded to a multiple of this, so most prompts share one compiled graph


def pad_tokens(text: torch.Tensor, mask: torch.Tensor, multiple: int):
    """(B, L, D), (B, L) -> the same with L rounded up to a multiple, the new tokens masked out."""
    extra = -text.shape[1] % multiple
    return torch.nn.functional.pad(text, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra), value=False)


@dataclass(frozen=True)
class SamplingSettings:
    """How a video is sampled. A model's own (`TextToVideo.sampling`) are what a generation uses
    where its caller names nothing; its folder's pipeline.json may name them under "sampling" (a
    guidance-distilled model knows only its guidance range, say, and may need fewer steps).

    `guidance_interval` (low, high): the times t (1 pure noise, 0 clean) in low < t <= high at
    which classifier-free guidance is applied; elsewhere the prompt's pass alone gives the
    velocity, one row instead of two (Kynkäänniemi et al., "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models", 2024). Measured on the shipped
    model (README): no faster in bf16 on a 2-core CPU, where a pass of one row costs about what a
    pass of two does; in float32 a clip denoised in 0.83-0.89x the time, but bouncing objects were
    painted less steadily and fewer prompts came out fully right. So it guides everywhere, the default."""
    steps: int = 20
    guidance: float = 4.0
    sampler: str = "stochastic"
    guidance_interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if isinstance(self.guidance_interval, list):  # as pipeline.json holds it; checked_sampling refuses what is not two times
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))

    def describe(self) -> str:
        """In words, e.g. "20 steps of stochastic, guidance 4 at t in (0.22, 0.84]"."""
        interval = "" if self.guidance_interval == (0.0, 1.0) else " at t in ({:g}, {:g}]".format(*self.guidance_interval)
        return f"{self.steps} steps of {self.sampler}, guidance {self.guidance:g}{interval}"


def whole_number(value, name: str, low: int, high: int) -> int:
    """`value` as an int if it is a whole number (NumPy's too) in low..high; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def checked_sampling(steps, guidance, sampler: str, guidance_range: tuple[float, float] | None = None,
                     guidance_interval=SamplingSettings.guidance_interval) -> SamplingSettings:
    """These settings, once a model whose guidance range is `guidance_range` (None: any useful
    scale; a distilled model knows only its own) can take them; else a ValueError saying why."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    steps = whole_number(steps, "steps", 1, MAX_STEPS)
    low, high = guidance_range or (0.0, MAX_GUIDANCE)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not low <= guidance <= high:  # NaN fails too
        raise ValueError(f"guidance must be between {low:g} and {high:g} for this model, got {guidance!r}")
    try:  # pipeline.json gives a list
        first, last = (float(t) for t in guidance_interval if not isinstance(t, bool))
    except (TypeError, ValueError):
        first = last = None
    if first is None or not 0 <= first < last <= 1:  # NaN fails too
        raise ValueError(f"guidance_interval must be two times (low, high) with 0 <= low < high <= 1, not {guidance_interval!r}")
    return SamplingSettings(steps, float(guidance), sampler, (first, last))


def redraw_seed(seed: int, draw: int) -> int:
    """The noise seed of a clip's `draw`-th painting: the clip's own seed first, then seeds drawn
    from it, so a seed names its clip whatever redraws it took."""
    return seed if draw == 0 else int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


def plan_for_painting(draw: int, plans: int) -> int:
    """Which of the ranked plans (`plans` of them) painting `draw` paints: the first plan its first
    FIRST_PLAN_PAINTINGS paintings, then each redraw the next. The painter misses at random, so a
    plan it missed once is worth painting again; but one it missed that often is more likely hard
    for it to paint than unlucky, and the next plan reads the prompt alike and places it anew."""
    return min(max(0, draw - FIRST_PLAN_PAINTINGS + 1), plans - 1)


def checked_redraws(redraws, planner) -> int:
    """Redraws check a painting against its plan, so only a layout model (one with a planner) takes them."""
    redraws = whole_number(redraws, "redraws", 0, MAX_REDRAWS)
    if redraws and planner is None:
        raise ValueError("redraws check a painting against its layout plan; this model plans no layout")
    return redraws


def checked_boundary(boundary) -> float:
    """Where a low-noise transformer takes over, once it is a share of the path strictly inside it."""
    if isinstance(boundary, bool) or not isinstance(boundary, numbers.Real) or not 0 < boundary < 1:  # NaN fails too
        raise ValueError(f"the boundary between the two transformers must be a share of the path above 0 and below 1, not {boundary!r}")
    return float(boundary)


@dataclass
class GeneratedVideo:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float
    seed: int
    timings: dict = field(default_factory=dict)  # seconds spent in text, denoise, decode (plan, for a layout model; check, with redraws)
    plan: tuple | None = None  # a layout model's planned objects (data/world.py's ShapeObject), where it drew them
    latents: torch.Tensor | None = None  # (1, C, T, h, w) normalised: what the autoencoder decoded into the frames
    draws: int = 1  # paintings made: the first, and each redraw after a painting that missed its plan


class TextToVideo:
    def __init__(self, transformer: DiffusionTransformer, autoencoder: VideoAutoencoder, text_encoder: TextEncoder,
                 schedule: FlowSchedule = FlowSchedule(), fps: float = 8.0, device: str | torch.device = "cpu",
                 sampling: SamplingSettings | None = None, planner: LayoutPlanner | None = None, plan_scorer: PlanScorer | None = None,
                 low_noise_transformer: DiffusionTransformer | None = None, boundary: float = 0.5, small_cost: float = 0.0,
                 redraws: int = 0):
        if transformer.cfg.layout_channels not in (0, LAYOUT_CHANNELS):
            raise ValueError(f"the transformer takes {transformer.cfg.layout_channels} layout channels; this version draws {LAYOUT_CHANNELS}")
        if transformer.cfg.silhouette_channels not in (0, silhouette_channels(autoencoder.cfg.temporal_factor)):
            raise ValueError(f"the transformer takes {transformer.cfg.silhouette_channels} silhouette channels; with this autoencoder's "
                             f"{autoencoder.cfg.temporal_factor} frames per latent step this version draws "
                             f"{silhouette_channels(autoencoder.cfg.temporal_factor)}")
        if bool(transformer.cfg.layout_channels) != (planner is not None):
            raise ValueError("a layout model needs its layout planner (pipeline.json \"planner\")" if planner is None
                             else "a layout planner serves only a transformer that takes a layout")
        if planner is not None:
            check_planner(planner)
        self.planner = planner.to(device).eval() if planner is not None else None
        if plan_scorer is not None and planner is None:
            raise ValueError("a plan scorer picks among a layout planner's plans; this model has no planner")
        self.plan_scorer = plan_scorer.to(device).eval() if plan_scorer is not None else None
        if isinstance(small_cost, bool) or not isinstance(small_cost, numbers.Real) or not 0 <= small_cost <= 1:  # NaN fails too
            raise ValueError(f"a plan's small_cost must be a share of its draws from 0 to 1, not {small_cost!r}")
        if small_cost and plan_scorer is not None:
            raise ValueError("small_cost weighs the consensus of the plans; this model's plan scorer picks them instead")
        self.small_cost = float(small_cost)  # pipelines/layout.py consensus: what each object planned small costs a plan
        try:
            self.redraws = checked_redraws(redraws, planner)  # paintings that miss their plan are painted again, this many times at most
        except ValueError as error:
            raise ValueError(f'the model\'s own redraws (pipeline.json "redraws") are not ones it can take: {error}') from None
        if transformer.cfg.latent_channels != autoencoder.cfg.latent_channels:
            raise ValueError(f"the transformer denoises {transformer.cfg.latent_channels} latent channels but the autoencoder "
                             f"makes {autoencoder.cfg.latent_channels}: name the transformer's own autoencoder in pipeline.json")
        self.device = torch.device(device)
        self.transformer = transformer.to(self.device).eval()
        self.denoiser = self.transformer  # what sampling calls: the transformer, or its compiled form
        if low_noise_transformer is not None:
            if low_noise_transformer.cfg != transformer.cfg:
                raise ValueError("the low-noise transformer must have the transformer's architecture and inputs (config.json), "
                                 f"not {low_noise_transformer.cfg} beside {transformer.cfg}")
            boundary = checked_boundary(boundary)
            low_noise_transformer = low_noise_transformer.to(self.device).eval()
        self.low_noise_transformer = low_noise_transformer
        self.low_noise_denoiser = low_noise_transformer  # likewise, compiled or not
        self.boundary = float(boundary)
        self.compile_failure: str | None = None  # why compiling failed, if it was asked for and did
        self._compile_errors: tuple[type[Exception], ...] = ()  # what a failed compile raises; torch._dynamo loads slowly
        self.autoencoder = autoencoder.to(self.device).eval()
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.fps = fps  # the frame rate the model was trained at
        if sampling is None:  # the usual settings, with the guidance brought into a distilled model's range
            low, high = self.guidance_range
            sampling = SamplingSettings(guidance=min(max(SamplingSettings.guidance, low), high))
        self.sampling = sampling
        try:
            self.sampling = self.sampling_for()  # checked, and the interval a tuple however pipeline.json gave it
        except ValueError as error:
            raise ValueError(f'the model\'s own sampling settings (pipeline.json "sampling") are not ones it can take: {error}') from None

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str | None = None) -> "TextToVideo":
        """weights: a generator folder (transformer's config.json + model.safetensors + pipeline.json)."""
        directory = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        transformer = DiffusionTransformer.from_pretrained(directory)
        settings = json.loads((directory / "pipeline.json").read_text()) if (directory / "pipeline.json").is_file() else {}
        autoencoder_dir = directory / settings["autoencoder"] if "autoencoder" in settings else None
        autoencoder = VideoAutoencoder.from_pretrained(autoencoder_dir)
        schedule = FlowSchedule(**settings.get("schedule", {}))
        fps = settings.get("fps", 8.0)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:  # NaN fails too
            raise ValueError(f'{directory / "pipeline.json"}: "fps" must be a frame rate above 0 and at most {MAX_FPS:g}, not {fps!r}')
        sampling = settings.get("sampling")
        if sampling is not None and not isinstance(sampling, dict):
            raise ValueError(f'{directory / "pipeline.json"}: "sampling" must be an object of steps, guidance and sampler')
        unknown = set(sampling or {}) - set(SamplingSettings.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{directory / 'pipeline.json'}: unknown sampling setting(s) {', '.join(sorted(unknown))}")
        planner, plan_scorer = load_planning(directory / settings["planner"]) if "planner" in settings else (None, None)
        low_noise = settings.get("low_noise", {})
        if not isinstance(low_noise, dict) or not isinstance(low_noise.get("transformer", ""), str) or set(low_noise) - {"transformer", "boundary"}:
            raise ValueError(f'{directory / "pipeline.json"}: "low_noise" must be an object of "transformer" (a folder) and "boundary"')
        low_noise_transformer = DiffusionTransformer.from_pretrained(directory / low_noise["transformer"]) if low_noise else None
        planning = settings.get("planning", {})
        if not isinstance(planning, dict) or set(planning) - {"small_cost"}:
            raise ValueError(f'{directory / "pipeline.json"}: "planning" must be an object of "small_cost" (a share of the draws)')
        return cls(transformer, autoencoder, TextEncoder.load(device), schedule, float(fps), device,
                   None if sampling is None else SamplingSettings(**sampling), planner, plan_scorer,
                   low_noise_transformer, low_noise.get("boundary", 0.5), planning.get("small_cost", 0.0), settings.get("redraws", 0))

    def compile(self) -> "TextToVideo":
        """Run the transformer through torch.compile from now on: faster at every step once warm.

        The first generation at each new size and duration compiles first: tens of seconds on a
        2-core CPU, a few once inductor's on-disk cache holds it; after torch's recompile limit (8
        shapes) further new shapes run eagerly. Worth it in long-lived processes (the server, the
        benchmark), not for one clip from the command line. Where compiling fails (no C++ compiler,
        say), generation goes on eagerly and `compile_failure` says why.
        """
        from torch._dynamo.exc import BackendCompilerFailed

        self.denoiser = torch.compile(self.transformer, dynamic=False)
        if self.low_noise_transformer is not None:
            self.low_noise_denoiser = torch.compile(self.low_noise_transformer, dynamic=False)
        self.compile_failure, self._compile_errors = None, (BackendCompilerFailed,)
        return self

    # -- what the model can make ----------------------------------------------------------------

    @property
    def size_multiples(self) -> tuple[int, int]:
        """(width, height) a size must be a multiple of: a latent cell's pixels times a patch's cells."""
        factor, (_, patch_height, patch_width) = self.autoencoder.cfg.spatial_factor, self.transformer.cfg.patch
        return factor * patch_width, factor * patch_height

    @property
    def size_rule(self) -> str:
        """What a width and height must be, in words, for error messages."""
        mw, mh = self.size_multiples
        return f"{'multiples of ' + str(mw) if mw == mh else f'multiples of {mw} and {mh}'} from {min(mw, mh)} to {MAX_SIDE}"

    @property
    def frame_multiple(self) -> int:
        return self.autoencoder.cfg.temporal_factor

    @property
    def max_seconds(self) -> float:
        return (MAX_FRAMES - 1) / self.fps

    def frames_for(self, seconds: float) -> int:
        """The fewest 1 + 4k frames at the model's frame rate that last at least `seconds`."""
        return 1 + self.frame_multiple * max(1, math.ceil(seconds * self.fps / self.frame_multiple - 1e-9))

    def check_plan(self, plan):
        """A plan is for a layout model, and holds what a scene can: 1 to MAX_OBJECTS objects."""
        if plan is None:
            return
        if self.planner is None:
            raise ValueError("this model takes no layout plan; only a layout model (one with a planner) paints one")
        if not isinstance(plan, Sequence) or not all(isinstance(obj, world.ShapeObject) for obj in plan):
            raise ValueError("a plan is a sequence of Shapes World objects (kinetoscope.data.world.ShapeObject)")
        if not 1 <= len(plan) <= MAX_OBJECTS:
            raise ValueError(f"a plan holds 1 to {MAX_OBJECTS} objects, not {len(plan)}")

    def check_request(self, prompt: str, width: int, height: int, frames: int):
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be a str, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        self.text_encoder.check_prompt(prompt)
        for name, value in (("width", width), ("height", height), ("frames", frames)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        mw, mh = self.size_multiples
        if width % mw or height % mh or not (mw <= width <= MAX_SIDE and mh <= height <= MAX_SIDE):
            raise ValueError(f"size {width}x{height} is not supported: width and height must be {self.size_rule}")
        step = self.frame_multiple
        if frames < 1 or (frames - 1) % step or frames > MAX_FRAMES:
            raise ValueError(f"{frames} frames is not supported: 1 + {step}k frames, at most {MAX_FRAMES}")

    @property
    def guidance_range(self) -> tuple[float, float]:
        return self.transformer.cfg.distilled_guidance or (0.0, MAX_GUIDANCE)

    def sampling_for(self, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                     guidance_interval: tuple[float, float] | None = None) -> SamplingSettings:
        """The settings a generation with these arguments uses (None: the model's own), once checked."""
        default = self.sampling
        return checked_sampling(default.steps if steps is None else steps, default.guidance if guidance is None else guidance,
                                default.sampler if sampler is None else sampler, self.guidance_range,
                                default.guidance_interval if guidance_interval is None else guidance_interval)

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str, width: int = 128, height: int = 128, frames: int = 17, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, sampler: str | None = None, on_step=None,
                 video: np.ndarray | None = None, strength: float = 1.0, plan: Sequence[world.ShapeObject] | None = None,
                 guidance_interval: tuple[float, float] | None = None, redraws: int | None = None) -> GeneratedVideo:
        """Sampling settings left None are the model's own (`self.sampling`), and so are `redraws`
        left None (`self.redraws`).

        A layout model paints the objects of `plan` (Shapes World's ShapeObject: colour, shape,
        size, motion, speed, start) where given, in place of its planner's: a layout a person sets,
        or a scene's true one, which tells the denoiser's failures from the planner's. Where the
        judge reads a layout model's painting as missing any attribute of its plan, the clip is
        painted again from new noise (`redraw_seed`), up to `redraws` times, and after a few misses
        from the planner's next-ranked plan (`plan_for_painting`; never in place of a given `plan`):
        the first painting that keeps the whole of its plan is returned, else the one that keeps
        most of it (`draws` says how many were made; `timings` add up all of them, "check" being
        the judge's part; `plan` is the returned painting's).

        With `video` (uint8 (T, H, W, 3), which then sets the size and length), the sample starts
        from that video noised to `strength` of the sampler's path (SDEdit, Meng et al., 2022) and
        takes that share of the steps: near 0 it keeps the video, at 1 it keeps nothing of it.
        """
        seed = whole_number(seed, "seed", 0, MAX_SEED)
        if video is not None:
            video = np.ascontiguousarray(video)  # torch takes no negative strides (a flipped view)
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(f"video must be uint8 frames shaped (T, H, W, 3), not {video.dtype} {video.shape}")
            frames, height, width = (int(n) for n in video.shape[:3])
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"strength must be above 0 and at most 1, not {strength!r}")
        strength = float(strength)
        if video is None and strength != 1:
            raise ValueError("strength below 1 needs a video to start from")
        self.check_request(prompt, width, height, frames)
        self.check_plan(plan)
        redraws = self.redraws if redraws is None else checked_redraws(redraws, self.planner)
        width, height, frames = int(width), int(height), int(frames)
        steps, guidance, sampler, guidance_interval = astuple(self.sampling_for(steps, guidance, sampler, guidance_interval))
        timings = {}
        start = self._clock()
        text, mask = (v.to(self.device) for v in self.text_encoder.encode([prompt]))
        timings["text"] = self._clock() - start
        latent_shape = self.autoencoder.latent_shape(frames, height, width)
        plans = [None]  # the plans to paint, best first: a redraw may take the next (`plan_for_painting`)
        if self.planner is not None:
            start = self._clock()
            plans = [tuple(plan)] if plan is not None else ranked_plans(
                self.planner, text, mask, width, height, (frames - 1) / self.fps, torch.Generator().manual_seed(seed),
                scorer=self.plan_scorer, mentions=self.text_encoder.mentions([prompt]).to(self.device), small_cost=self.small_cost)[0]
            timings["plan"] = self._clock() - start
        if self.denoiser is not self.transformer:  # compiled graphs are specialised to one prompt length
            text, mask = pad_tokens(text, mask, COMPILED_TEXT_MULTIPLE)

        given = None
        if video is not None:
            start = self._clock()
            with autocast_for(self.device):
                given = self.autoencoder.encode(clip_to_tensor(video)[None].to(self.device)).float()
            timings["encode"] = self._clock() - start

        best, best_kept, layouts = None, -1, {}
        for draw in range(1 + redraws):
            index = plan_for_painting(draw, len(plans))
            plan = plans[index]
            if index not in layouts:
                layouts[index] = self._layout(plan, width, height, frames, latent_shape, timings)
            progress = None if on_step is None else partial(self._draw_progress, on_step, draw)
            latents, frames_out = self._paint(text, mask, latent_shape, steps, guidance, redraw_seed(seed, draw), sampler, progress,
                                              given, strength, layouts[index], guidance_interval, timings)
            candidate = GeneratedVideo(frames_out, self.fps, seed, timings, plan, latents)
            if not redraws:
                return candidate
            start = self._clock()
            verdict = painting_verdict(frames_out, plan, self.fps)
            timings["check"] = timings.get("check", 0.0) + self._clock() - start
            kept = sum(check.passed for check in verdict.checks)
            if kept > best_kept:  # the earlier painting keeps a tie
                best, best_kept = candidate, kept
            if verdict.passed:
                break
        best.draws = draw + 1
        return best

    def _layout(self, plan, width: int, height: int, frames: int, latent_shape, timings: dict) -> torch.Tensor | None:
        """What a layout model is shown of `plan` (1, N, channels), its seconds added to the "plan"
        stage of `timings`; None for a model without a planner."""
        if plan is None:
            return None
        start = self._clock()
        frames_per_step = self.autoencoder.cfg.temporal_factor if self.transformer.cfg.silhouette_channels else None
        layout = layout_inputs([plan], (width, height), frames, self.fps, self.transformer.token_grid(latent_shape),
                               frames_per_step).to(self.device)
        timings["plan"] += self._clock() - start
        return layout

    @staticmethod
    def _draw_progress(on_step, draw: int, done: int, total: int):
        """A redraw adds its steps to the work: step `done` of redraw `draw` is done + draw * total of (draw + 1) * total."""
        on_step(draw * total + done, (draw + 1) * total)

    def _paint(self, text, mask, latent_shape, steps, guidance, seed, sampler, on_step, given, strength, layout,
               guidance_interval, timings: dict) -> tuple[torch.Tensor, np.ndarray]:
        """Denoised latents and the frames they decode to, the seconds of each added to `timings`."""
        start = self._clock()
        try:
            latents = self.denoise(text, mask, latent_shape, steps, guidance, seed, sampler, on_step, given, strength, layout,
                                   guidance_interval)
        except self._compile_errors as error:
            self.compile_failure = (str(error.inner_exception).strip().splitlines() or [type(error.inner_exception).__name__])[0]
            warnings.warn(f"torch.compile failed ({self.compile_failure}); generating without it")
            self.denoiser, self.low_noise_denoiser, self._compile_errors = self.transformer, self.low_noise_transformer, ()
            latents = self.denoise(text, mask, latent_shape, steps, guidance, seed, sampler, on_step, given, strength, layout,
                                   guidance_interval)
        timings["denoise"] = timings.get("denoise", 0.0) + self._clock() - start

        start = self._clock()
        with autocast_for(self.device):
            video = self.autoencoder.decode(latents)
        frames = tensor_to_clip(video[0])
        timings["decode"] = timings.get("decode", 0.0) + self._clock() - start
        return latents, frames

    def denoise(self, text, mask, latent_shape, steps: int, guidance: float, seed: int, sampler: str, on_step=None,
                given: torch.Tensor | None = None, strength: float = 1.0, layout: torch.Tensor | None = None,
                guidance_interval: tuple[float, float] = SamplingSettings.guidance_interval):
        """Seeded noise (1, *latent_shape) carried to clean latents by the sampler; with `given`
        latents, the sampler starts from them noised to `strength` of its path. A layout model is
        shown `layout` (1, N, channels); guidance applies at times within `guidance_interval`."""
        generator = torch.Generator("cpu").manual_seed(seed)

        def draw_noise(shape):
            return self.schedule.noise(shape, generator)

        noise = draw_noise((1, *latent_shape)).to(self.device)
        low_noise = None if self.low_noise_transformer is None else (self.low_noise_denoiser, self.boundary_time(latent_shape))
        velocity = self.guided_velocity(text, mask, guidance, layout=layout, interval=guidance_interval, low_noise=low_noise)
        times = self.schedule.sampling_times(steps, self.transformer.token_count(latent_shape), self.device, strength)
        start = noise if given is None or strength == 1 else add_noise(given, noise, times[:1])  # the shift may leave 1 a rounding short of 1
        with autocast_for(self.device):  # one context for every step, so the weights are cast to the compute dtype once
            return SAMPLERS[sampler](velocity, start, times, on_step, draw_noise=draw_noise)

    def boundary_time(self, latent_shape) -> float:
        """The time t at and below which the low-noise transformer denoises latents of this shape:
        `boundary` of the sampler's path, shifted as its steps are for this many tokens."""
        shift = self.schedule.shift(self.transformer.token_count(latent_shape))
        return float(shift_time(torch.tensor(self.boundary), shift))

    def _clock(self) -> float:
        """Wall time once queued GPU work is done, so stage timings are honest on CUDA too."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def guided_velocity(self, text, mask, guidance: float, model=None, layout=None, interval=SamplingSettings.guidance_interval,
                        low_noise: tuple | None = None):
        """Classifier-free guidance: v = v_uncond + g (v_cond - v_uncond), both in one batch; a
        guidance-distilled transformer gives that in one pass, from the prompt and g alone. A layout
        model's conditional pass is shown the `layout`, its unconditional one none. At times outside
        `interval` (low, high] the conditional pass alone gives v.

        A self-conditioned transformer also gets the clean latents implied by the previous call's
        guided velocity (none at the first), the estimate it was trained to refine. `model` replaces
        the denoiser (the transformer or its compiled form) for one caller, e.g. to count FLOPs eagerly.
        `low_noise` (model, t): that model gives the passes at times up to t instead.
        """
        model = model or self.denoiser
        distilled = torch.tensor([guidance], device=self.device) if self.transformer.cfg.distilled_guidance else None
        if guidance == 1.0 or distilled is not None:
            both_text, both_mask = text, mask
        else:
            both_text, both_mask = self.transformer.drop_text(
                text.expand(2, -1, -1), mask.expand(2, -1), torch.tensor([False, True], device=self.device)
            )
        copies = both_text.shape[0]
        both_layout = None if layout is None else torch.cat([layout, torch.zeros_like(layout)])[:copies]
        self_conditioned = self.transformer.cfg.self_condition
        whole_path = tuple(interval) == SamplingSettings.guidance_interval
        estimate = None

        def velocity(x, t):
            nonlocal estimate
            # Over the whole path, without reading t: on a GPU that read waits for the device at every step.
            guided = copies == 2 and (whole_path or interval[0] < min(float(t[0]), 1.0) <= interval[1])  # the shift may leave t = 1 a rounding above 1
            rows, (row_text, row_mask, row_layout) = (2, (both_text, both_mask, both_layout)) if guided else (1, (text, mask, layout))
            previous = estimate.expand(rows, -1, -1, -1, -1) if estimate is not None else None
            denoiser = low_noise[0] if low_noise is not None and float(t[0]) <= low_noise[1] + 1e-6 else model  # a rounding from the boundary counts as on it
            with autocast_for(self.device):
                v = denoiser(x.expand(rows, -1, -1, -1, -1), t.expand(rows), row_text, row_mask, previous, distilled, layout=row_layout).float()
            if guided:
                conditional, unconditional = v.chunk(2)
                v = unconditional + guidance * (conditional - unconditional)
            if self_conditioned:
                estimate = predicted_clean(x, v, t)
            return v

        return velocity
