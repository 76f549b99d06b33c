"""A picture of what INT8 does to a detector: FP32's boxes and INT8's on the same images, side by side.

``detections.png`` (written by ``quantlab compare`` for an NMS detector) holds one row per chosen
evaluation image and three panels per row: FP32's boxes, the best INT8 engine's and the worst's.
In an INT8 panel a box matched to one of FP32's (same class, IoU >= ``box_iou``) is drawn in blue,
a box FP32 did not find in orange, and an FP32 box the engine missed as a thin red outline.  The
rows are the images where the worst engine disagrees most with FP32 (lowest per-image F1, ties in
file order), so the picture shows the failure, not a lucky image.  Drawn with Pillow only: the same
detections give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quantlab.compare.detection import Detections, box_pairs

PANEL_WIDTH = 420
TITLE_HEIGHT = 34
MATCHED, EXTRA, MISSED, REFERENCE = (31, 119, 180), (255, 127, 14), (214, 39, 40), (44, 160, 44)


def _match_flags(ref: Detections, out: Detections, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Which reference boxes and which engine boxes take part in the one-to-one greedy matching."""
    used_ref = np.zeros(len(ref), bool)
    used_out = np.zeros(len(out), bool)
    for i, j in box_pairs(ref, out, iou):
        used_ref[i] = used_out[j] = True
    return used_ref, used_out


def image_f1(ref: Detections, out: Detections, iou: float) -> float:
    """F1 of one image's engine boxes against FP32's (1 when neither found anything)."""
    if len(ref) == 0 and len(out) == 0:
        return 1.0
    tp = int(_match_flags(ref, out, iou)[0].sum())
    return 2 * tp / (len(ref) + len(out))


def pick_images(ref: Sequence[Detections], worst: Sequence[Detections], iou: float, count: int = 2) -> list[int]:
    """The ``count`` images where ``worst`` disagrees most with ``ref`` (lowest F1; ties: file order)."""
    scores = [(image_f1(r, w, iou), i) for i, (r, w) in enumerate(zip(ref, worst))]
    return [i for _, i in sorted(scores)[:count]]


def detection_picture(images: Sequence[Path], ref: Sequence[Detections], panels: Sequence[tuple[str, Sequence[Detections]]],
                      classes: Sequence[str], iou: float) -> bytes:
    """PNG bytes: for each image (a row) FP32's boxes, then each ``(title, detections)`` panel.

    ``ref`` and each panel's detections are indexed like ``images`` (the chosen images only).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = []
    for k, path in enumerate(images):
        with Image.open(path) as img:
            base = img.convert("RGB")
        scale = PANEL_WIDTH / base.width
        height = max(1, round(base.height * scale))
        base = base.resize((PANEL_WIDTH, height), Image.Resampling.BILINEAR)
        cells = []
        for title, dets in [("FP32", ref), *panels]:
            panel = Image.new("RGB", (PANEL_WIDTH, height + TITLE_HEIGHT), (255, 255, 255))
            panel.paste(base, (0, TITLE_HEIGHT))
            draw = ImageDraw.Draw(panel)
            r, d = ref[k], dets[k]
            if title == "FP32":
                boxes = [(b, REFERENCE, 2) for b in r.boxes]
                text = f"FP32: {len(r)} boxes ({path.name})"
            else:
                used_ref, used_out = _match_flags(r, d, iou)
                boxes = [(b, MISSED, 1) for b, u in zip(r.boxes, used_ref) if not u]
                boxes += [(b, MATCHED if u else EXTRA, 2) for b, u in zip(d.boxes, used_out)]
                text = f"{title}: {len(d)} boxes, F1 {image_f1(r, d, iou):.2f} vs FP32"
            for box, colour, width in boxes:
                x1, y1, x2, y2 = (float(v) * scale for v in box)
                draw.rectangle([x1, y1 + TITLE_HEIGHT, max(x1, x2), max(y1, y2) + TITLE_HEIGHT], outline=colour, width=width)
            draw.text((4, 4), text, fill=(0, 0, 0), font=font)
            if title == "FP32" and len(classes) > 1 and len(r):
                found = sorted({classes[int(c)] for c in r.classes})
                draw.text((4, 18), "classes: " + ", ".join(found), fill=(90, 90, 90), font=font)
            cells.append(panel)
        rows.append(cells)
    gap = 8
    width = len(rows[0]) * PANEL_WIDTH + (len(rows[0]) - 1) * gap
    height = sum(c[0].height for c in rows) + (len(rows) - 1) * gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    top = 0
    for cells in rows:
        for j, cell in enumerate(cells):
            sheet.paste(cell, (j * (PANEL_WIDTH + gap), top))
        top += cells[0].height + gap
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
