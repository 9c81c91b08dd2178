import re
from collections import Counter

import numpy as np
import pytest

from kinetoscope.data import captions, world
from kinetoscope.data.captions import PromptError, caption_variants, is_heldout_scene, parse_prompt
from kinetoscope.data.world import COLORS, MOTIONS, SHAPES, Scene, ShapeObject

N_SCENES = 300
VARIANTS = 4


def obj(color, shape, motion, size=None, speed=None, start=None):
    return ShapeObject(color=color, shape=shape, size=size, motion=motion, speed=speed, start=start)


def scene_of(*objects, background="black", relation=None):
    return Scene(objects=tuple(objects), background=background, relation=relation)


@pytest.fixture(scope="module")
def corpus():
    """(split, scene, caption) for seeded scenes, each phrased VARIANTS ways in both splits."""
    rng = np.random.default_rng(1234)
    rows = []
    for _ in range(N_SCENES):
        scene = world.sample_scene(rng, aspect=float(rng.choice([0.75, 1.0, 16 / 9])))
        for split in captions.SPLITS:
            variants = caption_variants(scene, rng, count=VARIANTS, split=split)
            assert len(variants) == VARIANTS and len(set(variants)) == VARIANTS, variants
            rows += [(split, scene, caption) for caption in variants]
    return rows


def assert_agrees(parsed: Scene, truth: Scene, caption: str):
    """Every attribute the caption names matches the scene, and it names every object fully."""
    named = {o.color: (o, n) for o, n in parsed.groups()}
    true = {o.color: (o, n) for o, n in truth.groups()}
    assert named.keys() == true.keys(), caption
    for color, (o, n) in named.items():
        t, true_n = true[color]
        assert (o.shape, o.motion, n) == (t.shape, t.motion, true_n), caption
        assert o.size in (None, t.size) and o.speed in (None, t.speed), caption
        assert o.start is None, caption
    assert parsed.background in (None, truth.background), caption
    assert parsed.relation in (None, truth.relation), caption


def test_round_trip_in_both_splits(corpus):
    forms = Counter()
    optional = Counter()
    for split, scene, caption in corpus:
        parsed = parse_prompt(caption)
        assert_agrees(parsed, scene, caption)
        forms.update((split, form) for form in captions.phrasing_forms(caption))
        optional["size"] += parsed.objects[0].size is not None
        optional["background"] += parsed.background is not None
        optional["relation"] += parsed.relation is not None
        optional["speed"] += any(o.speed is not None for o in parsed.objects)
    train_forms = ["objects_first", "relation_first", "relation_last", "background_last"]
    heldout_forms = train_forms + ["background_first", "there_is", "heldout_word"]
    for split, expected in (("train", train_forms), ("heldout", heldout_forms)):
        for form in expected:
            assert forms[split, form] >= 20, (split, form, forms)
    # Optional attributes are sometimes named and sometimes left out.
    for attribute, named in optional.items():
        assert 20 <= named < len(corpus) - 20, (attribute, optional)


def test_every_generated_word_is_used(corpus):
    used = {split: set() for split in captions.SPLITS}
    for split, _, caption in corpus:
        used[split].update(captions._tokenize(caption))
    train_words = captions._tokens_used_by({captions.TRAIN})
    assert train_words <= used["train"], sorted(train_words - used["train"])
    assert captions.HELDOUT_WORDS <= used["heldout"], sorted(captions.HELDOUT_WORDS - used["heldout"])


def test_same_seed_same_captions():
    scene = world.sample_scene(np.random.default_rng(7))
    for split in captions.SPLITS:
        first = caption_variants(scene, np.random.default_rng(99), count=6, split=split)
        again = caption_variants(scene, np.random.default_rng(99), count=6, split=split)
        other = caption_variants(scene, np.random.default_rng(100), count=6, split=split)
        assert first == again and first != other


def test_count_gives_that_many_distinct_captions():
    scene = scene_of(obj("red", "triangle", "still", size="small"))
    for split in captions.SPLITS:
        variants = caption_variants(scene, np.random.default_rng(0), count=25, split=split)
        assert len(set(variants)) == 25
    with pytest.raises(ValueError):
        caption_variants(scene, np.random.default_rng(0), split="test")


def uses_heldout_phrasing(caption: str) -> bool:
    """Judged from the text alone, independently of the parser."""
    tokens = captions._tokenize(caption)
    background_first = tokens[0] in ("on", "against", "black", "white", "gray", "grey") or caption.startswith(
        "the background is"
    )
    return background_first or "there" in tokens or bool(captions.HELDOUT_WORDS & set(tokens))


def test_train_never_uses_heldout_phrasings_and_heldout_always_does(corpus):
    for split, _, caption in corpus:
        assert uses_heldout_phrasing(caption) == (split == "heldout"), (split, caption)
        assert captions.is_heldout_phrasing(caption) == (split == "heldout"), (split, caption)


def test_heldout_scenes():
    assert is_heldout_scene(scene_of(obj("pink", "square", "still")))
    assert is_heldout_scene(scene_of(obj("red", "circle", "left", speed="fast"), obj("blue", "triangle", "bounce")))
    assert is_heldout_scene(scene_of(obj("red", "square", "shrink")))
    assert not is_heldout_scene(scene_of(obj("pink", "circle", "shrink"), obj("cyan", "square", "bounce")))
    # Each attribute value still appears in training, in combinations that are not held out.
    allowed = [
        (color, shape, motion)
        for color in COLORS
        for shape in SHAPES
        for motion in MOTIONS
        if not (shape == "circle" and motion == "spin")
        and not is_heldout_scene(scene_of(obj(color, shape, motion)))
    ]
    for position, values in enumerate((COLORS, SHAPES, MOTIONS)):
        assert {triple[position] for triple in allowed} == set(values)


def test_scene_constraints_split_the_world():
    rng = np.random.default_rng(3)
    train = [world.sample_scene(rng, constraints=captions.TRAIN_SCENES) for _ in range(150)]
    heldout = [world.sample_scene(rng, constraints=captions.HELDOUT_SCENES) for _ in range(60)]
    assert not any(is_heldout_scene(s) for s in train)
    assert all(is_heldout_scene(s) for s in heldout)
    train_objects = [o for s in train for o in s.objects]
    assert {o.color for o in train_objects} == set(COLORS)
    assert {o.shape for o in train_objects} == set(SHAPES)
    assert {o.motion for o in train_objects} == set(MOTIONS)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (
            "a red circle moves to the right on a black background",
            scene_of(obj("red", "circle", "right"), background="black"),
        ),
        (
            "two small yellow squares slide up quickly",
            scene_of(*[obj("yellow", "square", "up", size="small", speed="fast")] * 2, background=None),
        ),
        (
            "a big blue triangle spins while a pink ball bounces, on white",
            scene_of(
                obj("blue", "triangle", "spin", size="large"), obj("pink", "circle", "bounce"), background="white"
            ),
        ),
        (
            # The disc's motion is not named, so it is left open.
            "a green box left of an orange disc; the box grows",
            scene_of(
                obj("green", "square", "grow"),
                obj("orange", "circle", None),
                background=None,
                relation=("green", "left of", "orange"),
            ),
        ),
    ],
)
def test_world_md_examples(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (
            "  A Medium-Sized RED disk is to the left of the green block. The disk doesn't move, "
            "the block rises upwards slowly!",
            scene_of(
                obj("red", "circle", "still", size="medium"),
                obj("green", "square", "up", speed="slow"),
                background=None,
                relation=("red", "left of", "green"),
            ),
        ),
        ("a red circle", scene_of(obj("red", "circle", None), background=None)),
        (
            "on a grey backdrop three tiny cyan triangles are quickly sliding leftwards",
            scene_of(*[obj("cyan", "triangle", "left", size="small", speed="fast")] * 3, background="gray"),
        ),
        (
            "a red ball bounces, with the ball over the blue box; the box sinks",
            scene_of(
                obj("red", "circle", "bounce"),
                obj("blue", "square", "down"),
                background=None,
                relation=("red", "above", "blue"),
            ),
        ),
    ],
)
def test_variations_parse(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt, word",
    [
        ("a magenta ball bounces", "'magenta'"),
        ("a red ball spins", "'spins'"),
        ("a red ball bounces quickly", "'quickly'"),
        ("a blue box spins slowly", "'slowly'"),
        ("four red balls bounce", "'four red balls'"),
        ("two red balls bounce and two blue boxes spin", "'two blue boxes'"),
        ("a red ball bounces and a red box spins", "'red'"),
        ("a red ball bounces, with the ball above the green box", "'the green box'"),
        ("two red balls slides left", "'slides'"),
        ("a red square slide left", "'slide'"),
        ("a red balls bounces", "'balls'"),
        ("there is two red balls that bounce", "'is'"),
        ("a red ball bounces on a red background", "'red'"),
        ("red ball the bounces", "'the'"),
        ("a red ball slides", "'slides'"),
        ("a red ball bounces on white; the background is black", "'black'"),
        ("a box spins", "'a box'"),
        ("the box spins", "'the box'"),
        ("two red balls left of a blue box", "'two red balls'"),
        ("a red ball bounces; the ball bounces left", "'left'"),
        ("a red ball quickly", "'a red ball quickly'"),
        ("", "no object"),
    ],
)
def test_bad_prompts_raise_naming_the_word(prompt, word):
    with pytest.raises(PromptError, match=re.escape(word)):
        parse_prompt(prompt)


def next_word_after_noun(caption: str, nouns: set[str]) -> str:
    """The verb (or copula) following the noun, skipping "that" and a leading adverb."""
    tokens = captions._tokenize(caption)
    rest = tokens[next(i for i, t in enumerate(tokens) if t in nouns) + 1 :]
    return next(t for t in rest if t not in ("that", "quickly", "slowly", "rapidly"))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_plural_agreement(count):
    scene = scene_of(*[obj("yellow", "square", "up", size="small", speed="fast")] * count)
    squares = [n for n in captions.NOUNS if n.shape == "square"]
    nouns = {n.plural if count > 1 else n.singular for n in squares}
    verbs = {(v.plural if count > 1 else v.singular).split()[0] for v in captions.VERBS}
    verbs.add("are" if count > 1 else "is")
    for split in captions.SPLITS:
        for caption in caption_variants(scene, np.random.default_rng(count), count=30, split=split):
            assert next_word_after_noun(caption, nouns) in verbs, caption
            if count == 1:
                assert not re.search(r"\b(two|three|pair)\b", caption), caption
            else:
                assert re.search({2: r"\b(two|a pair of)\b", 3: r"\bthree\b"}[count], caption), caption
