"""`kinetoscope ae train|eval|paint` and `kinetoscope reconstruct`."""

from __future__ import annotations

from pathlib import Path

from kinetoscope.cli import common


def register(subparsers):
    ae = subparsers.add_parser("ae", help="train and evaluate the video autoencoder")
    ae_commands = ae.add_subparsers(dest="ae_command", required=True, parser_class=common.ErrorExitParser)

    common.add_train_command(ae_commands, "configs/autoencoder.toml", run_train)

    evaluate = ae_commands.add_parser("eval", help="PSNR/SSIM on held-out clips and encode/decode speed")
    evaluate.add_argument("--weights", help="checkpoint folder (default: the shipped weights)")
    evaluate.add_argument("--clips", type=common.positive_int, default=16, help="held-out clips per size")
    evaluate.set_defaults(handler=run_eval)

    paint = ae_commands.add_parser(
        "paint", help="painted pairs for tuning a decoder to a layout generator: its latents of training scenes, painted from their true plans")
    paint.add_argument("--output", required=True, help="file of pairs; one that exists is resumed")
    paint.add_argument("--count", type=common.positive_int, required=True, help="pairs the file should hold")
    paint.add_argument("--seed", type=common.seed, default=0, help="which scenes and noise (one per process painting in parallel)")
    paint.add_argument("--size", type=common.parse_size, default=(128, 128), help="WxH of the clips (default 128x128)")
    paint.add_argument("--seconds", type=common.positive_float, default=2.0, help="length of the clips (default 2)")
    paint.add_argument("--weights", help="layout generator folder (default: the shipped model)")
    paint.set_defaults(handler=run_paint)

    reconstruct = subparsers.add_parser("reconstruct", help="encode and decode a video with the autoencoder")
    reconstruct.add_argument("input", help="any common video file")
    reconstruct.add_argument("--output", required=True, help="output video (.mp4, .gif, .webp)")
    reconstruct.add_argument("--weights", help="checkpoint folder (default: the shipped weights)")
    reconstruct.set_defaults(handler=run_reconstruct)


def run_train(args) -> int:
    from kinetoscope.training.autoencoder import train

    return common.run_training(train, args)


def run_eval(args) -> int:
    import torch

    from kinetoscope.eval.reconstruction import evaluate_autoencoder, time_round_trip

    from kinetoscope.models.autoencoder import VideoAutoencoder

    model = common.load_weights(VideoAutoencoder.from_pretrained, args.weights).to("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model.cfg
    print(f"autoencoder: {cfg.spatial_factor}x spatial, {cfg.temporal_factor}x temporal, {cfg.latent_channels} latent channels")
    print(f"{'held-out clips':<16}{'PSNR dB':>9}{'SSIM':>8}{'palette':>9}")
    evaluate_autoencoder(
        model,
        clips_per_bucket=args.clips,
        progress=lambda bucket, r: print(
            f"{str(bucket):<16}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['palette_colours_kept']:>8.1%}", flush=True
        ),
    )
    speed = time_round_trip(model)
    clip_seconds = (17 - 1) / 8
    total = speed["encode_s"] + speed["decode_s"]
    print(
        f"speed, 2 s 128x128 clip ({speed['bucket']}): encode {speed['encode_s'] * 1000:.1f} ms, "
        f"decode {speed['decode_s'] * 1000:.1f} ms, {clip_seconds / total:.0f}x real time"
    )
    return 0


def run_paint(args) -> int:
    from tqdm import tqdm

    from kinetoscope.pipelines.text_to_video import TextToVideo
    from kinetoscope.training.painted import paint_pairs

    common.check_writable_file(Path(args.output), "--output")
    pipe = common.load_weights(TextToVideo.load, args.weights)
    width, height = args.size
    try:
        pipe.check_request(common.PROBE_PROMPT, width, height, pipe.frames_for(args.seconds))
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    bars = []  # opened once the file is known to be resumable, so a refusal is one line

    def progress(done: int):
        if not bars:
            bars.append(tqdm(total=args.count, initial=done, desc="painted pairs", dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        pairs = paint_pairs(pipe, args.output, args.count, args.seed, args.size, args.seconds, progress)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    finally:
        for bar in bars:
            bar.close()
    print(f"{args.output}: {len(pairs)} painted pairs of {width}x{height}, {pairs.frames} frames")
    return 0


def run_reconstruct(args) -> int:
    from kinetoscope.media.video import VIDEO_SUFFIXES, VideoError, check_video_output, read_video, write_video
    from kinetoscope.pipelines.reconstruction import MAX_PIXELS, VideoReconstruction

    output = Path(args.output)
    if output.suffix.lower() not in VIDEO_SUFFIXES:
        raise common.UsageError(f"output must end in {', '.join(VIDEO_SUFFIXES)}; got {output.name!r}")
    common.check_writable_file(output, "--output")
    try:
        _, height, width, _ = read_video(args.input, max_frames=1)[0].shape
        most_frames = MAX_PIXELS // (width * height)
        if most_frames < 1:
            raise common.UsageError(f"{args.input}: frames of {width}x{height} are too large to reconstruct")
        # Decode no more than a round trip takes, so a long high-resolution file cannot fill the memory first.
        frames, fps = read_video(args.input, max_frames=most_frames + 1)
    except VideoError as error:
        raise common.UsageError(str(error)) from None
    if len(frames) > most_frames:
        raise common.UsageError(f"{args.input} is too long to reconstruct: at {width}x{height}, at most {most_frames} frames")
    try:
        check_video_output(output, fps)  # the input's frame rate, which the output keeps
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    pipeline = common.load_weights(VideoReconstruction.load, args.weights)
    try:
        restored = pipeline(frames)
    except ValueError as error:
        raise common.UsageError(str(error)) from None
    try:
        write_video(output, restored, fps)
    except (ValueError, VideoError, OSError) as error:
        raise common.UsageError(f"cannot write {output}: {error}") from None
    print(f"wrote {args.output}: {restored.shape[0]} frames of {restored.shape[2]}x{restored.shape[1]} at {fps:g} fps")
    return 0
