"""Run configuration: frozen dataclasses that validate themselves, loaded from ``quantlab.toml``.

Every field has a default, so an empty file (or none) is a valid configuration; CLI flags override
fields with :func:`dataclasses.replace` through :func:`override`.  Relative paths in a file are
relative to the directory holding it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.calibrators import CALIBRATORS, DEFAULT_CALIBRATORS
from quantlab.errors import QuantlabError, check

TARGETS: tuple[str, ...] = ("tensorrt", "ort-cpu", "ort-dynamic")
DEFAULT_TARGETS: tuple[str, ...] = ("tensorrt", "ort-cpu")  # the static ones; "all" adds ort-dynamic
CALIBRATOR_NAMES: tuple[str, ...] = CALIBRATORS  # every registered name; a run uses DEFAULT_CALIBRATORS
# graph transforms of the FP32 model before calibration, in the order they always run
TRANSFORM_NAMES: tuple[str, ...] = ("equalize", "smoothquant", "adaround", "bias-correction")


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> None:
    check(value in allowed, f"unknown {what} '{value}': choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    Steps, in order: decode to RGB; fit the image to the input size ``(H, W)`` (``crop``, or the
    model input's size when ``None``) as ``fit`` says; convert to
    float32 pixel values ``p`` in [0, 255]; ``x = (p * scale - mean) / std`` per channel; reorder
    channels when ``channel_order = "BGR"``; lay out as ``NCHW`` or ``NHWC``.

    ``fit`` (bilinear resampling throughout):

    * ``"crop"``: scale so the shorter side is ``resize`` pixels (``None``: the crop size, ``0``: no
      resizing), then take the centre ``(H, W)``;
    * ``"stretch"``: resize to exactly ``(H, W)``, aspect ratio not kept (PaddleDetection's plain
      resize); ``resize`` is ignored;
    * ``"letterbox"`` (YOLO-family detectors): scale by ``r = min(H / h, W / w)`` to
      ``(int(h r), int(w r))``, keeping the aspect ratio, and pad to ``(H, W)`` with the pixel value
      ``pad_value``, the image at the top-left corner (``pad_position = "top-left"``, YOLOX) or
      centred (``"center"``).  Example: a 512x384 (WxH) page into 416x416 gives r = 0.8125, a
      416x312 image and 104 rows of padding below it.

    Detection decoders receive each sample's scale and padding (:class:`quantlab.data.ImageInfo`)
    to map boxes back to the image's pixels.

    Example (EfficientNet-Lite): ``resize=256, crop=(224, 224), mean=127, std=128`` maps a pixel
    of 255 to (255 - 127) / 128 = 1.0 and a pixel of 0 to -0.992.
    """

    resize: int | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    fit: str = "crop"
    pad_value: float = 114.0
    pad_position: str = "top-left"

    def __post_init__(self) -> None:
        _one_of(self.fit, ("crop", "stretch", "letterbox"), "preprocess.fit")
        _one_of(self.pad_position, ("top-left", "center"), "preprocess.pad_position")
        check(0.0 <= self.pad_value <= 255.0, f"preprocess.pad_value must be a pixel value in [0, 255], got {self.pad_value}")
        _one_of(self.channel_order, ("RGB", "BGR"), "channel_order")
        _one_of(self.layout, ("NCHW", "NHWC"), "layout")
        check(
            self.resize is None or self.resize >= 0,
            f"preprocess.resize must be >= 0 (0: do not resize), got {self.resize}",
        )
        check(
            self.crop is None or (len(self.crop) == 2 and min(self.crop) > 0),
            f"preprocess.crop must be [height, width] with positive sizes, got {self.crop}",
        )
        check(len(self.mean) == 3 and len(self.std) == 3, "preprocess.mean and preprocess.std need 3 values (R, G, B)")
        check(all(s != 0 for s in self.std), "preprocess.std must not contain 0")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to quantize: an ONNX file, or a PyTorch ``module:factory`` that quantlab exports.

    ``input_shapes`` fixes dimensions: the export shape of a PyTorch model, and the value of any
    dynamic dimension other than the batch axis of an ONNX model.
    """

    name: str = ""
    onnx: str | None = None
    pytorch: str | None = None
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    opset: int = 17

    def __post_init__(self) -> None:
        check(
            self.pytorch is None or ":" in self.pytorch,
            f"model.pytorch must be 'module:factory', got '{self.pytorch}'",
        )
        check(self.opset >= 13, f"model.opset must be >= 13 (per-channel Q/DQ), got {self.opset}")
        for name, shape in self.input_shapes.items():
            check(
                all(isinstance(d, int) and d > 0 for d in shape),
                f"model.input_shapes.{name} must be a list of positive integers, got {list(shape)}",
            )

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.onnx:
            return Path(self.onnx).stem
        if self.pytorch:
            return self.pytorch.rsplit(":", 1)[1]
        return "model"


@dataclass(frozen=True)
class DataConfig:
    """Calibration data: a folder of images, of ``.npy``/``.npz`` arrays or of ``.txt`` sentences.

    ``kind = "auto"`` picks the one kind the folder holds (images, arrays or text).
    ``max_samples = 0`` uses every sample.  Samples are read in sorted file-name order.
    Text data (one sample per non-empty line) is tokenized by ``tokenizer``: a HuggingFace
    ``tokenizer.json`` or a folder holding one (``pkg:NAME/sub/path`` for one that ships with a
    package), padded and truncated to ``max_length`` tokens.
    """

    calib: str | None = None
    kind: str = "auto"
    batch_size: int = 8
    max_samples: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)
    tokenizer: str | None = None
    max_length: int = 128

    def __post_init__(self) -> None:
        _one_of(self.kind, ("auto", "images", "arrays", "text"), "data.kind")
        check(self.max_length > 0, f"data.max_length must be positive, got {self.max_length}")
        check(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")
        check(self.max_samples >= 0, f"data.max_samples must be >= 0, got {self.max_samples}")


@dataclass(frozen=True)
class PtqConfig:
    """What to produce: calibrators, targets, the percentile, where runs go.

    ``exclude`` names nodes of the model to leave in float in every INT8 model; nodes that write or
    read a tensor holding fill values (an attention mask's -3.4e38) are left in float as well.
    ``report = false`` skips the HTML/Markdown report at the end of the run (``quantlab report``
    writes it later).  ``transforms`` names graph transforms of the FP32 model (see
    :mod:`quantlab.transforms` and ``[transforms]``) that run before the statistics pass, always in
    the order of :data:`TRANSFORM_NAMES` whatever the order listed.
    """

    calibrators: tuple[str, ...] = DEFAULT_CALIBRATORS
    targets: tuple[str, ...] = DEFAULT_TARGETS
    percentile: float = 99.99
    out: str = "reports"
    run_name: str = ""
    latency_runs: int = 20
    exclude: tuple[str, ...] = ()
    report: bool = True
    transforms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check(isinstance(self.transforms, tuple),
              f'ptq.transforms must be a list of names, e.g. ["smoothquant", "bias-correction"], got {self.transforms!r}')
        for t in self.transforms:
            _one_of(t, TRANSFORM_NAMES, "transform")
        check(len(set(self.transforms)) == len(self.transforms), f"ptq.transforms names a transform twice: {list(self.transforms)}")
        check(len(self.calibrators) > 0, "ptq.calibrators is empty: name at least one of " + ", ".join(CALIBRATOR_NAMES))
        check(len(self.targets) > 0, "ptq.targets is empty: name at least one of " + ", ".join(TARGETS))
        for c in self.calibrators:
            _one_of(c, CALIBRATOR_NAMES, "calibrator")
        for t in self.targets:
            _one_of(t, TARGETS, "target")
        check(0.0 < self.percentile <= 100.0, f"ptq.percentile must be in (0, 100], got {self.percentile}")
        check(self.latency_runs >= 0, f"ptq.latency_runs must be >= 0, got {self.latency_runs}")


TASKS: tuple[str, ...] = ("classification", "dense", "embedding", "detection", "outputs")
BACKENDS: tuple[str, ...] = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class CompareConfig:
    """How ``quantlab compare`` evaluates the FP32, FP16 and INT8 engines of a run.

    ``eval`` is the evaluation folder; ``glob`` picks files inside it.  ``labels = "filename"`` reads
    an integer class label from the file name (the number after the last ``_`` of the stem).
    ``extra`` is an optional second, unlabelled folder whose samples count for agreement metrics
    only; for images ``extra_crops = k`` takes a k x k grid of crops from each image after scaling
    its shorter side to ``extra_resize`` pixels.  ``task`` picks the task metrics:

    * ``classification``: top-1/top-5 where there are labels; top-1 agreement, top-5 overlap and the
      KL divergence of the softmax against FP32 everywhere;
    * ``dense``: IoU of the maps thresholded at ``dense_threshold`` and mean absolute error vs FP32;
    * ``embedding``: cosine similarity to FP32 and retrieval top-``retrieval_k`` agreement;
    * ``detection``: the ``dense`` metrics plus box precision, recall and F1 against FP32's boxes:
      boxes from the map as rapidocr's DB post-processing makes them (threshold ``dense_threshold``,
      mean probability at least ``box_threshold``, expanded by ``box_unclip_ratio``, a 2x2 dilation
      when ``box_dilation``), matched one to one at IoU >= ``box_iou``;
    * ``detection`` with ``postprocess = "module:function"`` (NMS-decoded detectors such as YOLO):
      the named decoder turns each sample's raw outputs into boxes, scores and classes (see
      :mod:`quantlab.compare.detection`); mAP@0.5 (``map50``) and mAP@0.5:0.95 (``map``) of the
      engine's detections with FP32's as ground truth (COCO evaluation, pycocotools), and box
      precision, recall and F1 matched one to one per class at IoU >= ``box_iou``.  ``classes``
      names the model's classes (their number is checked against the decoder's output);
    * ``outputs``: only the per-output metrics (cosine, SQNR, max abs error, within atol/rtol),
      which every task reports too.

    ``output`` names the model output the task metrics read (default: the first).  ``metric`` is a
    user metric ``module:function``.  ``primary`` is the metric that ranks engines (default: the
    task's main one).  ``layers`` turns the per-layer analysis of the best INT8 engine on; its
    sensitivity ranking runs on the first ``sensitivity_samples`` samples (0: all) and, when
    ``sensitivity_layers`` is N > 0, only for the N layers with the lowest own SQNR.
    """

    eval: str | None = None
    glob: str = "*"
    labels: str = "none"
    extra: str | None = None
    extra_glob: str = "*"
    extra_crops: int = 1
    extra_resize: int | None = None
    task: str = "outputs"
    output: str | None = None
    dense_threshold: float = 0.3
    box_threshold: float = 0.5
    box_unclip_ratio: float = 1.6
    box_dilation: bool = True
    box_iou: float = 0.5
    postprocess: str | None = None
    classes: tuple[str, ...] = ()
    retrieval_k: int = 5
    metric: str | None = None
    primary: str | None = None
    max_samples: int = 0
    batch_size: int = 8
    backend: str = "onnxruntime"
    atol: float = 1e-5
    rtol: float = 1e-5
    latency_batches: tuple[int, ...] = (1, 8)
    latency_runs: int = 20
    warmup: int = 3
    layers: bool = True
    sensitivity_samples: int = 32
    sensitivity_layers: int = 0

    def __post_init__(self) -> None:
        _one_of(self.task, TASKS, "compare.task")
        _one_of(self.backend, BACKENDS, "compare.backend")
        check(self.labels in ("none", "filename"), f"unknown compare.labels '{self.labels}': choose one of none, filename")
        check(self.extra_crops >= 1, f"compare.extra_crops must be >= 1, got {self.extra_crops}")
        check(0.0 <= self.dense_threshold, f"compare.dense_threshold must be >= 0, got {self.dense_threshold}")
        check(self.retrieval_k >= 1, f"compare.retrieval_k must be >= 1, got {self.retrieval_k}")
        check(0.0 <= self.box_threshold <= 1.0, f"compare.box_threshold must be in [0, 1], got {self.box_threshold}")
        check(self.box_unclip_ratio > 0, f"compare.box_unclip_ratio must be > 0, got {self.box_unclip_ratio}")
        check(0.0 < self.box_iou <= 1.0, f"compare.box_iou must be in (0, 1], got {self.box_iou}")
        check(
            self.postprocess is None or (":" in self.postprocess and self.task == "detection"),
            f"compare.postprocess must be 'module:function' with task = \"detection\", got '{self.postprocess}' "
            f"(task {self.task})",
        )
        check(
            self.postprocess is None or len(self.classes) > 0,
            "compare.postprocess needs compare.classes: the model's class names, e.g. classes = [\"text\", \"title\"]",
        )
        check(
            self.metric is None or ":" in self.metric,
            f"compare.metric must be 'module:function', got '{self.metric}'",
        )
        check(self.max_samples >= 0, f"compare.max_samples must be >= 0, got {self.max_samples}")
        check(self.batch_size > 0, f"compare.batch_size must be positive, got {self.batch_size}")
        check(self.atol >= 0 and self.rtol >= 0, "compare.atol and compare.rtol must be >= 0")
        check(
            len(self.latency_batches) > 0 and all(isinstance(b, int) and b > 0 for b in self.latency_batches),
            f"compare.latency_batches must be positive integers, got {list(self.latency_batches)}",
        )
        check(self.latency_runs >= 0 and self.warmup >= 0, "compare.latency_runs and compare.warmup must be >= 0")
        check(self.sensitivity_samples >= 0, "compare.sensitivity_samples must be >= 0")
        check(self.sensitivity_layers >= 0, "compare.sensitivity_layers must be >= 0 (0 measures every layer)")


@dataclass(frozen=True)
class TuneConfig:
    """The escalation ladder of ``quantlab tune``: calibrator sweep, partial quantization, QAT.

    ``target`` is the target whose INT8 engines the ladder works on.  ``recipes`` are the sets of
    graph transforms (:mod:`quantlab.transforms`) tried after the calibrator sweep, each with every
    calibrator (an empty list skips the rung).  Partial quantization keeps at
    most ``max_float_layers`` of the most sensitive layers out of INT8 (in FP16 for ``tensorrt``, what
    TensorRT runs, in FP32 for ``ort-cpu``); for ``tensorrt``, whose models are not meant for the
    CPU, at most ``max_float_share`` of the quantized layers (0.05: one layer in twenty); for
    ``ort-cpu`` it stops before a step would raise the engine's batch-1 latency by more than
    ``max_latency_increase`` (0.10: +10%) over the fully quantized engine's.  ``qat``: ``"auto"`` and ``"on"``
    run quantization-aware training when the earlier rungs miss the tolerance (the PyTorch model when
    the config names one, else the prepared ONNX graph converted to PyTorch), ``"off"`` stops the
    ladder before it.
    """

    target: str = "ort-cpu"
    max_float_layers: int = 8
    max_float_share: float = 0.05
    max_latency_increase: float = 0.10
    qat: str = "auto"
    recipes: tuple[tuple[str, ...], ...] = (
        ("equalize",), ("smoothquant",), ("bias-correction",), ("equalize", "bias-correction"),
        ("smoothquant", "bias-correction"), ("adaround",), ("smoothquant", "adaround"),
    )

    def __post_init__(self) -> None:
        _one_of(self.target, TARGETS, "tune.target")
        for recipe in self.recipes:
            check(isinstance(recipe, tuple) and len(recipe) > 0,
                  f"tune.recipes must be lists of transform names, e.g. [[\"smoothquant\"], [\"equalize\", \"bias-correction\"]], got {recipe!r}")
            for t in recipe:
                _one_of(t, TRANSFORM_NAMES, "transform in tune.recipes")
        _one_of(self.qat, ("auto", "on", "off"), "tune.qat")
        check(self.max_float_layers >= 0, f"tune.max_float_layers must be >= 0, got {self.max_float_layers}")
        check(isinstance(self.max_float_share, (int, float)) and 0 <= self.max_float_share <= 1,
              f"tune.max_float_share must be a fraction in [0, 1] (0.05: one quantized layer in twenty), got {self.max_float_share!r}")
        check(isinstance(self.max_latency_increase, (int, float)) and self.max_latency_increase >= 0,
              f"tune.max_latency_increase must be a fraction >= 0 (0.10: +10% batch-1 latency), got {self.max_latency_increase!r}")


@dataclass(frozen=True)
class GateConfig:
    """The CI accuracy gate of ``quantlab gate``.

    ``engines``: engine names to gate (``int8:<calibrator>.<target>``), or ``"best"`` for the best
    INT8 engine by the primary metric, or ``"all"``.  ``baseline``: the stored results a run is
    compared with; a gated metric may be at most ``regression`` worse than its baseline value.
    """

    engines: tuple[str, ...] = ("best",)
    baseline: str = "reports/baseline.json"
    regression: float = 0.005

    def __post_init__(self) -> None:
        check(len(self.engines) > 0, 'gate.engines is empty: name engines, or use ["best"] or ["all"]')
        check(self.regression >= 0, f"gate.regression must be >= 0, got {self.regression}")


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware training (:mod:`quantlab.qat`), the last rung of the escalation ladder.

    Fine-tunes the PyTorch model (``[model] pytorch``) with INT8 fake quantizers for ``epochs``
    passes over ``data`` (a folder read like the calibration data; default: the calibration
    folder), at most ``max_steps`` optimizer steps in all (0: no limit).  ``lr`` is the SGD learning
    rate at the start of a cosine schedule: about 1% of the model's training rate (Wu et al. 2020).
    ``loss``: ``labels`` (cross-entropy against labels the training batches carry), ``distill``
    (mean squared error against the FP32 model's outputs, no labels needed) or ``auto`` (labels
    when the batches have them).  ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    ``calib_batches`` batches calibrate the quantizers quantlab's ranges do not cover.
    ``source``: which network trains: ``pytorch`` (``[model] pytorch``, modelopt's quantized
    modules), ``onnx`` (the prepared FP32 ONNX converted to PyTorch, quantizers where quantlab's
    ``tensorrt`` model has Q/DQ) or ``auto`` (``pytorch`` when the config names a factory).
    ``optimizer``: ``sgd`` (with ``momentum``) or ``adam``.  ``patience``: stop after that many
    evaluated epochs without a better metric (0: never; a plateau).  ``learn_ranges``: ``off``
    (ranges fixed at quantlab's calibration), ``activations`` or ``all`` (weights too): the
    quantizers' steps train (LSQ, :mod:`quantlab.qat.ranges`; ``onnx`` source only) at the learning
    rate ``range_lr`` on ``log s``; ``auto`` (the default): ``activations`` for the ``onnx`` source,
    ``off`` for the ``pytorch`` source (learned activation ranges measurably helped every bundled model).
    """

    epochs: int = 1
    lr: float = 1e-4
    momentum: float = 0.9
    batch_size: int = 8
    max_steps: int = 0
    device: str = "auto"
    loss: str = "auto"
    data: str | None = None
    seed: int = 0
    calib_batches: int = 2
    source: str = "auto"
    optimizer: str = "sgd"
    patience: int = 3
    learn_ranges: str = "auto"
    range_lr: float = 1e-2

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"qat.epochs must be >= 1, got {self.epochs}")
        check(self.lr > 0, f"qat.lr must be > 0, got {self.lr}")
        check(0.0 <= self.momentum < 1.0, f"qat.momentum must be in [0, 1), got {self.momentum}")
        check(self.batch_size > 0, f"qat.batch_size must be positive, got {self.batch_size}")
        check(self.max_steps >= 0, f"qat.max_steps must be >= 0 (0: no limit), got {self.max_steps}")
        _one_of(self.device, ("auto", "cpu", "cuda"), "qat.device")
        _one_of(self.loss, ("auto", "labels", "distill"), "qat.loss")
        check(self.calib_batches >= 1, f"qat.calib_batches must be >= 1, got {self.calib_batches}")
        _one_of(self.source, ("auto", "pytorch", "onnx"), "qat.source")
        _one_of(self.optimizer, ("sgd", "adam"), "qat.optimizer")
        check(self.patience >= 0, f"qat.patience must be >= 0 (0: no plateau stop), got {self.patience}")
        _one_of(self.learn_ranges, ("auto", "off", "activations", "all"), "qat.learn_ranges")
        check(self.range_lr > 0, f"qat.range_lr must be > 0, got {self.range_lr}")


@dataclass(frozen=True)
class TransformConfig:
    """Parameters of the graph transforms of :mod:`quantlab.transforms` (``[transforms]``).

    ``smoothquant_alpha``: the migration strength ``a`` of SmoothQuant, a number in [0, 1], or
    ``"auto"`` to search it per layer on the calibration data (the grid ``smoothquant_grid``, each
    value judged by the layer's output error after INT8 quantization).  ``smoothquant_rows``: rows
    (tokens) of calibration activations the search uses per layer.  ``adaround_iterations``:
    optimizer steps per layer of AdaRound; ``adaround_device``: ``auto`` (CUDA when available),
    ``cpu`` or ``cuda``.  ``seed`` fixes every random choice (row samples, mini-batches).
    """

    smoothquant_alpha: float | str = "auto"
    smoothquant_grid: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
    smoothquant_rows: int = 2048
    adaround_iterations: int = 200
    adaround_device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        a = self.smoothquant_alpha
        check(
            a == "auto" or (isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0),
            f"transforms.smoothquant_alpha must be a number in [0, 1] or \"auto\", got {a!r}",
        )
        check(
            len(self.smoothquant_grid) > 0 and all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in self.smoothquant_grid),
            f"transforms.smoothquant_grid must be numbers in [0, 1], got {list(self.smoothquant_grid)}",
        )
        check(isinstance(self.smoothquant_rows, int) and self.smoothquant_rows > 0,
              f"transforms.smoothquant_rows must be a positive integer, got {self.smoothquant_rows!r}")
        check(isinstance(self.adaround_iterations, int) and not isinstance(self.adaround_iterations, bool)
              and self.adaround_iterations > 0,
              f"transforms.adaround_iterations must be a positive integer, got {self.adaround_iterations!r}")
        _one_of(self.adaround_device, ("auto", "cpu", "cuda"), "transforms.adaround_device")
        check(isinstance(self.seed, int), f"transforms.seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    tolerance: dict[str, Any] = field(default_factory=dict)
    root: Path = field(default_factory=Path.cwd)

    def resolve(self, path: str | Path) -> Path:
        """A path from the config, made absolute against the config file's folder.

        ``pkg:NAME/sub/path`` names a path inside the installed Python package ``NAME`` (data that
        ships with a package, such as foolbox's labelled ImageNet images).
        """
        text = str(path)
        if text.startswith("pkg:"):
            return package_path(text[4:])
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.root / p))


def package_path(spec: str) -> Path:
    """``NAME/sub/path`` inside the installed package ``NAME``, found without importing it."""
    import importlib.util

    name, _, rest = spec.partition("/")
    try:
        found = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):
        found = None
    check(
        found is not None and found.submodule_search_locations,
        f"package '{name}' named by 'pkg:{spec}' is not installed: pip install it (see the README's model table)",
    )
    return Path(list(found.submodule_search_locations)[0]) / rest


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "ptq": PtqConfig, "compare": CompareConfig,
    "tune": TuneConfig, "gate": GateConfig, "qat": QatConfig, "transforms": TransformConfig,
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    check(not unknown, f"unknown key(s) {', '.join(unknown)} in [{where}]: valid keys are {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "preprocess":
            check(isinstance(value, dict), f"[{where}.preprocess] must be a table")
            value = _build(Preprocess, value, f"{where}.preprocess")
        elif key == "input_shapes":
            check(isinstance(value, dict), f"[{where}.input_shapes] must be a table of name = [dims]")
            value = {k: tuple(v) for k, v in value.items()}
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong type slipped through, e.g. a string where a number goes
        raise QuantlabError(f"bad value in [{where}]: {exc}") from None


def load_config(path: str | Path | None = None) -> Config:
    """Read a ``quantlab.toml``; ``None`` gives the defaults rooted at the current directory."""
    if path is None:
        return Config()
    p = Path(path)
    check(p.is_file(), f"config file '{p}' does not exist: pass an existing quantlab.toml to --config")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise QuantlabError(f"config file '{p}' is not valid TOML ({exc}): fix the syntax") from None
    known = set(_SECTIONS) | {"tolerance"}
    unknown = sorted(set(raw) - known)
    check(not unknown, f"unknown section(s) {', '.join(unknown)} in '{p}': valid sections are {', '.join(sorted(known))}")
    sections = {name: _build(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    tolerance = raw.get("tolerance", {})
    check(isinstance(tolerance, dict), "[tolerance] must be a table of metric = value")
    return Config(tolerance=dict(tolerance), root=p.resolve().parent, **sections)


def override(config: Config, section: str, **changes: Any) -> Config:
    """A copy of ``config`` with fields of one section replaced (``None`` values are ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return config
    current = getattr(config, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(current, **changes)})
