"""Captions for Shapes World: many true phrasings of a scene, a parser back to scenes, a held-out split.

The caption grammar of shared/world.md lives in one vocabulary (the tables under "Vocabulary").
`caption_variants` draws its words from it and `parse_prompt` reads prompts with it, so what the
generator writes and what the parser understands cannot drift apart.

Phrasings. A caption always names every object's colour, shape and motion and every group's
count; size, speed, background and relation are each optional. Forms:
  objects first     "two small yellow squares slide up quickly; the background is gray"
  relation first    "a green box left of an orange disc; the box grows and the disc sits still"
  relation last     "a red ball bounces while a blue block spins, with the ball above the block"
  background last   "..., on white" / "... on a black background" / "...; the background is gray"
Words vary too: articles (a/an/one/the), counts (two, a pair of, three) with plural agreement,
synonyms (ball/disc for circle, box/block for square, big for large, tiny for small, slides or
travels for moves, quickly/fast, grey for gray, ...) and progressive verbs ("is sliding left").

Held-out split (split="heldout"), which training (split="train") never sees, so evaluation on it
measures generalisation rather than memory:
  * Attribute combinations: an object whose (colour, shape) is in HELDOUT_COLOR_SHAPES (pink
    square, cyan triangle, orange circle) or whose (shape, motion) is in HELDOUT_SHAPE_MOTIONS
    (triangle bounce, square shrink, circle grow) makes its scene held out (`is_heldout_scene`).
    Every colour, shape and motion still appears in training in other combinations. Pass
    TRAIN_SCENES or HELDOUT_SCENES to world.sample_scene as its constraints.
  * Phrasings: two forms, background first ("on a white background, a red ball spins") and
    "there is/are ... that ..." ("there are two red balls that bounce"), and the words marked
    HELDOUT in the vocabulary (orb, huge, rapidly, glides, rotates). split="train" never writes
    them; every split="heldout" caption uses at least one. `phrasing_forms` and
    `is_heldout_phrasing` tell which a prompt uses.
The parser reads both splits, plus a few parse-only variants (disk, leftwards, mid-sized, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import NoReturn, Sequence, TypeVar

import numpy as np

from kinetoscope.data.world import BACKGROUNDS, COLORS, LINEAR_MOTIONS, Scene, SceneConstraints, ShapeObject

MAX_OBJECTS = 3  # world.md: one to three objects per clip
SPLITS = ("train", "heldout")


class PromptError(ValueError):
    """A prompt outside the world's grammar, or one that asks for something the world forbids."""


# ---------------------------------------------------------------------------------------------
# Held-out attribute combinations

HELDOUT_COLOR_SHAPES = frozenset({("pink", "square"), ("cyan", "triangle"), ("orange", "circle")})
HELDOUT_SHAPE_MOTIONS = frozenset({("triangle", "bounce"), ("square", "shrink"), ("circle", "grow")})


def is_heldout_scene(scene: Scene) -> bool:
    """True when any object shows a held-out (colour, shape) or (shape, motion) combination."""
    return any(
        (obj.color, obj.shape) in HELDOUT_COLOR_SHAPES or (obj.shape, obj.motion) in HELDOUT_SHAPE_MOTIONS
        for obj in scene.objects
    )


def _is_training_scene(scene: Scene) -> bool:
    return not is_heldout_scene(scene)


TRAIN_SCENES = SceneConstraints(reject=is_heldout_scene)
HELDOUT_SCENES = SceneConstraints(reject=_is_training_scene)


# ---------------------------------------------------------------------------------------------
# Vocabulary: every surface form, tagged with who may use it

TRAIN, HELDOUT, PARSE_ONLY = "train", "heldout", "parse-only"
LINEAR = "linear"  # a verb whose direction follows it: "slides left", "moves to the right"


@dataclass(frozen=True)
class Word:
    """One surface form (possibly several words) of a canonical value such as "large" or "fast"."""

    meaning: str
    text: str
    use: str = TRAIN


@dataclass(frozen=True)
class Noun:
    shape: str
    singular: str
    plural: str
    use: str = TRAIN


@dataclass(frozen=True)
class Verb:
    motion: str  # a world motion, or LINEAR
    singular: str  # agrees with one object: "slides"
    plural: str  # agrees with a group: "slide"
    progressive: str | None = None  # after "is"/"are": "sliding"; None where English has none
    use: str = TRAIN


NOUNS = (
    Noun("circle", "circle", "circles"),
    Noun("circle", "ball", "balls"),
    Noun("circle", "disc", "discs"),
    Noun("circle", "orb", "orbs", HELDOUT),
    Noun("circle", "disk", "disks", PARSE_ONLY),
    Noun("square", "square", "squares"),
    Noun("square", "box", "boxes"),
    Noun("square", "block", "blocks"),
    Noun("triangle", "triangle", "triangles"),
)
COLOR_WORDS = tuple(Word(color, color) for color in COLORS)
BACKGROUND_WORDS = (*(Word(background, background) for background in BACKGROUNDS), Word("gray", "grey"))
SIZE_WORDS = (
    Word("small", "small"),
    Word("small", "tiny"),
    Word("small", "little", PARSE_ONLY),
    Word("medium", "medium"),
    Word("medium", "medium-sized"),
    Word("medium", "mid-sized", PARSE_ONLY),
    Word("large", "large"),
    Word("large", "big"),
    Word("large", "huge", HELDOUT),
)
SPEED_WORDS = (
    Word("fast", "quickly"),
    Word("fast", "fast"),
    Word("fast", "rapidly", HELDOUT),
    Word("fast", "swiftly", PARSE_ONLY),
    Word("slow", "slowly"),
    Word("slow", "slow", PARSE_ONLY),
)
DIRECTION_WORDS = (
    Word("left", "left"),
    Word("left", "to the left"),
    Word("left", "leftward"),
    Word("left", "leftwards", PARSE_ONLY),
    Word("right", "right"),
    Word("right", "to the right"),
    Word("right", "rightward"),
    Word("right", "rightwards", PARSE_ONLY),
    Word("up", "up"),
    Word("up", "upward"),
    Word("up", "upwards", PARSE_ONLY),
    Word("down", "down"),
    Word("down", "downward"),
    Word("down", "downwards", PARSE_ONLY),
)
RELATION_WORDS = (
    Word("left of", "left of"),
    Word("left of", "to the left of"),
    Word("right of", "right of"),
    Word("right of", "to the right of"),
    Word("above", "above"),
    Word("above", "over", PARSE_ONLY),
    Word("below", "below"),
    Word("below", "under"),
    Word("below", "beneath", PARSE_ONLY),
)
VERBS = (
    Verb("still", "stays still", "stay still", "staying still"),
    Verb("still", "sits still", "sit still", "sitting still"),
    Verb("still", "is still", "are still"),
    Verb("still", "does not move", "do not move"),
    Verb("still", "rests", "rest", "resting"),
    Verb(LINEAR, "moves", "move", "moving"),
    Verb(LINEAR, "slides", "slide", "sliding"),
    Verb(LINEAR, "travels", "travel", "travelling"),
    Verb(LINEAR, "travels", "travel", "traveling", use=PARSE_ONLY),
    Verb(LINEAR, "glides", "glide", "gliding", use=HELDOUT),
    Verb("up", "rises", "rise", "rising"),
    Verb("down", "sinks", "sink", "sinking"),
    Verb("bounce", "bounces", "bounce", "bouncing"),
    Verb("bounce", "hops", "hop", "hopping"),
    Verb("grow", "grows", "grow", "growing"),
    Verb("grow", "gets bigger", "get bigger", "getting bigger"),
    Verb("grow", "expands", "expand", "expanding"),
    Verb("shrink", "shrinks", "shrink", "shrinking"),
    Verb("shrink", "gets smaller", "get smaller", "getting smaller"),
    Verb("spin", "spins", "spin", "spinning"),
    Verb("spin", "twirls", "twirl", "twirling"),
    Verb("spin", "rotates", "rotate", "rotating", use=HELDOUT),
)
# Counts past three are known words so that "four balls" is refused as too many, not as unknown.
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
GROUP_COUNT_WORDS = {2: ("two", "a pair of"), 3: ("three",)}  # what the generator writes for a group
ARTICLES = {"a": 0.6, "one": 0.2, "the": 0.2}  # for one object, with how often each is written
INDEFINITE_ARTICLES = {"a": 0.75, "one": 0.25}  # "there is the red ball" reads badly

# Sentence frames. The parser's grammar below accepts each of them; the round-trip tests hold it.
CLAUSE_JOINERS = (" and ", " while ", "; ")
THAT_CLAUSE_JOINERS = (" and ", ", and ", "; ")  # "while" reads badly between "... that ..." clauses
OPENING_JOINERS = ("; ", ", ", ": ")  # after a relation-first opening
RELATION_VERBS = ("", "is ", "starts ")  # "a green box [is] left of an orange disc"
RELATION_TAILS = (", with {a} {rel} {b}", "; {a} is {rel} {b}", "; {a} starts {rel} {b}", " and {a} starts {rel} {b}")
BACKGROUND_SUFFIXES = (
    ", on {bg}",
    " on {bg}",
    " on a {bg} background",
    ", on a {bg} background",
    " against a {bg} background",
    "; the background is {bg}",
    ", {bg} background",
)
BACKGROUND_PREFIXES = (  # held out: only split="heldout" puts the background first
    "on a {bg} background, ",
    "on {bg}, ",
    "against a {bg} background, ",
    "the background is {bg}; ",
    "{bg} background: ",
)


# ---------------------------------------------------------------------------------------------
# Tokens and the phrase tables the parser reads with


_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
SEPARATORS = frozenset({",", ";", ":", ".", "!", "?", "and", "while"})  # between clauses


def _tokenize(text: str) -> list[str]:
    # "Medium-sized" reads as "medium sized" and "doesn't" as "does not", however the prompt spells them.
    text = text.lower().replace("\u2019", "'").replace("n't", " not").replace("-", " ")
    return _TOKEN.findall(text)


class _Phrases(dict):
    """Token sequences -> values; the first entry for a sequence wins, so train words shadow
    parse-only duplicates ("travels")."""

    def __init__(self, pairs):
        super().__init__()
        for text, value in pairs:
            self.setdefault(tuple(_tokenize(text)), value)
        self.longest = max(map(len, self))


def _literal(*texts: str) -> _Phrases:
    return _Phrases((text, text) for text in texts)


def _words(entries: Sequence[Word]) -> _Phrases:
    return _Phrases((entry.text, entry) for entry in entries)


def _determiners() -> _Phrases:
    """Determiner -> (definite, count): a/an/one -> 1, "the" -> count unknown, "the two" -> 2, ..."""
    pairs = [("a", (False, 1)), ("an", (False, 1)), ("the", (True, None))]
    for count, texts in GROUP_COUNT_WORDS.items():
        pairs += [(text, (False, count)) for text in texts]
    for word, count in NUMBER_WORDS.items():
        pairs += [(word, (False, count)), (str(count), (False, count)), (f"the {word}", (True, count))]
    return _Phrases(pairs)


_NOUNS = _Phrases([(n.singular, (n, False)) for n in NOUNS] + [(n.plural, (n, True)) for n in NOUNS])
_COLORS, _SIZES, _SPEEDS = _words(COLOR_WORDS), _words(SIZE_WORDS), _words(SPEED_WORDS)
_BACKGROUNDS, _DIRECTIONS, _RELATIONS = _words(BACKGROUND_WORDS), _words(DIRECTION_WORDS), _words(RELATION_WORDS)
_VERBS = _Phrases([(v.singular, (v, "singular")) for v in VERBS] + [(v.plural, (v, "plural")) for v in VERBS])
_PROGRESSIVES = _Phrases((v.progressive, v) for v in VERBS if v.progressive)
_COPULAS = _Phrases([("is", "singular"), ("are", "plural")])
_THERE = _Phrases([("there is", "is"), ("there are", "are")])
_DETERMINERS = _determiners()
_THAT, _WITH, _ARTICLES = _literal("that"), _literal("with"), _literal("a", "an", "the")
_RELATION_VERBS = _literal(*(verb.strip() for verb in RELATION_VERBS if verb))
_THE_BACKGROUND_IS = _literal("the background is")
_BACKGROUND_PREPOSITIONS = _literal("on", "against", "over", "with", "in front of")
_BACKGROUND_NOUNS = _literal("background", "backdrop")

_ALL_PHRASES = (
    _NOUNS, _COLORS, _SIZES, _SPEEDS, _BACKGROUNDS, _DIRECTIONS, _RELATIONS, _VERBS, _PROGRESSIVES, _COPULAS,
    _THERE, _DETERMINERS, _THAT, _WITH, _ARTICLES, _RELATION_VERBS, _THE_BACKGROUND_IS,
    _BACKGROUND_PREPOSITIONS, _BACKGROUND_NOUNS,
)
KNOWN_WORDS = frozenset(token for phrases in _ALL_PHRASES for key in phrases for token in key) | SEPARATORS


_ENTRIES = (
    *NOUNS, *COLOR_WORDS, *BACKGROUND_WORDS, *SIZE_WORDS, *SPEED_WORDS, *DIRECTION_WORDS, *RELATION_WORDS, *VERBS
)


def _surface_texts(entry: Word | Noun | Verb) -> tuple[str, ...]:
    if isinstance(entry, Noun):
        return (entry.singular, entry.plural)
    if isinstance(entry, Verb):
        return tuple(text for text in (entry.singular, entry.plural, entry.progressive) if text)
    return (entry.text,)


def _tokens_used_by(uses: set[str]) -> frozenset[str]:
    texts = (text for entry in _ENTRIES if entry.use in uses for text in _surface_texts(entry))
    return frozenset(token for text in texts for token in _tokenize(text))


HELDOUT_WORDS = _tokens_used_by({HELDOUT}) - _tokens_used_by({TRAIN, PARSE_ONLY})  # tokens only held-out entries use


# ---------------------------------------------------------------------------------------------
# Generation


SAY_SIZE, SAY_SPEED, SAY_BACKGROUND, SAY_RELATION = 0.5, 0.6, 0.5, 0.7
RELATION_FIRST_RATE = 0.5
PROGRESSIVE_RATE = 0.25
ADVERB_FIRST_RATE = 0.25
BARE_REFERENCE_RATE = 0.6  # "the box" rather than "the green box", where the shape is unambiguous
THERE_IS_RATE = 0.35  # held-out split only
BACKGROUND_FIRST_RATE = 0.5  # held-out split only, when the background is named
ATTEMPTS_PER_CAPTION = 50  # draws before concluding the grammar has no further distinct phrasing

T = TypeVar("T")


def caption_variants(scene: Scene, rng: np.random.Generator, count: int = 4, split: str = "train") -> list[str]:
    """`count` distinct true captions of `scene` (fewer only when no more distinct ones turn up).

    split="train" never uses a held-out form or word; split="heldout" uses at least one in
    every caption (see the module docstring).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    captions: list[str] = []
    for _ in range(count * ATTEMPTS_PER_CAPTION):
        if len(captions) == count:
            break
        speaker = _Speaker(rng, split)
        caption = _describe(scene, speaker)
        if split == "heldout" and not speaker.used_heldout:
            continue
        if caption not in captions:
            captions.append(caption)
    return captions


class _Speaker:
    """Makes the random choices for one caption, from the words its split may use."""

    def __init__(self, rng: np.random.Generator, split: str):
        self.rng = rng
        self.heldout_allowed = split == "heldout"
        self.used_heldout = False
        self.nouns: dict[str, Noun] = {}  # one noun per colour, so a later "the box" repeats "a green box"

    def maybe(self, probability: float) -> bool:
        return bool(self.rng.random() < probability)

    def pick(self, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
        return options[int(self.rng.choice(len(options), p=weights))]

    def word(self, entries: Sequence[T]) -> T:
        usable = [e for e in entries if e.use == TRAIN or (e.use == HELDOUT and self.heldout_allowed)]
        chosen = self.pick(usable)
        self.used_heldout |= chosen.use == HELDOUT
        return chosen

    def heldout_form(self, probability: float) -> bool:
        chosen = self.heldout_allowed and self.maybe(probability)
        self.used_heldout |= chosen
        return chosen

    def noun(self, obj: ShapeObject) -> Noun:
        if obj.color not in self.nouns:
            self.nouns[obj.color] = self.word([noun for noun in NOUNS if noun.shape == obj.shape])
        return self.nouns[obj.color]


def _with_meaning(entries: Sequence[Word], meaning: str) -> list[Word]:
    return [entry for entry in entries if entry.meaning == meaning]


def _describe(scene: Scene, sp: _Speaker) -> str:
    groups = scene.groups()
    groups = [groups[i] for i in sp.rng.permutation(len(groups))]
    relation = scene.relation if scene.relation is not None and sp.maybe(SAY_RELATION) else None
    there_is = sp.heldout_form(THERE_IS_RATE)
    if relation is not None and sp.maybe(RELATION_FIRST_RATE):
        body = _relation_first(groups, relation, sp, there_is)
    else:
        body = _objects_first(groups, sp, there_is)
        if relation is not None:
            body += _relation_tail(groups, relation, sp)
    return _with_background(body, scene.background, sp) if sp.maybe(SAY_BACKGROUND) else body


def _objects_first(groups, sp: _Speaker, there_is: bool) -> str:
    if not there_is:
        return _join([f"{_introduce(obj, n, sp)} {_predicate(obj, n, sp)}" for obj, n in groups], CLAUSE_JOINERS, sp)
    clauses = [f"{_introduce(obj, n, sp, INDEFINITE_ARTICLES)} that {_predicate(obj, n, sp)}" for obj, n in groups]
    copula = "are" if groups[0][1] > 1 else "is"  # agrees with the first object listed
    return f"there {copula} " + _join(clauses, THAT_CLAUSE_JOINERS, sp)


def _relation_first(groups, relation, sp: _Speaker, there_is: bool) -> str:
    """Relation, then references back: "a green box left of an orange disc; the box grows and ..."."""
    first, name, second = relation
    objects = {obj.color: obj for obj, _ in groups}
    articles = INDEFINITE_ARTICLES if there_is else ARTICLES
    opening = (
        f"{_introduce(objects[first], 1, sp, articles)} {sp.pick(RELATION_VERBS)}"
        f"{sp.word(_with_meaning(RELATION_WORDS, name)).text} {_introduce(objects[second], 1, sp, articles)}"
    )
    if there_is:
        opening = "there is " + opening
    followers = [
        f"{_reference(obj, groups, sp)} {_predicate(obj, 1, sp)}"
        if obj.color in (first, second)
        else f"{_introduce(obj, n, sp)} {_predicate(obj, n, sp)}"
        for obj, n in groups
    ]
    return opening + sp.pick(OPENING_JOINERS) + _join(followers, CLAUSE_JOINERS, sp)


def _relation_tail(groups, relation, sp: _Speaker) -> str:
    first, name, second = relation
    objects = {obj.color: obj for obj, _ in groups}
    template = sp.pick(RELATION_TAILS)
    a = _reference(objects[first], groups, sp)
    rel = sp.word(_with_meaning(RELATION_WORDS, name)).text
    return template.format(a=a, rel=rel, b=_reference(objects[second], groups, sp))


def _with_background(body: str, background: str, sp: _Speaker) -> str:
    word = sp.word(_with_meaning(BACKGROUND_WORDS, background)).text
    if sp.heldout_form(BACKGROUND_FIRST_RATE):
        return sp.pick(BACKGROUND_PREFIXES).format(bg=word) + body
    return body + sp.pick(BACKGROUND_SUFFIXES).format(bg=word)


def _join(clauses: list[str], joiners: tuple[str, ...], sp: _Speaker) -> str:
    text = clauses[0]
    for i, clause in enumerate(clauses[1:], start=1):
        is_last = i == len(clauses) - 1
        # "a, b and c" or "a; b while c", but neither "a, b" nor "a while b while c"
        text += sp.pick(joiners if is_last else (", ", "; ")) + clause
    return text


def _introduce(obj: ShapeObject, count: int, sp: _Speaker, articles: dict[str, float] = ARTICLES) -> str:
    """A first mention: "a big blue triangle", "two small yellow squares"."""
    noun = sp.noun(obj)
    words = [obj.color, noun.plural if count > 1 else noun.singular]
    if sp.maybe(SAY_SIZE):
        words.insert(0, sp.word(_with_meaning(SIZE_WORDS, obj.size)).text)
    if count > 1:
        determiner = sp.pick(GROUP_COUNT_WORDS[count])
    else:
        determiner = sp.pick(list(articles), list(articles.values()))
        if determiner == "a" and words[0][0] in "aeiou":
            determiner = "an"
    return " ".join([determiner, *words])


def _reference(obj: ShapeObject, groups, sp: _Speaker) -> str:
    """A definite reference back to an object already introduced: "the box" or "the green box"."""
    noun = sp.noun(obj).singular
    shape_is_unique = sum(other.shape == obj.shape for other, _ in groups) == 1
    if shape_is_unique and sp.maybe(BARE_REFERENCE_RATE):
        return f"the {noun}"
    return f"the {obj.color} {noun}"


def _predicate(obj: ShapeObject, count: int, sp: _Speaker) -> str:
    """What it does, agreeing with `count`: "slide up quickly", "is spinning", "does not move"."""
    is_linear = obj.motion in LINEAR_MOTIONS
    verb = sp.word([v for v in VERBS if v.motion == obj.motion or (is_linear and v.motion == LINEAR)])
    plural = count > 1
    progressive = verb.progressive is not None and sp.maybe(PROGRESSIVE_RATE)
    if progressive:
        words = ["are" if plural else "is", verb.progressive]
    else:
        words = [verb.plural if plural else verb.singular]
    if verb.motion == LINEAR:
        words.append(sp.word(_with_meaning(DIRECTION_WORDS, obj.motion)).text)
    if obj.speed is not None and sp.maybe(SAY_SPEED):
        adverb = sp.word(_with_meaning(SPEED_WORDS, obj.speed)).text
        # "-ly" adverbs may lead the verb ("quickly slides up", "is quickly sliding"); "fast slides" may not.
        if adverb.endswith("ly") and sp.maybe(ADVERB_FIRST_RATE):
            words.insert(1 if progressive else 0, adverb)
        else:
            words.append(adverb)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Parsing: tokens -> clauses (recursive descent over the vocabulary) -> scene (checks meaning)


def parse_prompt(text: str) -> Scene:
    """The scene a prompt asks for: what it names, and None for what it leaves open.

    Objects carry colour, shape and motion as named (motion None when a prompt only places an
    object, as in "a green box left of an orange disc; the box grows"), size and speed or None,
    and start None; a group expands to that many objects. Background and relation are None
    unless named. Raises PromptError naming the offending word for an unknown word, a prompt
    outside the grammar, or a contradiction the world forbids.
    """
    return _parse(text)[0]


def phrasing_forms(text: str) -> frozenset[str]:
    """The phrasing forms a prompt uses: some of objects_first, relation_first, relation_last,
    background_first, background_last, there_is, heldout_word."""
    return _parse(text)[1]


HELDOUT_MARKERS = frozenset({"background_first", "there_is", "heldout_word"})


def is_heldout_phrasing(text: str) -> bool:
    """True when a prompt uses a held-out form or word (split="train" never writes one)."""
    return bool(phrasing_forms(text) & HELDOUT_MARKERS)


def _parse(text: str) -> tuple[Scene, frozenset[str]]:
    tokens = _tokenize(text)
    for token in tokens:
        if token not in KNOWN_WORDS:
            raise PromptError(f"unknown word {token!r} in prompt {text!r}")
    clauses = [clause for segment in _segments(tokens) for clause in _parse_segment(segment, text)]
    builder = _SceneBuilder(text)
    for clause in clauses:
        builder.add(clause)
    return builder.scene(), _forms(clauses, tokens)


def _segments(tokens: list[str]):
    """Split at "," ";" "and" "while" ...: every clause of the grammar lies between separators."""
    segment: list[str] = []
    for token in tokens:
        if token in SEPARATORS:
            if segment:
                yield segment
            segment = []
        else:
            segment.append(token)
    if segment:
        yield segment


@dataclass(frozen=True)
class _Mention:
    """An object as one phrase names it: "the two small red balls", "the box"."""

    definite: bool
    count: int | None  # from the determiner; None when it gives none ("the", or no determiner)
    size: str | None
    color: str | None
    shape: str
    plural: bool
    words: str


@dataclass(frozen=True)
class _Predicate:
    verb: Verb
    number: str  # "singular" or "plural", to agree with the subject
    verb_words: str
    direction: Word | None
    speeds: tuple[Word, ...]


@dataclass(frozen=True)
class _ObjectClause:
    mention: _Mention
    predicate: _Predicate | None  # None: the prompt only names the object ("a red circle")
    there: str | None  # "is"/"are" of "there is ...", to agree with the mention


@dataclass(frozen=True)
class _RelationClause:
    a: _Mention
    relation: Word
    b: _Mention
    there: str | None


@dataclass(frozen=True)
class _BackgroundClause:
    background: Word


class _NoMatch(Exception):
    """This reading of a clause does not fit; the cursor remembers where the deepest one stuck."""


class _Cursor:
    """Reads one clause's tokens, remembering the furthest point any reading got stuck."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.stuck_at = -1
        self.expected = ""

    def at_end(self) -> bool:
        return self.pos == len(self.tokens)

    def take(self, phrases: _Phrases):
        """The value of the longest phrase of `phrases` starting here (consumed), or None."""
        for length in range(min(phrases.longest, len(self.tokens) - self.pos), 0, -1):
            value = phrases.get(tuple(self.tokens[self.pos : self.pos + length]))
            if value is not None:
                self.pos += length
                return value
        return None

    def need(self, phrases: _Phrases, expected: str):
        value = self.take(phrases)
        if value is None:
            self.fail(expected)
        return value

    def fail(self, expected: str) -> NoReturn:
        if self.pos > self.stuck_at:
            self.stuck_at, self.expected = self.pos, expected
        raise _NoMatch

    def attempt(self, parse):
        """parse(self), or None with the position restored when that reading does not fit."""
        start = self.pos
        try:
            return parse(self)
        except _NoMatch:
            self.pos = start
            return None

    def words_since(self, start: int) -> str:
        return " ".join(self.tokens[start : self.pos])

    def error(self, text: str) -> PromptError:
        if self.stuck_at < len(self.tokens):
            word = self.tokens[self.stuck_at]
            return PromptError(f"unexpected word {word!r} in prompt {text!r} (expected {self.expected})")
        phrase = " ".join(self.tokens)
        return PromptError(f"unfinished phrase {phrase!r} in prompt {text!r} (expected {self.expected})")


def _parse_segment(tokens: list[str], text: str) -> list:
    """One segment: [background] (object clause | relation clause) [background], or a background."""
    cur = _Cursor(tokens)
    leading = cur.attempt(_read_background_clause)
    clauses = [leading] if leading else []
    if cur.at_end():
        return clauses
    for core in (_read_object_clause, _read_relation_clause):
        parsed = cur.attempt(partial(_clause_to_end, core=core))
        if parsed:
            return clauses + parsed
    raise cur.error(text)


def _clause_to_end(cur: _Cursor, core) -> list:
    clause = core(cur)
    trailing = cur.attempt(_read_background_clause)
    if not cur.at_end():
        cur.fail("the end of the clause")
    return [clause, trailing] if trailing else [clause]


def _read_object_clause(cur: _Cursor) -> _ObjectClause:
    """Object clause: "[there is] a red ball [that] bounces", or just "a red ball"."""
    there = cur.take(_THERE)
    mention = _read_mention(cur)
    if cur.take(_THAT):
        predicate = _read_predicate(cur)
    elif there:
        predicate = None  # "there is a red ball" names it without a motion
    else:
        predicate = cur.attempt(_read_predicate)
    return _ObjectClause(mention, predicate, there)


def _read_relation_clause(cur: _Cursor) -> _RelationClause:
    """Relation clause: "[with | there is] a green box [is | starts] left of an orange disc"."""
    there = None if cur.take(_WITH) else cur.take(_THERE)
    a = _read_mention(cur)
    cur.take(_RELATION_VERBS)
    relation = cur.need(_RELATIONS, "a relation such as 'left of' or 'above'")
    return _RelationClause(a, relation, _read_mention(cur), there)


def _read_background_clause(cur: _Cursor) -> _BackgroundClause:
    """Background: "on white", "on a white background", "white background", "the background is white"."""
    expected = "a background colour (black, white or gray)"
    if cur.take(_THE_BACKGROUND_IS):
        return _BackgroundClause(cur.need(_BACKGROUNDS, expected))
    preposition = cur.take(_BACKGROUND_PREPOSITIONS)
    article = cur.take(_ARTICLES)
    background = cur.take(_BACKGROUNDS)
    if background is None:
        if preposition:
            cur.fail(expected)  # "on a red background": the colour is the mistake
        raise _NoMatch  # no background at all ("the red ball"), so nothing worth reporting
    # A bare colour is no background ("..., white"): it takes "on ..." or "... background".
    if not cur.take(_BACKGROUND_NOUNS) and (article or not preposition):
        cur.fail("'background'")
    return _BackgroundClause(background)


def _read_mention(cur: _Cursor) -> _Mention:
    """Mention of an object: [determiner] [size] [colour] shape."""
    start = cur.pos
    definite, count = cur.take(_DETERMINERS) or (False, None)
    size = cur.take(_SIZES)
    color = cur.take(_COLORS)
    expected = "a shape (circle, square or triangle)" if cur.pos > start else "an object such as 'a red ball'"
    noun, plural = cur.need(_NOUNS, expected)
    return _Mention(
        definite=definite,
        count=count,
        size=size.meaning if size else None,
        color=color.meaning if color else None,
        shape=noun.shape,
        plural=plural,
        words=cur.words_since(start),
    )


def _read_predicate(cur: _Cursor) -> _Predicate:
    """Predicate: [speed] verb [speed] [direction] [speed], the verb maybe progressive ("is [speed] sliding")."""
    speeds = _read_speed(cur)
    start = cur.pos
    found = cur.take(_VERBS)
    if found:
        verb, number = found
    else:
        number = cur.take(_COPULAS) or cur.fail("a motion such as 'bounces' or 'slides left'")
        speeds += _read_speed(cur)
        verb = cur.need(_PROGRESSIVES, "a verb such as 'sliding'")
    verb_words = cur.words_since(start)
    speeds += _read_speed(cur)
    direction = cur.take(_DIRECTIONS)
    speeds += _read_speed(cur)
    return _Predicate(verb, number, verb_words, direction, tuple(speeds))


def _read_speed(cur: _Cursor) -> list[Word]:
    speed = cur.take(_SPEEDS)
    return [speed] if speed else []


@dataclass
class _Kind:
    """What the prompt says so far about the object(s) of one colour."""

    color: str
    shape: str
    count: int
    words: str  # the phrase that introduced it, for messages
    size: str | None = None
    motion: str | None = None
    speed: str | None = None


class _SceneBuilder:
    """Gives parsed clauses their meaning in order, rejecting what the world forbids."""

    def __init__(self, text: str):
        self.text = text
        self.kinds: dict[str, _Kind] = {}
        self.background: str | None = None
        self.relation: tuple[str, str, str] | None = None
        # "the green box" in a relation after the opening clause refers to an object the prompt
        # names elsewhere; these are the colours still waiting for that.
        self.opening = True
        self.unconfirmed: dict[str, str] = {}

    def fail(self, message: str) -> NoReturn:
        raise PromptError(f"{message} in prompt {self.text!r}")

    def add(self, clause) -> None:
        if isinstance(clause, _BackgroundClause):
            self.background = self._agree(self.background, clause.background.meaning, clause.background.text)
            return
        if isinstance(clause, _RelationClause):
            self._relate(clause)
        else:
            self._describe(clause)
        self.opening = False

    def scene(self) -> Scene:
        if not self.kinds:
            self.fail("no object named")
        for color, words in self.unconfirmed.items():
            self.fail(f"the relation names {words!r}, but no {color} object is in the scene")
        objects = tuple(
            ShapeObject(color=k.color, shape=k.shape, size=k.size, motion=k.motion, speed=k.speed, start=None)
            for k in self.kinds.values()
            for _ in range(k.count)
        )
        return Scene(objects=objects, background=self.background, relation=self.relation)

    def _describe(self, clause: _ObjectClause) -> None:
        kind = self._object(clause.mention)
        self.unconfirmed.pop(kind.color, None)
        self._check_there(clause.there, clause.mention)
        p = clause.predicate
        if p is None:
            return
        if (p.number == "plural") != clause.mention.plural:
            self.fail(f"{p.verb_words!r} does not agree with {clause.mention.words!r}")
        motion, speed = self._motion(p, kind.shape)
        kind.motion = self._agree(kind.motion, motion, p.verb_words)
        kind.speed = self._agree(kind.speed, speed, p.verb_words)

    def _relate(self, clause: _RelationClause) -> None:
        self._check_there(clause.there, clause.a)
        a = self._object(clause.a, in_later_relation=not self.opening)
        b = self._object(clause.b, in_later_relation=not self.opening)
        for kind, mention in ((a, clause.a), (b, clause.b)):
            if kind.count != 1:
                self.fail(f"a relation holds between two single objects, not {mention.words!r}")
        if a is b:
            self.fail(f"{clause.a.words!r} cannot be {clause.relation.text!r} itself")
        relation = (a.color, clause.relation.meaning, b.color)
        if self.relation not in (None, relation):
            self.fail(f"a second relation {clause.relation.text!r} (a scene states at most one)")
        self.relation = relation

    def _object(self, m: _Mention, in_later_relation: bool = False) -> _Kind:
        """The kind a mention refers to, introducing it when it is new."""
        count = self._count(m)
        if m.color is None:
            kind = self._by_shape(m)
        elif m.color in self.kinds:
            kind = self.kinds[m.color]
            if not m.definite or kind.shape != m.shape:
                self.fail(f"colour {m.color!r} names two objects, {kind.words!r} and {m.words!r}")
        else:
            kind = self._introduce(m, count)
            if m.definite and in_later_relation:
                self.unconfirmed[m.color] = m.words
            return kind
        if count not in (None, kind.count):
            self.fail(f"{m.words!r} does not match {kind.words!r}")
        kind.size = self._agree(kind.size, m.size, m.words)
        return kind

    def _count(self, m: _Mention) -> int | None:
        if m.count is None:
            return None if m.plural else 1
        if (m.count == 1) == m.plural:
            self.fail(f"{m.words.split()[-1]!r} does not agree with the count in {m.words!r}")
        return m.count

    def _introduce(self, m: _Mention, count: int | None) -> _Kind:
        if count is None:
            self.fail(f"{m.words!r} does not say how many")
        total = sum(kind.count for kind in self.kinds.values()) + count
        if total > MAX_OBJECTS:
            self.fail(f"too many objects: {m.words!r} makes {total}, a scene holds at most {MAX_OBJECTS}")
        kind = _Kind(color=m.color, shape=m.shape, count=count, words=m.words, size=m.size)
        self.kinds[m.color] = kind
        return kind

    def _by_shape(self, m: _Mention) -> _Kind:
        """The one object named before with the mention's shape (and size, if given): "the box"."""
        if not m.definite:
            self.fail(f"{m.words!r} names no colour")
        matches = [
            kind
            for kind in self.kinds.values()
            if kind.shape == m.shape and (m.size is None or kind.size in (None, m.size))
        ]
        if not matches:
            self.fail(f"{m.words!r} refers to no object named before")
        if len(matches) > 1:
            self.fail(f"{m.words!r} could be any of {[kind.words for kind in matches]}; name its colour")
        return matches[0]

    def _motion(self, p: _Predicate, shape: str) -> tuple[str, str | None]:
        if p.verb.motion == LINEAR:
            if p.direction is None:
                self.fail(f"{p.verb_words!r} needs a direction (left, right, up or down)")
            motion = p.direction.meaning
        else:
            motion = p.verb.motion
            if p.direction is not None and p.direction.meaning != motion:
                self.fail(f"{p.verb_words!r} cannot go {p.direction.text!r}")
        if motion == "spin" and shape == "circle":
            self.fail(f"circles never spin ({p.verb_words!r})")
        if len(p.speeds) > 1:
            self.fail(f"speed named twice ({p.speeds[0].text!r} and {p.speeds[1].text!r})")
        speed = p.speeds[0] if p.speeds else None
        if speed is not None and motion not in LINEAR_MOTIONS:
            self.fail(f"speed {speed.text!r} fits only left, right, up and down, not {p.verb_words!r}")
        return motion, speed.meaning if speed else None

    def _check_there(self, there: str | None, m: _Mention) -> None:
        if there is not None and (there == "are") != m.plural:
            self.fail(f"{there!r} does not agree with {m.words!r}")

    def _agree(self, known: str | None, named: str | None, words: str) -> str | None:
        """A value named again must be the same one ("a red ball bounces; the ball spins" must not)."""
        if named is None:
            return known
        if known not in (None, named):
            self.fail(f"{words!r} contradicts {known!r}")
        return named


def _forms(clauses: list, tokens: list[str]) -> frozenset[str]:
    backgrounds = [i for i, clause in enumerate(clauses) if isinstance(clause, _BackgroundClause)]
    cores = [clause for clause in clauses if not isinstance(clause, _BackgroundClause)]
    forms = {"relation_first" if isinstance(cores[0], _RelationClause) else "objects_first"}
    if any(isinstance(clause, _RelationClause) for clause in cores[1:]):
        forms.add("relation_last")
    if any(clause.there for clause in cores):
        forms.add("there_is")
    if backgrounds:
        forms.add("background_first" if backgrounds[0] == 0 else "background_last")
    if HELDOUT_WORDS.intersection(tokens):
        forms.add("heldout_word")
    return frozenset(forms)


