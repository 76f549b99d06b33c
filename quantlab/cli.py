"""The ``quantlab`` command: parse flags, build a config, call one library function, print.

Exit codes: 0 success, 1 a check failed (``lint`` found rule violations), 2 a user error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from quantlab.config import CALIBRATOR_NAMES, TARGETS, TRANSFORM_NAMES, Config, load_config, override
from quantlab.errors import QuantlabError, check, describe, raised_by_onnx


def _names(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = allowed if value == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    for n in names:
        check(n in allowed, f"unknown {what} '{n}': choose one of {', '.join(allowed)} or all")
    return names


def _transforms(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if value.strip() == "none":
        return ()
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    for n in names:
        check(n in TRANSFORM_NAMES, f"unknown transform '{n}': choose one of {', '.join(TRANSFORM_NAMES)}, a comma list, or none")
    return names


def _alpha(value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise QuantlabError(f"--smoothquant-alpha must be a number in [0, 1] or auto, got '{value}'") from None


def _config(args: argparse.Namespace) -> Config:
    """The config: ``--config``, else ./quantlab.toml, except that ``--model`` alone starts from the
    defaults (a ./quantlab.toml describes another model: its shapes and preprocessing do not apply)."""
    path = args.config
    if path is None and args.model is None and Path("quantlab.toml").is_file():
        path = "quantlab.toml"
    config = load_config(path)
    if args.model is not None:
        model = dataclasses.replace(config.model, onnx=str(Path(args.model).resolve()), pytorch=None, name="")
        config = dataclasses.replace(config, model=model)
    return config


def _input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``["x=1,3,224,224", ...]`` as ``{"x": (1, 3, 224, 224)}``."""
    if not values:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        check(bool(name) and bool(shape), f"--input-shape '{value}' is not NAME=D,D,...: e.g. --input-shape x=1,3,224,224")
        shapes[name] = shape
    return shapes


def _ptq_config(args: argparse.Namespace) -> Config:
    config = _config(args)
    shapes = _input_shapes(args.input_shape)
    if shapes:
        config = override(config, "model", input_shapes={**config.model.input_shapes, **shapes})
    config = override(config, "data", calib=str(Path(args.calib).resolve()) if args.calib else None,
                      batch_size=args.batch_size, max_samples=args.max_samples)
    config = override(
        config, "ptq",
        calibrators=_names(args.calibrator, CALIBRATOR_NAMES, "calibrator"),
        targets=_names(args.target, TARGETS, "target"),
        out=str(Path(args.out).resolve()) if args.out else None,
        percentile=args.percentile,
        run_name=args.name,
        report=False if args.no_report else None,
        transforms=_transforms(args.transform),
    )
    return override(config, "transforms", smoothquant_alpha=_alpha(args.smoothquant_alpha),
                    adaround_iterations=args.adaround_iterations)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="calibration batches", unit="batch", file=sys.stderr, leave=False)


def cmd_ptq(args: argparse.Namespace) -> int:
    from quantlab.ptq import run_ptq

    result = run_ptq(_ptq_config(args), stats=args.stats, progress=_progress)
    print(result)
    return 0 if result else 1


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="engine", file=sys.stderr, leave=False)


def _compare_config(args: argparse.Namespace) -> Config:
    config = _config(args)
    return override(
        config, "compare",
        backend=args.backend,
        max_samples=args.max_samples,
        latency_runs=args.latency_runs,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from quantlab.compare import run_compare

    config = _compare_config(args)
    result = run_compare(
        config, args.run, eval_dir=Path(args.eval).resolve() if args.eval else None,
        layers=False if args.no_layers else None, progress=_bar,
    )
    print(result)
    return 0 if result else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from quantlab.tune import run_tune

    result = run_tune(_config(args), progress=_progress)
    print(result)
    return 0 if result else 1


def _qat_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="QAT", unit="step", file=sys.stderr, leave=False)


def _epoch_line(report) -> None:
    metric = "-" if report.metric is None else f"{report.metric:.4f}"
    best = " (best so far)" if report.best else ""
    print(f"epoch {report.epoch}/{report.epochs}: loss {report.loss:.5g}, metric {metric}{best}, "
          f"{report.seconds:.1f} s", flush=True)


def cmd_qat(args: argparse.Namespace) -> int:
    from quantlab.qat.run import qat_run

    config = override(_config(args), "qat", epochs=args.epochs, device=args.device, source=args.source, lr=args.lr,
                      learn_ranges=args.learn_ranges)
    if args.calibrator is not None:
        check(args.calibrator in CALIBRATOR_NAMES,
              f"unknown calibrator '{args.calibrator}': choose one of {', '.join(CALIBRATOR_NAMES)}")
    result = qat_run(config, args.run, calibrator=args.calibrator, progress=_qat_bar, on_epoch=_epoch_line)
    print(result)
    return 0 if result else 1


def cmd_gate(args: argparse.Namespace) -> int:
    from quantlab.gate import run_gate

    result = run_gate(_config(args), run_dir=args.run, baseline=args.baseline, update_baseline=args.update_baseline,
                      progress=_progress)
    print(result)
    return 0 if result else 1


def cmd_report(args: argparse.Namespace) -> int:
    from quantlab.report import load_run, write_report

    run_dir = args.run
    if run_dir is None:
        # the run folder ./quantlab.toml's ptq run writes, else the bundled default's
        run_dir = "reports/efficientnet-lite0"
        if Path("quantlab.toml").is_file():
            config = load_config("quantlab.toml")
            run_dir = str(config.resolve(config.ptq.out) / (config.ptq.run_name or config.model.display_name))
    index = write_report(run_dir, worst=args.worst)
    run = load_run(index.parent)
    if run.winner is not None:
        print(f"winner: {run.winner.calibrator} on {run.winner.target} ({run.winner.detail})")
    for name in ("index.html", "summary.md", "report.json"):
        print(f"wrote {index.parent / name}")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from quantlab.qdq.lint import lint_onnx_file

    report = lint_onnx_file(args.model)
    print(report.summary())
    return 0 if report else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab", description="INT8 quantization and calibration workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ptq", help="post-training quantization: statistics, calibrators, Q/DQ models, caches")
    p.add_argument("--config", help="quantlab.toml (default: ./quantlab.toml when present)")
    p.add_argument("--model", help="ONNX model to quantize (overrides [model] in the config)")
    p.add_argument("--calib", help="folder of calibration images or .npy/.npz arrays")
    p.add_argument("--calibrator", help=f"one of {', '.join(CALIBRATOR_NAMES)}, a comma list, or all")
    p.add_argument("--target", help=f"one of {', '.join(TARGETS)}, a comma list, or all")
    p.add_argument("--percentile", type=float, help="percentile of |x| for the percentile calibrator (default 99.99)")
    p.add_argument("--out", help="folder that receives the run folder (default: reports)")
    p.add_argument("--name", help="run folder name (default: the model name)")
    p.add_argument("--batch-size", type=int, help="calibration batch size")
    p.add_argument("--max-samples", type=int, help="use at most this many calibration samples")
    p.add_argument("--stats", help="stats.npz of an earlier run: calibrate again without inference")
    p.add_argument("--input-shape", action="append", metavar="NAME=D,D,...",
                   help="size of a model input's dynamic dimensions, e.g. x=1,3,640,640 (repeatable; as [model.input_shapes])")
    p.add_argument("--no-report", action="store_true", help="skip index.html/summary.md (quantlab report writes them later)")
    p.add_argument("--transform", help=f"graph transforms before calibration: {', '.join(TRANSFORM_NAMES)}, a comma list, "
                                       "or none (overrides [ptq] transforms)")
    p.add_argument("--smoothquant-alpha", help="SmoothQuant migration strength in [0, 1], or auto (searched per layer)")
    p.add_argument("--adaround-iterations", type=int, help="AdaRound optimizer steps per layer")
    p.set_defaults(func=cmd_ptq)
    p = sub.add_parser("compare", help="evaluate the FP32, FP16 and INT8 engines of a run: accuracy, per-layer error, latency")
    p.add_argument("--config", help="quantlab.toml (default: ./quantlab.toml when present)")
    p.add_argument("--run", help="run folder written by quantlab ptq (default: the config's run folder)")
    p.add_argument("--eval", help="evaluation folder (overrides [compare] eval)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], help="engine backend (default: onnxruntime)")
    p.add_argument("--max-samples", type=int, help="evaluate at most this many samples")
    p.add_argument("--latency-runs", type=int, help="timed runs per engine and batch size at most, fewer once the median is stable (0: no latency)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer SQNR and sensitivity analysis")
    p.set_defaults(func=cmd_compare, model=None)
    p = sub.add_parser("tune", help="PTQ, compare, then escalate (partial quantization, QAT) until the tolerance holds")
    p.add_argument("--config", help="quantlab.toml (default: ./quantlab.toml when present)")
    p.set_defaults(func=cmd_tune, model=None)
    p = sub.add_parser("qat", help="quantization-aware training from a PTQ run's ranges; exit 0 tolerance met, 1 not, 2 user error")
    p.add_argument("--config", help="quantlab.toml (default: ./quantlab.toml when present)")
    p.add_argument("--run", help="run folder written by quantlab ptq (default: the config's run folder)")
    p.add_argument("--epochs", type=int, help="at most this many epochs (default: [qat] epochs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: [qat] device)")
    p.add_argument("--calibrator", help=f"whose ranges to start from: one of {', '.join(CALIBRATOR_NAMES)} "
                   "(default: the best tensorrt engine of compare.json, else the first configured)")
    p.add_argument("--source", choices=["auto", "pytorch", "onnx"], help="train the PyTorch model or the converted ONNX graph")
    p.add_argument("--lr", type=float, help="learning rate at the start of the cosine schedule (default: [qat] lr)")
    p.add_argument("--learn-ranges", choices=["auto", "off", "activations", "all"],
                   help="train the quantizers' ranges too (LSQ; onnx source; default: [qat] learn_ranges)")
    p.set_defaults(func=cmd_qat, model=None)
    p = sub.add_parser("gate", help="CI accuracy gate: tolerance and baseline; exit 0 pass, 1 fail, 2 user error")
    p.add_argument("--config", help="quantlab.toml (default: ./quantlab.toml when present)")
    p.add_argument("--baseline", help="baseline JSON (default: [gate] baseline)")
    p.add_argument("--update-baseline", action="store_true", help="record this run's results as the new baseline")
    p.add_argument("--run", help="gate an existing run folder instead of quantizing again")
    p.set_defaults(func=cmd_gate, model=None)
    p = sub.add_parser("report", help="write index.html, summary.md and report.json into a run folder")
    p.add_argument("--run", help="run folder (default: the one ./quantlab.toml's ptq writes, else reports/efficientnet-lite0)")
    p.add_argument("--worst", type=int, default=12, help="tensors drawn as full-size histograms, worst first (default 12)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("lint", help="check a Q/DQ ONNX model against TensorRT's explicit-quantization rules")
    p.add_argument("model", help="Q/DQ ONNX model")
    p.set_defaults(func=cmd_lint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantlabError as exc:
        print(f"quantlab: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # onnx or ONNX Runtime failing on the user's model where no stage caught it: still one line
        if not raised_by_onnx(exc) or isinstance(exc, MemoryError):
            raise
        print(f"quantlab: error: {args.command}: ONNX Runtime or onnx failed on the model ({describe(exc)}): "
              "check that the model loads and runs in ONNX Runtime", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantlab: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
