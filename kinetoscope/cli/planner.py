"""`kinetoscope planner train|eval|binding`: the layout planner of a layout model."""

from __future__ import annotations

from kinetoscope.cli import common


def register(subparsers):
    planner = subparsers.add_parser("planner", help="train and evaluate the layout planner (prompt -> the scene's objects)")
    planner_commands = planner.add_subparsers(dest="planner_command", required=True, parser_class=common.ErrorExitParser)
    common.add_train_command(planner_commands, "configs/planner.toml", run_train)
    evaluate = planner_commands.add_parser(
        "eval", help="plan held-out prompts, render each plan with Shapes World itself and judge it: "
                     "what a layout model could reach if its denoiser painted every plan perfectly")
    evaluate.add_argument("--weights", required=True, help="planner folder (config.json + model.safetensors), or a layout model's")
    evaluate.add_argument("--per-tier", type=common.positive_int, default=50, help="prompts per tier")
    evaluate.add_argument("--prompt-seed", type=common.seed, default=777, help="which seeded sample of held-out prompts (default 777)")
    evaluate.add_argument("--tries", type=common.positive_int, default=32,  # pipelines.layout.PLAN_TRIES, named here so --help needs no torch
                          help="plans drawn per prompt, of which the one the scorer rates best (or the consensus) of those the world allows "
                               "is kept (default 32, as generation does; 1: the planner alone)")
    evaluate.add_argument("--guidance", type=common.guidance_scale,
                          help="classifier-free guidance of the plans (default: the planner's own, config.json's \"guidance\")")
    evaluate.add_argument("--small-cost", type=common.share, default=0.0,
                          help="what each object a plan draws small costs it, as a share of the draws agreeing on a trait "
                               "(default 0; a generator's pipeline.json may set it under \"planning\")")
    evaluate.add_argument("--no-scorer", dest="scored", action="store_false",
                          help="keep the consensus of the draws even where the planner's folder has a plan scorer (scorer/)")
    evaluate.add_argument("--report", help="also write the results as JSON here")
    evaluate.set_defaults(handler=run_eval)
    binding = planner_commands.add_parser(
        "binding", help="ask prompts that introduce two objects and then refer back to each (\"a red kite left of a blue lamp; "
                        "the lamp shrinks and the kite spins\"), with shape nouns and stand-ins, and count the draws that give "
                        "each object its own motion: whether the planner reads references")
    binding.add_argument("--weights", required=True, help="planner folder (config.json + model.safetensors), or a layout model's")
    binding.add_argument("--pairs", type=common.positive_int, default=48, help="pairs of objects, each asked four ways (default 48)")
    binding.add_argument("--draws", type=common.positive_int, default=16, help="single draws per prompt (default 16)")
    binding.add_argument("--report", help="also write the counts as JSON here")
    binding.set_defaults(handler=run_binding)


def run_train(args) -> int:
    from kinetoscope.training.planner import train

    return common.run_training(train, args)


def run_eval(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from kinetoscope.cli.generate import print_results, write_report
    from kinetoscope.eval.generation import NOISE_SEEDS, TIERS, evaluate_generator

    report = common.check_writable_file(args.report, "--report") if args.report else None
    folder = Path(args.weights)
    planned = load_planned(args.weights, tries=args.tries, guidance=args.guidance, scored=args.scored, small_cost=args.small_cost)
    if args.small_cost and planned.scorer is not None:
        raise common.UsageError("--small-cost weighs the consensus of the draws; this planner's scorer picks them (add --no-scorer)")
    with tqdm(total=args.per_tier * len(TIERS), desc="held-out plans", unit="plan") as bar:
        result = evaluate_generator(planned, args.per_tier, progress=lambda item, verdict: bar.update(1), seed=args.prompt_seed)
    print_results(result)
    if report is not None:
        write_report(report, {"prompt_seed": args.prompt_seed, "noise_seeds": NOISE_SEEDS, "planner": str(folder), "tries": args.tries,
                              "guidance": planned.planner.cfg.guidance if args.guidance is None else args.guidance,
                              "picked_by": "consensus" if planned.scorer is None else "scorer",
                              **({} if planned.scorer else {"small_cost": args.small_cost})}, result)
    return 0


def load_planned(weights: str, **options):
    """A planner folder's, or a layout model's planner/, as PlannedScenes (`options` go to
    PlannedScenes.load); a bad folder is a usage error."""
    from pathlib import Path

    from kinetoscope.pipelines.layout import PlannedScenes

    folder = Path(weights)
    return common.load_weights(lambda path: PlannedScenes.load(path, **options),
                               str(folder / "planner" if (folder / "planner").is_dir() else folder))


def run_binding(args) -> int:
    from kinetoscope.cli.generate import write_report
    from kinetoscope.eval.binding import binding_lines, binding_rates

    report = common.check_writable_file(args.report, "--report") if args.report else None
    planned = load_planned(args.weights)
    rates = binding_rates(planned.planner, planned.text_encoder, args.pairs, args.draws)
    print("\n".join(binding_lines(rates)))
    if report is not None:
        write_report(report, {"planner": args.weights, "pairs": args.pairs, "draws": args.draws, "rates": rates}, None)
    return 0
