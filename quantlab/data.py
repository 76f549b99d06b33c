"""Calibration and evaluation data: plain iterables of feeds ``{input name: batch array}``.

Two folder layouts are understood:

* images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``) for a model with one image input, turned into
  tensors by a declared :class:`~quantlab.config.Preprocess`;
* arrays: ``.npz`` files keyed by input name (any number of inputs) or, for a single-input model,
  ``.npy`` files.  An array holds one sample (the input's shape without the batch axis) or a batch of
  them (the full rank; the first axis counts samples).

Files are read in sorted name order, so the same folder always gives the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.config import DataConfig, Preprocess
from quantlab.errors import QuantlabError, check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (``None`` for the dynamic batch axis) and NumPy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.shape[1:]

    def describe(self) -> str:
        return "x".join("N" if d is None else str(d) for d in self.shape)


def _fmt(shape: Sequence[int | None]) -> str:
    return "x".join("N" if d is None else str(d) for d in shape)


def list_data_files(folder: str | Path, kind: str = "auto") -> tuple[str, list[Path]]:
    """``(kind, files)`` for a data folder; raises a one-line error for a missing or empty one."""
    path = Path(folder)
    check(path.exists(), f"data folder '{path}' does not exist: pass a folder of images or .npy/.npz files")
    check(path.is_dir(), f"data path '{path}' is not a folder: pass a folder of images or .npy/.npz files")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    if kind == "auto":
        check(not (images and arrays), f"data folder '{path}' mixes images and arrays: keep one kind per folder")
        kind = "images" if images else "arrays"
    chosen = images if kind == "images" else arrays
    allowed = IMAGE_SUFFIXES if kind == "images" else ARRAY_SUFFIXES
    check(
        len(chosen) > 0,
        f"data folder '{path}' holds no {kind} ({', '.join(allowed)}): add calibration samples to it",
    )
    return kind, chosen


class ImageFolder:
    """Batches of preprocessed images for a single image input.

    ``Preprocess.crop = None`` takes the model input's height and width; ``resize = None`` scales the
    shorter side to the crop size first, ``resize = 0`` does not resize (then every image must
    already have the crop size, or the model's).
    """

    def __init__(self, files: Sequence[Path], spec: InputSpec, preprocess: Preprocess, batch_size: int) -> None:
        self.files = list(files)
        self.spec = spec
        self.preprocess = preprocess
        self.batch_size = batch_size
        check(
            len(spec.shape) == 4,
            f"image data needs a 4-D model input (N,C,H,W or N,H,W,C), but '{spec.name}' is {spec.describe()}: "
            "use a folder of .npy/.npz arrays instead",
        )
        nchw = preprocess.layout == "NCHW"
        h, w = (spec.shape[2], spec.shape[3]) if nchw else (spec.shape[1], spec.shape[2])
        channels = spec.shape[1] if nchw else spec.shape[3]
        check(
            channels in (3, None),
            f"model input '{spec.name}' is {spec.describe()} with layout {preprocess.layout}, "
            "which has no 3 colour channels: set data.preprocess.layout to match the model",
        )
        crop = preprocess.crop or ((h, w) if h and w else None)
        self.crop = crop
        self.resize = preprocess.resize if preprocess.resize is not None else (min(crop) if crop else 0)

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def load(self, path: Path) -> np.ndarray:
        """One image as a float32 array in the model's layout (no batch axis)."""
        from PIL import Image, UnidentifiedImageError

        p = self.preprocess
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.resize:
                    scale = self.resize / min(img.size)
                    size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
                    img = img.resize(size, Image.Resampling.BILINEAR)
                if self.crop:
                    ch, cw = self.crop
                    check(
                        img.size[0] >= cw and img.size[1] >= ch,
                        f"image '{path.name}' is {img.size[1]}x{img.size[0]} (HxW), smaller than the crop "
                        f"{ch}x{cw}: set data.preprocess.resize so the shorter side is at least {min(ch, cw)}",
                    )
                    left, top = (img.size[0] - cw) // 2, (img.size[1] - ch) // 2
                    img = img.crop((left, top, left + cw, top + ch))
                pixels = np.asarray(img, dtype=np.float32)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise QuantlabError(
                f"cannot read image '{path}' ({type(exc).__name__}: {exc}): remove or replace the file"
            ) from None
        x = (pixels * np.float32(p.scale) - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
        if p.channel_order == "BGR":
            x = x[..., ::-1]
        if p.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        x = np.ascontiguousarray(x, dtype=self.spec.dtype)
        expected = self.spec.sample_shape
        if any(e is not None and e != g for e, g in zip(expected, x.shape)):
            raise QuantlabError(
                f"image '{path.name}' preprocesses to {_fmt(x.shape)} but model input '{self.spec.name}' expects "
                f"{_fmt(expected)} per sample: set data.preprocess.crop (and resize) to the model's input size"
            )
        return x

    def __iter__(self) -> Iterator[Feed]:
        first_shape = None
        for start in range(0, len(self.files), self.batch_size):
            chunk = self.files[start : start + self.batch_size]
            arrays = [self.load(f) for f in chunk]
            for f, a in zip(chunk, arrays):
                first_shape = first_shape or (a.shape, f.name)
                if a.shape != first_shape[0]:
                    raise QuantlabError(
                        f"images differ in size: '{first_shape[1]}' gives {_fmt(first_shape[0])} but '{f.name}' gives "
                        f"{_fmt(a.shape)}: set data.preprocess.resize and crop so every image has the same size"
                    )
            yield {self.spec.name: np.stack(arrays)}


class ArrayFolder:
    """Batches from ``.npz`` files keyed by input name, or ``.npy`` files for a single input."""

    def __init__(self, files: Sequence[Path], specs: Sequence[InputSpec], batch_size: int) -> None:
        self.files = list(files)
        self.specs = list(specs)
        self.batch_size = batch_size
        if any(f.suffix.lower() == ".npy" for f in self.files):
            check(
                len(self.specs) == 1,
                f"the model has {len(self.specs)} inputs ({', '.join(s.name for s in self.specs)}) but the data "
                "holds .npy files: store one .npz per sample keyed by input name",
            )

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        try:
            if path.suffix.lower() == ".npy":
                return {self.specs[0].name: np.load(path, allow_pickle=False)}
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as exc:
            raise QuantlabError(f"cannot read array file '{path}' ({exc}): remove or replace the file") from None

    def _samples(self, path: Path) -> list[Feed]:
        arrays = self._read(path)
        names = [s.name for s in self.specs]
        check(
            sorted(arrays) == sorted(names),
            f"'{path.name}' holds arrays {sorted(arrays)} but the model's inputs are {names}: key the arrays by input name",
        )
        counts = set()
        for spec in self.specs:
            a = arrays[spec.name]
            batched = a.ndim == len(spec.shape)
            sample = a.shape[1:] if batched else a.shape
            if a.ndim not in (len(spec.shape), len(spec.shape) - 1) or any(
                e is not None and e != g for e, g in zip(spec.sample_shape, sample)
            ):
                raise QuantlabError(
                    f"array '{spec.name}' in '{path.name}' has shape {_fmt(a.shape)} but model input '{spec.name}' "
                    f"expects {spec.describe()} (or one sample of it): reshape the data to match the model"
                )
            same_kind = np.issubdtype(a.dtype, np.floating) == np.issubdtype(spec.dtype, np.floating)
            check(
                same_kind and a.dtype.kind in "fiub",
                f"array '{spec.name}' in '{path.name}' has dtype {a.dtype} but the model expects {spec.dtype}: "
                "convert the data",
            )
            arrays[spec.name] = (a if batched else a[None]).astype(spec.dtype, copy=False)
            counts.add(arrays[spec.name].shape[0])
        check(len(counts) == 1, f"arrays in '{path.name}' hold different numbers of samples {sorted(counts)}: align them")
        n = counts.pop()
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]

    def __len__(self) -> int:
        return -(-self.num_samples() // self.batch_size)

    def num_samples(self) -> int:
        return sum(len(self._samples(f)) for f in self.files)

    def __iter__(self) -> Iterator[Feed]:
        pending: list[Feed] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            for sample in self._samples(f):
                for k, v in sample.items():
                    if shapes.setdefault(k, v.shape) != v.shape:
                        raise QuantlabError(
                            f"samples of input '{k}' differ in shape ({_fmt(shapes[k])} vs {_fmt(v.shape)} in "
                            f"'{f.name}'): make every sample the same shape"
                        )
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield {k: np.stack([s[k] for s in pending]) for k in pending[0]}
                    pending = []
        if pending:
            yield {k: np.stack([s[k] for s in pending]) for k in pending[0]}


class Limited:
    """The first ``max_samples`` samples of a reader, batches trimmed to fit; 0 means all.

    With ``drop_last`` a final batch smaller than ``batch_size`` is dropped (models whose batch axis
    is static cannot take it).
    """

    def __init__(self, reader: ImageFolder | ArrayFolder, max_samples: int, batch_size: int, drop_last: bool) -> None:
        self.reader, self.max_samples, self.batch_size, self.drop_last = reader, max_samples, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.reader)
        if self.max_samples:
            n = min(n, -(-self.max_samples // self.batch_size))
        return n

    def __iter__(self) -> Iterator[Feed]:
        seen = 0
        for feed in self.reader:
            n = next(iter(feed.values())).shape[0]
            if self.max_samples and seen + n > self.max_samples:
                n = self.max_samples - seen
                feed = {k: v[:n] for k, v in feed.items()}
            if n <= 0 or (self.drop_last and n < self.batch_size):
                return
            seen += n
            yield feed


def make_reader(config: DataConfig, folder: str | Path, inputs: Sequence[InputSpec]) -> Limited:
    """The reader a data folder calls for, batched as the model allows."""
    kind, files = list_data_files(folder, config.kind)
    fixed = next((s.shape[0] for s in inputs if s.shape and s.shape[0] is not None), None)
    batch = fixed or config.batch_size
    if kind == "images":
        check(
            len(inputs) == 1,
            f"image data feeds one input but the model has {len(inputs)} ({', '.join(s.name for s in inputs)}): "
            "use .npz files keyed by input name",
        )
        reader: ImageFolder | ArrayFolder = ImageFolder(files, inputs[0], config.preprocess, batch)
    else:
        reader = ArrayFolder(files, inputs, batch)
    return Limited(reader, config.max_samples, batch, drop_last=fixed is not None and fixed > 1)
