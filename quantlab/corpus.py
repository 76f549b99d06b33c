"""A corpus of real ONNX models that install offline, with real calibration data for each.

The models are the ones packages ship (``pip install 'quantlab[corpus]'``) plus exports of the
bundled PyTorch models, each written the way a user would meet it:

* ``rapidocr`` 3.x: PP-OCRv6 text detector and recogniser (IR 10, opset 11, weights behind
  ``Identity`` nodes, dynamic height/width) and the v2.0 direction classifier (opset 11, ``-1`` batch,
  weights in ``Constant`` nodes);
* ``rapidocr-onnxruntime`` 1.4: the older PP-OCRv4 detector and recogniser (opset 12, every weight a
  ``Constant`` node) and the same classifier;
* ``ddddocr``: a CNN + LSTM captcha recogniser (fixed batch 1, one grey channel, dynamic width), a
  YOLOX detector (fixed ``[1, 3, 416, 416]``), and an already quantized recogniser (``ConvInteger``),
  which quantlab refuses with its reason;
* EfficientNet-Lite0 (``quantlab.zoo``) exported at opsets 9, 11, 13 and 17 with fixed batch sizes
  1, 2 and 4 or a dynamic one, one of them saved with external data; MiniLM-L6 exported at opsets 11
  and 17 (fixed batch 2 at one of them).

Calibration data is real: the scikit-image photographs for image models, the text tiles of the
bundled PP-OCR configuration for OCR models, the bundled MiniLM sentences for MiniLM; each is
preprocessed as the model's own package does and stored as ``.npz`` files keyed by input name, so
quantlab and ONNX Runtime's ``quantize_static`` read the same arrays.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantlab.config import package_path
from quantlab.errors import QuantlabError, check


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus: where it comes from, the shapes to fix, and its calibration data.

    ``fetch(folder)`` returns the ONNX file (a package's own file, or an export written into
    ``folder``); ``samples(n)`` returns ``n`` real calibration samples as ``{input: array[n, ...]}``;
    ``expect`` is ``"quantized"`` or the start of the one-line reason quantlab gives instead.
    """

    name: str
    origin: str
    fetch: Callable[[Path], Path]
    samples: Callable[[int], dict[str, np.ndarray]]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    expect: str = "quantized"
    fast: bool = False  # part of the quick tier of the tests
    min_cosine: float = 0.9  # the ort-cpu minmax model's cosine to FP32 at least (a transformer: lower)


def _package_file(package: str, relative: str) -> Callable[[Path], Path]:
    def fetch(folder: Path) -> Path:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        check(
            spec is not None and spec.submodule_search_locations is not None,
            f"the corpus needs the package {package}: pip install 'quantlab[corpus]'",
        )
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        check(path.is_file(), f"package {package} has no file {relative}: install the version pyproject.toml names")
        return path

    return fetch


# --- real images ---------------------------------------------------------------------------------


def _photos() -> list[Path]:
    """The colour photographs bundled with scikit-image (no download)."""
    spec = importlib.util.find_spec("skimage")
    check(spec is not None, "the corpus needs scikit-image for its photographs: pip install 'quantlab[corpus]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
             "retina.jpg", "ihc.png", "immunohistochemistry.png", "color.png", "coins.png", "camera.png", "page.png")
    return [folder / n for n in names if (folder / n).is_file()]


def _text_tiles() -> list[Path]:
    """The real text tiles (screenshots and photos of text) of the bundled PP-OCR configuration."""
    return sorted(package_path("quantlab/models/ppocr-det/calib").glob("*.jpg"))


def _images(paths: list[Path], n: int, height: int, width: int, mode: str = "RGB") -> np.ndarray:
    """``n`` images (cycling through ``paths``) squashed to ``height x width``: uint8 ``[n, H, W, C]``."""
    from PIL import Image

    out = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as img:
            img = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
        out.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(out)


def _paddle(height: int, width: int, name: str = "x") -> Callable[[int], dict[str, np.ndarray]]:
    """PaddleOCR's preprocessing: BGR, ``(p / 255 - 0.5) / 0.5``, NCHW, on text tiles."""

    def samples(n: int) -> dict[str, np.ndarray]:
        x = _images(_text_tiles(), n, height, width)[..., ::-1].astype(np.float32)
        return {name: np.ascontiguousarray(((x / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2))}

    return samples


def _ddddocr_text(n: int) -> dict[str, np.ndarray]:
    """ddddocr's recogniser preprocessing: grey, height 64, ``p / 255``, ``[n, 1, 64, W]``."""
    x = _images(_text_tiles(), n, 64, 192, mode="L").astype(np.float32) / 255.0
    return {"input1": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


def _ddddocr_det(n: int) -> dict[str, np.ndarray]:
    """ddddocr's YOLOX preprocessing: BGR pixel values 0..255 as float32, ``[n, 3, 416, 416]``."""
    x = _images(_photos(), n, 416, 416)[..., ::-1].astype(np.float32)
    return {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}


def _imagenet(n: int) -> dict[str, np.ndarray]:
    """EfficientNet-Lite preprocessing: RGB, ``(p - 127) / 128``, ``[n, 3, 224, 224]``."""
    x = _images(_photos(), n, 224, 224).astype(np.float32)
    return {"input": np.ascontiguousarray(((x - 127.0) / 128.0).transpose(0, 3, 1, 2))}


def _sentences(n: int, length: int = 32) -> dict[str, np.ndarray]:
    """Real sentences (the bundled MiniLM calibration text) tokenized by the bundled tokenizer."""
    from quantlab.data import InputSpec, TextFolder
    from quantlab.zoo import _minilm_dir

    files = sorted(package_path("quantlab/models/minilm/calib").glob("*.txt"))
    specs = [InputSpec(k, (None, length), np.dtype(np.int64)) for k in ("input_ids", "attention_mask", "token_type_ids")]
    reader = TextFolder(files, specs, Path(_minilm_dir()) / "tokenizer.json", length, n)
    return reader.encode(reader.lines()[:n])


# --- exports of the bundled PyTorch models -------------------------------------------------------


def _export(factory: str, opset: int, batch: int | None, external: bool = False) -> Callable[[Path], Path]:
    """Export ``quantlab.zoo.<factory>`` with the TorchScript exporter at ``opset``; ``batch`` fixes the batch axis."""

    def fetch(folder: Path) -> Path:
        import torch

        from quantlab import zoo

        tag = f"{factory}-opset{opset}-{'b' + str(batch) if batch else 'dynamic'}{'-external' if external else ''}"
        out = folder / tag / f"{tag}.onnx"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        module = getattr(zoo, factory)()
        b = batch or 1
        if factory == "minilm_l6":
            names, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["embedding"]
            feed = _sentences(b, 32)
            args = tuple(torch.from_numpy(feed[k]) for k in names)
        else:
            names, outputs = ["input"], ["logits"]
            args = (torch.from_numpy(_imagenet(b)["input"]),)
        axes = None if batch else {k: {0: "batch"} for k in (*names, *outputs)}
        tmp = out.parent / f".tmp-{out.name}"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), input_names=names, output_names=outputs, dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
        if external:
            import onnx

            model = onnx.load(str(tmp))
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{out.name}.weights", size_threshold=1024)
        os.replace(tmp, out)
        return out

    return fetch


def corpus() -> list[CorpusModel]:
    """Every model of the corpus, in a fixed order."""
    r, ro, dd = "rapidocr 3.10", "rapidocr-onnxruntime 1.4.4", "ddddocr 1.6.1"
    models = [
        CorpusModel("ppocrv6-det", r, _package_file("rapidocr", "models/PP-OCRv6_det_small.onnx"),
                    _paddle(256, 256), {"x": (1, 3, 256, 256)}),
        CorpusModel("ppocrv6-rec", r, _package_file("rapidocr", "models/PP-OCRv6_rec_small.onnx"),
                    _paddle(48, 320), {"x": (1, 3, 48, 320)}),
        CorpusModel("ppocr-cls", r, _package_file("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
                    _paddle(48, 192), {"x": (1, 3, 48, 192)}, fast=True),
        CorpusModel("ppocrv4-det", ro, _package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
                    _paddle(256, 256), {"x": (1, 3, 256, 256)}),
        CorpusModel("ppocrv4-rec", ro, _package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
                    _paddle(48, 320), {"x": (1, 3, 48, 320)}),
        CorpusModel("ppocr-cls-v2.0", ro, _package_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                    _paddle(48, 192), {"x": (1, 3, 48, 192)}),
        CorpusModel("ddddocr-ocr", dd, _package_file("ddddocr", "common.onnx"), _ddddocr_text,
                    {"input1": (1, 1, 64, 192)}),
        CorpusModel("ddddocr-det", dd, _package_file("ddddocr", "common_det.onnx"), _ddddocr_det),
        CorpusModel("ddddocr-ocr-old", dd, _package_file("ddddocr", "common_old.onnx"), _ddddocr_text,
                    {"input1": (1, 1, 64, 192)}, expect="prepare: model 'common_old.onnx' is already quantized", fast=True),
    ]
    for opset, batch, external in ((9, 1, False), (11, 2, False), (13, 4, False), (17, None, False), (17, 2, True)):
        name = f"efficientnet-lite0-opset{opset}-{'b' + str(batch) if batch else 'dynamic'}{'-external' if external else ''}"
        models.append(CorpusModel(name, "quantlab.zoo export", _export("efficientnet_lite0", opset, batch, external),
                                  _imagenet))
    for opset, batch in ((11, None), (17, 2)):
        name = f"minilm-l6-opset{opset}-{'b' + str(batch) if batch else 'dynamic'}"
        models.append(CorpusModel(name, "quantlab.zoo export", _export("minilm_l6", opset, batch), _sentences,
                                  min_cosine=0.75))
    return models


def write_calibration(model: CorpusModel, folder: Path, samples: int) -> Path:
    """``samples`` calibration samples of ``model`` as one ``.npz`` per sample in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = model.samples(samples)
    for i in range(samples):
        np.savez(folder / f"sample{i:03d}.npz", **{k: v[i] for k, v in arrays.items()})
    return folder


def config_text(model: CorpusModel, onnx_path: Path, calib: Path, out: Path, *, batch_size: int = 4,
                calibrators: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse"), latency_runs: int = 0) -> str:
    """A ``quantlab.toml`` that quantizes ``model`` for every target."""
    shapes = ", ".join(f'"{k}" = {list(v)}' for k, v in model.input_shapes.items())
    return (
        f'[model]\nname = "{model.name}"\nonnx = "{onnx_path}"\ninput_shapes = {{ {shapes} }}\n'
        f'[data]\ncalib = "{calib}"\nbatch_size = {batch_size}\n'
        f'[ptq]\nout = "{out}"\nlatency_runs = {latency_runs}\nreport = false\n'
        f'calibrators = {list(calibrators)}\ntargets = ["tensorrt", "ort-cpu"]\n'
    ).replace("'", '"')


def by_name(name: str) -> CorpusModel:
    models = {m.name: m for m in corpus()}
    if name not in models:
        raise QuantlabError(f"no corpus model '{name}': choose one of {', '.join(models)}")
    return models[name]


def scratch() -> tempfile.TemporaryDirectory:
    """A temporary folder for exports and calibration data."""
    return tempfile.TemporaryDirectory(prefix="quantlab-corpus-")
