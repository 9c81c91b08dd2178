"""Layout models: object slots, the layout planner, its training and evaluation, and a denoiser shown a layout."""

import json
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kinetoscope.cli import main
from kinetoscope.data import captions, world
from kinetoscope.data.layout import (MAX_OBJECTS, SILHOUETTE_CELLS, SLOT_FEATURES, SLOT_IDENTITY_TOKEN_FEATURES, SLOT_TOKEN_FEATURES, in_mention_order, layout_inputs,
                                     plan_states, scene_to_slots, silhouette_channels, silhouette_maps, slot_columns, slots_to_objects)
from kinetoscope.models.dit import DiffusionTransformer, config_for
from kinetoscope.models.planner import LayoutPlanner, PlannerConfig, PlanScorer, canvas_condition
from kinetoscope.pipelines.text_to_video import TextToVideo
from kinetoscope.training.common import RecipeError
from kinetoscope.training.planner import PlanBatches, contradict, planner_loss, scorer_loss, start_from, train as train_planner

sys.path.insert(0, str(Path(__file__).parent))
from test_training import TINY_RECIPE  # noqa: E402

TINY_PLANNER = PlannerConfig(dim=32, depth=1, heads=2)
PLANNER_RECIPE = """
[model]
dim = 32
depth = 1
heads = 2

[data]
buckets = ["64x64x17", "96x64x1"]
fps = 8.0
batch_size = 8
seed = 5

[train]
steps = 3
lr = 1e-3
warmup = 1
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.9
reuse = 1
seed = 0
log_every = 1
eval_every = 1000
checkpoint_minutes = 100
output = "unused"

[eval]
per_tier = 2
"""


def test_slots_hold_every_object_exactly_and_read_back_in_any_order():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = world.sample_scene(rng, 1.5, 2.0)
        slots = scene_to_slots(scene.objects)
        assert slots.shape == (MAX_OBJECTS, SLOT_FEATURES)
        assert (slots[:, 0] > 0).sum() == len(scene.objects)
        objects = slots_to_objects(slots[rng.permutation(MAX_OBJECTS)])
        key = lambda o: (o.color, o.start)  # noqa: E731
        assert [(o.color, o.shape, o.size, o.motion, o.speed) for o in sorted(objects, key=key)] == \
            [(o.color, o.shape, o.size, o.motion, o.speed) for o in sorted(scene.objects, key=key)]
        for read, true in zip(sorted(objects, key=key), sorted(scene.objects, key=key)):
            assert read.start == pytest.approx(true.start, abs=1e-6)
    with pytest.raises(ValueError, match="at most 3 objects"):
        scene_to_slots(scene.objects * 4)


def test_slots_read_as_the_world_allows():
    circle = world.ShapeObject("red", "circle", "small", "spin", None, (0.5, 0.5))  # no circle spins
    slots = scene_to_slots([circle])
    spin = 1 + 8 + 3 + 3 + world.MOTIONS.index("spin")
    slots[0, spin], slots[0, 1 + 8 + 3 + 3 + world.MOTIONS.index("left")] = 1.0, 0.5
    slots[0, -2:] = [1.7, -3.0]  # a start off the canvas is brought back onto it
    (read,) = slots_to_objects(slots)
    assert read.motion == "left" and read.speed in world.SPEEDS and read.start == (1.0, 0.0)
    still = scene_to_slots([world.ShapeObject("red", "square", "small", "grow", None, (0.5, 0.5))])
    still[0, -4:-2] = [1.0, -1.0]  # a speed means nothing to an object that does not travel
    assert slots_to_objects(still)[0].speed is None


def test_slots_follow_the_order_the_caption_names_the_objects():
    red = world.ShapeObject("red", "circle", "small", "still", None, (0.2, 0.5))
    blue = world.ShapeObject("blue", "square", "large", "up", "slow", (0.7, 0.6))
    pinks = [world.ShapeObject("pink", "triangle", "small", "grow", None, (x, 0.2)) for x in (0.3, 0.7)]
    assert in_mention_order([red, *pinks], "two pink triangles grow while a red ball stays still") == [*pinks, red]
    assert in_mention_order([blue, red], "a red circle is left of a blue box") == [red, blue]
    assert in_mention_order([red, blue], "a big blue box rises slowly; a red ball stays still") == [blue, red]


def test_the_planner_tells_its_slots_apart_and_hears_the_canvas():
    torch.manual_seed(0)
    planner = LayoutPlanner(TINY_PLANNER)
    for parameter in planner.parameters():  # past adaLN-Zero's silent start
        torch.nn.init.normal_(parameter, std=0.2)
    text, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)
    canvas = torch.stack([canvas_condition(64, 64, 2.0), canvas_condition(96, 64, 0.0)])
    slots, t = torch.randn(1, 3, SLOT_FEATURES).expand(2, -1, -1), torch.tensor([0.3, 0.3])
    out = planner(slots, t, text, mask, canvas)
    assert out.shape == slots.shape
    same = slots[:, :1].expand(-1, 3, -1)  # three slots alike but for their place
    alike = planner(same, t, text, mask, canvas)
    assert not torch.allclose(alike[:, 0], alike[:, 1])
    assert not torch.allclose(planner(slots, t, text, mask, canvas.flip(0)), out)  # the canvas matters


def test_attribute_tokens_read_a_slots_motion_from_the_words_alone_never_from_its_shape():
    torch.manual_seed(0)
    planner = LayoutPlanner(replace(TINY_PLANNER, token_features=SLOT_TOKEN_FEATURES))
    for parameter in planner.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    text, mask = torch.randn(1, 5, 384), torch.ones(1, 5, dtype=torch.bool)
    canvas, t = canvas_condition(64, 64, 2.0)[None], torch.tensor([0.5])
    what, how, where = np.split(np.arange(SLOT_FEATURES), np.cumsum(SLOT_TOKEN_FEATURES)[:-1])
    slots = torch.randn(1, MAX_OBJECTS, SLOT_FEATURES)
    out = planner(slots, t, text, mask, canvas)
    for changed, unmoved in ((what, how), (how, what)):
        other = slots.clone()
        other[..., changed] = torch.randn(1, MAX_OBJECTS, len(changed))  # every slot's shape (or motion) redrawn
        moved = planner(other, t, text, mask, canvas)
        assert torch.allclose(moved[..., unmoved], out[..., unmoved], atol=1e-6)
        assert not torch.allclose(moved[..., where], out[..., where])  # where it starts hears both
    assert not torch.allclose(planner(slots, t, torch.randn(1, 5, 384), mask, canvas)[..., how], out[..., how])  # the words decide
    with pytest.raises(ValueError, match="token_features"):
        LayoutPlanner(replace(TINY_PLANNER, token_features=(5, 5)))


def test_an_identity_kind_lets_a_slots_motion_read_its_colour_and_still_never_its_shape():
    torch.manual_seed(0)
    planner = LayoutPlanner(replace(TINY_PLANNER, token_features=SLOT_IDENTITY_TOKEN_FEATURES, identity_kind=True))
    for parameter in planner.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    text, mask = torch.randn(1, 5, 384), torch.ones(1, 5, dtype=torch.bool)
    canvas, t = canvas_condition(64, 64, 2.0)[None], torch.tensor([0.5])
    identity, what, how, where = np.split(np.arange(SLOT_FEATURES), np.cumsum(SLOT_IDENTITY_TOKEN_FEATURES)[:-1])
    assert list(identity) == [0, *range(SLOT_FEATURES)[slot_columns("color")]]
    slots = torch.randn(1, MAX_OBJECTS, SLOT_FEATURES)
    out = planner(slots, t, text, mask, canvas)
    reshaped, recoloured = slots.clone(), slots.clone()
    reshaped[..., what] = torch.randn(1, MAX_OBJECTS, len(what))  # every slot's shape and size redrawn
    recoloured[..., identity] = torch.randn(1, MAX_OBJECTS, len(identity))
    moved = planner(reshaped, t, text, mask, canvas)
    for columns in (identity, how):
        assert torch.allclose(moved[..., columns], out[..., columns], atol=1e-6)
    assert not torch.allclose(moved[..., where], out[..., where])
    assert not torch.allclose(planner(recoloured, t, text, mask, canvas)[..., how], out[..., how])  # motion hears the colour
    with pytest.raises(ValueError, match="identity_kind"):
        LayoutPlanner(replace(TINY_PLANNER, identity_kind=True))


def test_a_planner_with_one_token_per_slot_starts_one_with_attribute_tokens_and_back(tmp_path):
    recipe = tmp_path / "planner.toml"
    recipe.write_text(PLANNER_RECIPE)
    first = train_planner(str(recipe), output=str(tmp_path / "first"), steps=1)
    recipe.write_text(PLANNER_RECIPE.replace("heads = 2", f"heads = 2\nattribute_tokens = true\ninit = '{first}'"))
    exported = train_planner(str(recipe), output=str(tmp_path / "tokens"), steps=1)
    final = LayoutPlanner.from_pretrained(exported)
    assert final.cfg.token_features == SLOT_TOKEN_FEATURES and final.visible is not None
    recipe.write_text(PLANNER_RECIPE.replace("heads = 2", f"heads = 2\ninit = '{exported}'"))  # and back
    assert LayoutPlanner.from_pretrained(train_planner(str(recipe), output=str(tmp_path / "back"), steps=1)).visible is None
    recipe.write_text(PLANNER_RECIPE.replace("heads = 2", f"heads = 2\nattribute_tokens = true\nidentity_token = true\ninit = '{exported}'"))
    identified = LayoutPlanner.from_pretrained(train_planner(str(recipe), output=str(tmp_path / "identity"), steps=1))
    assert identified.cfg.identity_kind and identified.cfg.token_features == SLOT_IDENTITY_TOKEN_FEATURES
    torch.testing.assert_close(identified.blocks[0].cross.proj.weight, final.blocks[0].cross.proj.weight, atol=0.05, rtol=0)  # one step on
    assert_refused(recipe, tmp_path / "other", ((PLANNER_RECIPE.replace("heads = 2", "heads = 2\nattribute_tokens = 1"),
                                                 "attribute_tokens must be true or false"),
                                                (PLANNER_RECIPE.replace("heads = 2", "heads = 2\nidentity_token = true"),
                                                 "identity_token must be true \\(with attribute_tokens"),
                                                (PLANNER_RECIPE.replace("heads = 2", f"heads = 2\ninit = '{exported}'").replace("depth = 1", "depth = 2"),
                                                 "init")))


def test_text_layers_start_as_the_identity_and_let_the_words_look_at_each_other(tmp_path):
    recipe = tmp_path / "planner.toml"
    recipe.write_text(PLANNER_RECIPE)
    first = train_planner(str(recipe), output=str(tmp_path / "first"), steps=1)
    recipe.write_text(PLANNER_RECIPE.replace("heads = 2", f"heads = 2\ntext_layers = 1\ninit = '{first}'"))
    layered = LayoutPlanner(replace(TINY_PLANNER, text_layers=1))
    start_from(layered, str(first))
    plain = LayoutPlanner.from_pretrained(first)
    slots, t, canvas = torch.randn(2, 3, SLOT_FEATURES), torch.rand(2), torch.randn(2, 2)
    text, mask = torch.randn(2, 5, 384), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    torch.testing.assert_close(layered.eval()(slots, t, text, mask, canvas), plain(slots, t, text, mask, canvas))
    exported = LayoutPlanner.from_pretrained(train_planner(str(recipe), output=str(tmp_path / "layered"), steps=2))
    assert exported.cfg.text_layers == 1 and not torch.equal(exported.text_layers[0].linear2.weight, torch.zeros_like(exported.text_layers[0].linear2.weight))
    later = text.clone()
    later[0, 4] = torch.randn(384)  # a later word changes what the first one carries to the slots
    refined = [exported.text_layers[0](exported.text_in(words))[0, 0] for words in (text, later)]
    assert not torch.allclose(*refined)


def test_mentions_pair_each_word_with_its_repeats_and_a_planner_reading_them_starts_as_one_that_does_not(tmp_path):
    from kinetoscope.models.text_encoder import TextEncoder

    encoder = TextEncoder.load("cpu")
    prompts = ["a red kite left of a blue lamp; the lamp shrinks", "a ball"]
    mentions = encoder.mentions(prompts)
    states, mask = encoder.encode(prompts)
    assert mentions.shape == (2, states.shape[1], states.shape[1])
    words = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(prompts[0])["input_ids"])
    pairs = {(words[i], words[j]) for i, j in mentions[0].nonzero().tolist()}
    assert pairs == {("a", "a"), ("lamp", "lamp")}  # never a word with itself, never padding
    assert not mentions[1].any() and mentions[0].sum() == 4

    recipe = tmp_path / "planner.toml"
    recipe.write_text(PLANNER_RECIPE)
    first = train_planner(str(recipe), output=str(tmp_path / "first"), steps=1)
    reading = LayoutPlanner(replace(TINY_PLANNER, mentions=True))
    start_from(reading, str(first))
    slots, t, canvas = torch.randn(2, 3, SLOT_FEATURES), torch.rand(2), torch.randn(2, 2)
    torch.testing.assert_close(reading.eval()(slots, t, states, mask, canvas, mentions), LayoutPlanner.from_pretrained(first)(slots, t, states, mask, canvas))
    with pytest.raises(ValueError, match="needs mentions"):
        reading(slots, t, states, mask, canvas)
    recipe.write_text(PLANNER_RECIPE.replace("heads = 2", f"heads = 2\nmentions = true\ninit = '{first}'"))
    exported = LayoutPlanner.from_pretrained(train_planner(str(recipe), output=str(tmp_path / "mentions"), steps=2))
    assert exported.cfg.mentions and exported.mention_proj.weight.abs().sum() > 0
    # Once trained, the pairs change the plans: the same words without them plan otherwise.
    paired, unpaired = (exported.eval()(slots, t, states, mask, canvas, pairs_of) for pairs_of in (mentions, torch.zeros_like(mentions)))
    assert not torch.allclose(paired, unpaired)
    assert_refused(recipe, tmp_path / "other", ((PLANNER_RECIPE.replace("heads = 2", "heads = 2\nmentions = 1"), "mentions must be true or false"),))


def test_the_binding_probe_asks_true_captions_four_ways_and_counts_right_and_swapped_draws(monkeypatch, capsys):
    from kinetoscope.eval import binding
    from kinetoscope.models.text_encoder import TextEncoder

    prompts = binding.binding_prompts(6)
    assert len(prompts) == 24 and [item.way for item in prompts[:4]] == list(binding.WAYS)
    for item in prompts:
        if item.way[0] == "shape nouns":  # the parser knows no stand-in; shape nouns make a caption it reads exactly
            stated = captions.parse_prompt(item.prompt)
            assert {obj.color: obj.motion for obj in stated.objects} == dict(zip(item.colors, item.motions))
            assert not captions.is_heldout_scene(world.Scene(tuple(
                replace(obj, size="small", speed="slow" if obj.motion in world.LINEAR_MOTIONS else None, start=(0.5, 0.5))
                for obj in stated.objects), "black"))
        assert item.prompt.index(item.colors[0]) < item.prompt.index(item.colors[1])

    def plans(planner, text, mask, *args, mentions=None, **kwargs):  # draw i gives the motions the right way round if i is even
        item = next(item for item in prompts if item.prompt == asked[-1])
        return [tuple(world.ShapeObject(color, "square", "small", motion, None, (0.5, 0.5))
                      for color, motion in zip(item.colors, item.motions if draw % 2 == 0 else item.motions[::-1]))
                for draw in range(text.shape[0])]

    asked = []
    encoder = TextEncoder.load("cpu")
    monkeypatch.setattr(encoder, "encode", lambda texts, _encode=encoder.encode: asked.append(texts[0]) or _encode(texts))
    monkeypatch.setattr(binding, "plan_objects", plans)
    rates = binding.binding_rates(None, encoder, count=6, draws=3)
    assert rates["stand-ins"]["other order"] == {"right": 12, "swapped": 6, "draws": 18}
    assert main(["planner", "binding", "--weights", "/nowhere"]) == 2
    assert "no layout planner checkpoint" in capsys.readouterr().err


class RecordingEncoder:
    """A text encoder for planner batches that records the texts it encodes."""

    def encode(self, texts):
        self.texts = texts
        return torch.zeros(len(texts), 4, 384), torch.ones(len(texts), 4, dtype=torch.bool)

    def mentions(self, texts):
        return torch.zeros(len(texts), 4, 4, dtype=torch.bool)


def test_lead_ins_move_a_caption_along_and_leave_its_slots_in_mention_order():
    from kinetoscope.training.planner import LEAD_INS, SceneBatches

    led = RecordingEncoder()
    slots = SceneBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 6, "seed": 3, "lead_in_rate": 1.0}, led, seed=3)()[0]
    for text, rows in zip(led.texts, slots.numpy()):
        lead_in = next(lead_in for lead_in in LEAD_INS if text.startswith(lead_in))
        named = [obj.color for obj in captions.parse_prompt(text[len(lead_in):]).objects]
        assert list(dict.fromkeys(obj.color for obj in slots_to_objects(rows))) == list(dict.fromkeys(named))  # a group fills slots in turn
    assert not set(captions._tokenize(" ".join(LEAD_INS))) & (captions.HELDOUT_WORDS | set(world.COLORS) | {"background", "there"})


def test_paraphrases_put_every_verb_in_other_words_of_its_motion_and_leave_the_rest():
    from kinetoscope.training.planner import PARAPHRASES, SceneBatches, paraphrase_verbs

    rng = np.random.default_rng(5)
    caption = "a tiny blue square is bouncing, two cyan boxes do not move while a purple block slowly moves right on white"
    assert paraphrase_verbs(caption, rng, 0.0) == caption
    swapped = paraphrase_verbs(caption, rng, 1.0)
    bounce = {forms[2] for forms in PARAPHRASES["bounce"]}
    still = {forms[1] for forms in PARAPHRASES["still"]}  # the plural, as "two ... boxes" asks
    travel = {forms[0] for forms in PARAPHRASES[captions.LINEAR]}
    pattern = r"a tiny blue square is (.+), two cyan boxes (.+) while a purple block slowly (.+) right on white"
    verbs = re.fullmatch(pattern, swapped).groups()
    assert verbs[0] in bounce and verbs[1] in still and verbs[2] in travel

    seen = RecordingEncoder()
    SceneBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 40, "seed": 3, "paraphrase_rate": 1.0}, seen, seed=3)()
    tokens = set(captions._tokenize(" ".join(seen.texts)))
    grammar_verbs = {"moves", "move", "slides", "slide", "travels", "bounces", "hops", "grows", "shrinks", "spins", "twirls", "rests"}
    assert not tokens & grammar_verbs  # every verb in other words
    words = {word for choices in PARAPHRASES.values() for forms in choices for form in forms for word in captions._tokenize(form)}
    assert not words & (captions.HELDOUT_WORDS | set(world.COLORS))  # and none of them held out
    assert set(PARAPHRASES) == {verb.motion for verb in captions.VERBS}


def test_stand_ins_name_each_shape_by_one_word_that_says_nothing_of_it_and_leave_its_shape_unsaid():
    from kinetoscope.training.planner import STAND_INS, SceneBatches, stand_in_nouns

    caption = "a green triangle starts right of a purple block; two red boxes bounce and the triangle is twirling"
    named = re.fullmatch(r"a green (\w+) starts right of a purple (\w+); two red (\w+) bounce and the (\w+) is twirling",
                         stand_in_nouns(caption, np.random.default_rng(2))).groups()
    singular = {forms[0]: forms[1] for forms in STAND_INS}
    assert named[0] == named[3] and singular[named[1]] == named[2] and named[0] != named[1]  # one word per shape, in its number

    seen = RecordingEncoder()
    slots = SceneBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 30, "seed": 3, "stand_in_rate": 1.0}, seen, seed=3)()[0]
    shape_words = {form for noun in captions.NOUNS for form in (noun.singular, noun.plural)}
    assert not set(captions._tokenize(" ".join(seen.texts))) & shape_words
    assert (slots[..., slot_columns("shape")] == 0).all() and (slots[..., slot_columns("color")].abs() == 1).any()
    words = {form for forms in STAND_INS for form in forms}
    assert not words & (captions.KNOWN_WORDS | captions.HELDOUT_WORDS)  # no word a prompt could mean otherwise


def test_relation_rate_draws_scenes_until_their_captions_state_a_relation():
    from kinetoscope.training.planner import SceneBatches

    def stated_relations(rate):
        seen = RecordingEncoder()
        SceneBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 40, "seed": 3, "relation_rate": rate}, seen, seed=3)()
        return sum(captions.parse_prompt(text).relation is not None for text in seen.texts)

    assert stated_relations(1.0) == 40
    assert stated_relations(0.0) < 20  # about one caption in eight states one unasked


def test_relation_rate_can_spare_captions_of_one_object():
    from kinetoscope.training.planner import SceneBatches

    def captions_read(rate, spares):
        seen = RecordingEncoder()
        SceneBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 200, "seed": 3, "relation_rate": rate,
                      "relation_spares_one_object": spares}, seen, seed=3)()
        return [captions.parse_prompt(text) for text in seen.texts]

    def one_object(stated):
        return sum(len(s.objects) == 1 for s in stated)

    spared, unasked = captions_read(1.0, True), captions_read(0.0, True)
    assert all(s.relation is not None for s in spared if len(s.objects) > 1)
    # a caption of one object is kept as first drawn: about 44% name one, asked for relations or not
    assert 60 < one_object(spared) < 120 and 60 < one_object(unasked) < 120
    assert one_object(captions_read(1.0, False)) == 0
    with pytest.raises(RecipeError, match="relation_spares_one_object must be true or false"):
        captions_read(1.0, "yes")


def test_planner_steps_lower_its_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    planner = LayoutPlanner(TINY_PLANNER)
    rng = np.random.default_rng(1)
    slots = torch.from_numpy(np.stack([scene_to_slots(world.sample_scene(rng).objects) for _ in range(16)]))
    text, mask = torch.randn(16, 6, 384), torch.ones(16, 6, dtype=torch.bool)
    canvas = canvas_condition(64, 64, 2.0).expand(16, -1)
    optimizer = torch.optim.Adam(planner.parameters(), lr=3e-3)

    def loss():
        return planner_loss(planner, slots, text, mask, canvas, torch.Generator().manual_seed(7))

    before = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.6 * before


def test_the_planner_loss_weighs_the_starts_as_asked():
    from kinetoscope.diffusion.rectified_flow import velocity_target

    planner = LayoutPlanner(TINY_PLANNER)  # its output layer starts at zero: the loss is the target's own square
    slots = torch.from_numpy(np.stack([scene_to_slots(world.sample_scene(np.random.default_rng(i)).objects) for i in range(4)]))
    text, mask, canvas = torch.randn(4, 6, 384), torch.ones(4, 6, dtype=torch.bool), canvas_condition(64, 64, 2.0).expand(4, -1)
    for weight in (1.0, 4.0):
        loss = planner_loss(planner, slots, text, mask, canvas, torch.Generator().manual_seed(7), start_weight=weight)
        generator = torch.Generator().manual_seed(7)
        torch.randn(4, generator=generator)
        squared = velocity_target(slots, torch.randn(slots.shape, generator=generator)) ** 2
        expected = (squared[..., :-2].sum() + weight * squared[..., -2:].sum()) / (squared[..., 0].numel() * (SLOT_FEATURES - 2 + 2 * weight))
        torch.testing.assert_close(loss, expected)


def assert_refused(recipe, output, cases):
    """Each (recipe text, error pattern) refused before training starts."""
    for text, error in cases:
        recipe.write_text(text)
        with pytest.raises(RecipeError, match=error):
            train_planner(str(recipe), output=str(output))


def test_planner_training_resumes_exports_and_is_scored_by_the_judge(tmp_path, capsys):
    recipe = tmp_path / "planner.toml"
    recipe.write_text(PLANNER_RECIPE)
    output = tmp_path / "run"
    final = train_planner(str(recipe), output=str(output))
    assert LayoutPlanner.from_pretrained(final).cfg.dim == 32
    assert json.loads((final / "config.json").read_text())["trained_steps"] == 3
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "eval_fully_right unseen phrasings" in records[-1] and (output / "loss.png").is_file()
    train_planner(str(recipe), output=str(output), steps=5)  # resumes at 3
    assert json.loads((output / "final" / "config.json").read_text())["trained_steps"] == 5
    with pytest.raises(RecipeError, match="different recipe"):
        recipe.write_text(PLANNER_RECIPE.replace("lr = 1e-3", "lr = 2e-3"))
        train_planner(str(recipe), output=str(output), steps=6)
    assert_refused(recipe, tmp_path / "other", ((PLANNER_RECIPE.replace("batch_size = 8", "batch_size = 0"), "batch_size"),
                                                (PLANNER_RECIPE.replace("reuse = 1", "reuse = 1\nstart_weight = 0"), "start_weight"),
                                                (PLANNER_RECIPE.replace("seed = 5", "seed = 5\nlead_in_rate = 1.5"), "lead_in_rate"),
                                                (PLANNER_RECIPE.replace("seed = 5", "seed = 5\nparaphrase_rate = -0.1"), "paraphrase_rate")))

    report = tmp_path / "plans.json"
    assert main(["planner", "eval", "--weights", str(final), "--per-tier", "3", "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert {tier: scores["prompts"] for tier, scores in result["tiers"].items()} == {"unseen combinations": 3, "unseen phrasings": 3}
    assert "prompts fully right" in capsys.readouterr().out
    assert result["guidance"] == 1.0
    assert main(["planner", "eval", "--weights", str(final), "--guidance", "-1"]) == 2
    assert "guidance must be between" in capsys.readouterr().err
    assert main(["planner", "eval", "--weights", str(tmp_path / "nowhere")]) == 2
    assert "no layout planner checkpoint" in capsys.readouterr().err


def test_planner_reads_each_prompt_once_for_all_the_rows_it_conditions():
    torch.manual_seed(0)
    planner = LayoutPlanner(TINY_PLANNER)
    for parameter in planner.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    text, mask = torch.randn(2, 5, 384), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    slots, t, canvas = torch.randn(6, 3, SLOT_FEATURES), torch.rand(6), torch.randn(6, 2)
    each_row = planner(slots, t, text.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), canvas)
    torch.testing.assert_close(planner(slots, t, text, mask, canvas), each_row)  # prompt i conditions rows 3i..3i+2
    with pytest.raises(ValueError, match="2 prompts cannot each condition an equal share of 5 rows"):
        planner(slots[:5], t[:5], text, mask, canvas[:5])


def test_planner_guidance_weighs_the_prompt_against_the_empty_prompt_it_was_trained_to_answer(monkeypatch):
    from kinetoscope.pipelines import layout as planning

    torch.manual_seed(0)
    planner = LayoutPlanner(replace(TINY_PLANNER, guidance=3.0))
    for parameter in planner.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    text, mask = torch.randn(2, 5, 384), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    dropped_text, dropped_mask = planner.drop_text(text, mask, torch.tensor([False, True]))
    assert torch.equal(dropped_text[0], text[0]) and torch.equal(dropped_mask[0], mask[0])
    assert not dropped_text[1].any() and dropped_mask[1].tolist() == [True, False, False, False, False]
    slots, t, canvas = torch.randn(1, 3, SLOT_FEATURES), torch.tensor([0.4]), canvas_condition(64, 64, 2.0)[None]
    empty = planner.drop_text(text[:1], mask[:1], torch.tensor([True]))
    other_empty = planner.drop_text(torch.randn(1, 5, 384), mask[:1], torch.tensor([True]))
    torch.testing.assert_close(planner(slots, t, *empty, canvas), planner(slots, t, *other_empty, canvas))  # no prompt shows through

    seen = {}
    monkeypatch.setattr(planning, "euler_sample", lambda velocity, noise, times: seen.setdefault("v", velocity(noise, times[0].expand(len(noise)))))
    planning.plan_objects(planner, text[:1], mask[:1], 64, 64, 2.0, torch.Generator().manual_seed(1), tries=2)
    noise = torch.randn((2, 3, SLOT_FEATURES), generator=torch.Generator().manual_seed(1))
    conditional = planner(noise, torch.ones(2), text[:1].expand(2, -1, -1), mask[:1].expand(2, -1), canvas.expand(2, -1))
    unconditional = planner(noise, torch.ones(2), *(v.expand(2, *v.shape[1:]) for v in empty), canvas.expand(2, -1))
    torch.testing.assert_close(seen.pop("v"), unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4)  # the planner's own guidance
    planning.plan_objects(planner, text[:1], mask[:1], 64, 64, 2.0, torch.Generator().manual_seed(1), tries=2, guidance=1.0)
    torch.testing.assert_close(seen.pop("v"), conditional, rtol=1e-4, atol=1e-4)  # guidance 1: the prompt alone, in one pass

    rng = np.random.default_rng(1)
    scenes = torch.from_numpy(np.stack([scene_to_slots(world.sample_scene(rng).objects) for _ in range(4)]))
    canvases = canvas.expand(4, -1)
    losses = [planner_loss(planner, scenes, prompts, torch.ones(4, 5, dtype=torch.bool), canvases, torch.Generator().manual_seed(7),
                           caption_dropout=0.999) for prompts in (torch.randn(4, 5, 384), torch.randn(4, 5, 384))]
    torch.testing.assert_close(*losses)  # every caption dropped: the loss of the empty prompt's plans


def test_planner_training_continues_from_exported_weights_with_caption_dropout(tmp_path):
    recipe = tmp_path / "planner.toml"
    recipe.write_text(PLANNER_RECIPE)
    first = train_planner(str(recipe), output=str(tmp_path / "first"), steps=1)
    guided = PLANNER_RECIPE.replace("heads = 2", f"heads = 2\nguidance = 2.5\ninit = '{first}'").replace("reuse = 1", "reuse = 1\ncaption_dropout = 0.2")
    recipe.write_text(guided)
    final = train_planner(str(recipe), output=str(tmp_path / "guided"), steps=1)
    continued = LayoutPlanner.from_pretrained(final)
    assert continued.cfg.guidance == 2.5
    assert any(not torch.equal(a, b) for a, b in zip(continued.state_dict().values(), LayoutPlanner.from_pretrained(first).state_dict().values()))
    assert_refused(recipe, tmp_path / "other", ((guided.replace("caption_dropout = 0.2", "caption_dropout = 0"), "needs \\[train\\] caption_dropout"),
                                                (guided.replace("caption_dropout = 0.2", "caption_dropout = 1"), "caption_dropout must be"),
                                                (guided.replace("dim = 32", "dim = 64"), "init")))


def test_a_layout_input_starts_silent_and_only_a_layout_model_takes_one():
    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", depth=1, latent_channels=4, layout_channels=11)).eval()
    latents, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    text, mask = torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool)
    layout = torch.rand(1, model.token_count(latents.shape), 11)
    for parameter in model.parameters():  # past adaLN-Zero's silent start
        if parameter is not model.layout_in.weight:
            torch.nn.init.normal_(parameter, std=0.1)
    plain = model(latents, t, text, mask)
    assert torch.equal(model(latents, t, text, mask, layout=layout), plain)  # silent until trained
    assert torch.equal(model(latents, t, text, mask, layout=torch.zeros_like(layout)), plain)  # no bias: zeros are no layout
    torch.nn.init.normal_(model.layout_in.weight, std=0.1)
    assert not torch.allclose(model(latents, t, text, mask, layout=layout), plain)
    other = DiffusionTransformer(config_for("tiny", depth=1, latent_channels=4))
    with pytest.raises(ValueError, match="takes no layout"):
        other(latents, t, text, mask, layout=layout)


def test_silhouettes_draw_what_each_colour_covers_in_every_frame_of_a_latent_step():
    square = world.ShapeObject("blue", "square", "large", "right", "fast", (0.3, 0.5))
    circle = world.ShapeObject("red", "circle", "small", "still", None, (0.8, 0.2))
    assert silhouette_channels(4) == 8 * 4 * SILHOUETTE_CELLS ** 2
    maps = silhouette_maps([(square, circle)], (192, 128), 17, 8.0, (5, 8, 12), 4)
    assert maps.shape == (1, 5 * 8 * 12, silhouette_channels(4))
    # Back to pictures: (colour, frame, rows, cols) at 4 cells a token, the first step's frame once.
    cells = maps[0].reshape(5, 8, 12, 8, 4, 4, 4).permute(3, 0, 4, 1, 5, 2, 6).reshape(8, 20, 32, 48)
    cells = torch.cat([cells[:, :1], cells[:, 4:]], dim=1)  # (colour, 17 frames, 32, 48)
    colors = list(world.COLORS)
    for index, obj in enumerate((square, circle)):
        drawn = cells[colors.index(obj.color)].numpy()
        assert np.allclose(drawn, world.coverage(obj, 48, 32, 17, 8.0), atol=1e-6)  # each frame as the world draws it
    assert cells[[c for c in range(8) if colors[c] not in ("blue", "red")]].max() == 0
    area = cells[colors.index("blue")].sum(dim=(1, 2))
    assert torch.allclose(area, area[0], rtol=0.05)  # a moving square keeps its area
    columns = cells[colors.index("blue")].sum(dim=1).argmax(dim=1)
    assert columns[16] > columns[8] > columns[0]  # and travels right, frame by frame
    picture = silhouette_maps([(square,)], (192, 128), 1, 8.0, (1, 8, 12), 4)[0].reshape(8, 12, 8, 4, 4, 4)
    assert all(torch.equal(picture[..., k, :, :], picture[..., 0, :, :]) for k in range(4))  # an image: its frame in every slot
    with pytest.raises(ValueError, match="do not make 5 latent steps of 4 frames"):
        silhouette_maps([(square,)], (192, 128), 16, 8.0, (5, 8, 12), 4)
    both = layout_inputs([(square, circle)], (192, 128), 17, 8.0, (5, 8, 12), 4)
    assert both.shape[-1] == 11 + silhouette_channels(4) and torch.equal(both[..., 11:], maps)
    assert layout_inputs([(square,)], (192, 128), 17, 8.0, (5, 8, 12), None).shape[-1] == 11


def test_a_silhouette_input_grows_from_a_layout_model_and_counts_once_trained(tmp_path):
    from kinetoscope.training.generator import start_from

    torch.manual_seed(0)
    layout_model = DiffusionTransformer(config_for("tiny", depth=1, latent_channels=4, layout_channels=11))
    for parameter in layout_model.parameters():  # past adaLN-Zero's silent start
        torch.nn.init.normal_(parameter, std=0.1)
    layout_model.save_pretrained(tmp_path / "layout")
    grown = DiffusionTransformer(replace(layout_model.cfg, silhouette_channels=64)).eval()
    start_from(grown, str(tmp_path / "layout"))
    latents, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    text, mask = torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool)
    heatmaps, silhouettes = torch.rand(1, 8, 11), torch.rand(1, 8, 64)
    with torch.no_grad():
        before = layout_model.eval()(latents, t, text, mask, layout=heatmaps)
        assert torch.equal(grown(latents, t, text, mask, layout=torch.cat([heatmaps, silhouettes], -1)), before)  # silent until trained
        torch.nn.init.normal_(grown.silhouette_in.weight, std=0.1)
        assert not torch.allclose(grown(latents, t, text, mask, layout=torch.cat([heatmaps, silhouettes], -1)), before)
        with pytest.raises(ValueError, match="11 heatmap and 64 silhouette channels per token, not 11"):
            grown(latents, t, text, mask, layout=heatmaps)
    with pytest.raises(ValueError, match="needs layout_channels too"):
        config_for("tiny", silhouette_channels=64)


def test_a_silhouette_model_trains_samples_and_is_refused_a_count_its_autoencoder_does_not_make(tmp_path):
    torch.manual_seed(0)
    planner_dir = tmp_path / "planner"
    LayoutPlanner(TINY_PLANNER).save_pretrained(planner_dir)
    final = train_generator_run(layout_recipe(tmp_path, planner_dir, "depth = 1, layout_channels = 11, silhouette_channels = 512"),
                                tmp_path / "run")
    pipe = TextToVideo.load(final)
    assert pipe.transformer.cfg.silhouette_channels == silhouette_channels(pipe.autoencoder.cfg.temporal_factor) == 512
    torch.nn.init.normal_(pipe.transformer.silhouette_in.weight)  # two steps leave it near its zero start: make it count
    small = (world.ShapeObject("red", "square", "small", "still", None, (0.5, 0.5)),)
    large = (world.ShapeObject("red", "square", "large", "still", None, (0.5, 0.5)),)  # the same centre: only the silhouette differs
    one, other = (pipe("a red square", width=32, height=32, frames=5, steps=2, seed=4, plan=list(plan)) for plan in (small, large))
    assert one.frames.shape == (5, 32, 32, 3) and not np.array_equal(one.frames, other.frames)
    with pytest.raises(RecipeError, match="silhouette_channels must be 512"):
        train_generator_run(layout_recipe(tmp_path, planner_dir, "depth = 1, layout_channels = 11, silhouette_channels = 64"),
                            tmp_path / "wrong")
    odd = DiffusionTransformer(replace(pipe.transformer.cfg, silhouette_channels=64))
    with pytest.raises(ValueError, match="draws 512"):
        TextToVideo(odd, pipe.autoencoder, pipe.text_encoder, planner=pipe.planner)


def test_object_weight_weighs_the_loss_at_the_tokens_an_object_covers(tmp_path):
    from kinetoscope.diffusion.rectified_flow import FlowSchedule
    from kinetoscope.training.generator import diffusion_loss, object_token_weights

    square = world.ShapeObject("blue", "square", "large", "right", "fast", (0.3, 0.5))
    shown = layout_inputs([(square,)], (64, 64), 17, 8.0, (5, 4, 4), 4)
    weights = object_token_weights(shown, 3.0)
    cover = shown[..., 11:].amax(-1)
    assert torch.equal(weights, 1 + 3 * cover) and weights.min() == 1 and weights.max() == 4  # fully covered cells: 1 + W
    assert 0 < (weights > 1).float().mean() < 0.5  # the background keeps weight 1
    assert ((weights.view(5, 4, 4) > 1).sum(dim=(1, 2)) > 0).all()  # the object in every latent step

    torch.manual_seed(0)
    model = DiffusionTransformer(config_for("tiny", depth=1, latent_channels=4))
    for parameter in model.parameters():  # past adaLN-Zero's silent start, so tokens' errors differ
        torch.nn.init.normal_(parameter, std=0.1)
    latents, text, mask = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 3, 384), torch.ones(2, 3, dtype=torch.bool)
    tokens = model.token_count(latents.shape)

    def loss(weights=None):
        return diffusion_loss(model, latents, text, mask, FlowSchedule(), 0.0, torch.Generator().manual_seed(1), token_weights=weights)[0]

    plain = loss()
    assert torch.allclose(loss(torch.full((2, tokens), 5.0)), plain, rtol=1e-5)  # even weights: the plain mean
    each = torch.stack([loss(torch.eye(tokens)[k].expand(2, -1)) for k in range(tokens)])  # (tokens, 2): one token's error alone
    assert torch.allclose(each.mean(0), plain, rtol=1e-5) and each.std(0).min() > 0
    weights = torch.rand(2, tokens) + 0.5
    assert torch.allclose(loss(weights), (each.T * weights).sum(1) / weights.sum(1), rtol=1e-5)

    torch.manual_seed(0)
    planner_dir = tmp_path / "planner"
    LayoutPlanner(TINY_PLANNER).save_pretrained(planner_dir)
    silhouettes = "depth = 1, layout_channels = 11, silhouette_channels = 512"
    for setting, overrides, error in (("object_weight = 4", "depth = 1, layout_channels = 11", "finds the objects by their silhouettes"),
                                      ("object_weight = 0", silhouettes, "object_weight must be a positive weight, not 0"),
                                      ("object_weight = true", silhouettes, "not True")):
        recipe = layout_recipe(tmp_path, planner_dir, overrides)
        recipe.write_text(recipe.read_text().replace("[train]\n", f"[train]\n{setting}\n"))
        with pytest.raises(RecipeError, match=error):
            train_generator_run(recipe, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    recipe = layout_recipe(tmp_path, planner_dir, silhouettes)
    recipe.write_text(recipe.read_text().replace("[train]\n", "[train]\nobject_weight = 4\n"))
    assert TextToVideo.load(train_generator_run(recipe, tmp_path / "run")).transformer.cfg.silhouette_channels == 512


def layout_recipe(tmp_path, planner_dir, overrides="depth = 1, layout_channels = 11") -> Path:
    recipe = tmp_path / "layout.toml"
    recipe.write_text(TINY_RECIPE.replace("overrides = { depth = 1 }", f"overrides = {{ {overrides} }}\nplanner = \"{planner_dir}\""))
    return recipe


def test_a_layout_model_trains_on_true_layouts_and_samples_its_planners(tmp_path, capsys):
    torch.manual_seed(0)
    planner_dir = tmp_path / "planner"
    LayoutPlanner(TINY_PLANNER).save_pretrained(planner_dir)
    final = train_generator_run(layout_recipe(tmp_path, planner_dir), tmp_path / "run")
    assert json.loads((final / "pipeline.json").read_text())["planner"] == "planner"
    assert LayoutPlanner.from_pretrained(final / "planner").cfg.dim == 32
    pipe = TextToVideo.load(final)
    first = pipe("two small yellow squares slide up quickly", width=32, height=32, frames=5, steps=2, seed=4)
    again = pipe("two small yellow squares slide up quickly", width=32, height=32, frames=5, steps=2, seed=4)
    assert first.frames.shape == (5, 32, 32, 3) and np.array_equal(first.frames, again.frames)
    assert first.plan == again.plan and all(isinstance(obj, world.ShapeObject) for obj in first.plan)
    given = (world.ShapeObject("red", "circle", "large", "still", None, (0.3, 0.5)),)  # a layout set by hand
    torch.nn.init.normal_(pipe.transformer.layout_in.weight)  # two steps leave it near its zero start: make the layout count
    planned = pipe("two small yellow squares slide up quickly", width=32, height=32, frames=5, steps=2, seed=4)
    painted = pipe("two small yellow squares slide up quickly", width=32, height=32, frames=5, steps=2, seed=4, plan=list(given))
    assert painted.plan == given != planned.plan and not np.array_equal(painted.frames, planned.frames)
    for plan, message in (([], "1 to 3 objects"), (given * 4, "1 to 3 objects"), (["a red circle"], "sequence of Shapes World objects")):
        with pytest.raises(ValueError, match=message):
            pipe("a red circle", width=32, height=32, frames=5, steps=2, plan=plan)
    with pytest.raises(ValueError, match="needs its layout planner"):
        TextToVideo(pipe.transformer, pipe.autoencoder, pipe.text_encoder)
    PlanScorer(TINY_PLANNER).save_pretrained(final / "planner" / "scorer")  # a scorer in the planner's folder picks its plans
    scored = TextToVideo.load(final)
    assert isinstance(scored.plan_scorer, PlanScorer)
    with pytest.raises(ValueError, match="small_cost weighs the consensus of the plans; this model's plan scorer picks them"):
        TextToVideo(pipe.transformer, pipe.autoencoder, pipe.text_encoder, planner=pipe.planner, plan_scorer=scored.plan_scorer, small_cost=0.5)
    assert scored("a red square spins", width=32, height=32, frames=5, steps=1, seed=2).plan is not None
    with pytest.raises(ValueError, match="picks among a layout planner's plans"):
        TextToVideo(plain_transformer(pipe), pipe.autoencoder, pipe.text_encoder, plan_scorer=scored.plan_scorer)
    plain = plain_transformer(pipe)
    with pytest.raises(ValueError, match="serves only a transformer that takes a layout"):
        TextToVideo(plain, pipe.autoencoder, pipe.text_encoder, planner=pipe.planner)
    with pytest.raises(ValueError, match="takes no layout plan"):
        TextToVideo(plain, pipe.autoencoder, pipe.text_encoder)("a red circle", width=32, height=32, frames=5, steps=2, plan=given)
    report = tmp_path / "true.json"
    assert main(["eval", "--weights", str(final), "--per-tier", "1", "--steps", "1", "--true-layout", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["layout"] == "true"
    shutil.rmtree(final / "planner" / "scorer")
    settings = json.loads((final / "pipeline.json").read_text())
    (final / "pipeline.json").write_text(json.dumps({**settings, "planning": {"small_cost": 0.5}}))
    assert TextToVideo.load(final).small_cost == 0.5
    assert main(["eval", "--weights", str(final), "--per-tier", "1", "--steps", "1", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["small_cost"] == 0.5
    assert main(["generate", "a red square spins", "-o", str(tmp_path / "out.mp4"), "--size", "32x32", "--steps", "1",
                 "--weights", str(final)]) == 0
    assert "\nlayout: " in capsys.readouterr().out  # where the planner put the objects, in words

    # Guidance distillation of a layout model: the student is shown the layout too, in one pass.
    distill = f'[distill]\nteacher = "{final}"\nguidance = [1.0, 3.0]\n'
    student_recipe = tmp_path / "student.toml"
    student_recipe.write_text(layout_recipe(tmp_path, planner_dir).read_text().replace('size = "tiny"', f'size = "tiny"\ninit = "{final}"') + distill)
    student = TextToVideo.load(train_generator_run(student_recipe, tmp_path / "student"))
    assert student.transformer.cfg.distilled_guidance == (1.0, 3.0) and student.planner is not None
    video = student("a red square spins", width=32, height=32, frames=5, steps=2, guidance=2.0, seed=1)
    assert video.frames.shape == (5, 32, 32, 3) and video.plan is not None
    student_recipe.write_text(TINY_RECIPE.replace('size = "tiny"', f'size = "tiny"\ninit = "{final}"') + distill)
    with pytest.raises(RecipeError, match="a layout model's student takes what its teacher does"):
        train_generator_run(student_recipe, tmp_path / "plain_student")


def plain_transformer(pipe: TextToVideo) -> DiffusionTransformer:
    """A transformer that takes no layout, for the autoencoder of `pipe`."""
    return DiffusionTransformer(config_for("tiny", depth=1, latent_channels=pipe.autoencoder.cfg.latent_channels))


def train_generator_run(recipe: Path, output: Path) -> Path:
    from kinetoscope.training.generator import train

    return train(str(recipe), output=str(output))


def test_layout_model_recipes_name_a_planner_that_fits(tmp_path):
    planner_dir = tmp_path / "planner"
    LayoutPlanner(TINY_PLANNER).save_pretrained(planner_dir)
    with pytest.raises(RecipeError, match="layout_channels must be 11"):
        train_generator_run(layout_recipe(tmp_path, planner_dir, "depth = 1, layout_channels = 5"), tmp_path / "a")
    with pytest.raises(RecipeError, match="no layout planner checkpoint"):
        train_generator_run(layout_recipe(tmp_path, tmp_path / "nowhere"), tmp_path / "b")
    with pytest.raises(RecipeError, match="has no layout_channels"):
        train_generator_run(layout_recipe(tmp_path, planner_dir, "depth = 1"), tmp_path / "c")
    wrong = tmp_path / "wrong"
    LayoutPlanner(PlannerConfig(dim=32, depth=1, heads=2, features=5)).save_pretrained(wrong)
    with pytest.raises(RecipeError, match="reads 3 of 28"):
        train_generator_run(layout_recipe(tmp_path, wrong), tmp_path / "d")
    recipe = tmp_path / "no_planner.toml"
    recipe.write_text(TINY_RECIPE.replace("overrides = { depth = 1 }", "overrides = { depth = 1, layout_channels = 11 }"))
    with pytest.raises(RecipeError, match="must name the layout planner"):
        train_generator_run(recipe, tmp_path / "e")


def test_eval_with_true_layouts_hands_each_prompt_the_scene_it_was_written_from(capsys):
    from types import SimpleNamespace

    from kinetoscope.eval import generation

    class PaintingPipe:  # paints exactly the plan it is given, as a perfect denoiser would
        fps = 8.0
        asked = []

        def frames_for(self, seconds):
            return 1 + round(seconds * self.fps)

        def __call__(self, prompt, frames=17, seed=0, plan=None, **settings):
            self.asked.append(plan)
            scene = world.Scene(tuple(plan), captions.parse_prompt(prompt).background or "black")
            return SimpleNamespace(frames=world.render(scene, 128, 128, frames, self.fps), fps=self.fps, draws=1)

    prompts = generation.held_out_prompts(4)
    for item in prompts:  # each prompt's objects are the ones it names
        named = sorted(obj.color for obj in captions.parse_prompt(item.prompt).objects)
        assert sorted(obj.color for obj in item.objects) == named
    report = generation.evaluate_generator(PaintingPipe(), per_tier=4, true_layout=True)
    assert PaintingPipe.asked == [item.objects for item in prompts]
    assert all(scores["fully_right"] >= 0.75 for scores in report["tiers"].values()), report["failures"]
    assert main(["eval", "--true-layout", "--from-noise", "1"]) == 2
    assert "--from-noise starts from true clips" in capsys.readouterr().err


def test_plans_rendered_by_the_world_are_judged_like_videos():
    from kinetoscope.data.judge import judge
    from kinetoscope.models.text_encoder import TextEncoder
    from kinetoscope.pipelines.layout import PlannedScenes

    planned = PlannedScenes(LayoutPlanner(TINY_PLANNER), TextEncoder.load("cpu"))
    prompt = "a red circle moves to the right on a white background"
    video = planned(prompt, seed=3)
    assert video.frames.shape == (17, 128, 128, 3) and np.array_equal(planned(prompt, seed=3).frames, video.frames)
    assert (video.frames[0, 0, 0] == world.BACKGROUNDS["white"]).all()  # the prompt's background
    truth = world.Scene(slots_to_objects(scene_to_slots(world.sample_scene(np.random.default_rng(2)).objects)), "black")
    verdict = judge(world.render(truth, 128, 128, 17, 8.0), captions.parse_prompt(captions.caption_variants(truth, np.random.default_rng(0), 1)[0]), 8.0)
    assert verdict.passed  # a plan that is the truth passes, so the judge can score plans


def test_the_world_allows_only_plans_it_could_draw_and_planning_ranks_those_by_their_consensus(monkeypatch):
    from kinetoscope.pipelines import layout as planning

    scene = world.sample_scene(np.random.default_rng(4), 1.0, 2.0)
    assert world.is_possible(scene.objects, 1.0, 2.0)
    still = world.ShapeObject("red", "square", "medium", "still", None, (0.5, 0.5))
    assert world.is_possible([still], 1.0, 2.0)
    assert not world.is_possible([still, world.ShapeObject("blue", "circle", "medium", "still", None, (0.55, 0.5))], 1.0, 2.0)  # touching
    assert not world.is_possible([world.ShapeObject("red", "square", "medium", "right", "fast", (0.8, 0.5))], 1.0, 2.0)  # leaves the canvas

    def blue_circle(motion, start):
        return world.ShapeObject("blue", "circle", "small", motion, "slow" if motion == "up" else None, start)

    overlapping = [still, blue_circle("still", (0.5, 0.5))]
    rare = [still, blue_circle("bounce", (0.25, 0.25))]  # allowed, but the only draw reading the circle as bouncing, above left
    likely = [still, blue_circle("still", (0.8, 0.75))]  # still and below right of the square, as most draws have it
    also_likely = [still, blue_circle("up", (0.8, 0.8))]
    drawn = [overlapping, rare, likely, also_likely]  # the planner's tries, in order
    monkeypatch.setattr(planning, "euler_sample", lambda velocity, noise, times: torch.from_numpy(
        np.stack([scene_to_slots(objects) for objects in drawn])))
    planner = LayoutPlanner(TINY_PLANNER)
    text, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    assert planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=4) == [slots_to_objects(scene_to_slots(likely))]
    as_read = [slots_to_objects(scene_to_slots(plan)) for plan in (likely, also_likely, rare)]
    assert planning.ranked_plans(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=4) == [as_read]  # the refused one left out
    crowded = [still, blue_circle("bounce", (0.5, 0.5))]  # refused draws have no say: with theirs, the bouncing reading would win
    drawn = [crowded] * 4 + [rare, likely, [still, blue_circle("still", (0.8, 0.8))]]
    assert planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=7) == [slots_to_objects(scene_to_slots(likely))]
    drawn = [[still, blue_circle("bounce", (0.5, 0.5))], overlapping, [still, blue_circle("still", (0.52, 0.5))]]
    assert planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=3) == [tuple(overlapping)]  # none allowed: the consensus of all
    assert planning.plan_traits(tuple(likely)) >= {("count", 2), (1, "motion", "still"), (0, 1, 0, 1), (0, 1, 1, 1)}
    # agreement counts per trait: one extra object's traits do not outvote three draws of one object
    alone, paired = (still,), (still, blue_circle("still", (0.8, 0.75)))
    assert planning.by_consensus([paired, alone, alone, alone])[0] == alone
    drawn = [[], [], [], likely]  # empty plans agree wholly with each other, and are not drawn
    assert planning.ranked_plans(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=4) == [[slots_to_objects(scene_to_slots(likely))]]
    assert (0, 1, 0, 0) in planning.plan_traits(tuple(overlapping))  # level within RELATION_MARGIN


def test_a_plan_may_pay_for_each_object_it_draws_small_which_moves_open_sizes_and_keeps_stated_ones(monkeypatch):
    """`small_cost`: where the draws disagree on an object's size (its prompt leaves it open), a
    larger reading wins once a small object costs more than the agreement it loses; a size nearly
    every draw gives (one the prompt states) still wins, as it does with nothing to pay."""
    from kinetoscope.pipelines import layout as planning

    def circle(size):
        return (world.ShapeObject("blue", "circle", size, "still", None, (0.5, 0.5)),)

    drawn = []
    monkeypatch.setattr(planning, "euler_sample", lambda velocity, noise, times: torch.from_numpy(
        np.stack([scene_to_slots(objects) for objects in drawn])))
    planner = LayoutPlanner(TINY_PLANNER)
    text, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    plan = lambda cost: planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=len(drawn), small_cost=cost)[0]
    drawn = [circle("small")] * 3 + [circle("medium")] * 2 + [circle("large")]  # the size left open: the draws differ
    assert plan(0.0)[0].size == "small"  # the consensus: three draws agree against two
    assert plan(0.1)[0].size == "small"  # 0.6 of a draw's agreement is less than the one it loses
    assert plan(0.25)[0].size == "medium"  # 1.5 is more; of the larger readings the likelier
    drawn = [circle("small")] * 5 + [circle("medium")]  # a size stated: the draws nearly agree
    assert plan(0.5)[0].size == "small"  # 3 draws' worth is less than the 4 it would lose
    assert planning.SMALLEST == "small"


def test_a_plan_states_all_a_prompt_says_and_is_free_where_it_says_nothing():
    stated = captions.parse_prompt("a red ball bounces; a small blue block starts left of a green triangle, the triangle spins")
    ball = world.ShapeObject("red", "circle", "large", "bounce", None, (0.7, 0.4))
    block = world.ShapeObject("blue", "square", "small", "left", "fast", (0.2, 0.6))  # its motion is left open
    triangle = world.ShapeObject("green", "triangle", "medium", "spin", None, (0.5, 0.8))
    plan = (ball, block, triangle)
    assert plan_states(plan, stated)
    for wrong in (plan[1:], (ball, replace(block, size="large"), triangle), (replace(ball, motion="still"), block, triangle),
                  (ball, replace(block, start=(0.9, 0.6)), triangle), (*plan[:2], replace(ball, color="yellow")),
                  (replace(ball, shape="square"), block, triangle), (ball, block, replace(triangle, motion="grow"))):
        assert not plan_states(wrong, stated)
    pair = captions.parse_prompt("two red balls bounce")
    assert plan_states((ball, replace(ball, size="small", start=(0.2, 0.3))), pair)
    assert not plan_states((ball,), pair) and not plan_states((ball, ball, ball), pair)


def test_contradicted_plans_break_their_caption_and_show_no_held_out_combination():
    data = {"buckets": ["64x64x17", "96x64x1"], "fps": 8.0, "batch_size": 4, "seed": 3, "stand_in_rate": 0.3, "paraphrase_rate": 0.3}
    batches = PlanBatches(data, RecordingEncoder(), seed=1, negatives=3)
    kinds = set()
    for _ in range(40):
        objects, caption, stated, stand_in, _ = batches.captioned_scene()
        assert plan_states(objects, stated) and (stated.objects[0].shape is None) == stand_in
        wrong = contradict(tuple(objects), stated, batches.rng)
        assert wrong is not None and not plan_states(wrong, stated)
        assert not captions.is_heldout_scene(world.Scene(wrong, "black"))
        kinds.add("count" if len(wrong) != len(objects) else "same count")
    assert kinds == {"count", "same count"}
    plain = PlanBatches({**data, "stand_in_rate": 0.0, "paraphrase_rate": 0.0}, RecordingEncoder(), seed=1, negatives=3)
    slots, text, mask, canvas, _ = plain()
    assert slots.shape == (16, MAX_OBJECTS, SLOT_FEATURES) and text.shape[0] == 4 and canvas.shape == (16, 2)
    for caption, rows in zip(plain.text_encoder.texts, slots.unflatten(0, (4, 4))):  # the true plan first, then 3 it contradicts
        stated = captions.parse_prompt(caption)
        assert [plan_states(slots_to_objects(row.numpy()), stated) for row in rows] == [True, False, False, False]


def test_a_scorer_blind_to_shape_never_reads_it_and_is_shown_no_plan_wrong_in_shape_alone():
    torch.manual_seed(0)
    shape = slot_columns("shape")
    scorer = PlanScorer(replace(TINY_PLANNER, unread_features=tuple(range(SLOT_FEATURES)[shape])))
    for parameter in scorer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    slots, text, mask, canvas = torch.randn(4, 3, SLOT_FEATURES), torch.randn(4, 5, 384), torch.ones(4, 5, dtype=torch.bool), torch.randn(4, 2)
    reshaped = slots.clone()
    reshaped[..., shape] = torch.randn(4, 3, 3)
    torch.testing.assert_close(scorer(reshaped, text, mask, canvas), scorer(slots, text, mask, canvas))
    recolored = slots.clone()
    recolored[..., slot_columns("color")] = torch.randn(4, 3, len(world.COLORS))
    assert not torch.allclose(scorer(recolored, text, mask, canvas), scorer(slots, text, mask, canvas))
    with pytest.raises(ValueError, match="unread_features"):
        PlanScorer(replace(TINY_PLANNER, unread_features=(SLOT_FEATURES,)))
    batches = PlanBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 8, "seed": 2}, RecordingEncoder(), seed=2, negatives=3,
                          unread=("shape",))
    rows = batches()[0].unflatten(0, (8, 4)).numpy()
    for true, wrong in ((group[0], plan) for group in rows for plan in group[1:]):
        blind = np.ones(SLOT_FEATURES, dtype=bool)
        blind[shape] = False
        assert not np.array_equal(true[:, blind], wrong[:, blind])


def test_scorer_steps_rank_true_plans_above_their_contradictions():
    torch.manual_seed(0)
    scorer = PlanScorer(TINY_PLANNER)
    batches = PlanBatches({"buckets": ["64x64x17"], "fps": 8.0, "batch_size": 16, "seed": 2}, RecordingEncoder(), seed=2, negatives=3)
    slots, _, _, canvas, _ = batches()
    text, mask = torch.randn(16, 6, 384), torch.ones(16, 6, dtype=torch.bool)  # one made-up prompt per caption
    optimizer = torch.optim.Adam(scorer.parameters(), lr=3e-3)
    before = scorer_loss(scorer, slots, text, mask, canvas).item()
    assert before == pytest.approx(np.log(4))  # its head starts at zero: every plan alike
    for _ in range(60):
        optimizer.zero_grad()
        scorer_loss(scorer, slots, text, mask, canvas).backward()
        optimizer.step()
    assert scorer_loss(scorer, slots, text, mask, canvas).item() < 0.5 * before


def test_a_scorer_trains_from_a_planner_and_planning_keeps_the_draw_it_rates_best(tmp_path, monkeypatch, capsys):
    from kinetoscope.pipelines import layout as planning

    recipe = tmp_path / "scorer.toml"
    recipe.write_text(PLANNER_RECIPE)
    planner_dir = train_planner(str(recipe), output=str(tmp_path / "planner"), steps=1)
    scorer_recipe = PLANNER_RECIPE.replace("heads = 2", f"heads = 2\nrole = 'scorer'\nunread = ['shape']\ninit = '{planner_dir}'").replace(
        "seed = 5", "seed = 5\nnegatives = 3").replace("per_tier = 2", f"per_tier = 2\nplanner = '{planner_dir}'")
    recipe.write_text(scorer_recipe)
    exported = train_planner(str(recipe), output=str(tmp_path / "scorer"))
    scorer = PlanScorer.from_pretrained(exported)
    records = [json.loads(line) for line in (tmp_path / "scorer" / "log.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(np.log(4), abs=0.05) and "eval_fully_right unseen phrasings" in records[-1]
    assert_refused(recipe, tmp_path / "other", ((scorer_recipe.replace("role = 'scorer'", "role = 'critic'"), "role must be one of"),
                                                (scorer_recipe.replace("negatives = 3", "negatives = 0"), "negatives"),
                                                (scorer_recipe.replace("unread = ['shape']", "unread = ['color']"), "unread must list"),
                                                (scorer_recipe.replace(f"planner = '{planner_dir}'", ""), r"\[eval\] planner"),
                                                (scorer_recipe.replace(f"init = '{planner_dir}'", f"init = '{tmp_path}'"), "init")))

    # In the planner's folder, the scorer picks among its draws wherever the planner is loaded.
    shutil.copytree(exported, planner_dir / planning.SCORER_FOLDER)
    planner, loaded = planning.load_planning(planner_dir)
    assert isinstance(loaded, PlanScorer) and planning.PlannedScenes.load(planner_dir).scorer is not None
    assert planning.PlannedScenes.load(planner_dir, scored=False).scorer is None
    for flags, picked_by in (([], "scorer"), (["--no-scorer"], "consensus")):
        assert main(["planner", "eval", "--weights", str(planner_dir), "--per-tier", "1", "--report", str(tmp_path / "plans.json"), *flags]) == 0
        assert json.loads((tmp_path / "plans.json").read_text())["picked_by"] == picked_by
    assert main(["planner", "eval", "--weights", str(planner_dir), "--per-tier", "1", "--report", str(tmp_path / "plans.json"),
                 "--no-scorer", "--small-cost", "0.3"]) == 0
    assert json.loads((tmp_path / "plans.json").read_text())["small_cost"] == 0.3
    assert main(["planner", "eval", "--weights", str(planner_dir), "--small-cost", "1.5"]) == 2
    assert "expected a share from 0 to 1, got '1.5'" in capsys.readouterr().err
    assert main(["planner", "eval", "--weights", str(planner_dir), "--small-cost", "0.3"]) == 2  # the scorer picks: nothing to weigh
    assert "this planner's scorer picks them (add --no-scorer)" in capsys.readouterr().err
    drawn = [[world.ShapeObject("red", "square", "medium", motion, None, (x, 0.5))] for motion, x in (("still", 0.3), ("spin", 0.5), ("grow", 0.6))]
    monkeypatch.setattr(planning, "euler_sample", lambda velocity, noise, times: torch.from_numpy(
        np.stack([scene_to_slots(objects) for objects in drawn])))
    monkeypatch.setattr(PlanScorer, "forward", lambda self, slots, text, mask, canvas, mentions=None: slots[:, 0, slot_columns("motion")][:, world.MOTIONS.index("spin")])
    text, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    assert planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=3, scorer=loaded) == [tuple(drawn[1])]
    assert planning.ranked_plans(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=3, scorer=loaded) == [
        [slots_to_objects(scene_to_slots(drawn[i])) for i in (1, 0, 2)]]  # the rest in the planner's order: the scorer rates them alike
    assert planning.plan_objects(planner, text, mask, 128, 128, 2.0, torch.Generator(), tries=3) != [tuple(drawn[1])]
