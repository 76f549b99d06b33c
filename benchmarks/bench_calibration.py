"""Calibration cost as a user feels it: whole commands, wall time and peak memory, against ONNX Runtime.

What is compared, each case a fresh process started the way a user starts it
    * ``quantlab ptq --model M --calib DIR --calibrator all --target all --no-report`` (every
      calibrator, every target, the checks and the files of a run folder), and the same command
      with its report;
    * ``quantlab ptq ... --calibrator minmax --target ort-cpu --no-report``: the one model
      ``quantize_static`` writes, for a like-for-like row;
    * ONNX Runtime's ``quantize_static`` (QDQ, QUInt8 activations, QInt8 per-channel weights) with
      ``CalibrationMethod.MinMax`` and ``.Entropy``, as a small script that reads the same ``.npz``
      files with NumPy;
    * a bare FP32 inference pass over the same samples (ONNX Runtime's default session options):
      the floor every calibration stands on, since each sample must be run once;

  on the same prepared FP32 EfficientNet-Lite0 (``prepare_model(resolve_model(config)).path``) and
  the same samples, batch size 8, at several sample counts.

Samples
    The 19 photographs of ``calib_data/`` are too few, so each is turned into up to 54 deterministic
    224x224 crops (shorter side scaled to 256, 294 or 333 pixels, crop at one of 9 positions,
    mirrored or not), pre-processed once by quantlab's reader (mean 127, std 128) and saved as one
    ``.npz`` per sample, keyed by the model's input name.  Every tool reads those files.

Measurement
    Each case runs under ``/usr/bin/time`` (peak resident memory of the process, ``%M``; user and
    system CPU seconds); the wall time is taken around the process, Python start-up, imports and
    model loading included.  The model is exported, prepared and loaded once before anything is
    timed, so caches (quantlab's model cache, numba's compiled kernel, the OS file cache) are warm
    for every tool alike.  The machine may be shared: every case runs ``--repeat`` times in
    interleaved rounds (each round runs every case once, one after the other), the tables show
    medians, and ratios are taken within a round (between processes that ran one after the other)
    and then their median over the rounds.  ``uptime`` is printed before and after.

    ONNX Runtime's Entropy keeps every intermediate activation in memory (8 GB for 128 samples of
    this model), so it runs at 128 samples only; so does quantlab with its report, whose cost (the
    figures of one run folder) does not depend on the number of samples.

    A second table breaks quantlab's all-calibrators run down by phase from its ``timing.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "quantlab.toml"
BATCH_SIZE = 8
TIME = "/usr/bin/time"

# crop variants: (shorter side scale, (x, y) crop position as a fraction of the slack, mirror)
SCALES = (1.0, 1.15, 1.3)
POSITIONS = ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0), (0.0, 0.5), (1.0, 0.5))
MIRRORS = (False, True)
RESIZE, CROP = 256, 224
ENTROPY_MAX_SAMPLES = 128  # ONNX Runtime's Entropy holds every activation: 8 GB at 128 samples
REPORT_MAX_SAMPLES = 128  # the report's cost does not depend on the sample count: measured once


# --- calibration samples --------------------------------------------------------------------------


def crop_variants() -> list[tuple[float, tuple[float, float], bool]]:
    """The fixed list of (scale, position, mirror) choices; the first one is the plain centre crop."""
    return [(s, p, m) for p, m, s in itertools.product(POSITIONS, MIRRORS, SCALES)]


def make_crop(photo: Path, scale: float, position: tuple[float, float], mirror: bool):
    """One 224x224 RGB crop of ``photo`` (a PIL image)."""
    from PIL import Image

    with Image.open(photo) as img:
        img = img.convert("RGB")
        factor = round(RESIZE * scale) / min(img.size)
        img = img.resize((max(CROP, round(img.size[0] * factor)), max(CROP, round(img.size[1] * factor))),
                         Image.Resampling.BILINEAR)
        left = round(position[0] * (img.size[0] - CROP))
        top = round(position[1] * (img.size[1] - CROP))
        img = img.crop((left, top, left + CROP, top + CROP))
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else img


def make_crops(photos_dir: Path, out_dir: Path, count: int) -> None:
    """Write ``count`` crops as PNG files into ``out_dir``; sorted names cycle through the photos."""
    photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    variants = crop_variants()
    if count > len(photos) * len(variants):
        raise SystemExit(f"at most {len(photos) * len(variants)} samples can be made from {len(photos)} photos, {count} asked")
    pairs = ((i, v, p) for i, v in enumerate(variants) for p in photos)
    for index, (scale, position, mirror), photo in itertools.islice(pairs, count):
        make_crop(photo, scale, position, mirror).save(out_dir / f"{index:02d}-{photo.stem}.png", compress_level=1)


def make_samples(work: Path, count: int) -> tuple[Path, Path]:
    """Prepare the model (cached) and write ``count`` pre-processed samples, one ``.npz`` each."""
    import dataclasses

    import numpy as np

    from quantlab.config import load_config
    from quantlab.data import make_reader
    from quantlab.model import prepare_model
    from quantlab.ptq import resolve_model

    config = load_config(CONFIG_FILE)
    prepared = prepare_model(resolve_model(config), config.model.input_shapes)
    crops = work / "crops"
    crops.mkdir()
    make_crops(config.resolve(config.data.calib), crops, count)
    preprocess = dataclasses.replace(config.data.preprocess, resize=None)  # the crops are 224x224 already
    data = dataclasses.replace(config.data, calib=str(crops), batch_size=BATCH_SIZE, max_samples=0, preprocess=preprocess)
    arrays = work / "arrays"
    arrays.mkdir()
    index = 0
    for feed in make_reader(data, crops, prepared.inputs):
        for i in range(next(iter(feed.values())).shape[0]):
            np.savez(arrays / f"{index:05d}.npz", **{k: v[i] for k, v in feed.items()})
            index += 1
    shutil.rmtree(crops)
    return prepared.path, arrays


def sample_folder(arrays: Path, work: Path, count: int) -> Path:
    """A folder holding (links to) the first ``count`` samples."""
    folder = work / f"samples-{count}"
    if not folder.exists():
        folder.mkdir()
        for f in sorted(arrays.iterdir())[:count]:
            (folder / f.name).symlink_to(f)
    return folder


# --- the small scripts a user would write for ONNX Runtime (run as children of this file) ---------


def npz_batches(folder: Path, batch_size: int):
    """Batches of ``.npz`` samples stacked along a new axis 0, in sorted file order."""
    import numpy as np

    files = sorted(folder.glob("*.npz"))
    for start in range(0, len(files), batch_size):
        samples = []
        for f in files[start:start + batch_size]:
            with np.load(f) as z:
                samples.append({k: z[k] for k in z.files})
        yield {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def child_ort(method: str, model: Path, data: Path, out: Path) -> None:
    """``quantize_static`` with ONNX Runtime's ``method`` over the samples of ``data``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.batches = npz_batches(data, BATCH_SIZE)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=getattr(CalibrationMethod, method))


def child_infer(model: Path, data: Path) -> None:
    """One FP32 inference pass over the samples, ONNX Runtime's default CPU session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for feed in npz_batches(data, BATCH_SIZE):
        session.run(None, feed)


# --- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One command, by the row it fills."""

    key: str
    label: str
    argv: Callable[[Path, Path, Path], list[str]]  # (model, samples, out folder) -> command line
    max_samples: int | None = None


def quantlab_argv(*flags: str) -> Callable[[Path, Path, Path], list[str]]:
    def argv(model: Path, data: Path, out: Path) -> list[str]:
        return [sys.executable, "-m", "quantlab.cli", "ptq", "--model", str(model), "--calib", str(data),
                "--out", str(out), "--name", "bench", "--batch-size", str(BATCH_SIZE), *flags]
    return argv


def child_argv(*args: str) -> Callable[[Path, Path, Path], list[str]]:
    def argv(model: Path, data: Path, out: Path) -> list[str]:
        extra = [str(out / "model.int8.onnx")] if args[0] == "ort" else []
        return [sys.executable, str(Path(__file__).resolve()), "--child", *args, str(model), str(data), *extra]
    return argv


CASES = (
    Case("ql_all", "quantlab ptq, all calibrators and targets, --no-report",
         quantlab_argv("--calibrator", "all", "--target", "all", "--no-report")),
    Case("ql_all_report", "quantlab ptq, all calibrators and targets, with report",
         quantlab_argv("--calibrator", "all", "--target", "all"), REPORT_MAX_SAMPLES),
    Case("ql_minmax", "quantlab ptq, minmax, ort-cpu, --no-report",
         quantlab_argv("--calibrator", "minmax", "--target", "ort-cpu", "--no-report")),
    Case("ort_minmax", "ONNX Runtime quantize_static, MinMax", child_argv("ort", "MinMax")),
    Case("ort_entropy", "ONNX Runtime quantize_static, Entropy", child_argv("ort", "Entropy"), ENTROPY_MAX_SAMPLES),
    Case("infer", "FP32 inference pass (ONNX Runtime defaults)", child_argv("infer")),
)

# (numerator, denominator, what the issue asks of the ratio)
RATIOS = (
    ("ql_all", "ort_minmax", "<= 1.0"),
    ("ql_all", "infer", "<= 1.5"),
    ("ql_all_report", "ql_all", "<= 1.2"),
    ("ql_minmax", "ort_minmax", ""),
    ("ql_minmax", "infer", ""),
    ("ort_minmax", "infer", ""),
    ("ql_all", "ort_entropy", ""),
)


@dataclass
class Run:
    """One process: wall seconds, peak RSS in MB, CPU seconds (user + system); ``error`` if it failed."""

    wall_s: float = 0.0
    peak_mb: float = 0.0
    cpu_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    error: str = ""


def measure(argv: list[str], out: Path, timeout: float) -> Run:
    """Run ``argv`` under ``/usr/bin/time`` in the repository root; quantlab's phases from timing.json."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stats = out.parent / "time.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run([TIME, "-o", str(stats), "-f", "%M %U %S", *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return Run(error=f"over {timeout:.0f} s")
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # quantlab exits 1 when a check fails: the work was done
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return Run(error=tail[:200])
    peak_kb, user, system = stats.read_text().split()[-3:]
    timing = out / "bench" / "timing.json"
    phases = json.loads(timing.read_text())["seconds"] if timing.exists() else {}
    return Run(wall, int(peak_kb) / 1024, float(user) + float(system), phases)


def run_rounds(model: Path, arrays: Path, work: Path, counts: Sequence[int], repeat: int,
               timeout: float) -> dict[tuple[str, int], list[Run]]:
    """Every case at every count, ``repeat`` rounds; within a round the cases run one after the other."""
    runs: dict[tuple[str, int], list[Run]] = {}
    for round_ in range(1, repeat + 1):
        for n in counts:
            data = sample_folder(arrays, work, n)
            for case in CASES:
                if case.max_samples is not None and n > case.max_samples:
                    continue
                r = measure(case.argv(model, data, work / "out" / "run"), work / "out" / "run", timeout)
                runs.setdefault((case.key, n), []).append(r)
                what = r.error or f"{r.wall_s:6.1f} s wall, {r.cpu_s:6.1f} s CPU, {r.peak_mb:6.0f} MB"
                print(f"  [{round_}/{repeat}] {n:>5} samples  {case.key:<14} {what}", flush=True)
    return runs


# --- reporting ------------------------------------------------------------------------------------


def median_of(runs: list[Run], attr: str) -> float | None:
    ok = [getattr(r, attr) for r in runs if not r.error]
    return statistics.median(ok) if ok else None


def ratio(runs: dict[tuple[str, int], list[Run]], a: str, b: str, n: int) -> float | None:
    """Median over rounds of wall(a) / wall(b), each pair from the same round."""
    pairs = [x.wall_s / y.wall_s for x, y in zip(runs.get((a, n), []), runs.get((b, n), []))
             if not x.error and not y.error and y.wall_s > 0]
    return statistics.median(pairs) if pairs else None


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    return "\n".join(lines)


def main_table(runs: dict[tuple[str, int], list[Run]], counts: Sequence[int]) -> list[list[str]]:
    head = ["command"] + [f"{n} {what}" for n in counts for what in ("wall s", "CPU s", "peak MB")]
    body = []
    for case in CASES:
        row = [case.label]
        for n in counts:
            got = runs.get((case.key, n))
            if not got:
                row += ["not run", "-", "-"]
            elif all(r.error for r in got):
                row += ["failed", "-", "-"]
            else:
                row += [fmt(median_of(got, "wall_s")), fmt(median_of(got, "cpu_s")), fmt(median_of(got, "peak_mb"), 0)]
        body.append(row)
    return [head, *body]


def ratio_table(runs: dict[tuple[str, int], list[Run]], counts: Sequence[int]) -> list[list[str]]:
    labels = {c.key: c.key for c in CASES}
    head = ["wall-time ratio", *(f"{n} samples" for n in counts), "goal"]
    body = []
    for a, b, goal in RATIOS:
        cells = [fmt(ratio(runs, a, b, n), 2) for n in counts]
        if any(c != "-" for c in cells):
            body.append([f"{labels[a]} / {labels[b]}", *cells, goal or "-"])
    return [head, *body]


PHASES = (("prepare", ("prepare",)), ("statistics", ("statistics",)), ("fp16", ("fp16",)), ("ranges", ("ranges:",)),
          ("quantize", ("qdq:",)), ("checks", ("checks:",)), ("dynamic", ("dynamic:",)))


def phase_table(runs: dict[tuple[str, int], list[Run]], counts: Sequence[int]) -> list[list[str]]:
    """quantlab's all-calibrators run by phase (median over rounds); 'outside' is wall less the phases:
    Python start-up, imports, configuration, writing tables and the manifest."""
    head = ["phase (ql_all)", *(f"{n} samples s" for n in counts)]
    rows = []
    for name, prefixes in PHASES:
        row = [name]
        for n in counts:
            vals = [sum(v for k, v in r.phases.items() if k.startswith(prefixes)) for r in runs.get(("ql_all", n), []) if not r.error]
            row.append(fmt(statistics.median(vals) if vals else None, 2))
        rows.append(row)
    outside = ["outside the phases"]
    for n in counts:
        vals = [r.wall_s - sum(v for k, v in r.phases.items() if any(k.startswith(p) for _, ps in PHASES for p in ps))
                for r in runs.get(("ql_all", n), []) if not r.error]
        outside.append(fmt(statistics.median(vals) if vals else None, 2))
    return [head, *rows, outside]


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- entry points ---------------------------------------------------------------------------------


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def environment() -> str:
    import numba
    import onnxruntime

    return (f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}, "
            f"numba {numba.__version__}")


def warm_up(model: Path, arrays: Path, work: Path, timeout: float) -> Run:
    """One small quantlab run (untimed): the prepared-model cache and numba's compile cache are filled."""
    data = sample_folder(arrays, work, BATCH_SIZE)
    return measure(CASES[0].argv(model, data, work / "out" / "run"), work / "out" / "run", timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[128, 1024], help="calibration sample counts")
    parser.add_argument("--quick", action="store_true", help="64 samples, one round (a smoke run)")
    parser.add_argument("--repeat", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per process (default 900)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "ort":
            child_ort(rest[0], Path(rest[1]), Path(rest[2]), Path(rest[3]))
        else:
            child_infer(Path(rest[0]), Path(rest[1]))
        return 0
    if not Path(TIME).exists():
        parser.error(f"{TIME} is needed to measure peak memory: install GNU time")
    counts = [64] if args.quick else sorted(set(args.samples))
    if min(counts) <= 0 or any(n % BATCH_SIZE for n in counts):
        parser.error(f"sample counts must be positive multiples of the batch size {BATCH_SIZE}")
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running case, remove the samples
    work = Path(tempfile.mkdtemp(prefix="quantlab-bench-"))
    try:
        print(f"machine: {environment()}")
        print(f"preparing the model and {max(counts)} samples ...", flush=True)
        model, arrays = make_samples(work, max(counts))
        warm = warm_up(model, arrays, work, args.timeout)
        if warm.error:
            print(f"warm-up failed: {warm.error}", file=sys.stderr)
            return 1
        before = uptime()
        print(f"before: {before}", flush=True)
        runs = run_rounds(model, arrays, work, counts, repeat, args.timeout)
        after = uptime()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"after:  {after}\n")
    print(f"Whole processes, median of {repeat} round(s):\n")
    print(plain(main_table(runs, counts)))
    print("\nWall-time ratios, each taken within a round, median over rounds:\n")
    print(plain(ratio_table(runs, counts)))
    print("\nquantlab ptq (all calibrators and targets, --no-report) by phase, from its timing.json:\n")
    print(plain(phase_table(runs, counts)))
    failed = [(k, n, r.error) for (k, n), rs in runs.items() for r in rs if r.error]
    for key, n, error in failed:
        print(f"failed: {key} at {n} samples: {error}")
    print("\nMarkdown:\n")
    print(markdown(main_table(runs, counts)))
    print()
    print(markdown(ratio_table(runs, counts)))
    print()
    print(markdown(phase_table(runs, counts)))
    print(f"\n- EfficientNet-Lite0, batch size {BATCH_SIZE}, {environment()}; every case a fresh process.")
    print(f"- load: before `{before}`; after `{after}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
