"""Detection metrics for NMS-decoded detectors (YOLO-family, PicoDet): decoders, mAP and box P/R/F1.

A detector's ONNX graph usually ends before its post-processing: it outputs raw head tensors (box
terms, objectness, class scores per anchor or grid cell) and the detector's own code decodes them and
runs non-maximum suppression.  ``[compare] postprocess = "module:function"`` names that decoder:

    decode(outputs, info, num_classes) -> (boxes, scores, classes)

``outputs`` maps each output name to one sample's raw tensor (batch axis of 1 kept), ``info`` is the
sample's :class:`~quantlab.data.ImageInfo` (its letterbox scale and padding, or resize scales, to
map boxes back to the image file), ``num_classes`` the length of ``[compare] classes``.  It returns
``boxes`` ``[K, 4]`` as ``x1, y1, x2, y2`` in pixels of the image file, ``scores`` ``[K]`` and integer
``classes`` ``[K]`` in ``[0, num_classes)``.  quantlab checks what it returns (one line naming the
sample when it is malformed) and scores every engine's detections against FP32's, which serve as the
ground truth:

* ``map50`` and ``map``: COCO mean average precision at IoU 0.5 and averaged over IoU 0.5:0.05:0.95,
  computed by pycocotools' ``COCOeval`` (101-point interpolated precision, per class, then averaged
  over the classes FP32 found), with no limit on detections per image below the most any engine found;
* ``box_precision``, ``box_recall``, ``box_f1``: a one-to-one matching of the engine's boxes with
  FP32's of the same class at IoU >= ``box_iou``, the matching the DB text-detector metric uses
  (:func:`quantlab.compare.metrics.matched_pairs`); ``boxes``: how many the engine found.

Worked example (one image, one class): FP32 found two boxes; the engine finds one of them with score
0.9 and a spurious box with score 0.8.  Ranked by score the engine's precision/recall points are
(1.0, 0.5) then (0.5, 0.5); the interpolated precision is 1 at the 51 recall points 0, 0.01, ..., 0.5
and 0 at the 50 above, so AP@0.5 = 51/101 = 0.505, precision = recall = F1 = 0.5.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantlab.compare.metrics import load_callable, matched_pairs
from quantlab.data import ImageInfo
from quantlab.errors import QuantlabError, check

DETECTION_METRICS = ("map50", "map", "box_f1", "box_precision", "box_recall", "boxes")
Decoder = Callable[[dict[str, np.ndarray], ImageInfo, int], Any]


@dataclass(frozen=True)
class Detections:
    """One sample's detections: ``boxes`` ``[K, 4]`` (x1, y1, x2, y2, image pixels), ``scores`` ``[K]``,
    ``classes`` ``[K]`` (int64)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def load_decoder(spec: str) -> Decoder:
    """The callable ``module:function`` named by ``compare.postprocess``."""
    return load_callable(spec, "decoder", "compare.postprocess")


def check_class_count(info: ImageInfo, found: int, expected: int, what: str) -> None:
    """For decoders: the raw outputs hold ``found`` classes where the config names ``expected``."""
    check(
        found == expected,
        f"sample '{info.source}': the model's {what} holds {found} class(es) but compare.classes names {expected}: "
        f"list the model's {found} class name(s) in compare.classes",
    )


def checked_detections(value: Any, info: ImageInfo, num_classes: int, spec: str) -> Detections:
    """A decoder's return value as :class:`Detections`, or a one-line error naming the sample."""

    def bad(problem: str) -> QuantlabError:
        return QuantlabError(f"decoder '{spec}' on sample '{info.source}': {problem}: "
                             "return (boxes [K, 4] x1 y1 x2 y2, scores [K], classes [K]) as arrays")

    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise bad(f"returned {type(value).__name__}, not a (boxes, scores, classes) triple")
    try:
        boxes, scores, classes = (np.asarray(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise bad(f"returned values that are not arrays ({exc})") from None
    if boxes.size == 0 and scores.size == 0 and classes.size == 0:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise bad(f"boxes have shape {list(boxes.shape)}")
    k = boxes.shape[0]
    if scores.shape != (k,) or classes.shape != (k,):
        raise bad(f"{k} boxes but scores {list(scores.shape)} and classes {list(classes.shape)}")
    if boxes.dtype.kind not in "fiu" or scores.dtype.kind not in "fiu" or classes.dtype.kind not in "fiu":
        raise bad("non-numeric boxes, scores or classes")
    boxes, scores = boxes.astype(np.float64), scores.astype(np.float64)
    if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
        raise bad("NaN or infinite boxes or scores")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise bad("a box with x2 < x1 or y2 < y1")
    if classes.dtype.kind == "f" and not np.all(classes == np.round(classes)):
        raise bad("class ids that are not integers")
    ids = classes.astype(np.int64)
    if k and (ids.min() < 0 or ids.max() >= num_classes):
        raise QuantlabError(
            f"decoder '{spec}' on sample '{info.source}': class id {int(ids.max() if ids.max() >= num_classes else ids.min())} "
            f"is outside the {num_classes} class(es) of compare.classes: list every class of the model in compare.classes"
        )
    return Detections(boxes, scores, ids)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every axis-aligned box of ``a`` ``[n, 4]`` with every one of ``b`` ``[m, 4]`` (x1, y1, x2, y2)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_pairs(ref: Detections, out: Detections, threshold: float) -> list[tuple[int, int]]:
    """``(reference, engine)`` box pairs of the same class matched one to one at IoU >= ``threshold``
    (:func:`quantlab.compare.metrics.matched_pairs`)."""
    iou = iou_matrix(ref.boxes, out.boxes)
    iou[ref.classes[:, None] != out.classes[None, :]] = 0.0
    return matched_pairs(iou, threshold)


def coco_map(ref: Sequence[Detections], out: Sequence[Detections], num_classes: int) -> tuple[float, float]:
    """``(mAP@0.5, mAP@0.5:0.95)`` of ``out`` with ``ref`` as ground truth, by pycocotools' COCOeval.

    Classes FP32 never found do not count (COCO's rule); when FP32 found nothing at all, no detection
    scores 1 and any detection 0.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise QuantlabError("the detection task's mAP uses pycocotools: pip install 'quantlab[models]'") from None
    check(len(ref) == len(out), f"{len(ref)} reference samples but {len(out)} engine samples")
    n_ref, n_out = sum(map(len, ref)), sum(map(len, out))
    if n_ref == 0:
        return (1.0, 1.0) if n_out == 0 else (0.0, 0.0)
    if n_out == 0:
        return 0.0, 0.0

    def records(dets: Sequence[Detections], with_score: bool) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for image, d in enumerate(dets, start=1):
            for box, score, cls in zip(d.boxes, d.scores, d.classes):
                x1, y1, x2, y2 = (float(v) for v in box)
                row: dict[str, Any] = {"id": len(rows) + 1, "image_id": image, "category_id": int(cls) + 1,
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                if with_score:
                    row["score"] = float(score)
                rows.append(row)
        return rows

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(1, len(ref) + 1)],
                      "categories": [{"id": c} for c in range(1, num_classes + 1)],
                      "annotations": records(ref, False)}
        gt.createIndex()
        dt = gt.loadRes(records(out, True))
        ev = COCOeval(gt, dt, "bbox")
        most = max(max(map(len, ref)), max(map(len, out)))
        ev.params.maxDets = [1, 10, max(100, most)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [IoU thresholds, recall points, classes], area "all"

    def mean(p: np.ndarray) -> float:
        kept = p[p > -1]
        return float(kept.mean()) if kept.size else 0.0

    return mean(precision[0]), mean(precision)


def detection_scores(ref: Sequence[Detections], out: Sequence[Detections], num_classes: int,
                     iou: float = 0.5) -> dict[str, float]:
    """mAP@0.5, mAP@0.5:0.95 and box precision/recall/F1 of ``out`` against ``ref`` (see the module)."""
    map50, map_ = coco_map(ref, out, num_classes)
    tp = sum(len(box_pairs(r, o, iou)) for r, o in zip(ref, out))
    n_ref, n_out = sum(map(len, ref)), sum(map(len, out))
    precision = tp / n_out if n_out else 1.0
    recall = tp / n_ref if n_ref else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"map50": map50, "map": map_, "box_f1": f1, "box_precision": precision, "box_recall": recall,
            "boxes": float(n_out)}


class NmsDetector:
    """The decoder of ``[compare] postprocess`` bound to the evaluation samples' :class:`ImageInfo`.

    :meth:`detections` decodes all samples of one engine; :meth:`metrics` scores an engine against
    FP32 (FP32's detections are decoded once and reused for every engine).
    """

    def __init__(self, spec: str, classes: Sequence[str], infos: Sequence[ImageInfo] | None, iou: float = 0.5) -> None:
        check(
            infos is not None,
            f"compare.postprocess '{spec}' decodes detections from images: the evaluation data must be a folder of images",
        )
        self.spec = spec
        self.classes = tuple(classes)
        self.infos = list(infos or [])
        self.iou = iou
        self.decoder = load_decoder(spec)
        self._cache: dict[str, list[Detections]] = {}

    def detections(self, outputs: dict[str, np.ndarray]) -> list[Detections]:
        """Every sample's checked detections (outputs hold all samples, batch axis first)."""
        n = len(next(iter(outputs.values())))
        check(n == len(self.infos), f"{n} evaluation samples but {len(self.infos)} image records: a bug in the reader")
        key = hashlib.sha256(b"".join(np.ascontiguousarray(outputs[k]).tobytes() for k in sorted(outputs))).hexdigest()
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            found = []
            for i, info in enumerate(self.infos):
                sample = {k: v[i : i + 1] for k, v in outputs.items()}
                found.append(checked_detections(self.decoder(sample, info, len(self.classes)), info,
                                                len(self.classes), self.spec))
            self._cache[key] = found
        return self._cache[key]

    def metrics(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
        return detection_scores(self.detections(ref), self.detections(out), len(self.classes), self.iou)
