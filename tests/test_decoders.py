"""The bundled detectors' decoders against their packages' own detections on real images.

Each decoder gets the raw outputs the package's own pre-processing and session produce and must
return exactly the package's boxes; quantlab's own reader (letterbox or plain resize, Pillow) must
then find the same detections (mAP@0.5 against the package's).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from quantlab.compare.detection import Detections, detection_scores
from quantlab.config import load_config
from quantlab.data import ImageFolder, ImageInfo, InputSpec
from quantlab.errors import QuantlabError

from conftest import ROOT

MODELS = ROOT / "quantlab" / "models"


def _need(*packages: str) -> None:
    for name in packages:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install 'quantlab[models]')")


def _page() -> Path:
    _need("skimage")
    import skimage

    return Path(skimage.__file__).parent / "data" / "page.png"  # a real scanned book page, bundled


def _reader(config_path: Path, files: list[Path], shape: tuple[int, ...], name: str) -> ImageFolder:
    config = load_config(config_path)
    return ImageFolder(files, InputSpec(name, shape, np.dtype("float32")), config.data.preprocess, 1)


def test_ddddocr_decoder_gives_the_packages_own_boxes_on_a_real_page() -> None:
    _need("ddddocr", "cv2", "pycocotools")
    import cv2
    from ddddocr.core.detection_engine import DetectionEngine

    from quantlab.decoders import ddddocr_yolox

    page = _page()
    engine = DetectionEngine()
    expected = engine.get_bbox(page.read_bytes())  # the package's boxes: [x1, y1, x2, y2] ints, no scores
    img = cv2.imdecode(np.frombuffer(page.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    tensor, ratio = engine.preproc(img, (416, 416))
    raw = engine.session.run(None, {"images": tensor[None]})[0]
    info = ImageInfo(page.name, img.shape[0], img.shape[1], ratio, ratio, 0, 0, 416, 416)
    boxes, scores, classes = ddddocr_yolox({"output": raw}, info, 1)
    h, w = img.shape[:2]
    as_package = [[max(int(x1), 0), max(int(y1), 0), min(int(x2), w), min(int(y2), h)] for x1, y1, x2, y2 in boxes.tolist()]
    assert len(expected) > 40 and as_package == expected
    assert np.all((scores > 0.1) & (scores <= 1.0)) and set(classes.tolist()) == {0}

    # quantlab's own letterbox (Pillow) then the same decoder: the same detections
    reader = _reader(MODELS / "yolox-ddddocr" / "quantlab.toml", [page], (1, 3, 416, 416), "images")
    x = next(iter(reader))["images"]
    assert x.shape == (1, 3, 416, 416) and np.all(x[0, :, 300:, :] == 114)  # the padding below the page
    ours = ddddocr_yolox({"output": engine.session.run(None, {"images": x})[0]}, reader.infos()[0], 1)
    scores_vs_package = detection_scores([Detections(boxes, scores, classes)],
                                         [Detections(*[np.asarray(v) for v in ours])], 1)
    assert scores_vs_package["map50"] >= 0.95 and scores_vs_package["box_f1"] >= 0.95

    with pytest.raises(QuantlabError, match=r"sample 'page.png': the model's output .* holds 1 class\(es\) but compare.classes names 3"):
        ddddocr_yolox({"output": raw}, info, 3)


def test_layout_decoder_gives_the_packages_own_boxes_on_a_real_page() -> None:
    _need("rapid_layout", "cv2", "pycocotools")
    import logging

    from rapid_layout import RapidLayout

    from quantlab.decoders import rapid_layout_picodet

    logging.getLogger("rapid_layout").setLevel(logging.WARNING)
    page = MODELS / "layout-cdla" / "eval" / "cargo-timings-p1.jpg"
    layout = RapidLayout()
    expected = layout(str(page))
    img = layout.load_img(str(page))
    tensor = layout.model_handler.model_processors.preprocess(img)  # the package's PPPreProcess
    raw = layout.session(tensor)
    names = layout.session.get_output_names()
    info = ImageInfo(page.name, img.shape[0], img.shape[1], 800 / img.shape[0], 608 / img.shape[1], 0, 0, 800, 608)
    classes_of = load_config(MODELS / "layout-cdla" / "quantlab.toml").compare.classes
    boxes, scores, classes = rapid_layout_picodet(dict(zip(names, raw)), info, len(classes_of))
    assert len(expected.boxes) >= 5
    np.testing.assert_array_equal(boxes, np.asarray(expected.boxes, np.float64))
    np.testing.assert_array_equal(scores, np.asarray(expected.scores))
    assert [classes_of[c] for c in classes] == list(expected.class_names)
    assert {"title", "text"} <= set(expected.class_names)

    reader = _reader(MODELS / "layout-cdla" / "quantlab.toml", [page], (1, 3, 800, 608), "image")
    x = next(iter(reader))["image"]
    np.testing.assert_allclose(x, tensor, atol=0.15)  # Pillow's and OpenCV's bilinear resize differ slightly
    ours = rapid_layout_picodet(dict(zip(names, layout.session(x))), reader.infos()[0], len(classes_of))
    scores_vs_package = detection_scores([Detections(boxes, scores, classes)],
                                         [Detections(*[np.asarray(v) for v in ours])], len(classes_of))
    assert scores_vs_package["map50"] >= 0.9

    with pytest.raises(QuantlabError, match="holds 10 class"):
        rapid_layout_picodet(dict(zip(names, raw)), info, 3)
    with pytest.raises(QuantlabError, match="expects 8 raw output"):
        rapid_layout_picodet({"x": raw[0]}, info, 10)
