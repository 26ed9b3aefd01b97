"""``lesionseg predict``: segment image files and folders.

For every input (NIfTI, NRRD, MHA/MHD, PNG, JPEG, BMP, TIFF) it writes into the output
folder, atomically:

* ``<name>_label<ext>``: the label map (uint8, class values) in the input's format and
  exact geometry (JPEG/BMP inputs give PNG labels: labels must be lossless; MHD/NHDR
  give single-file MHA/NRRD);
* with ``--probabilities``: ``<name>_prob<ext>`` (``_prob_<value>`` per class when there
  are several) — float32 for volumes, 8-bit (probability × 255) for PNG images;
* ``<name>_lesions.csv``: one row per lesion (unless ``--no-csv``);

and for the whole batch ``lesionseg-lesions.csv`` (every file's lesions, unless
``--no-csv``) and ``lesionseg-summary.json`` (succeeded and failed inputs), as the Slicer
module's batch writes them (:mod:`LesionSegLib.inference.batch`).

A file that fails is reported on one line (``lesionseg predict: FILE: reason``) and the
others are still processed; the exit status is 1 when any failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..validation import arg_type, device_arg, number, probability_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="segment image files or folders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    src = p.add_argument_group("network")
    src.add_argument("--checkpoint", help="LesionSeg checkpoint or official weight file")
    src.add_argument("--model", help="network name (with --checkpoint: forces it for plain state dicts; "
                                     "alone: the installed or shipped weights of that network and preset)")
    src.add_argument("--random-weights", action="store_true",
                     help="with --model and no --checkpoint: random weights, to test the pipeline only")
    src.add_argument("--preset", help="task preset (default: the checkpoint's)")
    run = p.add_argument_group("inference")
    run.add_argument("--device", default="auto", type=device_arg, help="auto (default), cpu, cuda, cuda:N, mps")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                     help="auto (default: bf16 on GPUs and on CPUs with native bf16, else fp32), or int8 "
                          "on the CPU (onnxruntime; see docs/performance.md)")
    run.add_argument("--calibration", metavar="DIR",
                     help="int8: training images of the network to calibrate on (once per network and "
                          "input size; then the quantized model comes from the cache)")
    run.add_argument("--batch-size", default="auto", help="slices per batch, or auto (default)")
    run.add_argument("--tta", action="store_true", help="average with the mirrored image")
    run.add_argument("--compile", action="store_true", help="torch.compile the network")
    run.add_argument("--backend", choices=("torch", "onnxruntime"),
                     help="torch (default) or onnxruntime (default for an .onnx --checkpoint; see "
                          "docs/performance.md for when it is faster on a CPU)")
    run.add_argument("--mode", default="resize", choices=("resize", "native", "tile"),
                     help="resize slices/images to the network size (default), run them at native "
                          "resolution, or tile large images (2-D only)")
    run.add_argument("--tile-overlap", type=arg_type(number, lo=0.0, hi=1.0, hi_open=True), default=0.25, help="overlap of tiles (fraction, default 0.25)")
    run.add_argument("--window", help="CT window CENTER,WIDTH overriding the preset's (e.g. -600,1500)")
    out = p.add_argument_group("results")
    out.add_argument("--threshold", type=probability_arg,
                     help="probability threshold, between 0 and 1 (default: the card's)")
    out.add_argument("--seed-threshold", type=arg_type(number, lo=0.0, hi=1.0, hi_open=True),
                     help="keep only lesions with a pixel at or above this probability (hysteresis; default: "
                          "the weights' own rule where they have one; 0 keeps every lesion)")
    out.add_argument("--min-lesion-size", type=arg_type(number, lo=0.0), default=0.0,
                     help="drop lesions smaller than this (mm³ for volumes, mm² or pixels for images)")
    out.add_argument("--probabilities", action="store_true", help="also write probability maps")
    out.add_argument("--no-csv", action="store_true", help="do not write lesion tables")
    out.add_argument("--recursive", action="store_true", help="also look into sub-folders of input folders")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)


def _parse_batch(value: str):
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SystemExit(f"lesionseg predict: error: --batch-size must be a positive integer or auto, not {value!r}")
    return n


def _parse_window(value):
    if not value:
        return None
    from ..validation import OptionError, window
    parts = value.split(",")
    if len(parts) != 2:
        raise SystemExit(f"lesionseg predict: error: --window takes CENTER,WIDTH, not {value!r}")
    try:
        return window(*parts, name="--window")
    except OptionError as e:
        raise SystemExit(f"lesionseg predict: error: {e}") from None


def run_predict(args: argparse.Namespace) -> int:
    out_dir = Path(args.output)
    window = _parse_window(args.window)
    batch = _parse_batch(args.batch_size)
    if not args.checkpoint and not args.model:
        print("lesionseg predict: error: give --checkpoint (trained weights) or --model", file=sys.stderr)
        return 2
    from .. import resolver
    from ..inference import Predictor
    from ..inference import io as lio
    from ..preprocessing import InputError
    from ..weights import WeightsError
    if args.random_weights and not args.checkpoint:
        print(f"lesionseg predict: warning: --random-weights: {args.model} has random weights "
              f"(for testing the pipeline only)", file=sys.stderr)
        choice = resolver.RANDOM_WEIGHTS
    else:
        try:
            choice = resolver.choose_weights(args.model, args.preset, args.checkpoint)
        except WeightsError as e:
            print(f"lesionseg predict: error: {e}", file=sys.stderr)
            return 1
        if choice.kind in ("installed", "release") and not args.checkpoint and not args.quiet:
            print(f"lesionseg predict: using {choice.description}", file=sys.stderr)
    source = choice.source(args.model, args.preset)
    onnx_file = isinstance(source, str)
    backend = args.backend or ("onnxruntime" if onnx_file else "torch")
    predictor = Predictor(source, preset=args.preset, device=args.device, precision=args.precision,
                          batch_size=batch, tta=args.tta, compile=args.compile, backend=backend,
                          calibration=args.calibration)
    try:  # an impossible pair of thresholds fails once, not once per file
        thr, seed = predictor.outputs.decision(args.threshold, args.seed_threshold)
    except InputError as e:
        print(f"lesionseg predict: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"lesionseg predict: {predictor.name} ({predictor.preset}), {predictor.device_message}, "
              f"{predictor.precision}", file=sys.stderr)
        if seed:
            print(f"lesionseg predict: keeping only lesions with a pixel at probability ≥ {seed:g} (threshold "
                  f"{thr:g}; --seed-threshold 0 keeps every lesion)", file=sys.stderr)

    files, problems = lio.list_inputs(args.inputs, recursive=args.recursive, exclude=[out_dir])
    created = not out_dir.exists()
    problem = _output_folder_problem(out_dir)
    if problem:
        print(f"lesionseg predict: error: {problem}", file=sys.stderr)
        return 1
    try:
        return _run_files(predictor, files, problems, out_dir, args, window, choice.description)
    finally:
        if created:  # a folder made for this run and left empty (every input failed) goes again
            try:
                out_dir.rmdir()
            except OSError:
                pass


class _FileWriter:
    """What ``lesionseg predict`` makes of one file (:class:`LesionSegLib.inference.batch.FileSegmenter`)."""

    def __init__(self, predictor, args, window, bar) -> None:
        self.predictor, self.args, self.window, self.bar = predictor, args, window, bar

    def output_names(self, path: Path):
        from ..inference import io as lio
        stem, ext = lio.split_ext(path)
        return [f"{stem}_label{lio.output_ext(ext)}"] + ([] if self.args.no_csv else [f"{stem}_lesions.csv"])

    def segment(self, path: Path, out_dir: Path, progress):
        from ..inference.batch import FileResult
        written, pred = _predict_file(self.predictor, path, out_dir, self.output_names(path), self.args,
                                      self.window, self.bar)
        nonfinite = int(pred.info.get("nonfinite_voxels") or 0)
        warnings = [f"{nonfinite} voxel(s) are NaN or infinite; they were left out of the intensity statistics "
                    f"and read as the lowest intensity"] if nonfinite else []
        return FileResult(written, pred, warnings)


def _printer(bar):
    from ..inference.batch import BatchReport

    class Printer(BatchReport):
        current = None

        def started(self, path, number, total):
            self.current = path
            bar.start(f"[{number}/{total}] {path.name}")

        def succeeded(self, path, result, seconds):
            bar.end()
            for w in result.warnings:
                print(f"lesionseg predict: warning: {path}: {w}", file=sys.stderr)
            n = len(result.prediction.lesions)
            print(f"{path} -> {result.written[0]} ({n} lesion{'s' if n != 1 else ''}, {seconds:.1f} s)")

        def failed(self, path, error):
            bar.end()
            print(f"lesionseg predict: {path}: {error}", file=sys.stderr)
    return Printer()


def _run_files(predictor, files, problems, out_dir: Path, args, window, weights: str) -> int:
    from ..inference.batch import segment_files
    from ..jobs import TerminalProgress
    bar = TerminalProgress(not args.quiet)
    report = _printer(bar)
    settings = {"model": predictor.name, "preset": predictor.preset, "weights": weights}
    try:
        summary = segment_files(files, out_dir, _FileWriter(predictor, args, window, bar), problems=problems,
                                settings=settings, lesion_table=not args.no_csv, summary_without_results=False,
                                report=report)
    except KeyboardInterrupt:
        bar.end()
        print(f"lesionseg predict: interrupted at {report.current}", file=sys.stderr)
        return 130
    if summary.failed:
        print(f"lesionseg predict: {len(summary.failed)} of {len(files) + len(problems)} input(s) failed",
              file=sys.stderr)
        return 1
    return 0


def _predict_file(predictor, path: Path, out_dir: Path, names, args, window, bar):
    """Segment one file; ``names``: the label file and (unless ``--no-csv``) the lesion table."""
    import numpy as np
    import SimpleITK as sitk
    from ..inference import io as lio
    from ..preprocessing import InputError

    image = lio.read_image(path)
    stem, ext = lio.split_ext(path)
    oext = lio.output_ext(ext)
    dim = image.GetDimension()
    if dim == 3:
        if args.mode == "tile":
            raise InputError("--mode tile is for 2-D images; volumes are processed slice by slice")
        pred = predictor.predict_volume(image, threshold=args.threshold, seed_threshold=args.seed_threshold,
                                        min_lesion_size_mm3=args.min_lesion_size,
                                        return_probabilities=args.probabilities, mode=args.mode, window=window,
                                        progress=bar)
        label_img = pred.labels
    elif dim == 2:
        array = sitk.GetArrayFromImage(image)
        photo = ext in lio.PHOTO_EXTS
        pred = predictor.predict_image(array, mode=args.mode, tile_overlap=args.tile_overlap,
                                       threshold=args.threshold, seed_threshold=args.seed_threshold,
                                       return_probabilities=args.probabilities,
                                       spacing=None if photo else image.GetSpacing(),
                                       min_lesion_size_mm2=args.min_lesion_size, window=window, progress=bar)
        label_img = sitk.GetImageFromArray(pred.labels)
        label_img.CopyInformation(image)
    else:
        raise InputError(f"{dim}-D images are not supported (2-D images and 3-D volumes)")

    written = [lio.write_image(label_img, out_dir / names[0])]
    if args.probabilities and pred.probabilities is not None:
        several = len(pred.classes) > 1
        for c, cls in enumerate(pred.classes):
            name = f"{stem}_prob_{cls['value']}{oext}" if several else f"{stem}_prob{oext}"
            prob = pred.probabilities[c]
            if oext in (".png",):  # 8-bit formats cannot hold floats: probability × 255
                prob = np.round(prob * 255.0).astype(np.uint8)
            img = sitk.GetImageFromArray(prob)
            img.CopyInformation(label_img)
            written.append(lio.write_image(img, out_dir / name))
    if not args.no_csv:
        written.append(lio.write_text(lio.lesions_csv(pred.lesions, path.name, pred.classes), out_dir / names[1]))
    return written, pred


def _output_folder_problem(out_dir: Path):
    """Why results cannot be written into ``out_dir`` (None when they can)."""
    import tempfile
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=str(out_dir)):
            pass
    except OSError as e:
        return f"cannot write into the output folder {out_dir}: {e.strerror or e}"
    return None
