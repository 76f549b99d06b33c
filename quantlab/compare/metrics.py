"""Metrics that compare an engine's outputs with FP32's and with labels.

Every metric here is a plain function of NumPy arrays holding all evaluation samples (batch axis
first).  Names are the keys users write in ``[tolerance]`` and ``[compare] primary``:

* per output, for every task: ``cosine`` (of the flattened outputs), ``sqnr_db``
  (``20 log10(||ref|| / ||ref - out||)``, ONNX Runtime's qdq_loss_debug definition), ``max_abs`` and
  ``within_tol`` (the fraction of elements with ``|out - ref| <= atol + rtol |ref|``, Polygraphy's
  elementwise rule, 1e-5 for both by default);
* ``classification``: ``top1`` and ``top5`` against labels (only on labelled samples),
  ``top1_agreement`` (same argmax as FP32), ``top5_overlap`` (mean shared fraction of the two top-5
  sets) and ``kl`` (mean KL divergence of FP32's softmax to the engine's, in nats);
* ``dense`` (probability or score maps): ``iou`` of the maps thresholded at ``dense_threshold``
  (per sample, then averaged; two empty maps count as 1) and ``mae``, the mean absolute error;
* ``embedding``: ``mean_cosine`` and ``min_cosine`` of each sample's embedding to FP32's, and
  ``retrieval_agreement``: for each sample as a query against all the others, the overlap of the
  k nearest neighbours by cosine under the engine and under FP32;
* ``detection`` (probability-map text detectors such as DB): the ``dense`` metrics, plus the boxes
  a user gets: each map becomes boxes as the detector's own post-processing makes them (rapidocr's
  ``DBPostProcess``: binarise at ``dense_threshold``, one box per connected region, kept when its mean
  probability reaches ``box_threshold``, expanded by ``box_unclip_ratio``), and the engine's boxes
  are matched one to one with FP32's at IoU >= ``box_iou``: ``box_precision``, ``box_recall``,
  ``box_f1`` over all samples (micro-averaged), and ``boxes``, the number of boxes the engine found;
  NMS-decoded detectors (``postprocess``) get ``map50``, ``map`` and the same box metrics from
  :mod:`quantlab.compare.detection` instead.

Lower is better for :data:`LOWER_IS_BETTER`; higher is better for every other metric, user
metrics included.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantlab.errors import QuantlabError, check

SQNR_CAP_DB = 999.0
LOWER_IS_BETTER = frozenset({"kl", "mae", "max_abs"})
OUTPUT_METRICS = ("cosine", "sqnr_db", "max_abs", "within_tol")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5", "top1_agreement", "top5_overlap", "kl"),
    "dense": ("iou", "mae"),
    "embedding": ("mean_cosine", "min_cosine", "retrieval_agreement"),
    "detection": ("map50", "map", "box_f1", "box_precision", "box_recall", "iou", "mae", "boxes"),
    "outputs": (),
}


def default_primary(task: str, labelled: int, decoded: bool = False) -> str:
    """The metric that ranks engines when the config names none (``decoded``: an NMS detector's mAP@0.5)."""
    if task == "detection" and decoded:
        return "map50"
    if task == "classification":
        return "top1" if labelled else "top1_agreement"
    return {"dense": "iou", "embedding": "mean_cosine", "detection": "box_f1"}.get(task, "sqnr_db")


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def sqnr_db_of_sums(signal_sq: float, noise_sq: float) -> float:
    """``10 log10(signal_sq / noise_sq)`` from sums of squares, clipped to +-``SQNR_CAP_DB``.

    No error gives the cap, a zero signal with an error (or an infinite error) minus the cap; NaN
    when either sum is NaN or both are infinite.
    """
    if math.isnan(signal_sq) or math.isnan(noise_sq):
        return math.nan
    if noise_sq <= 0.0:
        return SQNR_CAP_DB
    if signal_sq <= 0.0:
        return -SQNR_CAP_DB
    ratio = signal_sq / noise_sq
    if math.isnan(ratio):  # both infinite
        return math.nan
    if ratio == 0.0:  # an infinite error, or a ratio below float range
        return -SQNR_CAP_DB
    return float(min(max(10.0 * math.log10(ratio), -SQNR_CAP_DB), SQNR_CAP_DB))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """``20 log10(||ref|| / ||ref - out||)`` in dB, clipped to +-999 dB (see :func:`sqnr_db_of_sums`)."""
    a = np.asarray(ref, np.float64).ravel()
    d = a - np.asarray(out, np.float64).ravel()
    return sqnr_db_of_sums(float(np.vdot(a, a)), float(np.vdot(d, d)))


def check_agreement(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """Cosine (6 digits) and SQNR (2 digits, NaN outputs as minus the cap) of a model check against FP32."""
    sqnr = sqnr_db(ref, out)
    return round(cosine(ref, out), 6), round(-SQNR_CAP_DB if math.isnan(sqnr) else sqnr, 2)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(out, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def output_metrics(ref: np.ndarray, out: np.ndarray, atol: float = 1e-5, rtol: float = 1e-5) -> dict[str, float]:
    """Cosine, SQNR, max abs error and the fraction within ``atol + rtol |ref|`` of one output."""
    a = np.asarray(ref, np.float64)
    b = np.asarray(out, np.float64)
    check(a.shape == b.shape, f"output shapes differ: reference {a.shape} vs engine {b.shape}")
    diff = np.abs(a - b)
    return {
        "cosine": cosine(a, b),
        "sqnr_db": sqnr_db(a, b),
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "within_tol": float(np.mean(diff <= atol + rtol * np.abs(a))) if diff.size else 1.0,
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    k = min(k, x.shape[1])
    # a stable sort on the negated scores breaks ties by the lower class index, run to run
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def classification_metrics(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Top-1/top-5 on labelled samples (label >= 0) and agreement with FP32 on all samples."""
    r = np.asarray(ref).reshape(len(ref), -1)
    o = np.asarray(out).reshape(len(out), -1)
    result: dict[str, float | None] = {"top1": None, "top5": None}
    if labels is not None and np.any(labels >= 0):
        mask = labels >= 0
        check(
            int(labels[mask].max()) < o.shape[1],
            f"a label ({int(labels[mask].max())}) is out of range for a model with {o.shape[1]} classes: "
            "check compare.labels and the evaluation file names",
        )
        top5 = _topk(o[mask], 5)
        result["top1"] = float(np.mean(top5[:, 0] == labels[mask]))
        result["top5"] = float(np.mean(np.any(top5 == labels[mask][:, None], axis=1)))
    ref5, out5 = _topk(r, 5), _topk(o, 5)
    result["top1_agreement"] = float(np.mean(ref5[:, 0] == out5[:, 0]))
    shared = [len(np.intersect1d(a, b)) for a, b in zip(ref5, out5)]
    result["top5_overlap"] = float(np.mean(shared) / ref5.shape[1])
    lp, lq = _log_softmax(r), _log_softmax(o)
    result["kl"] = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    return result


def dense_metrics(ref: np.ndarray, out: np.ndarray, threshold: float) -> dict[str, float]:
    """IoU of the thresholded maps (mean over samples) and the mean absolute error."""
    r = np.asarray(ref).reshape(len(ref), -1) > threshold
    o = np.asarray(out).reshape(len(out), -1) > threshold
    inter = np.sum(r & o, axis=1)
    union = np.sum(r | o, axis=1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    mae = float(np.mean(np.abs(np.asarray(ref, np.float64) - np.asarray(out, np.float64))))
    return {"iou": float(np.mean(iou)), "mae": mae}


@dataclass(frozen=True)
class BoxParams:
    """How a probability map becomes boxes (rapidocr's defaults for PP-OCR) and when two boxes match."""

    threshold: float = 0.3
    box_threshold: float = 0.5
    unclip_ratio: float = 1.6
    dilation: bool = True
    iou: float = 0.5


def _probability_maps(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    check(a.ndim == 3, f"the detection task needs probability maps shaped [N, 1, H, W] or [N, H, W], got {list(np.shape(x))}: "
                       "set compare.output to the detector's map output")
    return a


def text_boxes(prob: np.ndarray, params: BoxParams) -> list[np.ndarray]:
    """The boxes rapidocr's DB post-processing finds in one ``[H, W]`` probability map (4 corners each).

    Regions of ``prob > threshold`` (dilated by 2x2 when ``dilation``), each one's minimum-area
    rectangle, kept when the mean probability inside reaches ``box_threshold`` and expanded by
    ``area * unclip_ratio / perimeter`` (the DB paper's unclip), in pixel coordinates of the map.
    """
    try:
        from rapidocr.ch_ppocr_det.utils import DBPostProcess
    except ImportError:
        raise QuantlabError("the detection task uses rapidocr's DB post-processing: pip install 'quantlab[models]' "
                            "(rapidocr), or use task = \"dense\"") from None
    post = DBPostProcess(thresh=params.threshold, box_thresh=params.box_threshold, unclip_ratio=params.unclip_ratio,
                         use_dilation=params.dilation, score_mode="fast")
    h, w = prob.shape
    boxes, _ = post(prob[None, None].astype(np.float32), (h, w))
    return [np.asarray(b, np.float64).reshape(4, 2) for b in boxes]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two quadrilaterals (``[4, 2]`` corners)."""
    from shapely.geometry import Polygon

    pa, pb = Polygon(a), Polygon(b)
    if not (pa.is_valid and pb.is_valid):
        pa, pb = pa.buffer(0), pb.buffer(0)
    union = pa.union(pb).area
    return float(pa.intersection(pb).area / union) if union > 0 else 0.0


def matched_pairs(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """A one-to-one greedy matching of reference boxes (rows of ``iou``) with an engine's (columns):
    pairs ``(row, column)`` taken by IoU, highest first (ties: lower row, then lower column), at
    IoU >= ``threshold``, each box used at most once.  Shared by the DB text-detector metric, the NMS
    detection metrics (:mod:`quantlab.compare.detection`) and the detection picture.

    Example: ``iou = [[0.9, 0.6], [0.7, 0.0]]`` at 0.5 takes (0, 0); then (1, 0) and (0, 1) each
    reuse a box: one pair, although (0, 1) and (1, 0) would have made two.
    """
    iou = np.asarray(iou, np.float64)
    rows, cols = np.nonzero(iou >= threshold)
    used_ref: set[int] = set()
    used_out: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for _, i, j in sorted(zip((-iou[rows, cols]).tolist(), rows.tolist(), cols.tolist())):
        if i not in used_ref and j not in used_out:
            used_ref.add(i)
            used_out.add(j)
            pairs.append((i, j))
    return pairs


def match_pairs(iou: np.ndarray, threshold: float) -> int:
    """True positives of :func:`matched_pairs`: how many pairs it makes."""
    return len(matched_pairs(iou, threshold))


def match_boxes(ref: list[np.ndarray], out: list[np.ndarray], threshold: float) -> int:
    """True positives of a one-to-one greedy matching of quadrilaterals (:func:`match_pairs`)."""
    iou = np.zeros((len(ref), len(out)))
    for i, a in enumerate(ref):
        lo_a, hi_a = a.min(0), a.max(0)
        for j, b in enumerate(out):
            if np.any(b.max(0) < lo_a) or np.any(b.min(0) > hi_a):
                continue  # the enclosing rectangles do not even touch
            iou[i, j] = box_iou(a, b)
    return match_pairs(iou, threshold)


_BOX_CACHE: dict[tuple[str, BoxParams], list[list[np.ndarray]]] = {}


def _boxes_of(maps: np.ndarray, params: BoxParams) -> list[list[np.ndarray]]:
    """Boxes of every map; the reference's are computed once for all engines."""
    key = (hashlib.sha256(np.ascontiguousarray(maps).tobytes()).hexdigest(), params)
    if key not in _BOX_CACHE:
        if len(_BOX_CACHE) >= 8:
            _BOX_CACHE.pop(next(iter(_BOX_CACHE)))
        _BOX_CACHE[key] = [text_boxes(m, params) for m in maps]
    return _BOX_CACHE[key]


def detection_metrics(ref: np.ndarray, out: np.ndarray, params: BoxParams = BoxParams()) -> dict[str, float]:
    """Pixel IoU and MAE of the maps and box precision/recall/F1 against FP32's boxes.

    Example: FP32 finds 3 text lines, the engine finds 3 boxes of which 2 overlap FP32's at IoU >= 0.5:
    precision = recall = F1 = 2/3.  No box on either side counts as a perfect score.
    """
    r, o = _probability_maps(ref), _probability_maps(out)
    result: dict[str, float] = dense_metrics(r, o, params.threshold)
    tp = n_ref = n_out = 0
    for rb, ob in zip(_boxes_of(r, params), _boxes_of(o, params)):
        tp += match_boxes(rb, ob, params.iou)
        n_ref += len(rb)
        n_out += len(ob)
    precision = tp / n_out if n_out else 1.0  # no box found: none is wrong
    recall = tp / n_ref if n_ref else 1.0  # no box to find: none is missed
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    result.update({"box_precision": precision, "box_recall": recall, "box_f1": f1, "boxes": float(n_out)})
    return result


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return _topk(sim, k)


def embedding_metrics(ref: np.ndarray, out: np.ndarray, k: int) -> dict[str, float | None]:
    """Per-sample cosine to FP32's embedding and retrieval top-k agreement."""
    r, o = _unit_rows(ref), _unit_rows(out)
    cos = np.clip(np.sum(r * o, axis=1), -1.0, 1.0)
    result: dict[str, float | None] = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if len(r) > k:
        nr, no = _neighbours(r, k), _neighbours(o, k)
        shared = [len(np.intersect1d(a, b)) for a, b in zip(nr, no)]
        result["retrieval_agreement"] = float(np.mean(shared) / k)
    else:
        result["retrieval_agreement"] = None
    return result


def task_metrics(
    task: str, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, *, dense_threshold: float = 0.3,
    retrieval_k: int = 5, boxes: BoxParams | None = None,
) -> dict[str, float | None]:
    if task == "detection":
        return dict(detection_metrics(ref, out, boxes or BoxParams(threshold=dense_threshold)))
    if task == "classification":
        return classification_metrics(ref, out, labels)
    if task == "dense":
        return dense_metrics(ref, out, dense_threshold)
    if task == "embedding":
        return embedding_metrics(ref, out, retrieval_k)
    return {}


UserMetric = Callable[..., Any]


def load_user_metric(spec: str) -> UserMetric:
    """The callable ``module:function`` named by ``compare.metric``.

    It is called as ``f(reference, outputs, labels)`` with dicts of output name to array (all
    samples) and the label array or ``None``, and returns a number or a dict of name to number.
    """
    return load_callable(spec, "metric", "compare.metric")


def load_callable(spec: str, what: str, setting: str) -> Callable[..., Any]:
    """The function ``module:function`` that ``setting`` names (a ``what``: metric, decoder); one-line errors."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise QuantlabError(f"cannot import the {what} module '{module}' ({exc}): check {setting}") from None
    except AttributeError:
        raise QuantlabError(f"module '{module}' has no function '{name}': check {setting}") from None
    check(callable(fn), f"{setting} '{spec}' is not callable: name a function")
    return fn


def user_metrics(fn: UserMetric, spec: str, ref: dict[str, np.ndarray], out: dict[str, np.ndarray],
                 labels: np.ndarray | None) -> dict[str, float]:
    value = fn(ref, out, labels)
    if isinstance(value, dict):
        items = value.items()
    else:
        items = [(spec.rsplit(":", 1)[1], value)]
    result: dict[str, float] = {}
    for key, v in items:
        try:
            result[str(key)] = float(v)
        except (TypeError, ValueError):
            raise QuantlabError(f"user metric '{spec}' returned {v!r} for '{key}': return numbers") from None
    return result
