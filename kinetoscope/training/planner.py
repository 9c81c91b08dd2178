"""Train the layout planner (models/planner.py) on Shapes World's scenes and captions.

    kinetoscope planner train --recipe configs/planner.toml [--output runs/planner] [--minutes M]

Nothing is rendered: each step draws training scenes on canvases of the recipe's buckets, captions
them from the train split only (held-out combinations and phrasings never appear), and teaches the
planner the rectified-flow velocity from noise to the scene's object slots (data/layout.py), in the
order the caption names the objects.
Resumes from OUTPUT/checkpoint; keeps an EMA of the weights, which is what gets exported. Every
evaluation plans held-out prompts, renders the plans with Shapes World itself and lets the judge
score them (pipelines/layout.py), and saves a contact sheet of them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kinetoscope.data import captions, world
from kinetoscope.data.dataset import Bucket
from kinetoscope.data.layout import (MAX_OBJECTS, SLOT_FEATURES, SLOT_GROUPS, SLOT_IDENTITY_TOKEN_FEATURES, SLOT_TOKEN_FEATURES,
                                     in_mention_order, plan_states,
                                     scene_to_slots, slot_columns)
from kinetoscope.diffusion.rectified_flow import add_noise, velocity_target
from kinetoscope.models.checkpoint import load_checkpoint
from kinetoscope.models.planner import LayoutPlanner, PlannerConfig, PlanScorer, canvas_condition
from kinetoscope.models.text_encoder import TextEncoder
from kinetoscope.training.common import (BatchPool, RecipeError, RunDirectory, Stopwatch, check_train_settings, learning_rate,
                                         load_recipe, replace_folder, reuse_setting, run_progress)

REQUIRED = {
    "model": (),
    "data": ("buckets", "fps", "batch_size", "seed"),
    "train": ("steps", "lr", "warmup", "weight_decay", "grad_clip", "seed", "log_every", "eval_every", "checkpoint_minutes",
              "output", "ema_decay"),
    "eval": ("per_tier",),
}
KNOWN = {
    "model": ("role", "dim", "depth", "heads", "mlp_ratio", "text_layers", "mentions", "guidance", "init", "attribute_tokens", "identity_token", "unread"),
    "data": (*REQUIRED["data"], "lead_in_rate", "paraphrase_rate", "stand_in_rate", "relation_rate",
             "relation_spares_one_object", "negatives"),
    "train": (*REQUIRED["train"], "minutes", "reuse", "workers", "start_weight", "caption_dropout"),
    "eval": (*REQUIRED["eval"], "planner"),
}
UNREADABLE = tuple(name for name in SLOT_GROUPS if name != "color")  # a colour names its object: every model reads it
ROLES = ("planner", "scorer")  # [model] role: a LayoutPlanner, or a PlanScorer to pick among its plans


# Words before a caption that say nothing of its scene. Every training caption starts with its first
# object, so a planner can learn to read slot 0 at the caption's first tokens: given "against a black
# background, a red ball ..." (a held-out form) it then read the ball into two slots. A lead-in now
# and then moves the objects along, and none of these is a held-out form or word.
LEAD_INS = ("here, ", "scene: ", "we see ", "in this clip, ", "the video shows ", "a short video: ", "look closely: ",
            "in the following short clip, ", "this is a video in which ")

# Everyday English verbs for each of the world's motions that the caption grammar never writes (so no
# held-out word either), as (singular, plural, progressive) like captions.VERBS. The grammar has three
# verbs for travel, and a planner trained on them alone read "glides left" (a held-out verb) as a
# bounce in 7 of 100 held-out phrasings, "left" notwithstanding: shown other verbs now and then in
# place of the grammar's, it learns that the direction says the motion, whatever the verb.
PARAPHRASES = {
    captions.LINEAR: (("goes", "go", "going"), ("heads", "head", "heading"), ("shifts", "shift", "shifting"),
                      ("runs", "run", "running"), ("flies", "fly", "flying"), ("passes", "pass", "passing")),
    "up": (("climbs", "climb", "climbing"), ("ascends", "ascend", "ascending"), ("goes up", "go up", "going up")),
    "down": (("descends", "descend", "descending"), ("drops", "drop", "dropping"), ("goes down", "go down", "going down")),
    "still": (("remains still", "remain still", "remaining still"), ("stays put", "stay put", "staying put"),
              ("stands still", "stand still", "standing still"), ("holds still", "hold still", "holding still")),
    "bounce": (("jumps", "jump", "jumping"), ("leaps", "leap", "leaping"), ("springs", "spring", "springing")),
    "grow": (("swells", "swell", "swelling"), ("enlarges", "enlarge", "enlarging"), ("gets larger", "get larger", "getting larger"),
             ("becomes bigger", "become bigger", "becoming bigger")),
    "shrink": (("contracts", "contract", "contracting"), ("dwindles", "dwindle", "dwindling"),
               ("becomes smaller", "become smaller", "becoming smaller"), ("gets littler", "get littler", "getting littler")),
    "spin": (("turns", "turn", "turning"), ("whirls", "whirl", "whirling"), ("turns around", "turn around", "turning around")),
}
# Each form a training caption can show -> (its motion, which form: 0 singular, 1 plural, 2 progressive).
_VERB_FORMS = {form: (verb.motion, index) for verb in captions.VERBS if verb.use == captions.TRAIN
               for index, form in enumerate((verb.singular, verb.plural, verb.progressive)) if form}
_VERB_PATTERN = re.compile(r"\b(" + "|".join(map(re.escape, sorted(_VERB_FORMS, key=len, reverse=True))) + r")\b")


def paraphrase_verbs(caption: str, rng: np.random.Generator, rate: float) -> str:
    """`caption` with each of its verbs, at `rate`, in another form of one of the PARAPHRASES of its motion."""
    def swap(match: re.Match) -> str:
        if rng.random() >= rate:
            return match.group(0)
        motion, form = _VERB_FORMS[match.group(0)]
        choices = PARAPHRASES[motion]
        return choices[rng.integers(len(choices))][form]

    return _VERB_PATTERN.sub(swap, caption)


# Everyday nouns no caption uses, as (singular, plural), to stand in for a caption's shape words. A
# planner reads a motion's object by its noun ("the block shrinks"), and every noun it was trained
# on comes with the odds of what its shape does: no training caption says a block shrinks, and told
# so, the planner gave the shrink to the other object. Named by a word that says nothing of its
# shape, ("a purple lamp ... the lamp shrinks"), an object can be told apart from the others only by
# which word names it, which is how a motion must be bound whatever the noun.
STAND_INS = (("lamp", "lamps"), ("cloud", "clouds"), ("stone", "stones"), ("bird", "birds"), ("boat", "boats"), ("coin", "coins"),
             ("flower", "flowers"), ("cup", "cups"), ("key", "keys"), ("leaf", "leaves"), ("bell", "bells"), ("kite", "kites"))
# Each noun a training caption can show -> (its shape, which form: 0 singular, 1 plural).
_NOUN_FORMS = {form: (noun.shape, index) for noun in captions.NOUNS if noun.use == captions.TRAIN
               for index, form in enumerate((noun.singular, noun.plural))}
_NOUN_PATTERN = re.compile(r"\b(" + "|".join(sorted(_NOUN_FORMS, key=len, reverse=True)) + r")\b")


def stand_in_nouns(caption: str, rng: np.random.Generator) -> str:
    """`caption` with every noun of each shape replaced by one of the STAND_INS, a different one per shape."""
    stand_in = dict(zip(world.SHAPES, rng.permutation(len(STAND_INS))))

    def swap(match: re.Match) -> str:
        shape, form = _NOUN_FORMS[match.group(0)]
        return STAND_INS[stand_in[shape]][form]

    return _NOUN_PATTERN.sub(swap, caption)


# Scenes drawn, at most, for a caption that states a relation where [data] relation_rate asks for
# one (about one caption in eight does, so this almost never runs out).
RELATION_ATTEMPTS = 50


def recipe_flag(table: dict, section: str, name: str) -> bool:
    """[section] `name` of a recipe, true or false (false when the recipe leaves it out)."""
    flag = table.get(name, False)
    if not isinstance(flag, bool):
        raise RecipeError(f"[{section}] {name} must be true or false, not {flag!r}")
    return flag


def data_rate(data: dict, name: str) -> float:
    """[data] `name`, a share from 0 to 1 (0 when the recipe leaves it out)."""
    rate = data.get(name, 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise RecipeError(f"[data] {name} must be a number from 0 to 1, not {rate!r}")
    return rate


class SceneBatches:
    """Training scenes and their captions, as (slots (B, S, F), text (B, L, D), mask (B, L), canvas (B, 2),
    mentions (B, L, L): TextEncoder.mentions),
    a share `lead_in_rate` of the captions after one of the LEAD_INS, a share `paraphrase_rate` of
    their verbs in other words (PARAPHRASES), a share `stand_in_rate` naming their shapes by
    STAND_INS (with no shape in their slots: the caption no longer says it), and a share
    `relation_rate` of the scenes drawn again until their caption states a relation (with
    `relation_spares_one_object`, only of those whose caption names two objects or more, so that
    captions of one object keep their share)."""

    def __init__(self, data: dict, text_encoder: TextEncoder, seed: int):
        try:
            self.buckets = [Bucket.parse(b) for b in data["buckets"]]
        except (ValueError, TypeError) as error:
            raise RecipeError(f"[data] buckets: {error}") from None
        if not self.buckets:
            raise RecipeError("[data] buckets must name at least one WIDTHxHEIGHTxFRAMES")
        if isinstance(data["batch_size"], bool) or not isinstance(data["batch_size"], int) or data["batch_size"] < 1:
            raise RecipeError(f"[data] batch_size must be a whole number of at least 1, not {data['batch_size']!r}")
        self.fps, self.batch_size = float(data["fps"]), data["batch_size"]
        self.lead_in_rate, self.paraphrase_rate, self.stand_in_rate, self.relation_rate = (
            data_rate(data, name) for name in ("lead_in_rate", "paraphrase_rate", "stand_in_rate", "relation_rate"))
        self.relation_spares_one_object = recipe_flag(data, "data", "relation_spares_one_object")
        self.text_encoder = text_encoder
        self.rng = np.random.default_rng(seed)

    def captioned_scene(self):
        """One training scene as (its objects in the order the caption names them, the caption as
        the model reads it, what the caption states (`captions.parse_prompt`, read before any
        rewording; no shape under stand-ins), whether its shapes are stand-ins, canvas (2,))."""
        bucket = self.buckets[self.rng.integers(len(self.buckets))]
        seconds = (bucket.frames - 1) / self.fps
        wants_relation = self.relation_rate > 0 and self.rng.random() < self.relation_rate  # no draw: older recipes keep their data
        for attempt in range(RELATION_ATTEMPTS):
            scene = world.sample_scene(self.rng, bucket.width / bucket.height, max(seconds, 1 / self.fps), captions.TRAIN_SCENES)
            caption = captions.caption_variants(scene, self.rng, count=1, split="train")[0]
            stated = captions.parse_prompt(caption)
            spared = attempt == 0 and self.relation_spares_one_object and len(stated.objects) == 1
            if stated.relation is not None or not wants_relation or spared:
                break
        objects = in_mention_order(scene.objects, caption)
        if self.paraphrase_rate:
            caption = paraphrase_verbs(caption, self.rng, self.paraphrase_rate)
        stand_in = self.rng.random() < self.stand_in_rate
        if stand_in:
            caption = stand_in_nouns(caption, self.rng)
            stated = replace(stated, objects=tuple(replace(obj, shape=None) for obj in stated.objects))
        if self.rng.random() < self.lead_in_rate:
            caption = LEAD_INS[self.rng.integers(len(LEAD_INS))] + caption
        return objects, caption, stated, stand_in, canvas_condition(bucket.width, bucket.height, seconds)

    def __call__(self):
        slots, texts, canvases = [], [], []
        for _ in range(self.batch_size):
            objects, caption, _, stand_in, canvas = self.captioned_scene()
            rows = scene_to_slots(objects)
            if stand_in:
                rows[:, slot_columns("shape")] = 0.0
            slots.append(rows)
            texts.append(caption)
            canvases.append(canvas)
        text, mask = self.text_encoder.encode(texts)
        return torch.from_numpy(np.stack(slots)), text, mask, torch.stack(canvases), self.text_encoder.mentions(texts)


# How a plan may be made to contradict its caption, and how often: give one object another object's
# attribute (most often its motion, the planner's commonest error), change one attribute, drop or add
# an object, or move objects past each other.
CONTRADICTIONS = {"swap motion": 4, "swap color": 1, "swap shape": 1, "swap size": 1, "swap start": 2, "change color": 1,
                  "change shape": 1, "change size": 1, "change motion": 2, "change speed": 1, "drop": 1, "add": 1}


def contradict(objects: tuple[world.ShapeObject, ...], stated: world.Scene, rng: np.random.Generator,
               attempts: int = 50) -> tuple[world.ShapeObject, ...] | None:
    """A plan like `objects` that says something `stated` contradicts and shows no held-out
    combination (so that no held-out pair is trained on, as a wrong plan either); None when
    `attempts` random changes found none."""
    kinds, weights = zip(*CONTRADICTIONS.items())
    weights = np.asarray(weights, dtype=float) / sum(weights)
    for _ in range(attempts):
        kind, _, name = str(rng.choice(kinds, p=weights)).partition(" ")
        plan = list(objects)
        if kind == "swap" and len(plan) > 1:
            i, j = rng.choice(len(plan), 2, replace=False)
            names = ("motion", "speed") if name == "motion" else (name,)
            plan[i], plan[j] = (replace(plan[i], **{n: getattr(plan[j], n) for n in names}),
                                replace(plan[j], **{n: getattr(plan[i], n) for n in names}))
        elif kind == "change" and plan:
            i = rng.integers(len(plan))
            plan[i] = changed(plan[i], name, rng)
        elif kind == "drop" and len(plan) > 1:
            del plan[rng.integers(len(plan))]
        elif kind == "add" and len(plan) < MAX_OBJECTS:
            i = rng.integers(len(plan))  # a twin beside it, as a caption's group of like objects
            plan.insert(i + 1, replace(plan[i], start=tuple(float(v) for v in rng.uniform(0.2, 0.8, 2))))
        plan = tuple(plan)
        if (plan != objects and all(obj.motion != "spin" or obj.shape != "circle" for obj in plan)
                and not captions.is_heldout_scene(world.Scene(plan, stated.background or "black"))
                and not plan_states(plan, stated)):
            return plan
    return None


def changed(obj: world.ShapeObject, name: str, rng: np.random.Generator) -> world.ShapeObject:
    """`obj` with its attribute `name` (or its motion's speed) drawn afresh."""
    choices = SLOT_GROUPS[name]
    value = choices[rng.integers(len(choices))]
    if name == "speed":
        return replace(obj, speed=value if obj.motion in world.LINEAR_MOTIONS else None)
    if name == "motion":
        speed = obj.speed or tuple(world.SPEEDS)[rng.integers(len(world.SPEEDS))]
        return replace(obj, motion=value, speed=speed if value in world.LINEAR_MOTIONS else None)
    return replace(obj, **{name: value})


class PlanBatches(SceneBatches):
    """For the plan scorer: each scene's true plan followed by `negatives` plans its caption
    contradicts (`contradict`), as (slots (B * (1 + negatives), S, F), text (B, L, D), mask (B, L),
    canvas (B * (1 + negatives), 2), mentions (B, L, L)): rows i * (1 + negatives)... belong to caption i, true plan first.
    A scorer that leaves attributes `unread` is shown no plan wrong in those alone: to it, that
    plan is the true one."""

    def __init__(self, data: dict, text_encoder: TextEncoder, seed: int, negatives: int, unread: Sequence[str] = ()):
        super().__init__(data, text_encoder, seed)
        self.negatives = negatives
        self.unread = dict.fromkeys(unread)

    def __call__(self):
        slots, texts, canvases = [], [], []
        while len(texts) < self.batch_size:
            objects, caption, stated, _, canvas = self.captioned_scene()
            stated = replace(stated, objects=tuple(replace(obj, **self.unread) for obj in stated.objects))
            plans = [objects]
            while len(plans) <= self.negatives and (wrong := contradict(tuple(objects), stated, self.rng)) is not None:
                plans.append(wrong)
            if len(plans) <= self.negatives:
                continue  # a caption too vague to contradict often enough
            slots.extend(scene_to_slots(plan) for plan in plans)
            texts.append(caption)
            canvases.extend([canvas] * len(plans))
        text, mask = self.text_encoder.encode(texts)
        return torch.from_numpy(np.stack(slots)), text, mask, torch.stack(canvases), self.text_encoder.mentions(texts)


def planner_loss(planner: LayoutPlanner, slots, text, mask, canvas, generator=None, start_weight: float = 1.0,
                 caption_dropout: float = 0.0, mentions=None) -> torch.Tensor:
    """Velocity MSE at logit-normal times, averaged over the batch, each slot's start (its last two
    features) weighted `start_weight` against each of the others. A stated relation moves only the
    starts, 2 of 28 features, and by less than a one-hot flips: at weight 1 the planner of
    configs/planner.toml placed related objects no better than chance, on training captions too.
    A share `caption_dropout` of the captions is dropped (the empty prompt), for guidance."""
    b = slots.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=generator))
    noise = torch.randn(slots.shape, generator=generator)
    if caption_dropout:
        text, mask = planner.drop_text(text, mask, torch.rand(b, generator=generator) < caption_dropout)
    prediction = planner(add_noise(slots, noise, t), t, text, mask, canvas, mentions)
    weights = torch.ones(slots.shape[-1], device=slots.device)
    weights[-2:] = start_weight
    return ((prediction - velocity_target(slots, noise)) ** 2 * weights).mean() / weights.mean()


def scorer_loss(scorer: PlanScorer, slots, text, mask, canvas, mentions=None) -> torch.Tensor:
    """Cross-entropy of picking each caption's true plan among its plans (`PlanBatches`: the true
    one first), by their scores."""
    scores = scorer(slots, text, mask, canvas, mentions).float().unflatten(0, (text.shape[0], -1))  # (B, 1 + negatives)
    return F.cross_entropy(scores, torch.zeros(text.shape[0], dtype=torch.long, device=scores.device))


def train(recipe_path: str, output: str | None = None, minutes: float | None = None, steps: int | None = None):
    recipe = load_recipe(recipe_path, REQUIRED, KNOWN)
    settings = recipe["train"]
    check_train_settings({"workers": 0, **settings})
    reuse = reuse_setting(settings)
    start_weight = settings.get("start_weight", 1.0)
    if isinstance(start_weight, bool) or not isinstance(start_weight, (int, float)) or not 0 < start_weight <= 100:
        raise RecipeError(f"[train] start_weight must be a number above 0 and at most 100, not {start_weight!r}")
    total_steps = steps or settings["steps"]
    minutes = minutes if minutes is not None else settings.get("minutes")
    evaluation = recipe["eval"]
    if isinstance(evaluation["per_tier"], bool) or not isinstance(evaluation["per_tier"], int) or evaluation["per_tier"] < 1:
        raise RecipeError(f"[eval] per_tier must be a whole number of at least 1, not {evaluation['per_tier']!r}")
    caption_dropout = settings.get("caption_dropout", 0.0)
    if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, (int, float)) or not 0 <= caption_dropout < 1:
        raise RecipeError(f"[train] caption_dropout must be a number from 0 up to (not including) 1, not {caption_dropout!r}")
    torch.manual_seed(settings["seed"])
    role = recipe["model"].get("role", "planner")
    if role not in ROLES:
        raise RecipeError(f"[model] role must be one of {', '.join(ROLES)}, not {role!r}")
    attribute_tokens = recipe_flag(recipe["model"], "model", "attribute_tokens")
    identity_token = recipe["model"].get("identity_token", False)
    if not isinstance(identity_token, bool) or (identity_token and not attribute_tokens):
        raise RecipeError(f"[model] identity_token must be true (with attribute_tokens = true) or false, not {identity_token!r}")
    recipe_flag(recipe["model"], "model", "mentions")
    unread = recipe["model"].get("unread", [])
    if not isinstance(unread, list) or not set(unread) <= set(UNREADABLE):
        raise RecipeError(f"[model] unread must list slot attributes out of {', '.join(UNREADABLE)}, not {unread!r}")
    try:
        model = (LayoutPlanner if role == "planner" else PlanScorer)(PlannerConfig(
            slots=MAX_OBJECTS, features=SLOT_FEATURES, identity_kind=identity_token,
            token_features=(SLOT_IDENTITY_TOKEN_FEATURES if identity_token else SLOT_TOKEN_FEATURES) if attribute_tokens else (),
            unread_features=tuple(column for name in unread for column in range(SLOT_FEATURES)[slot_columns(name)]),
            **{k: v for k, v in recipe["model"].items() if k not in ("role", "init", "attribute_tokens", "identity_token", "unread")}))
    except (TypeError, ValueError) as error:
        raise RecipeError(f"[model]: {error}") from None
    if role == "planner" and model.cfg.guidance != 1 and not caption_dropout:
        raise RecipeError("[model] guidance other than 1 needs [train] caption_dropout: a planner never shown the empty prompt has no unconditional plan")
    if role == "scorer":
        negatives = recipe["data"].get("negatives")
        if isinstance(negatives, bool) or not isinstance(negatives, int) or not 1 <= negatives <= 64:
            raise RecipeError(f"[data] negatives (wrong plans per caption) must be a whole number from 1 to 64, not {negatives!r}")
        if not isinstance(evaluation.get("planner"), str):
            raise RecipeError("[eval] planner must name the planner folder whose plans the scorer picks among")
        judged_planner = load_planner(evaluation["planner"])
    text_encoder = TextEncoder.load("cpu")
    run = RunDirectory(output or settings["output"])
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.99), weight_decay=settings["weight_decay"])
    step, carried = 0, 0.0
    run.recover()
    if run.has_checkpoint():
        run.check_resumable(recipe)
        model.load_state_dict(load_file(run.checkpoint / "model.safetensors"))
        ema.load_state_dict(load_file(run.checkpoint / "ema.safetensors"))
        state = run.load_state(optimizer)
        step, carried = state["step"], state["elapsed_s"]
        print(f"resuming from step {step} ({carried / 60:.1f} min so far)")
    elif recipe["model"].get("init"):  # continue from exported weights (the EMA): a fresh optimizer
        start_from(model, recipe["model"]["init"])
        ema.load_state_dict(model.state_dict())
        print(f"starting from the weights in {recipe['model']['init']}")
    seed = settings["seed"] * 1_000_003 + step  # a resumed run draws fresh scenes and noise
    torch.manual_seed(seed)
    data_seed = recipe["data"]["seed"] * 1_000_003 + step
    batches = (SceneBatches(recipe["data"], text_encoder, data_seed) if role == "planner"
               else PlanBatches(recipe["data"], text_encoder, data_seed, negatives, unread))
    pool = BatchPool(batches, reuse, seed)
    clock = Stopwatch(carried)

    def save_model(modules, directory):
        model, averaged = modules
        model.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in averaged.state_dict().items()}, directory / "ema.safetensors")

    def checkpoint():
        run.save((model, ema), optimizer, {"step": step, "elapsed_s": clock.elapsed, "recipe": recipe}, save_model)

    last_checkpoint = clock.elapsed
    bar = tqdm(total=total_steps, initial=step, desc=role, dynamic_ncols=True)
    evaluated = (ema, None) if role == "planner" else (judged_planner, ema)
    model.train()
    while (fraction := run_progress(step, total_steps, clock.elapsed, minutes)) < 1.0:
        lr = learning_rate(step, settings["lr"], settings["warmup"], fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        slots, text, mask, canvas, mentions = pool.next()
        loss = (planner_loss(model, slots, text, mask, canvas, start_weight=float(start_weight), caption_dropout=float(caption_dropout),
                             mentions=mentions)
                if role == "planner" else scorer_loss(model, slots, text, mask, canvas, mentions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        if torch.isfinite(grad_norm):
            optimizer.step()
            with torch.no_grad():
                decay = min(settings["ema_decay"], (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % settings["log_every"] == 0:
            run.log({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr, "elapsed_s": round(clock.elapsed, 1)})
        if step % settings["eval_every"] == 0:
            evaluate(*evaluated, text_encoder, recipe, run, step)
        if clock.elapsed - last_checkpoint > settings["checkpoint_minutes"] * 60:
            checkpoint()
            last_checkpoint = clock.elapsed
    bar.close()
    checkpoint()
    if step % settings["eval_every"]:
        evaluate(*evaluated, text_encoder, recipe, run, step)
    return export(ema, run, step, clock.elapsed)


def start_from(model: LayoutPlanner | PlanScorer, directory: str):
    """Load exported weights of the recipe's shape into `model` (their guidance may differ). A
    planner with one token per slot may start one with attribute tokens, or the reverse, and one
    with attribute tokens one with an identity kind: every weight is shared but the embedding of
    the token kinds. A planner may start one with more text
    layers, which start as the identity, and one that reads mentions (which starts as if it did
    not). A planner may start a scorer: it already reads prompts and plans, and only the scorer's
    head starts afresh."""
    try:
        cfg, state = load_checkpoint(directory, PlannerConfig, "layout planner or plan scorer")
    except (OSError, ValueError) as error:
        raise RecipeError(f"[model] init: {error}") from None
    if replace(cfg, guidance=model.cfg.guidance, token_features=model.cfg.token_features, unread_features=model.cfg.unread_features,
               identity_kind=model.cfg.identity_kind,
               text_layers=max(cfg.text_layers, model.cfg.text_layers), mentions=cfg.mentions or model.cfg.mentions) != model.cfg:
        raise RecipeError(f"[model] init {directory} is a {cfg}; the recipe's is a {model.cfg}")
    ours = model.state_dict()
    if "kind_embedding" in state and "kind_embedding" in ours and state["kind_embedding"].shape != ours["kind_embedding"].shape:
        del state["kind_embedding"]  # other token kinds (identity_kind): only their embedding starts afresh
    missing, _ = model.load_state_dict(state, strict=False)
    starting_afresh = ("kind_embedding", "score_out.", "mention_proj.",
                       *(f"text_layers.{layer}." for layer in range(cfg.text_layers, model.cfg.text_layers)))
    if lacking := [key for key in missing if not key.startswith(starting_afresh)]:
        raise RecipeError(f"[model] init {directory} lacks {', '.join(sorted(lacking))}")


def load_planner(directory: str) -> LayoutPlanner:
    try:
        return LayoutPlanner.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as error:
        raise RecipeError(f"[eval] planner: {error}") from None


@torch.no_grad()
def evaluate(planner: LayoutPlanner, scorer: PlanScorer | None, text_encoder: TextEncoder, recipe: dict, run: RunDirectory,
             step: int) -> dict:
    """Plan held-out prompts (picked among by `scorer`, if any), render the plans, judge them; log
    the rates and save a contact sheet."""
    from kinetoscope.eval.generation import evaluate_generator, held_out_prompts
    from kinetoscope.media.frames import save_contact_sheet
    from kinetoscope.pipelines.layout import PlannedScenes

    planned = PlannedScenes(planner.eval(), text_encoder, fps=recipe["data"]["fps"], scorer=scorer and scorer.eval())
    report = evaluate_generator(planned, per_tier=recipe["eval"]["per_tier"])
    record = {"step": step}
    for tier, result in report["tiers"].items():
        record[f"eval_fully_right {tier}"] = result["fully_right"]
    run.log(record)
    run.plot_loss(("loss",), title=f"{'scorer' if scorer else 'planner'} loss (plans fully right at step {step}: "
                  + " / ".join(f"{r['fully_right']:.0%}" for r in report["tiers"].values()) + ")")
    prompts = held_out_prompts(recipe["eval"]["per_tier"])
    shown = [item for item, _ in report["failures"][:12]]
    if shown:  # each as the evaluation planned it: prompt i from seed i
        save_contact_sheet(run.root / "samples" / f"failed_plans_{step:06d}.png",
                           [planned(item.prompt, seed=prompts.index(item)).frames for item in shown], [item.prompt for item in shown])
    return report


def export(ema: LayoutPlanner | PlanScorer, run: RunDirectory, step: int, elapsed: float):
    final = replace_folder(run.root / "final", lambda folder: ema.save_pretrained(
        folder, {"trained_steps": step, "wall_time_s": round(elapsed), "hardware": f"CPU ({torch.get_num_threads()} threads)"}))
    print(f"exported the {ema.kind} to {final} after {step} steps, {elapsed / 60:.1f} min")
    return final
