"""Calibration cost: quantlab against ONNX Runtime's ``quantize_static``, wall time and peak memory.

What is compared
    * quantlab ``run_ptq`` with the calibrators ``minmax`` alone, ``entropy`` alone and all four
      (``minmax, percentile, entropy, mse``), target ``ort-cpu`` only and no latency runs, so each
      calibrator yields one U8S8 Q/DQ model, as ``quantize_static`` does;
    * ONNX Runtime's ``quantize_static`` (QDQ, QUInt8 activations, QInt8 per-channel weights) with
      ``CalibrationMethod.MinMax``, ``.Entropy`` and ``.Percentile``;

  on the same pre-processed FP32 EfficientNet-Lite0 (``prepare_model(resolve_model(config)).path``)
  and the same calibration batches (batch size 8), at several sample counts.

Samples
    The 19 photographs of ``calib_data/`` are too few, so each is turned into up to 54 deterministic
    224x224 crops: shorter side scaled to 256, 294 or 333 pixels, crop at one of 9 positions (centre,
    corners, edge midpoints), mirrored or not.  The crops are saved as PNG files in a temporary
    folder, named so that sorted order cycles through all photographs.  quantlab reads the folder with
    the configured preprocessing (crop 224, mean 127, std 128; a 224x224 image is not resized), and
    ONNX Runtime gets its batches from quantlab's own reader (``quantlab.data.make_reader``), so both
    see byte-identical float tensors.

Measurement
    The model is exported and prepared once, in this process, before anything is timed (both tools
    use the shared quantlab cache).  One small quantlab run with every calibrator then fills numba's
    compile cache, so compilation is not in the numbers.  Each case then runs in a fresh Python
    process, which times the calibrate-and-write step itself (``quantize_static`` for ONNX Runtime;
    ``run_ptq`` less its ``prepare`` phase for quantlab: statistics pass, FP16 copy, ranges, Q/DQ
    models, checks) and reports its peak resident memory (``ru_maxrss``).  Timings on a shared
    machine are noisy: every case runs ``--repeat`` times (default 3) in interleaved rounds, the
    fastest time and the highest peak memory are kept (load from other work only adds time), and
    the targets are checked on ratios measured in the same run.

    ONNX Runtime's Entropy and Percentile calibrators keep every intermediate activation in memory
    (8.5 GB for 128 samples of this model, measured here), so they run at 128 samples only; larger
    counts are reported with a linear extrapolation of their memory instead of being run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "quantlab.toml"
BATCH_SIZE = 8
RESULT_MARK = "BENCH-RESULT "

# crop variants: (shorter side scale, (x, y) crop position as a fraction of the slack, mirror)
SCALES = (1.0, 1.15, 1.3)
POSITIONS = ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.0), (0.5, 1.0), (0.0, 0.5), (1.0, 0.5))
MIRRORS = (False, True)
RESIZE, CROP = 256, 224

QUANTLAB_METHODS: dict[str, tuple[str, ...]] = {
    "minmax": ("minmax",),
    "entropy": ("entropy",),
    "all": ("minmax", "percentile", "entropy", "mse"),
}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
ORT_STORES_ACTIVATIONS = ("Entropy", "Percentile")  # memory grows with the sample count
ORT_STORED_MAX_SAMPLES = 128


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


def make_samples(photos_dir: Path, out_dir: Path, count: int) -> int:
    """Write ``count`` crops as PNG files into ``out_dir``; sorted names cycle through the photos."""
    photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    variants = crop_variants()
    available = len(photos) * len(variants)
    if count > available:
        raise SystemExit(f"at most {available} samples can be made from {len(photos)} photos, {count} asked")
    written = 0
    for index, (scale, position, mirror) in enumerate(variants):
        for photo in photos:
            if written == count:
                return written
            make_crop(photo, scale, position, mirror).save(out_dir / f"{index:02d}-{photo.stem}.png", compress_level=1)
            written += 1
    return written


# --- cases and their outcomes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measurement: a tool, a calibration method of that tool, a sample count."""

    tool: str  # "quantlab" or "ort"
    method: str
    samples: int

    @property
    def row(self) -> str:
        return f"quantlab {self.method}" if self.tool == "quantlab" else f"ORT {self.method}"

    def arg(self) -> str:
        return f"{self.tool}:{self.method}:{self.samples}"

    @staticmethod
    def parse(text: str) -> Case:
        tool, method, samples = text.split(":")
        return Case(tool, method, int(samples))


@dataclass
class Outcome:
    """What a case gave: ``status`` is ok, failed, timeout or skipped."""

    case: Case
    status: str
    wall_s: float | None = None
    peak_gb: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def plan(sample_counts: Sequence[int]) -> list[Case]:
    """Every case, grouped by sample count so each group is measured under similar machine load."""
    cases = []
    for n in sample_counts:
        cases += [Case("quantlab", m, n) for m in QUANTLAB_METHODS]
        cases += [Case("ort", m, n) for m in ORT_METHODS]
    return cases


def rows() -> list[str]:
    return [Case("quantlab", m, 0).row for m in QUANTLAB_METHODS] + [Case("ort", m, 0).row for m in ORT_METHODS]


# --- one case, inside its own process -------------------------------------------------------------


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (10^9 bytes); Linux reports ``ru_maxrss`` in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def bench_config(model: Path, data: Path, samples: int, calibrators: tuple[str, ...], out: Path):
    """The repository's ``quantlab.toml`` pointed at the exported model and the sample folder."""
    from quantlab.config import load_config, override

    config = load_config(CONFIG_FILE)
    config = override(config, "model", onnx=str(model))
    preprocess = dataclasses.replace(config.data.preprocess, resize=None)  # crops are 224x224 already
    config = override(config, "data", calib=str(data), batch_size=BATCH_SIZE, max_samples=samples, preprocess=preprocess)
    return override(config, "ptq", calibrators=calibrators, targets=("ort-cpu",), out=str(out),
                    run_name="bench", latency_runs=0, report=False)  # ORT writes no report either


def run_quantlab(case: Case, model: Path, data: Path, work: Path) -> dict[str, Any]:
    """Time ``run_ptq`` less its ``prepare`` phase (a cache hit: the model was prepared beforehand)."""
    from quantlab.ptq import run_ptq

    config = bench_config(model, data, case.samples, QUANTLAB_METHODS[case.method], work)
    start = time.perf_counter()
    result = run_ptq(config)
    total = time.perf_counter() - start
    return {"wall_s": total - result.seconds.get("prepare", 0.0), "phases": dict(result.seconds)}


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` over quantlab's batches: one batch per ``get_next``.

    ORT recognises any object with a ``get_next`` method as a reader (a structural subclass check).
    """

    def __init__(self, batches: Iterable[dict[str, Any]]) -> None:
        self._batches: Iterator[dict[str, Any]] = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._batches, None)


def run_ort(case: Case, model: Path, data: Path, work: Path) -> dict[str, Any]:
    """Time ``quantize_static`` on the prepared model with quantlab's batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from quantlab.data import make_reader
    from quantlab.model import prepare_model

    config = bench_config(model, data, case.samples, ("minmax",), work)
    prepared = prepare_model(model, config.model.input_shapes)
    reader = make_reader(config.data, data, prepared.inputs)
    start = time.perf_counter()
    quantize_static(
        str(prepared.path), str(work / "model.int8.onnx"), FeedReader(reader),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=True, calibrate_method=getattr(CalibrationMethod, case.method),
        extra_options={"CalibPercentile": config.ptq.percentile},
    )
    return {"wall_s": time.perf_counter() - start, "phases": {}}


def run_case_here(case: Case, model: Path, data: Path) -> None:
    """Run one case in this process and print its result as one JSON line."""
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-") as work:
        runner = run_quantlab if case.tool == "quantlab" else run_ort
        result = runner(case, model, data, Path(work))
    result["peak_gb"] = peak_rss_gb()
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- driving the cases from the parent process ----------------------------------------------------


def run_case(case: Case, model: Path, data: Path, timeout: float) -> Outcome:
    """Run ``case`` in a fresh Python process; failures and timeouts become outcomes, not errors."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case.arg(), "--model", str(model), "--data", str(data)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return Outcome(case, "timeout", note=f"over {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (out of memory?)"
        return Outcome(case, "failed", note=tail[:200])
    reported = json.loads(lines[-1][len(RESULT_MARK):])
    return Outcome(case, "ok", reported["wall_s"], reported["peak_gb"], reported.get("phases", {}))


def skipped(case: Case, outcomes: dict[Case, Outcome]) -> Outcome:
    """An ORT case left out for its memory, with that memory extrapolated from the smallest count.

    Memory = base + stored * samples / 128, where ``stored`` is the measured peak at 128 samples
    less the peak of ORT MinMax at 128 samples (same process, reader and model, no stored outputs).
    """
    small = ORT_STORED_MAX_SAMPLES
    measured = outcomes.get(Case("ort", case.method, small))
    base = outcomes.get(Case("ort", "MinMax", small))
    note = "skipped: memory grows with samples"
    if measured is None or not measured.ok:
        return Outcome(case, "skipped", note=note)
    base_gb = base.peak_gb if base is not None and base.ok else 0.0
    estimate = base_gb + (measured.peak_gb - base_gb) * case.samples / small
    return Outcome(case, "skipped", peak_gb=estimate, note=f"{note}, ~{estimate:.0f} GB extrapolated")


def warm_up(model: Path, data: Path, timeout: float) -> Outcome:
    """One small quantlab run with every calibrator (not timed): fills numba's compile cache."""
    return run_case(Case("quantlab", "all", BATCH_SIZE), model, data, timeout)


def too_big(case: Case) -> bool:
    """Whether a case is left out because its memory grows with the sample count."""
    return case.tool == "ort" and case.method in ORT_STORES_ACTIVATIONS and case.samples > ORT_STORED_MAX_SAMPLES


def best(runs: list[Outcome]) -> Outcome:
    """The repeats of one case as one outcome: the fastest run's time, the highest peak memory."""
    ok = [o for o in runs if o.ok]
    if not ok:
        return runs[-1]
    fastest = min(ok, key=lambda o: o.wall_s)
    failed = len(runs) - len(ok)
    note = f"{failed} of {len(runs)} runs failed: {runs[-1].note}" if failed else ""
    return dataclasses.replace(fastest, peak_gb=max(o.peak_gb for o in ok), note=note)


def run_all(cases: list[Case], model: Path, data: Path, timeout: float, repeat: int) -> dict[Case, Outcome]:
    """Run every case ``repeat`` times in interleaved rounds, so load changes spread over all cases."""
    runs: dict[Case, list[Outcome]] = {case: [] for case in cases if not too_big(case)}
    for round_ in range(1, repeat + 1):
        for case, done in runs.items():
            done.append(run_case(case, model, data, timeout))
            print(f"  [{round_}/{repeat}] {case.row:<16} {case.samples:>5} samples: {describe(done[-1])}", flush=True)
    outcomes = {case: best(done) for case, done in runs.items()}
    for case in filter(too_big, cases):
        outcomes[case] = skipped(case, outcomes)
        print(f"  {case.row:<22} {case.samples:>5} samples: {describe(outcomes[case])}", flush=True)
    return {case: outcomes[case] for case in cases}


# --- reporting ------------------------------------------------------------------------------------


def describe(outcome: Outcome) -> str:
    if outcome.ok:
        return f"{outcome.wall_s:.1f} s, {outcome.peak_gb:.2f} GB"
    return f"{outcome.status}: {outcome.note}" if outcome.status != "skipped" else outcome.note


def cells(outcome: Outcome | None) -> tuple[str, str]:
    """(wall, memory) cells of the table."""
    if outcome is None:
        return "-", "-"
    if outcome.ok:
        return f"{outcome.wall_s:.1f}", f"{outcome.peak_gb:.2f}"
    if outcome.status == "skipped":
        return "skipped", "-" if outcome.peak_gb is None else f"~{outcome.peak_gb:.0f} (est.)"
    return outcome.status, "-"


def table(outcomes: dict[Case, Outcome], sample_counts: Sequence[int]) -> list[list[str]]:
    """Header row then one row per tool and method: wall s and peak RSS GB per sample count."""
    head = ["tool / method"] + [f"{n} {what}" for n in sample_counts for what in ("wall s", "peak GB")]
    body = []
    for label in rows():
        row = [label]
        for n in sample_counts:
            row += cells(next((o for c, o in outcomes.items() if c.row == label and c.samples == n), None))
        body.append(row)
    return [head, *body]


def plain(rows_: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows_) for i in range(len(rows_[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows_]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows_: list[list[str]]) -> str:
    lines = ["| " + " | ".join(r) + " |" for r in rows_]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(rows_[0]) - 1)) + "|")
    return "\n".join(lines)


def phase_sums(o: Outcome) -> dict[str, float]:
    """quantlab's phases (``PtqResult.seconds``) summed over calibrators; ``other`` is the remainder."""
    sums = {
        "statistics": o.phases.get("statistics", 0.0),
        "fp16": o.phases.get("fp16", 0.0),
        "ranges": sum(v for k, v in o.phases.items() if k.startswith("ranges:")),
        "qdq": sum(v for k, v in o.phases.items() if k.startswith("qdq:")),
    }
    sums["other"] = o.wall_s - sum(sums.values())
    return sums


def phase_table(outcomes: dict[Case, Outcome]) -> list[list[str]]:
    head = ["quantlab case", "samples", "statistics", "fp16", "ranges", "qdq", "other", "wall"]
    body = [
        [case.method, str(case.samples)] + [f"{v:.1f}" for v in (*phase_sums(o).values(), o.wall_s)]
        for case, o in outcomes.items() if case.tool == "quantlab" and o.ok
    ]
    return [head, *body]


def dominant(o: Outcome, minus: Outcome | None = None) -> str:
    """The phase holding most of ``o``'s time (or of its excess over ``minus``)."""
    sums = phase_sums(o)
    if minus is not None:
        sums = {k: v - phase_sums(minus)[k] for k, v in sums.items()}
    name = max(sums, key=sums.get)
    return f"{name} {'+' if minus else ''}{sums[name]:.1f} s"


def verdict(passed: bool | None) -> str:
    return "n/a " if passed is None else ("PASS" if passed else "FAIL")


def get(outcomes: dict[Case, Outcome], tool: str, method: str, n: int) -> Outcome | None:
    o = outcomes.get(Case(tool, method, n))
    return o if o is not None and o.ok else None


def target_speed(outcomes: dict[Case, Outcome]) -> str:
    """(1) quantlab entropy at least 5x faster than ORT Entropy at 128 samples."""
    n = ORT_STORED_MAX_SAMPLES
    ql, ort = get(outcomes, "quantlab", "entropy", n), get(outcomes, "ort", "Entropy", n)
    if ql is None or ort is None:
        return f"{verdict(None)} (1) quantlab entropy >= 5x faster than ORT Entropy at {n} samples: a case is missing"
    ratio = ort.wall_s / ql.wall_s
    why = "" if ratio >= 5.0 else f"; short by {5.0 / ratio:.2f}x, largest phase: {dominant(ql)}"
    return (f"{verdict(ratio >= 5.0)} (1) quantlab entropy >= 5x faster than ORT Entropy at {n} samples: "
            f"{ratio:.1f}x ({ql.wall_s:.1f} s vs {ort.wall_s:.1f} s){why}")


def target_memory(outcomes: dict[Case, Outcome], sample_counts: Sequence[int]) -> list[str]:
    """(2) quantlab peak memory under 1.5 GB, and flat: largest count within 10% of the smallest."""
    mine = [o for c, o in outcomes.items() if c.tool == "quantlab" and o.ok]
    lines = []
    if mine:
        worst = max(mine, key=lambda o: o.peak_gb)
        lines.append(f"{verdict(worst.peak_gb < 1.5)} (2a) quantlab peak memory < 1.5 GB: "
                     f"highest {worst.peak_gb:.2f} GB ({worst.case.method}, {worst.case.samples} samples)")
    else:
        lines.append(f"{verdict(None)} (2a) quantlab peak memory < 1.5 GB: no quantlab case ran")
    lo, hi = min(sample_counts), max(sample_counts)
    if lo == hi:
        return lines + [f"{verdict(None)} (2b) quantlab memory flat in samples: needs two sample counts (not with --quick)"]
    for method in QUANTLAB_METHODS:
        a, b = get(outcomes, "quantlab", method, lo), get(outcomes, "quantlab", method, hi)
        what = f"(2b) quantlab {method} memory flat, {hi} within 10% of {lo} samples"
        if a is None or b is None:
            lines.append(f"{verdict(None)} {what}: a case is missing")
        else:
            growth = b.peak_gb / a.peak_gb - 1.0
            lines.append(f"{verdict(growth <= 0.10)} {what}: {growth:+.1%} ({a.peak_gb:.2f} -> {b.peak_gb:.2f} GB)")
    return lines


def target_all(outcomes: dict[Case, Outcome], sample_counts: Sequence[int]) -> list[str]:
    """(3) quantlab with all four calibrators at most 1.3x the wall time of minmax alone."""
    lines = []
    for n in sample_counts:
        a, b = get(outcomes, "quantlab", "minmax", n), get(outcomes, "quantlab", "all", n)
        what = f"(3) quantlab all <= 1.3x quantlab minmax at {n} samples"
        if a is None or b is None:
            lines.append(f"{verdict(None)} {what}: a case is missing")
        else:
            ratio = b.wall_s / a.wall_s
            why = "" if ratio <= 1.3 else f"; {ratio / 1.3 - 1:.0%} over, largest extra phase: {dominant(b, a)}"
            lines.append(f"{verdict(ratio <= 1.3)} {what}: {ratio:.2f}x ({b.wall_s:.1f} s vs {a.wall_s:.1f} s){why}")
    return lines


def report(outcomes: dict[Case, Outcome], sample_counts: Sequence[int], notes: list[str]) -> None:
    rows_ = table(outcomes, sample_counts)
    print("\nWall time of the calibrate+write step and peak RSS, per sample count:\n")
    print(plain(rows_))
    print("\nquantlab phases (seconds; 'other' is sanity checks and writing the run folder):\n")
    print(plain(phase_table(outcomes)))
    problems = [o for o in outcomes.values() if o.note and o.status != "skipped"]
    if problems:
        print("\nFailed runs:")
        for o in problems:
            print(f"  {o.case.row}, {o.case.samples} samples: {o.status if not o.ok else 'kept'}: {o.note}")
    print("\nTargets:")
    for line in [target_speed(outcomes), *target_memory(outcomes, sample_counts), *target_all(outcomes, sample_counts)]:
        print("  " + line)
    print("\nMarkdown:\n")
    print(markdown(rows_))
    print()
    for note in notes:
        print(f"- {note}")


# --- entry points ---------------------------------------------------------------------------------


def environment() -> str:
    import numba
    import onnxruntime

    return (f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__}, "
            f"numba {numba.__version__}")


def prepare(sample_count: int, work: Path) -> tuple[Path, Path]:
    """Export and prepare the model once (cached), and write the calibration crops."""
    from quantlab.config import load_config
    from quantlab.model import prepare_model
    from quantlab.ptq import resolve_model

    config = load_config(CONFIG_FILE)
    model = resolve_model(config)
    prepare_model(model, config.model.input_shapes)
    data = work / "samples"
    data.mkdir()
    make_samples(config.resolve(config.data.calib), data, sample_count)
    return model, data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[128, 256, 1024], help="calibration sample counts")
    parser.add_argument("--quick", action="store_true", help="128 samples only (a smoke run)")
    parser.add_argument("--repeat", type=int, help="runs per case, best time kept (default 3, 1 with --quick)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per case (default 600)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        run_case_here(Case.parse(args.case), args.model, args.data)
        return 0
    counts = [ORT_STORED_MAX_SAMPLES] if args.quick else sorted(set(args.samples))
    if min(counts) <= 0 or min(counts) % BATCH_SIZE:
        parser.error(f"sample counts must be positive multiples of the batch size {BATCH_SIZE}")
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running case, remove the crops
    work = Path(tempfile.mkdtemp(prefix="quantlab-bench-"))
    try:
        print(f"machine: {environment()}")
        print(f"preparing the model and {max(counts)} calibration crops ...", flush=True)
        model, data = prepare(max(counts), work)
        print("warming up numba's compile cache (one untimed quantlab run, all calibrators) ...", flush=True)
        warm = warm_up(model, data, args.timeout)
        if not warm.ok:
            print(f"warm-up failed: {describe(warm)}", file=sys.stderr)
            return 1
        outcomes = run_all(plan(counts), model, data, args.timeout, repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(outcomes, counts, [
        f"EfficientNet-Lite0, batch size {BATCH_SIZE}, {environment()}; every case in a fresh process.",
        f"Wall time: best of {repeat} run(s) in interleaved rounds (load from other work only adds time); "
        "peak RSS: the highest of them. Python start-up and model export/preparation (done once beforehand) "
        "are excluded; numba's compile cache was warmed by an untimed run, so compilation is not included.",
        "quantlab: `run_ptq`, target `ort-cpu`, latency runs and the HTML report off (includes its FP16 copy, "
        "checks, statistics file, scale tables and TensorRT caches). "
        "ORT: `quantize_static`, QDQ, U8 activations, S8 per-channel weights.",
        f"ORT Entropy and Percentile hold every activation in memory, so they run at {ORT_STORED_MAX_SAMPLES} "
        "samples only; larger counts show an extrapolated peak.",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
