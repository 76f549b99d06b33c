"""QAT on a GPU, measured: MiniLM-L6, the PP-OCRv6 detector and EfficientNet-Lite0 from a
deliberately weak PTQ start, with fixed or learned ranges (``--learn-ranges``).

Each case quantizes the bundled model with one calibrator for the ``tensorrt`` target (PTQ: the
start), then runs ``quantlab qat``'s library call on the run folder: the prepared FP32 ONNX
converted to PyTorch (``[qat] source = "onnx"``), fake quantizers where the PTQ model has Q/DQ,
starting from that calibrator's ranges, distillation from FP32, the metric of the compare harness
after every epoch, stop at the tolerance or on a plateau.  It prints one line per epoch (metric,
loss, minutes) and ends with a JSON summary per case, also written to ``--out``.

Training data (``--data``):

* ``calib``: the model's calibration folder (MiniLM 256 sentences, detector 16 tiles);
* ``more``: MiniLM: the calibration sentences plus every other prose sentence of Python's language
  reference (``pydoc_data.topics``, the standard library) that is not in the evaluation set;
  detector and EfficientNet-Lite0: the calibration images and their mirror images (left-right,
  up-down, both: 64 tiles, 76 photographs);
* ``dihedral``: images only: those four and their transposes (the 8 symmetries of the square: 128
  tiles, 152 photographs).
* ``mixed``: detector only: ``more`` plus other kinds of image the detector meets: 4 tiles of each
  rendered book page of the layout model's calibration folder (The Rust Programming Language at
  1.5x, 64 tiles) and scikit-image's bundled photographs except the two the evaluation folder uses
  (``page.png``, ``text.png``), scaled and centre-cropped to 512 (JPEG, quality 95; needs
  scikit-image, so build it where it is installed and pass the folder with ``--data-dir``).
  Distillation needs no labels, only inputs like the deployment's, so more unlabelled text or
  mirrored text is enough; the evaluation data stays disjoint from it.

    python benchmarks/qat_gpu.py --model minilm --calibrator minmax --epochs 30 --device cuda
    python benchmarks/qat_gpu.py --model detector --calibrator minmax --epochs 40 --data more \
        --task dense --primary iou --tolerance '{"iou": {"min": 0.95}}' --learn-ranges activations --range-lr 1e-2
    python benchmarks/qat_gpu.py --model lite0 --calibrator minmax --data more --primary top1_agreement \
        --tolerance '{}' --eval DIR
    python benchmarks/qat_gpu.py --model detector --data mixed --build-only --work W   # then --data-dir W/train-data

``--exclude NODE ...`` keeps those nodes out of INT8 (``[ptq] exclude``): partial quantization, then
QAT of the rest (the quantizers follow the PTQ model's Q/DQ).

``--tolerance`` replaces the config's ``[tolerance]`` (JSON; ``{}``: train until the plateau);
``--task dense`` scores the detector's thresholded probability map alone (pixel IoU), for a machine
without rapidocr;
``--primary`` the metric that picks the best epoch; ``--eval`` the evaluation folder (and the
agreement set), for a machine without the package that holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab.config import load_config, override  # noqa: E402

CONFIGS = {"minilm": "quantlab/models/minilm/quantlab.toml", "detector": "quantlab/models/ppocr-det/quantlab.toml",
           "lite0": "quantlab.toml"}


def _sentences(text: str) -> list[str]:
    """Prose sentences of 5 to 45 words: cut at ``.``, ``!`` or ``?`` before a capital letter."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "*", "|", "+", "=", "-")) for ln in lines if ln):
            continue
        flat = " ".join(ln for ln in lines if ln)
        if "::=" in flat or flat.count("(") > 6:
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = s.split()
            if 5 <= len(words) <= 45 and s[-1] in ".!?":
                out.append(s)
    return out


def minilm_extra(folder: Path, config) -> int:
    """The calibration sentences plus the language reference's other prose sentences, none from eval/."""
    from pydoc_data.topics import topics

    held_out = set()
    for f in config.resolve(config.compare.eval).glob("*.txt"):
        held_out.update(ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip())
    calib = [ln.strip() for f in sorted(config.resolve(config.data.calib).glob("*.txt"))
             for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    extra = [s for key in sorted(topics) for s in _sentences(topics[key]) if s not in held_out]
    lines = list(dict.fromkeys(calib + extra))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def images_mirrored(folder: Path, config, transposed: bool = False) -> int:
    """The calibration images and their mirror images, as PNG (no second JPEG loss); with
    ``transposed`` also the transposes of those four (the 8 symmetries of the square: 90-degree turns
    included)."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(config.resolve(config.data.calib).glob("*.jpg")):
        img = Image.open(f).convert("RGB")
        four = (("", img), ("-lr", ImageOps.mirror(img)), ("-ud", ImageOps.flip(img)),
                ("-rot", ImageOps.flip(ImageOps.mirror(img))))
        if transposed:
            four += tuple((f"{tag}-t", im.transpose(Image.Transpose.TRANSPOSE)) for tag, im in four)
        for tag, im in four:
            im.save(folder / f"{f.stem}{tag}.png")
            n += 1
    return n


#: scikit-image photographs the detector's evaluation folder cuts its tiles from (skimage-page-*, skimage-text-*)
SKIMAGE_IN_EVAL = ("page.png", "text.png")


def images_mixed(folder: Path, config) -> int:
    """``more`` plus tiles of rendered book pages and scikit-image's photographs (see the module docstring)."""
    from PIL import Image

    n = images_mirrored(folder, config)
    pages = sorted((ROOT / "quantlab/models/layout-cdla/calib").glob("*.jpg"))
    for f in pages:
        img = Image.open(f).convert("RGB")
        img = img.resize((round(img.width * 1.5), round(img.height * 1.5)), Image.Resampling.LANCZOS)
        for i, (x, y) in enumerate([(0, 0), (img.width - 512, 0), (0, img.height - 512),
                                    (img.width - 512, img.height - 512)]):
            img.crop((x, y, x + 512, y + 512)).save(folder / f"page-{f.stem}-{i}.jpg", quality=95)
            n += 1
    import skimage

    for f in sorted((Path(skimage.__file__).parent / "data").iterdir()):
        if f.suffix not in (".png", ".jpg") or f.name in SKIMAGE_IN_EVAL:
            continue
        img = Image.open(f).convert("RGB")
        scale = 512 / min(img.size)
        img = img.resize((max(512, round(img.width * scale)), max(512, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
        x, y = (img.width - 512) // 2, (img.height - 512) // 2
        img.crop((x, y, x + 512, y + 512)).save(folder / f"photo-{f.stem}.jpg", quality=95)
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--calibrator", default="minmax")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", choices=["calib", "more", "dihedral", "mixed"], default="calib")
    ap.add_argument("--data-dir", help="a training folder built before (e.g. by --data mixed --build-only)")
    ap.add_argument("--build-only", action="store_true", help="build the --data folder and stop")
    ap.add_argument("--exclude", nargs="*", default=[], help="nodes kept in float: partial quantization + QAT")
    ap.add_argument("--source", choices=["onnx", "pytorch"], default="onnx")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--onnx", help="the model's ONNX file, when its package is not installed (detector)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    ap.add_argument("--learn-ranges", choices=["off", "activations", "all"], default="off")
    ap.add_argument("--range-lr", type=float, default=1e-2, help="learning rate of the learned steps (log s)")
    ap.add_argument("--primary", help="the metric that picks the best epoch (default: the config's)")
    ap.add_argument("--tolerance", help="JSON replacing [tolerance] ('{}': no early stop at a tolerance)")
    ap.add_argument("--eval", help="evaluation folder (and agreement set), replacing the config's")
    ap.add_argument("--task", help="replaces [compare] task (detector: 'dense' scores the probability map alone, "
                    "without rapidocr's box post-processing)")
    ap.add_argument("--work", help="folder for the run (default: a temporary folder)")
    ap.add_argument("--out", help="write the JSON summary here")
    args = ap.parse_args()

    from quantlab.ptq import run_ptq
    from quantlab.qat.run import qat_run

    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix=f"qat-{args.model}-"))
    config = load_config(ROOT / CONFIGS[args.model])
    if args.onnx:
        config = override(config, "model", onnx=str(Path(args.onnx).resolve()))
    config = override(config, "ptq", calibrators=(args.calibrator,), targets=("tensorrt",), out=str(work),
                      run_name=f"{args.model}-{args.calibrator}-{args.data}-{args.lr:g}-{args.learn_ranges}-{args.range_lr:g}",
                      report=False, latency_runs=0, exclude=tuple(config.ptq.exclude) + tuple(args.exclude))
    config = override(config, "compare", latency_runs=0, layers=False, primary=args.primary, task=args.task)
    if args.eval:
        folder = str(Path(args.eval).resolve())
        config = override(config, "compare", eval=folder, extra=folder if config.compare.extra else None)
    if args.tolerance is not None:
        config = dataclasses.replace(config, tolerance=json.loads(args.tolerance))
    data = None
    if args.data_dir:
        data = str(Path(args.data_dir).resolve())
    elif args.data in ("more", "dihedral", "mixed"):
        folder = work / "train-data"
        if args.model == "minilm":
            n = minilm_extra(folder, config)
        elif args.data == "mixed":
            n = images_mixed(folder, config)
        else:
            n = images_mirrored(folder, config, transposed=args.data == "dihedral")
        print(f"training data: {n} samples in {folder}", flush=True)
        data = str(folder)
    if args.build_only:
        return 0
    config = override(config, "qat", epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, patience=args.patience,
                      batch_size=args.batch_size, device=args.device, source=args.source, data=data,
                      learn_ranges=args.learn_ranges, range_lr=args.range_lr, max_steps=args.max_steps)
    t0 = time.perf_counter()
    ptq = run_ptq(config)
    ptq_seconds = time.perf_counter() - t0
    print(f"PTQ {args.calibrator}/tensorrt: {ptq_seconds:.1f} s", flush=True)

    def epoch_line(r) -> None:
        minutes = (time.perf_counter() - t_qat) / 60
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        print(f"epoch {r.epoch:3d}: metric {metric}{' *' if r.best else '  '} loss {r.loss:.5f} "
              f"epoch {r.seconds:6.1f} s, total {minutes:5.2f} min", flush=True)

    t_qat = time.perf_counter()
    result = qat_run(config, ptq.run_dir, calibrator=args.calibrator, on_epoch=epoch_line)
    qat_minutes = (time.perf_counter() - t_qat) / 60
    print(result, flush=True)
    summary = {
        "model": args.model, "calibrator": args.calibrator, "data": args.data_dir or args.data, "exclude": args.exclude, "optimizer": args.optimizer,
        "lr": args.lr, "batch_size": args.batch_size, "source": args.source, "device": result.qat.device,
        "primary": result.primary, "start": None if result.start is None else result.start.metrics.get(result.primary),
        "metrics": result.qat.metrics, "losses": result.qat.losses, "epoch_seconds": result.qat.epoch_seconds,
        "best_epoch": result.qat.best_epoch, "final": result.final.metrics.get(result.primary),
        "tolerance_ok": result.final.tolerance_ok, "stop": result.qat.stop, "steps": result.qat.steps,
        "train_step_ms": round(result.qat.seconds.get("train_step", 0.0) * 1000, 1),
        "tensorrt_rules": result.qat.tensorrt_rules, "conversion": result.qat.conversion,
        "learn_ranges": args.learn_ranges, "range_lr": args.range_lr, "ranges": result.qat.ranges,
        "per_epoch": result.per_epoch, "fp32": result.reference,
        "start_metrics": None if result.start is None else result.start.metrics,
        "qat_minutes": round(qat_minutes, 2), "ptq_seconds": round(ptq_seconds, 1),
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
    }
    text = json.dumps(summary, indent=1)
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
