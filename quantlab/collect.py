"""The one statistics pass: run the prepared model in ONNX Runtime and stream every calibrated
activation into its :class:`~quantlab.stats.TensorStats`.

The model is run once per batch with every calibrated tensor added as a graph output.  For each
tensor and batch: signed min and max (NumPy), a check that no value is NaN or Inf, a doubling of the
histogram range when needed, and a compiled histogram update (:mod:`quantlab._kernels`).  Memory holds
one batch of activations plus ``2 * NBINS`` counts per tensor, whatever the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import onnx

from quantlab.data import Feed
from quantlab.errors import QuantlabError
from quantlab.model import PreparedModel
from quantlab.stats import NBINS, StatsSet, TensorStats, range_for


def ort_session(model: onnx.ModelProto | str, *, level: str = "basic", threads: int = 0, spinning: bool = False):
    """An ONNX Runtime CPU session with its logging kept quiet.

    ``spinning=False`` keeps idle worker threads from busy-waiting between runs (the statistics
    pass needs those cores for histograms); latency measurements use ONNX Runtime's default (on).
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    # idle ORT workers must not spin between runs: the histogram kernel needs those cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _augmented(prepared: PreparedModel) -> onnx.ModelProto:
    model = onnx.load(str(prepared.path))
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in prepared.tensors:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def update(stats: TensorStats, x: np.ndarray, where: str) -> None:
    """Add one batch of a tensor to its statistics (see :mod:`quantlab.stats`)."""
    from quantlab._kernels import histogram_update

    flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
    if flat.size == 0:
        return
    lo, hi = float(flat.min()), float(flat.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = "NaN" if math.isnan(lo) or math.isnan(hi) else "Inf"
        raise QuantlabError(
            f"tensor '{stats.name}' holds {bad} values {where}: check the model and the input data "
            "(preprocessing, dtype) before calibrating"
        )
    stats.min, stats.max = min(stats.min, lo), max(stats.max, hi)
    stats.count += int(flat.size)
    needed = range_for(max(abs(stats.min), abs(stats.max)))
    if needed > stats.range:
        stats.grow_to(needed)
    if stats.range == 0.0:
        stats.hist_pos[0] += flat.size
        return
    histogram_update(flat, stats.hist_pos, stats.hist_neg, NBINS / stats.range)


def collect_stats(
    prepared: PreparedModel,
    batches: Iterable[Feed],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> StatsSet:
    """One pass over ``batches``; ``on_batch(n)`` is called after each batch of ``n`` samples."""
    session = ort_session(_augmented(prepared))
    names = [o.name for o in session.get_outputs() if o.type == "tensor(float)" and o.name in set(prepared.tensors)]
    input_names = [i.name for i in session.get_inputs()]
    wanted = set(names) | set(input_names)
    tensors = {n: TensorStats(n) for n in prepared.tensors if n in wanted}
    samples = 0

    def check_inputs(index: int, feed: Feed) -> None:
        where = f"in calibration batch {index}"
        for name in input_names:  # graph inputs first, straight from the feed: bad data is named as such
            value = feed[name]
            if name in tensors:
                update(tensors[name], value, where)
            elif np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise QuantlabError(f"input '{name}' holds NaN or Inf values {where}: clean the calibration data")

    def infer(feed: Feed) -> list[np.ndarray]:
        return session.run(names, {k: feed[k] for k in input_names})

    # Two-stage pipeline: ONNX Runtime computes batch k+1 in a worker thread (it releases the GIL)
    # while this thread histograms batch k (the compiled kernel releases it too).  A batch is handed
    # to ONNX Runtime before its inputs are checked, so the first check (which imports and loads the
    # compiled kernel, about a second) overlaps the first inference; a bad input still stops the run
    # before any of its statistics are used.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[int, Feed, Future[list[np.ndarray]]] | None = None
        for index, feed in enumerate(batches):
            job = (index, feed, pool.submit(infer, feed))
            check_inputs(index, feed)
            if pending is not None:
                samples += _absorb(pending, names, tensors, on_batch)
            pending = job
        if pending is not None:
            samples += _absorb(pending, names, tensors, on_batch)
    if samples == 0:
        raise QuantlabError("the calibration data gave no batch: add samples or raise data.max_samples")
    folded = {k: v for k, v in prepared.folded.items() if v in tensors}
    return StatsSet(tensors, folded, prepared.sha256, samples)


def _absorb(
    job: tuple[int, Feed, Future[list[np.ndarray]]],
    names: list[str],
    tensors: dict[str, TensorStats],
    on_batch: Callable[[int], None] | None,
) -> int:
    """Fold one finished batch into the statistics; returns its number of samples."""
    index, feed, future = job
    where = f"in calibration batch {index}"
    for name, value in zip(names, future.result()):
        update(tensors[name], value, where)
    n = next(iter(feed.values())).shape[0]
    if on_batch:
        on_batch(n)
    return n
