"""NMS detection metrics: mAP against a hand-checked case and against pycocotools' own summary,
the shared one-to-one matching, the checks on what a decoder returns, and the task end to end on the
tiny model (metrics, picture, bad decoders as one-line errors)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from quantlab.cli import main
from quantlab.compare import metrics as M
from quantlab.compare import run_compare
from quantlab.compare.detection import Detections, checked_detections, coco_map, detection_scores, iou_matrix
from quantlab.config import load_config
from quantlab.data import ImageInfo
from quantlab.errors import QuantlabError

INFO = ImageInfo("page-3.png", 100, 200, 1.0, 1.0, 0, 0, 100, 200)


def _dets(boxes, scores, classes) -> Detections:
    return Detections(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
                      np.asarray(classes, np.int64))


def test_map_of_a_hand_checked_case() -> None:
    # FP32: two boxes of one class.  The engine: one box at IoU 0.72 with the first (score 0.9) and a
    # spurious one (0.8).  Precision/recall by score: (1, 0.5), (0.5, 0.5): the interpolated precision
    # is 1 at the 51 recall points 0..0.5 and 0 above, AP = 51/101 at IoU thresholds 0.5..0.7 (5 of
    # the 10 COCO thresholds); above 0.72 the match is lost and AP = 0.
    ref = [_dets([[0, 0, 100, 100], [200, 200, 260, 240]], [1.0, 1.0], [0, 0])]
    out = [_dets([[0, 0, 100, 72], [400, 400, 450, 450]], [0.9, 0.8], [0, 0])]
    assert iou_matrix(ref[0].boxes, out[0].boxes)[0, 0] == pytest.approx(0.72)
    scores = detection_scores(ref, out, num_classes=1, iou=0.5)
    assert scores["map50"] == pytest.approx(51 / 101)
    assert scores["map"] == pytest.approx(0.5 * 51 / 101)
    assert scores["box_precision"] == scores["box_recall"] == scores["box_f1"] == 0.5
    assert scores["boxes"] == 2.0
    # identical detections: perfect; a class mismatch is not a match; nothing found on either side: perfect
    assert detection_scores(ref, ref, 1)["map"] == pytest.approx(1.0)
    wrong_class = [_dets(ref[0].boxes, [1.0, 1.0], [1, 1])]
    assert detection_scores(ref, wrong_class, 2) == pytest.approx(
        {"map50": 0.0, "map": 0.0, "box_f1": 0.0, "box_precision": 0.0, "box_recall": 0.0, "boxes": 2.0})
    empty = [_dets(np.zeros((0, 4)), [], [])]
    assert coco_map(empty, empty, 1) == (1.0, 1.0) and coco_map(ref, empty, 1) == (0.0, 0.0)


def test_map_agrees_with_pycocotools_summary(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = np.random.default_rng(3)
    ref, out = [], []
    for _ in range(6):
        n = int(g.integers(1, 9))
        xy = g.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + g.uniform(10, 80, (n, 2))], axis=1)
        classes = g.integers(0, 3, n)
        ref.append(_dets(boxes, np.ones(n), classes))
        keep = g.random(n) > 0.2
        moved = boxes[keep] + g.normal(0, 4, (int(keep.sum()), 4))
        moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1)
        extra = np.array([[5.0, 5.0, 40.0, 30.0]])
        out.append(_dets(np.concatenate([moved, extra]), g.uniform(0.1, 1, int(keep.sum()) + 1),
                         np.concatenate([classes[keep], [0]])))
    # the documented pycocotools flow: annotation and result files, summarize(), stats[1] (AP50), stats[0]
    gt = {"images": [{"id": i + 1} for i in range(6)], "categories": [{"id": c + 1} for c in range(3)], "annotations": []}
    res = []
    for i, (r, o) in enumerate(zip(ref, out)):
        for b, c in zip(r.boxes, r.classes):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                                      "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                      "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0})
        for b, s, c in zip(o.boxes, o.scores, o.classes):
            res.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": float(s)})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    map50, map_ = coco_map(ref, out, 3)
    assert map50 == pytest.approx(ev.stats[1], abs=1e-12) and map_ == pytest.approx(ev.stats[0], abs=1e-12)
    assert 0.3 < map_ < map50 < 1.0


def test_one_to_one_matching_is_greedy_by_iou() -> None:
    assert M.matched_pairs(np.array([[0.9, 0.6], [0.7, 0.0]]), 0.5) == [(0, 0)]
    assert M.matched_pairs(np.array([[0.6, 0.9], [0.7, 0.0]]), 0.5) == [(0, 1), (1, 0)]
    assert M.match_pairs(np.zeros((0, 3)), 0.5) == 0


@pytest.mark.parametrize("value, problem", [
    ((np.zeros((2, 3)), np.zeros(2), np.zeros(2)), "boxes have shape"),
    ((np.zeros((2, 4)), np.zeros(3), np.zeros(2)), "2 boxes but scores"),
    ((np.array([[5.0, 0, 1, 1]]), np.ones(1), np.zeros(1)), "x2 < x1"),
    ((np.array([[0, 0, np.nan, 1]]), np.ones(1), np.zeros(1)), "NaN"),
    ((np.zeros((1, 4)), np.ones(1), np.array([0.5])), "not integers"),
    ([np.zeros((1, 4)), np.ones(1)], "not a (boxes, scores, classes) triple"),
    ((np.zeros((1, 4)), np.ones(1), np.array([3])), "class id 3 is outside the 2 class"),
])
def test_malformed_decoder_output_names_the_sample(value, problem: str) -> None:
    with pytest.raises(QuantlabError) as err:
        checked_detections(value, INFO, 2, "mod:decode")
    assert problem in str(err.value) and "'page-3.png'" in str(err.value) and "\n" not in str(err.value)


DECODER = '''
import numpy as np

def decode(outputs, info, num_classes):
    """One box per sample, sized by the tiny model's first two logits, scored by the third."""
    v = outputs["logits"][0]
    w, h = 2.0 + 3.0 * abs(float(v[0])), 2.0 + 3.0 * abs(float(v[1]))
    box = info.to_image(np.array([[1.0, 1.0, 1.0 + w, 1.0 + h]]))
    return box, np.array([1.0 / (1.0 + np.exp(-float(v[2])))]), np.array([int(v[3] > 0)])

def malformed(outputs, info, num_classes):
    return np.zeros((1, 3)), np.zeros(1), np.zeros(1)
'''


@pytest.fixture
def detection_run(tiny_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The tiny run judged as a two-class detector on 5 real 8x8 image crops, by a decoder in tmp_path."""
    from PIL import Image
    from skimage import data

    run_dir, config = tiny_run
    (tmp_path / "tiny_decoder.py").write_text(DECODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = tmp_path / "images"
    images.mkdir()
    photo = data.astronaut()
    for i in range(5):
        Image.fromarray(photo[60 * i : 60 * i + 40, 100 : 140]).save(images / f"crop{i}.png")
    text = config.read_text().split("[compare]")[0] + f"""
[compare]
eval = "{images}"
task = "detection"
postprocess = "tiny_decoder:decode"
classes = ["a", "b"]
latency_runs = 1
latency_batches = [1]
layers = false
"""
    config.write_text(text)
    return run_dir, config


def test_detection_task_end_to_end_on_the_tiny_model(detection_run: tuple[Path, Path]) -> None:
    run_dir, config_path = detection_run
    engines = ["int8:minmax.ort-cpu", "int8:entropy.tensorrt"]
    result = run_compare(load_config(config_path), run_dir, engines=engines)
    assert result.primary == "map50" and len(result.int8) == 2
    fp32 = result["fp32"].metrics
    assert fp32["map50"] == fp32["map"] == fp32["box_f1"] == 1.0 and fp32["boxes"] == 5.0
    for e in result.int8:
        assert 0.0 <= e.metrics["map"] <= e.metrics["map50"] <= 1.0 and e.metrics["boxes"] == 5.0
    saved = json.loads((run_dir / "compare.json").read_text())
    assert saved["picture"]["file"] == "detections.png" and len(saved["picture"]["images"]) == 2
    png = (run_dir / "detections.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"path": "detections.png", "kind": "figure"} in [{k: a[k] for k in ("path", "kind")} for a in manifest["artefacts"]]
    assert "Detections: FP32 against INT8" in (run_dir / "index.html").read_text()
    run_compare(load_config(config_path), run_dir, engines=engines)
    assert (run_dir / "detections.png").read_bytes() == png  # the same detections give the same bytes


def test_a_malformed_decoder_is_one_line_naming_the_sample(detection_run: tuple[Path, Path], capsys) -> None:
    run_dir, config_path = detection_run
    config_path.write_text(config_path.read_text().replace("tiny_decoder:decode", "tiny_decoder:malformed"))
    assert main(["compare", "--config", str(config_path), "--run", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("quantlab: ") and "'crop0.png'" in last and "boxes have shape [1, 3]" in last
