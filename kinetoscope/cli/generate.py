"""`kinetoscope generate`, `kinetoscope train`, `kinetoscope join-experts`, `kinetoscope eval`, `kinetoscope compare` and
`kinetoscope bench`."""

from __future__ import annotations

from pathlib import Path

from kinetoscope.cli import common


def register(subparsers):
    generate = subparsers.add_parser("generate", help="generate a video (or a .png image) from a prompt")
    generate.add_argument("prompt")
    generate.add_argument("--output", "-o", required=True, help="out.mp4, out.gif, out.webp or out.png")
    generate.add_argument("--seconds", type=common.positive_float, default=2.0)
    generate.add_argument("--size", type=common.parse_size, default=(128, 128), help="WxH (default 128x128)")
    generate.add_argument("--fps", type=common.frame_rate, default=8.0)
    generate.add_argument("--seed", type=common.seed, default=0)
    common.add_sampling_arguments(generate)
    generate.add_argument("--weights", help="generator folder (default: the shipped model)")
    generate.set_defaults(handler=run_generate)

    train = subparsers.add_parser("train", help="train the generator from a recipe (resumes; works under torchrun)")
    common.add_training_arguments(train, "configs/generator.toml")
    train.set_defaults(handler=run_train)

    join = subparsers.add_parser("join-experts", help="one generator of two trained on the noisier and the cleaner stretch of the path")
    join.add_argument("noisy", help="generator folder trained on the noisier stretch ([train] times = [BOUNDARY, 1])")
    join.add_argument("clean", help="generator folder trained on the cleaner stretch ([train] times = [0, BOUNDARY])")
    join.add_argument("--boundary", type=common.path_fraction, required=True, help="the share of the path (before the shift) where they meet")
    join.add_argument("--output", "-o", required=True, help="the joined generator folder (replaced if there)")
    join.set_defaults(handler=run_join_experts)

    evaluate = subparsers.add_parser("eval", help="generate held-out prompts and score them with the judge")
    evaluate.add_argument("--per-tier", type=common.positive_int, default=50, help="prompts per tier")
    evaluate.add_argument("--prompt-seed", type=common.seed, default=777,  # generation.EVAL_SEED, named here so --help needs no torch
                          help="which seeded sample of held-out prompts, or with --from-noise of training scenes "
                               "(default 777, the one every README figure uses)")
    evaluate.add_argument("--from-noise", type=common.path_fraction, nargs="+", metavar="LEVEL",
                          help="instead: true clips of training scenes, noised to each LEVEL of the sampler's path "
                               "(1: pure noise) and sampled back, judged against their captions: where the model decides layouts")
    evaluate.add_argument("--clips", type=common.positive_int, help="clips per --from-noise level (default 50)")
    evaluate.add_argument("--true-layout", action="store_true",
                          help="a layout model paints each held-out scene's true layout instead of its planner's plan")
    common.add_sampling_arguments(evaluate)
    evaluate.add_argument("--weights", help="generator folder (default: the shipped model)")
    evaluate.add_argument("--report", help="also write the results as JSON here")
    evaluate.set_defaults(handler=run_eval)

    compare = subparsers.add_parser("compare", help="two eval reports side by side: each rate, its change and how far beyond chance")
    compare.add_argument("base", help="a report of `kinetoscope eval --report`")
    compare.add_argument("other", help="another, compared with the base")
    compare.set_defaults(handler=run_compare)

    bench = subparsers.add_parser("bench", help="seconds per clip by stage, real-time factor, FLOP/s, memory")
    bench.add_argument("--size", type=common.parse_size, default=(128, 128))
    bench.add_argument("--seconds", type=common.positive_float, default=2.0)
    common.add_sampling_arguments(bench)
    bench.add_argument("--repeats", type=common.positive_int, default=5)
    bench.add_argument("--held-out", type=common.positive_int, metavar="N",
                       help="time the first N held-out prompts of each tier (`kinetoscope eval --per-tier N`'s, from the same "
                            "noise seeds) instead of the bench's own, once each: what a clip takes on average, redraws included")
    bench.add_argument("--weights", help="generator folder (default: the shipped model)")
    bench.add_argument("--compile", action="store_true", help="time the transformer compiled by torch.compile (as `serve --compile` runs it)")
    bench.set_defaults(handler=run_bench)


def load_pipeline(weights: str | None):
    from kinetoscope.pipelines.text_to_video import TextToVideo

    return common.load_weights(TextToVideo.load, weights)


def checked_request(pipe, prompt: str, width: int, height: int, seconds: float | None, args):
    """The frame count for `seconds` (None: one image) and the sampling settings `args` ask for (the
    model's own where they name none), once both are ones the model can take."""
    if seconds is not None and seconds > pipe.max_seconds:
        raise common.UsageError(f"--seconds {seconds:g} is too long; at most {pipe.max_seconds:g}")
    frames = 1 if seconds is None else pipe.frames_for(seconds)
    try:
        pipe.check_request(prompt, width, height, frames)
        sampling = pipe.sampling_for(args.steps, args.guidance, args.sampler)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    common.set_redraws(pipe, args.redraws)
    return frames, sampling


def retime(frames, source_fps: float, target_fps: float, seconds: float):
    """Resample in time by nearest frame, so motion keeps its speed at any output frame rate."""
    import math

    import numpy as np

    count = math.floor(seconds * target_fps + 0.5) + 1  # halves up: 0.5 s at 1 fps is 2 frames, not 1
    index = np.minimum(np.rint(np.arange(count) * source_fps / target_fps).astype(int), len(frames) - 1)
    return frames[index]


def run_generate(args) -> int:
    from tqdm import tqdm

    from kinetoscope.media.video import check_video_output, write_video

    output = Path(args.output)
    image = output.suffix.lower() == ".png"
    try:
        check_video_output(output, args.fps)  # an extension it writes, at a rate the format can store
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    common.check_writable_file(output, "--output")
    pipe = load_pipeline(args.weights)
    width, height = args.size
    frames, sampling = checked_request(pipe, args.prompt, width, height, None if image else args.seconds, args)
    with tqdm(total=sampling.steps, desc="denoising", unit="step") as bar:
        def on_step(done: int, total: int):  # a redraw adds its steps to the total
            bar.total = total
            bar.update(done - bar.n)

        video = pipe(args.prompt, width=width, height=height, frames=frames, steps=sampling.steps,
                     guidance=sampling.guidance, seed=args.seed, sampler=sampling.sampler, on_step=on_step)
    result = video.frames if image else retime(video.frames, video.fps, args.fps, args.seconds)
    try:
        write_video(output, result, args.fps)
    except (ValueError, OSError) as error:  # VideoError is a ValueError
        raise common.UsageError(f"cannot write {output}: {error}") from None
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in video.timings.items())
    print(f"wrote {output}: {len(result)} frame(s) of {width}x{height} at {args.fps:g} fps, seed {args.seed} ({timing})")
    if video.draws > 1:
        from kinetoscope.pipelines.text_to_video import FIRST_PLAN_PAINTINGS

        moved = f" (after the {FIRST_PLAN_PAINTINGS}th, from the planner's next layouts)" if video.draws > FIRST_PLAN_PAINTINGS else ""
        print(f"painted {video.draws} times{moved}: the judge read the earlier painting(s) as missing their layout")
    if video.plan is not None:  # a layout model: where its planner put the objects (x, y as fractions of the canvas)
        from kinetoscope.data.layout import describe_objects

        print(f"layout: {describe_objects(video.plan)}")
    return 0


def run_train(args) -> int:
    from kinetoscope.training.generator import train

    return common.run_training(train, args)


def run_join_experts(args) -> int:
    from kinetoscope.training.generator import join_experts

    noisy, clean, output = Path(args.noisy), Path(args.clean), Path(args.output)
    if output.resolve() in (noisy.resolve(), clean.resolve()):
        raise common.UsageError("--output must be a new folder, not one of the two it joins")
    try:
        joined = join_experts(noisy, clean, args.boundary, output)
    except (ValueError, OSError) as error:
        raise common.UsageError(str(error).splitlines()[0]) from None
    print(f"joined {noisy} (above {args.boundary:g} of the path) and {clean} (at and below it) into {joined}")
    return 0


def run_eval(args) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from kinetoscope.eval.generation import NOISE_SEEDS, TIERS, evaluate_from_noise, evaluate_generator

    if args.clips is not None and not args.from_noise:
        raise common.UsageError("--clips counts the clips of --from-noise; held-out prompts are counted by --per-tier")
    if args.from_noise and len(set(args.from_noise)) < len(args.from_noise):
        raise common.UsageError(f"--from-noise names a level more than once: {' '.join(f'{level:g}' for level in args.from_noise)}")
    if args.true_layout and args.from_noise:
        raise common.UsageError("--true-layout paints the layouts of held-out scenes; --from-noise starts from true clips instead")
    report = common.check_writable_file(args.report, "--report") if args.report else None
    pipe = load_pipeline(args.weights)
    if args.true_layout and pipe.planner is None:
        raise common.UsageError("--true-layout needs a layout model (one with a planner); this model takes no layout")
    try:
        sampling = pipe.sampling_for(args.steps, args.guidance, args.sampler)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    common.set_redraws(pipe, args.redraws)
    print(f"sampling: {sampling.describe()}")

    report_data = {"prompt_seed": args.prompt_seed, "sampling": asdict(sampling), "noise_seeds": NOISE_SEEDS}
    if pipe.planner is not None and not args.from_noise:
        report_data["layout"] = "true" if args.true_layout else "planned"
        if not args.true_layout and pipe.plan_scorer is None:
            report_data["small_cost"] = pipe.small_cost  # how the consensus picked each plan among the draws
        report_data["redraws"] = pipe.redraws
    if args.from_noise:
        clips = args.clips or 50
        with tqdm(total=clips * len(args.from_noise), desc="noised clips", unit="clip") as bar:
            levels = evaluate_from_noise(pipe, args.from_noise, clips, asdict(sampling),
                                         progress=lambda level, verdict: bar.update(1), seed=args.prompt_seed)
        for level, scores in levels.items():
            print(f"from {level:g} of the path: {scores['fully_right']:.1%} of {scores['prompts']} clips fully right; "
                  f"per attribute: {attribute_line(scores)}")
        report_data["from_noise"] = {f"{level:g}": scores for level, scores in levels.items()}
        result = None
    else:
        with tqdm(total=args.per_tier * len(TIERS), desc="held-out prompts", unit="clip") as bar:
            result = evaluate_generator(pipe, args.per_tier, asdict(sampling),
                                        progress=lambda item, verdict: bar.update(1), seed=args.prompt_seed, true_layout=args.true_layout)
        print_results(result)
    if report is not None:
        write_report(report, report_data, result)
    return 0


def attribute_line(scores) -> str:
    return ", ".join(f"{name} {scores['attributes'][name]:.0%} ({c['passed']}/{c['of']})" for name, c in scores["checks"].items())


def print_results(result: dict):
    """What `evaluate_generator` found, as eval prints it: each tier, the checks, and the first failures."""
    for tier, scores in result["tiers"].items():
        print(f"{tier}: {scores['fully_right']:.1%} of {scores['prompts']} prompts fully right; per attribute: {attribute_line(scores)}")
    checks = [count for scores in result["tiers"].values() for count in scores["checks"].values()]
    print(f"attribute checks passed: {sum(c['passed'] for c in checks)} of {sum(c['of'] for c in checks)} (all tiers)")
    print("fully right by objects named: " + ", ".join(f"{count} object{'s' * (count > 1)} {tally['fully_right']} of {tally['prompts']}"
                                                      for count, tally in result["by_objects"].items()))
    prompts = sum(scores["prompts"] for scores in result["tiers"].values())
    if result["paintings"] > prompts:
        print(f"clips painted: {result['paintings']} for {prompts} prompts (redraws of paintings the judge read as missing their plan)")
    for item, failed in result["failures"][:10]:
        print(f"  failed [{item.tier}] {item.prompt!r}: {'; '.join(failed)}")


def write_report(path: Path, report_data: dict, result: dict | None):
    """An eval report: `report_data` (how it was made), and `evaluate_generator`'s result where there is one."""
    import json

    from kinetoscope.media.frames import atomic_output

    if result is not None:
        report_data["tiers"] = result["tiers"]
        report_data["by_objects"] = {str(count): tally for count, tally in result["by_objects"].items()}
        report_data["paintings"] = result["paintings"]
        report_data["failures"] = [{"tier": item.tier, "prompt": item.prompt, "failed": failed} for item, failed in result["failures"]]
    try:
        with atomic_output(path) as temporary:
            temporary.write_text(json.dumps(report_data, indent=2) + "\n")
    except OSError as error:
        raise common.UsageError(f"cannot write {path}: {error}") from None


def run_compare(args) -> int:
    import json

    from kinetoscope.eval.generation import compare_reports, report_noise_seeds

    reports = []
    for path in (args.base, args.other):
        try:
            reports.append(json.loads(Path(path).read_text()))
        except OSError as error:
            raise common.UsageError(f"cannot read {path}: {error.strerror or error}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise common.UsageError(f"{path} is not JSON ({error})") from None
    try:
        changes = compare_reports(*reports)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    for label, path, report in (("base: ", args.base, reports[0]), ("other:", args.other, reports[1])):
        sampling = report["sampling"] if isinstance(report.get("sampling"), dict) else {}
        layout = f"; {report['layout']} layouts" if report.get("layout") in ("true", "planned") else ""
        print(f"{label} {path} (prompt seed {report.get('prompt_seed', '?')}; {sampling.get('steps', '?')} steps of "
              f"{sampling.get('sampler', '?')}, guidance {sampling.get('guidance', '?')}{layout})")
    if reports[0].get("prompt_seed") != reports[1].get("prompt_seed"):
        print("note: the reports judged different samples of prompts, so only the rates, not the prompts, are paired")
    seeding = [report_noise_seeds(report) for report in reports]
    if seeding[0] != seeding[1]:
        print(f"note: the reports drew their noise differently (base: seed {seeding[0]}; other: seed {seeding[1]})")
    width = max(len(change.section) for change in changes)
    print(f"{'':{width}}  {'rate':15} {'base':>15} {'other':>15} {'change':>10} {'z':>6}")
    for change in changes:
        (a, n), (b, m) = change.base, change.other
        print(f"{change.section:{width}}  {change.rate:15} {f'{a}/{n}':>9} {a / n:>5.0%} {f'{b}/{m}':>9} {b / m:>5.0%} "
              f"{(b / m - a / n) * 100:>+6.1f} pts {change.z:>+6.1f}")
    print("z: the change in standard errors of the difference of two rates; beyond 2 either way, chance alone rarely explains it")
    return 0


def run_bench(args) -> int:
    from kinetoscope.eval.bench import BENCH_PROMPTS, benchmark_generation

    pipe = load_pipeline(args.weights)
    width, height = args.size
    frames, sampling = checked_request(pipe, common.PROBE_PROMPT, width, height, args.seconds, args)
    if args.compile:
        common.compile_and_warm_up(pipe, width, height, frames, sampling.guidance)
    prompts, repeats, progress = BENCH_PROMPTS, args.repeats, None
    if args.held_out:
        from tqdm import tqdm

        from kinetoscope.eval.generation import held_out_prompts

        prompts = [item.prompt for item in held_out_prompts(args.held_out)]
        repeats, progress = len(prompts), lambda runs: tqdm(runs, desc="held-out prompts", unit="clip")
    r = benchmark_generation(pipe, width, height, frames, sampling, repeats, prompts, progress)
    print(f"transformer: {'compiled by torch.compile' if args.compile else 'eager (--compile to compare)'}")
    stages = ", ".join(f"{k} {v:.3f} s" for k, v in r["stages_s"].items())
    print(f"clip: {r['clip']}, {'the held-out prompts' if args.held_out else 'the bench prompts'}")
    print(f"seconds per clip: {r['total_s']:.3f} median ({stages}); {r['mean_total_s']:.3f} mean")
    print(f"real-time factor: {r['real_time_factor']:.2f}x (clip seconds / wall seconds)")
    if pipe.redraws:
        print(f"paintings per clip: {r['paintings_per_clip']:.2f} (up to {1 + pipe.redraws}: redraws of paintings the judge read as missing "
              f"their plan; --redraws 0 times the first painting alone)")
    print(f"denoiser: {r['denoiser_flops_per_s'] / 1e9:.0f} GFLOP/s = {r['fraction_of_matmul_rate']:.0%} of the "
          f"{r['compute_dtype']} matmul rate measured now ({r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)")
    where = "allocated during the timed generations, weights included" if pipe.device.type == "cuda" else "the process's peak resident memory, loading included"
    print(f"peak memory: {r['peak_memory_mib']:.0f} MiB ({where})")
    return 0
