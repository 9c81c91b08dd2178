import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from kinetoscope.models import text_encoder
from kinetoscope.models.text_encoder import TextEncoder, TextEncoderWeightsError

PROMPTS = [
    "two small yellow squares slide up quickly on a gray background",
    "a red circle",
    "",
]


@pytest.fixture(scope="module")
def encoder():
    # Any attempt to open a connection while loading fails the test: loading must be offline.
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to use the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.delenv(text_encoder.MODEL_DIR_VARIABLE, raising=False)  # the pinned original, whatever the shell says
        yield TextEncoder.load("cpu")


def record_model_batches(encoder) -> list[int]:
    """Batch sizes of the model's forward passes, in order."""
    batches = []
    encoder.model.register_forward_hook(
        lambda module, args, kwargs, output: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return batches


def mean_pooled(encoder, prompt):
    states, mask = encoder.encode([prompt])
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def test_shapes_and_mask(encoder):
    states, mask = encoder.encode(PROMPTS)
    lengths = [len(encoder.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert encoder.dim == 384
    assert states.shape == (3, max(lengths), 384) and states.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths
    assert lengths[2] == 2  # an empty prompt still has [CLS] and [SEP]
    assert torch.all(states[~mask] == 0)


def test_the_network_computes_what_transformers_bert_does(encoder):
    # models/minilm.py replaces transformers' BertModel (whose import cost every cold start ~2 s):
    # on the pinned weights its states must be BertModel's (identical here on 804 prompts).
    from transformers import BertModel

    reference = BertModel.from_pretrained(text_encoder.bundled_model_dir(), local_files_only=True, dtype=torch.float32).eval()
    prompts = [*PROMPTS, "two small yellow squares slide up quickly while a big cyan disc spins", "x " * 80]
    tokens = encoder.tokenizer(prompts, padding=True, truncation=True, max_length=text_encoder.MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = encoder.model(**tokens), reference(**tokens).last_hidden_state
    real = tokens["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_deterministic_and_padding_only_rounds(encoder):
    states, mask = encoder.encode(PROMPTS)
    fresh = TextEncoder(encoder.tokenizer, encoder.model, encoder.device)  # same weights, empty cache
    again, again_mask = fresh.encode(PROMPTS)
    assert torch.equal(again, states) and torch.equal(again_mask, mask)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_mask = TextEncoder(encoder.tokenizer, encoder.model, encoder.device).encode([prompt])
        length = alone.shape[1]
        assert torch.equal(alone_mask[0], mask[i, :length])
        torch.testing.assert_close(alone[0], states[i, :length], rtol=0, atol=1e-5)


def test_cache_is_hit_and_identical():
    encoder = TextEncoder.load("cpu")
    batches = record_model_batches(encoder)
    first, _ = encoder.encode(PROMPTS[:2])
    mixed, mixed_mask = encoder.encode([PROMPTS[1], "a blue square grows on white", PROMPTS[0], PROMPTS[0]])
    assert batches == [2, 1]  # only the one new prompt ran through the model
    assert torch.equal(mixed[2], first[0]) and torch.equal(mixed[3], first[0])
    length = mixed_mask[0].sum()
    assert torch.equal(mixed[0, :length], first[1, :length])
    mixed.zero_()  # returned tensors are copies: the cache is untouched
    again, _ = encoder.encode(PROMPTS[:2])
    assert torch.equal(again, first) and batches == [2, 1]


def test_cache_is_bounded_lru():
    encoder = TextEncoder.load("cpu")
    encoder.cache_size = 2
    batches = record_model_batches(encoder)
    encoder.encode(["a", "b"])
    encoder.encode(["a"])  # refreshes "a", so "b" is now the oldest
    encoder.encode(["c"])
    encoder.encode(["a"])
    assert batches == [2, 1]
    encoder.encode(["b"])
    assert batches == [2, 1, 1]


def test_truncation(encoder):
    long_prompt = " ".join(["a red circle moves left"] * 20)
    states, mask = encoder.encode([long_prompt, "a red circle"], max_tokens=16)
    assert states.shape == (2, 16, 384)
    assert mask[0].all()
    default_states, _ = encoder.encode([long_prompt])
    assert default_states.shape[1] == text_encoder.MAX_TOKENS
    # Truncated prompts are encoded afresh, not cut from a longer cached encoding.
    assert not torch.equal(default_states[0, :15], states[0, :15])


class OverlapWatch:
    """A tokenizer that counts calls made while another thread is still inside one."""

    def __init__(self, tokenizer):
        self.tokenizer, self.inside, self.overlaps = tokenizer, 0, 0

    def __call__(self, *args, **kwargs):
        self.inside += 1
        self.overlaps += self.inside > 1
        try:
            time.sleep(0.002)  # widen the window a real race needs
            return self.tokenizer(*args, **kwargs)
        finally:
            self.inside -= 1

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_prompts_are_checked_and_encoded_one_thread_at_a_time(encoder):
    # The Rust tokenizer is shared and not thread-safe: a server's request thread checking a prompt
    # while a worker tokenizes a batch switched the batch's padding off, or raised "Already borrowed".
    watch = OverlapWatch(encoder.tokenizer)
    shared = TextEncoder(watch, encoder.model, encoder.device)

    def encode_many():
        for i in range(30):
            shared.encode([f"a red circle moves left {i} times", f"{i} blue squares"])

    with ThreadPoolExecutor(2) as pool:
        encoding = pool.submit(encode_many)
        checks = [pool.submit(shared.check_prompt, f"a green triangle number {i}") for i in range(100)]
        encoding.result()
        assert [check.result() for check in checks] == [None] * 100
    assert watch.overlaps == 0


def test_similar_prompts_are_closer(encoder):
    anchor = mean_pooled(encoder, "a red circle moves left")
    paraphrase = mean_pooled(encoder, "a red ball slides to the left")
    unrelated = mean_pooled(encoder, "a blue square grows on white")
    assert F.cosine_similarity(anchor, paraphrase) > F.cosine_similarity(anchor, unrelated) + 0.1


def test_hash_mismatch_raises(monkeypatch):
    monkeypatch.setattr(text_encoder, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(TextEncoderWeightsError, match="SHA-256"):
        TextEncoder.load("cpu")


def test_a_changed_vocabulary_is_refused(tmp_path):
    original = text_encoder.bundled_model_dir()
    for name in (text_encoder.WEIGHTS_FILE, *text_encoder.COPIED_FILES):
        (tmp_path / name).symlink_to(original / name)
    (tmp_path / "vocab.txt").unlink()
    (tmp_path / "vocab.txt").write_text((original / "vocab.txt").read_text().replace("circle", "circles", 1))
    with pytest.raises(TextEncoderWeightsError, match="vocab.txt has SHA-256"):
        TextEncoder.load("cpu", model_dir=tmp_path)


def test_missing_weights_raise(tmp_path):
    with pytest.raises(TextEncoderWeightsError, match="not found"):
        TextEncoder.load("cpu", model_dir=tmp_path)


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    return text_encoder.write_compact_copy(tmp_path_factory.mktemp("compact"), ["two red circles move left; on white", "a red circle"])


def test_a_compact_copy_encodes_its_vocabulary_like_the_original(encoder, compact_dir, monkeypatch):
    weights = (compact_dir / text_encoder.COMPACT_FILE).stat().st_size
    assert weights < 0.3 * (text_encoder.bundled_model_dir() / text_encoder.WEIGHTS_FILE).stat().st_size
    monkeypatch.setenv(text_encoder.MODEL_DIR_VARIABLE, str(compact_dir))
    compact = TextEncoder.load("cpu")  # the variable names it
    prompts = ["two red circles move left on white", "a red circle", ""]
    states, mask = compact.encode(prompts)
    original, original_mask = encoder.encode(prompts)
    assert torch.equal(mask, original_mask)
    torch.testing.assert_close(states, original, rtol=0, atol=2e-2)  # float16 layer weights
    assert (states - original).abs().max() > 0  # it really is the copy that ran


def test_a_compact_copy_refuses_words_it_has_no_embedding_for(compact_dir):
    compact = TextEncoder.load("cpu", compact_dir)
    with pytest.raises(ValueError, match="no embedding for: blue"):
        compact.encode(["a blue circle"])


def test_a_corrupted_compact_copy_is_refused(compact_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in compact_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    data = bytearray((broken / text_encoder.COMPACT_FILE).read_bytes())
    data[-1] ^= 1
    (broken / text_encoder.COMPACT_FILE).write_bytes(bytes(data))
    with pytest.raises(TextEncoderWeightsError, match="corrupted"):
        TextEncoder.load("cpu", broken)
    (broken / text_encoder.COMPACT_FILE).write_bytes((compact_dir / text_encoder.COMPACT_FILE).read_bytes())
    with (broken / "vocab.txt").open("a") as vocab:  # a changed vocabulary would shift token ids
        vocab.write("extra\n")
    with pytest.raises(TextEncoderWeightsError, match="vocab.txt is missing or corrupted"):
        TextEncoder.load("cpu", broken)
    manifest = broken / text_encoder.COMPACT_MANIFEST
    sound = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sound, "source_sha256": "0" * 64}))
    with pytest.raises(TextEncoderWeightsError, match="made from"):
        TextEncoder.load("cpu", broken)
    for unsound in ({k: v for k, v in sound.items() if k != "files"}, ["not", "an", "object"]):
        manifest.write_text(json.dumps(unsound))
        with pytest.raises(TextEncoderWeightsError, match="not a compact text encoder's manifest"):
            TextEncoder.load("cpu", broken)
