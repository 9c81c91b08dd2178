"""Write a compact copy of the text encoder for a machine without its wheel (a lent GPU that reaches
no package index and takes the working tree up to 64 MiB): float16 layers and the embedding rows
of Shapes World's vocabulary, about a quarter of the pinned 91 MB file.

    .venv/bin/python scripts/compact_text_encoder.py DIR
    KINETOSCOPE_TEXT_ENCODER=DIR python3 -m kinetoscope train --recipe ...   # there

It then encodes captions of both splits and the evaluation's held-out prompts with the original
and the copy, and prints how far apart their states are.
"""

from __future__ import annotations

import argparse
import string

import numpy as np
import torch

from kinetoscope.data import captions, world
from kinetoscope.eval.generation import held_out_prompts
from kinetoscope.models.text_encoder import COMPACT_FILE, TextEncoder, bundled_model_dir, write_compact_copy
from kinetoscope.training.planner import LEAD_INS, PARAPHRASES, STAND_INS


def sample_captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = []
    for split, constraints in (("train", captions.TRAIN_SCENES), ("heldout", captions.HELDOUT_SCENES)):
        for _ in range(count):
            scene = world.sample_scene(rng, constraints=constraints)
            texts += captions.caption_variants(scene, rng, count=2, split=split)
    return texts


def vocabulary() -> list[str]:
    """Every word the prompt parser accepts, as a user may write it (the parser reads "doesn't" as
    "does not" and a curly apostrophe as a straight one, but the tokenizer splits them its own way),
    and the words a planner's training puts around and in place of the grammar's."""
    augmentation = " ".join((*LEAD_INS, *(form for choices in PARAPHRASES.values() for forms in choices for form in forms),
                             *(form for forms in STAND_INS for form in forms)))
    words = sorted(captions.KNOWN_WORDS | set(captions._tokenize(augmentation)))
    return words + [f"{word}n't" for word in words] + list(string.digits + string.punctuation) + ["\u2019"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("destination")
    args = parser.parse_args()
    destination = write_compact_copy(args.destination, vocabulary())
    size = (destination / COMPACT_FILE).stat().st_size
    print(f"wrote {destination} ({size / 1e6:.1f} MB of weights)")

    prompts = list(dict.fromkeys(sample_captions(500) + [item.prompt for item in held_out_prompts(50)]))
    original, compact = TextEncoder.load("cpu", bundled_model_dir()), TextEncoder.load("cpu", destination)
    worst = scale = 0.0
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        (a, mask), (b, _) = original.encode(batch), compact.encode(batch)
        worst = max(worst, float((a - b)[mask].abs().max()))
        scale = max(scale, float(a[mask].abs().max()))
    print(f"{len(prompts)} distinct captions and held-out prompts: largest state difference {worst:.2e} (states reach {scale:.1f})")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
