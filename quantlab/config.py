"""Run configuration: frozen dataclasses that validate themselves, loaded from ``quantlab.toml``.

Every field has a default, so an empty file (or none) is a valid configuration; CLI flags override
fields with :func:`dataclasses.replace` through :func:`override`.  Relative paths in a file are
relative to the directory holding it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError, check

TARGETS: tuple[str, ...] = ("tensorrt", "ort-cpu")
CALIBRATOR_NAMES: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> None:
    check(value in allowed, f"unknown {what} '{value}': choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    Steps, in order: decode to RGB; scale so the shorter side is ``resize`` pixels (bilinear;
    ``None``: the crop size, ``0``: no resizing); take the centre ``crop = (height, width)``
    (``None``: the model input's size); convert to
    float32 pixel values ``p`` in [0, 255]; ``x = (p * scale - mean) / std`` per channel; reorder
    channels when ``channel_order = "BGR"``; lay out as ``NCHW`` or ``NHWC``.

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

    def __post_init__(self) -> None:
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
    """Calibration data: a folder of images or of ``.npy``/``.npz`` arrays.

    ``kind = "auto"`` picks images when the folder holds image files, arrays otherwise.
    ``max_samples = 0`` uses every sample.  Samples are read in sorted file-name order.
    """

    calib: str | None = None
    kind: str = "auto"
    batch_size: int = 8
    max_samples: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)

    def __post_init__(self) -> None:
        _one_of(self.kind, ("auto", "images", "arrays"), "data.kind")
        check(self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}")
        check(self.max_samples >= 0, f"data.max_samples must be >= 0, got {self.max_samples}")


@dataclass(frozen=True)
class PtqConfig:
    """What to produce: calibrators, targets, the percentile, where runs go."""

    calibrators: tuple[str, ...] = CALIBRATOR_NAMES
    targets: tuple[str, ...] = TARGETS
    percentile: float = 99.99
    out: str = "reports"
    run_name: str = ""
    latency_runs: int = 20

    def __post_init__(self) -> None:
        check(len(self.calibrators) > 0, "ptq.calibrators is empty: name at least one of " + ", ".join(CALIBRATOR_NAMES))
        check(len(self.targets) > 0, "ptq.targets is empty: name at least one of " + ", ".join(TARGETS))
        for c in self.calibrators:
            _one_of(c, CALIBRATOR_NAMES, "calibrator")
        for t in self.targets:
            _one_of(t, TARGETS, "target")
        check(0.0 < self.percentile <= 100.0, f"ptq.percentile must be in (0, 100], got {self.percentile}")
        check(self.latency_runs >= 0, f"ptq.latency_runs must be >= 0, got {self.latency_runs}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)
    tolerance: dict[str, float] = field(default_factory=dict)
    root: Path = field(default_factory=Path.cwd)

    def resolve(self, path: str | Path) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "ptq": PtqConfig}


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
