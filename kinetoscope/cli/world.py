"""`kinetoscope world sample`: render Shapes World clips with their captions and true scenes."""

from __future__ import annotations

import json
from pathlib import Path

from kinetoscope.cli import common

MAX_FRAMES = 2000
MAX_CLIP_PIXELS = 256 * 1024 * 1024  # 768 MB of uint8 frames, rendered in float32 on top
SHEET_CLIPS = 16  # the contact sheet shows the first clips; the rest are only on disk


def register(subparsers):
    world_parser = subparsers.add_parser("world", help="the Shapes World domain")
    commands = world_parser.add_subparsers(dest="world_command", required=True, parser_class=common.ErrorExitParser)
    sample = commands.add_parser("sample", help="render seeded clips with captions and scene metadata")
    sample.add_argument("--count", type=common.positive_int, default=8)
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--size", type=common.parse_size, default=(128, 128), help="WxH (default 128x128)")
    sample.add_argument("--fps", type=common.frame_rate, default=8.0)
    sample.add_argument("--seconds", type=common.positive_float, default=2.0)
    sample.add_argument("--seed", type=common.seed, default=0)
    sample.add_argument("--split", choices=("train", "heldout"), default="train",
                        help="held-out scenes and phrasings are the ones training never sees")
    sample.set_defaults(handler=run_sample)

    bench = commands.add_parser("bench", help="clips per second the renderer makes on one core")
    bench.add_argument("--size", type=common.parse_size, action="append", help="WxH, repeatable (default 64x64 and 128x128)")
    bench.add_argument("--frames", type=common.positive_int, default=17)
    bench.add_argument("--seconds", type=common.positive_float, default=3.0, help="time per size")
    bench.set_defaults(handler=run_bench)


def run_sample(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from kinetoscope.data import captions, world
    from kinetoscope.media.frames import save_contact_sheet
    from kinetoscope.media.video import write_video

    width, height = args.size
    frames = max(1, round(args.seconds * args.fps) + 1)
    if frames > MAX_FRAMES:
        raise common.UsageError(f"{frames} frames is too long; ask for at most {MAX_FRAMES} (seconds x fps)")
    if width * height * frames > MAX_CLIP_PIXELS:
        raise common.UsageError(f"a {width}x{height} clip of {frames} frames is too big to render; "
                                f"keep width x height x frames under {MAX_CLIP_PIXELS:,}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise common.UsageError(f"cannot create {out}: {error.strerror}") from None
    rng = np.random.default_rng(args.seed)
    constraints = captions.TRAIN_SCENES if args.split == "train" else captions.HELDOUT_SCENES
    clips, labels = [], []
    for index in tqdm(range(args.count), desc="rendering", unit="clip"):
        scene = world.sample_scene(rng, width / height, (frames - 1) / args.fps, constraints)
        video = world.render(scene, width, height, frames, args.fps)
        texts = captions.caption_variants(scene, rng, count=4, split=args.split)
        name = f"clip_{index:04d}"
        write_video(out / f"{name}.mp4", video, args.fps)
        metadata = {"captions": texts, "fps": args.fps, "size": [width, height], "frames": frames, **scene.to_dict()}
        (out / f"{name}.json").write_text(json.dumps(metadata, indent=2) + "\n")
        if index < SHEET_CLIPS:
            clips.append(video)
            labels.append(f"{name}: {texts[0]}")
    save_contact_sheet(out / "contact_sheet.png", clips, labels)
    print(f"wrote {args.count} clips to {out} (contact sheet of the first {len(clips)}: {out / 'contact_sheet.png'})")
    return 0


def run_bench(args) -> int:
    import time

    import numpy as np
    import torch

    from kinetoscope.data import captions, world

    torch.set_num_threads(1)  # the renderer is NumPy, single-threaded; say so by measuring one core
    rng = np.random.default_rng(0)
    for width, height in args.size or [(64, 64), (128, 128)]:
        clips, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            scene = world.sample_scene(rng, width / height, (args.frames - 1) / 8.0, captions.TRAIN_SCENES)
            world.render(scene, width, height, args.frames, 8.0)
            captions.caption_variants(scene, rng, count=1)
            clips += 1
        rate = clips / (time.perf_counter() - start)
        print(f"{width}x{height}x{args.frames}: {rate:.0f} clips/s on one core (sample + render + caption)")
    return 0
