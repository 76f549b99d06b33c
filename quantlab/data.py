"""Calibration and evaluation data: plain iterables of feeds ``{input name: batch array}``.

Three folder layouts are understood:

* images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``) for a model with one image input, turned into
  tensors by a declared :class:`~quantlab.config.Preprocess`; optionally each image gives a k x k
  grid of crops instead of one centre crop;
* arrays: ``.npz`` files keyed by input name (any number of inputs) or, for a single-input model,
  ``.npy`` files.  An array holds one sample (the input's shape without the batch axis) or a batch of
  them (the full rank; the first axis counts samples);
* text (``.txt``): one sample per non-empty line, tokenized by a HuggingFace ``tokenizers``
  tokenizer to a fixed length, for models with ``input_ids`` / ``attention_mask`` /
  ``token_type_ids`` inputs.

Files are read in sorted name order (optionally only those matching a glob pattern), so the same
folder always gives the same batches.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantlab.config import DataConfig, Preprocess, package_path
from quantlab.errors import QuantlabError, check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".txt",)
SUFFIXES = {"images": IMAGE_SUFFIXES, "arrays": ARRAY_SUFFIXES, "text": TEXT_SUFFIXES}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

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


def list_data_files(folder: str | Path, kind: str = "auto", glob: str = "*") -> tuple[str, list[Path]]:
    """``(kind, files)`` for a data folder; raises a one-line error for a missing or empty one.

    ``glob`` keeps only the files whose name matches the pattern (case-sensitive, not recursive),
    e.g. ``"imagenet_*"``.  ``kind = "auto"`` picks the one kind (images, arrays, text) the
    matching files hold.
    """
    path = Path(folder)
    check(path.exists(), f"data folder '{path}' does not exist: pass a folder of images, .npy/.npz or .txt files")
    check(path.is_dir(), f"data path '{path}' is not a folder: pass a folder of images, .npy/.npz or .txt files")
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and fnmatch.fnmatchcase(p.name, glob)
    )
    found = {k: [p for p in files if p.suffix.lower() in suffixes] for k, suffixes in SUFFIXES.items()}
    if kind == "auto":
        present = [k for k, v in found.items() if v]
        check(
            len(present) <= 1,
            f"data folder '{path}' mixes {' and '.join(present)}: keep one kind per folder",
        )
        kind = present[0] if present else "arrays"
    chosen = found[kind]
    matching = f" matching '{glob}'" if glob != "*" else ""
    check(
        len(chosen) > 0,
        f"data folder '{path}' holds no {kind}{matching} ({', '.join(SUFFIXES[kind])}): add calibration samples to it"
        + (" or fix the glob pattern" if matching else ""),
    )
    return kind, chosen


@dataclass(frozen=True)
class ImageInfo:
    """How one image sample was made from its file: the pre-processing a detector's decoder undoes.

    A point ``(x, y)`` of the image file (``height x width`` pixels) lands at
    ``(x * scale_x + offset_x, y * scale_y + offset_y)`` in the model input, so a box the model
    finds maps back by ``x = (x' - offset_x) / scale_x`` (:meth:`to_image`).  A letterbox has
    ``scale_x = scale_y = r`` and offsets of 0 (top-left) or half the padding (centred); a centre
    crop negative offsets (the crop's corner).  ``input_height x input_width`` is the sample's size.
    Example: a 512x384 (WxH) image letterboxed top-left into 416x416 has r = 0.8125; the input's box
    ``[81.25, 0, 162.5, 81.25]`` is ``[100, 0, 200, 100]`` in the file.
    """

    source: str
    height: int
    width: int
    scale_y: float
    scale_x: float
    offset_y: int = 0
    offset_x: int = 0
    input_height: int = 0
    input_width: int = 0

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """``[K, 4]`` boxes ``x1, y1, x2, y2`` in model-input pixels -> pixels of the image file."""
        b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        b[:, 0::2] = (b[:, 0::2] - self.offset_x) / self.scale_x
        b[:, 1::2] = (b[:, 1::2] - self.offset_y) / self.scale_y
        return b


class ImageFolder:
    """Batches of preprocessed images for a single image input.

    ``Preprocess.crop = None`` takes the model input's height and width; ``resize = None`` scales the
    shorter side to the crop size first, ``resize = 0`` does not resize (then every image must
    already have the crop size, or the model's).  The ``resize`` argument, when given, replaces
    ``Preprocess.resize``.

    ``crops = k > 1`` takes a k x k grid of crops from each image instead of its centre: after
    resizing, crop ``(i, j)`` starts at ``top = round(i * (H - ch) / (k - 1))`` and
    ``left = round(j * (W - cw) / (k - 1))``, so the first and last crops touch the image's edges.
    Crops come in row-major order, images in file order.  Example: a 640x480 (WxH) photo with
    ``resize = 320`` becomes 427x320; with ``k = 3`` and a 224x224 crop the tops are 0, 48, 96 and
    the lefts 0, 102, 203.
    """

    def __init__(
        self,
        files: Sequence[Path],
        spec: InputSpec,
        preprocess: Preprocess,
        batch_size: int,
        crops: int = 1,
        resize: int | None = None,
    ) -> None:
        self.files = list(files)
        self.spec = spec
        self.preprocess = preprocess
        self.batch_size = batch_size
        check(crops >= 1, f"crops must be >= 1 (a k x k grid per image), got {crops}")
        check(resize is None or resize >= 0, f"resize must be >= 0 (0: do not resize), got {resize}")
        self.crops = crops
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
        check(
            crops == 1 or crop is not None,
            f"a {crops}x{crops} grid of crops needs a crop size: set data.preprocess.crop or fix the model's input size",
        )
        self.crop = crop
        if preprocess.fit != "crop":
            check(
                crop is not None,
                f"preprocess.fit = \"{preprocess.fit}\" needs a fixed input size, but '{spec.name}' is {spec.describe()}: "
                "set data.preprocess.crop = [height, width] or fix the model's input shape",
            )
            check(crops == 1, f"a {crops}x{crops} grid of crops needs preprocess.fit = \"crop\", not \"{preprocess.fit}\"")
        if resize is None:
            resize = preprocess.resize
        self.resize = resize if resize is not None else (min(crop) if crop else 0)

    def __len__(self) -> int:
        return -(-len(self.files) * self.crops**2 // self.batch_size)

    def num_samples(self) -> int:
        return len(self.files) * self.crops**2

    def infos(self) -> list[ImageInfo]:
        """Every sample's :class:`ImageInfo`, in the order the batches hold them."""
        return [info for f in self.files for info in self.image_infos(f)]

    def load(self, path: Path) -> np.ndarray:
        """One image as a float32 array in the model's layout (no batch axis): the first crop."""
        return self.load_crops(path)[0]

    def load_crops(self, path: Path) -> list[np.ndarray]:
        """The ``crops x crops`` samples of one image (one sample when ``crops = 1``)."""
        return [self._to_input(p, path) for p in self._pixels(path)[0]]

    def image_infos(self, path: Path) -> list[ImageInfo]:
        """Where each sample of one image comes from (its crops, or its letterbox), read from the header."""
        return self._pixels(path, decode=False)[1]

    def _pixels(self, path: Path, decode: bool = True) -> tuple[list[np.ndarray], list[ImageInfo]]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if not decode:
                    return [], self._geometry(path, img.size)[1]
                img = img.convert("RGB")
                size, infos = self._geometry(path, img.size)
                if size != img.size:
                    img = img.resize(size, Image.Resampling.BILINEAR)
                if self.preprocess.fit == "letterbox":
                    ch, cw = self.crop
                    canvas = np.full((ch, cw, 3), np.float32(self.preprocess.pad_value), np.float32)
                    top, left = infos[0].offset_y, infos[0].offset_x
                    canvas[top : top + size[1], left : left + size[0]] = np.asarray(img, dtype=np.float32)
                    return [canvas], infos
                if not self.crop:
                    return [np.asarray(img, dtype=np.float32)], infos
                ch, cw = self.crop
                pixels = [
                    np.asarray(img.crop((-i.offset_x, -i.offset_y, -i.offset_x + cw, -i.offset_y + ch)), dtype=np.float32)
                    for i in infos
                ]
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise QuantlabError(
                f"cannot read image '{path}' ({type(exc).__name__}: {exc}): remove or replace the file"
            ) from None
        return pixels, infos

    def _geometry(self, path: Path, size: tuple[int, int]) -> tuple[tuple[int, int], list[ImageInfo]]:
        """The resized ``(width, height)`` of an image of ``size`` and each sample's :class:`ImageInfo`."""
        width, height = size
        fit = self.preprocess.fit
        if fit in ("stretch", "letterbox"):
            ch, cw = self.crop
            if fit == "stretch":
                return (cw, ch), [ImageInfo(path.name, height, width, ch / height, cw / width, 0, 0, ch, cw)]
            r = min(ch / height, cw / width)
            new_w, new_h = int(width * r), int(height * r)
            check(
                new_w >= 1 and new_h >= 1,
                f"image '{path.name}' is {height}x{width} (HxW): letterboxed into {ch}x{cw} it would be "
                f"{new_h}x{new_w} pixels: crop it to a less extreme aspect ratio or remove it",
            )
            top, left = ((ch - new_h) // 2, (cw - new_w) // 2) if self.preprocess.pad_position == "center" else (0, 0)
            return (new_w, new_h), [ImageInfo(path.name, height, width, r, r, top, left, ch, cw)]
        if self.resize:
            scale = self.resize / min(width, height)
            new = (max(1, round(width * scale)), max(1, round(height * scale)))
        else:
            new = (width, height)
        sy, sx = new[1] / height, new[0] / width
        if not self.crop:
            return new, [ImageInfo(path.name, height, width, sy, sx, 0, 0, new[1], new[0])]
        ch, cw = self.crop
        check(
            new[0] >= cw and new[1] >= ch,
            f"image '{path.name}' is {new[1]}x{new[0]} (HxW), smaller than the crop "
            f"{ch}x{cw}: set data.preprocess.resize so the shorter side is at least {min(ch, cw)}",
        )
        k = self.crops
        if k == 1:
            corners = [((new[1] - ch) // 2, (new[0] - cw) // 2)]
        else:
            tops = [round(i * (new[1] - ch) / (k - 1)) for i in range(k)]
            lefts = [round(j * (new[0] - cw) / (k - 1)) for j in range(k)]
            corners = [(top, left) for top in tops for left in lefts]
        return new, [ImageInfo(path.name, height, width, sy, sx, -top, -left, ch, cw) for top, left in corners]

    def _to_input(self, pixels: np.ndarray, path: Path) -> np.ndarray:
        """Normalise, reorder and lay out ``pixels`` (HxWx3 RGB float32), checked against the input."""
        p = self.preprocess
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
        pending: list[np.ndarray] = []
        for f in self.files:
            for a in self.load_crops(f):
                first_shape = first_shape or (a.shape, f.name)
                if a.shape != first_shape[0]:
                    raise QuantlabError(
                        f"images differ in size: '{first_shape[1]}' gives {_fmt(first_shape[0])} but '{f.name}' gives "
                        f"{_fmt(a.shape)}: set data.preprocess.resize and crop so every image has the same size"
                    )
                pending.append(a)
                if len(pending) == self.batch_size:
                    yield {self.spec.name: np.stack(pending)}
                    pending = []
        if pending:
            yield {self.spec.name: np.stack(pending)}


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


class TextFolder:
    """Batches of tokenized sentences: one sample per non-empty line of each ``.txt`` file.

    Each line is stripped and encoded by a HuggingFace ``tokenizers`` tokenizer (the
    ``tokenizer.json`` of the model), which adds the model's special tokens; the ids are truncated
    to ``max_length`` tokens (a longer line loses its end, it is not an error) and padded with the
    tokenizer's padding token.  The feed holds, for each model input named ``input_ids``,
    ``attention_mask`` (1 on tokens, 0 on padding) or ``token_type_ids`` (0 for single sentences),
    an array of shape ``(batch, max_length)`` in the input's integer dtype.  Example with a BERT
    tokenizer and ``max_length = 6``: ``"Hello world"`` becomes ids ``[101, 7592, 2088, 102, 0, 0]``
    and mask ``[1, 1, 1, 1, 0, 0]``.
    """

    def __init__(
        self, files: Sequence[Path], specs: Sequence[InputSpec], tokenizer: Path, max_length: int, batch_size: int
    ) -> None:
        self.files = list(files)
        self.specs = list(specs)
        self.max_length = max_length
        self.batch_size = batch_size
        check(max_length > 0, f"data.max_length must be positive, got {max_length}")
        for spec in self.specs:
            check(
                spec.name in TEXT_INPUTS,
                f"model input '{spec.name}' is not one that text data feeds ({', '.join(TEXT_INPUTS)}): "
                "use a folder of .npz files keyed by input name",
            )
            check(
                len(spec.shape) == 2 and np.issubdtype(spec.dtype, np.integer),
                f"model input '{spec.name}' is {spec.describe()} {spec.dtype}, not a 2-D integer (batch, tokens) "
                "input: text data feeds token ids only",
            )
            length = spec.shape[1]
            check(
                length is None or length == max_length,
                f"model input '{spec.name}' takes {length} tokens but data.max_length is {max_length}: "
                f"set data.max_length = {length}",
            )
        self.tokenizer = _load_tokenizer(tokenizer, max_length)
        self._lines: list[str] | None = None

    def lines(self) -> list[str]:
        """Every sample: the non-empty, stripped lines of the files, in file and line order."""
        if self._lines is None:
            lines: list[str] = []
            for path in self.files:
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    raise QuantlabError(f"text file '{path}' is not UTF-8: convert it to UTF-8") from None
                except OSError as exc:
                    raise QuantlabError(f"cannot read text file '{path}' ({exc}): remove or replace the file") from None
                found = [line.strip() for line in text.splitlines() if line.strip()]
                check(found, f"text file '{path}' holds no sentences: put one sample per line or remove the file")
                lines += found
            self._lines = lines
        return self._lines

    def num_samples(self) -> int:
        return len(self.lines())

    def __len__(self) -> int:
        return -(-self.num_samples() // self.batch_size)

    def encode(self, lines: Sequence[str]) -> Feed:
        """Token arrays ``{input name: (len(lines), max_length)}`` for some sentences."""
        encodings = self.tokenizer.encode_batch(list(lines))
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {
            spec.name: np.array([getattr(e, fields[spec.name]) for e in encodings], dtype=spec.dtype)
            for spec in self.specs
        }

    def __iter__(self) -> Iterator[Feed]:
        lines = self.lines()
        for start in range(0, len(lines), self.batch_size):
            yield self.encode(lines[start : start + self.batch_size])


def _load_tokenizer(path: Path, max_length: int):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or a folder holding it), padding and
    truncating to ``max_length``."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise QuantlabError("text data needs the tokenizers package: pip install tokenizers") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    check(
        file.is_file(),
        f"tokenizer '{file}' does not exist: set data.tokenizer to a tokenizer.json file or a folder holding one",
    )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust core raises a plain Exception for malformed files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantlabError(
            f"'{file}' is not a HuggingFace tokenizers file ({first}): point data.tokenizer at the model's tokenizer.json"
        ) from None
    padding = tokenizer.padding
    if padding:
        pad_id, pad_token = padding["pad_id"], padding["pad_token"]
    else:
        pad_token = next((t for t in ("[PAD]", "<pad>", "<|pad|>") if tokenizer.token_to_id(t) is not None), None)
        check(
            pad_token is not None,
            f"tokenizer '{file}' has no padding token ([PAD] or <pad>): use the model's own tokenizer.json",
        )
        pad_id = tokenizer.token_to_id(pad_token)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


class Limited:
    """The first ``max_samples`` samples of a reader, batches trimmed to fit; 0 means all.

    With ``drop_last`` a final batch smaller than ``batch_size`` is dropped (models whose batch axis
    is static cannot take it).
    """

    def __init__(
        self, reader: ImageFolder | ArrayFolder | TextFolder, max_samples: int, batch_size: int, drop_last: bool
    ) -> None:
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
                break
            seen += n
            yield feed
        if self.drop_last and seen == 0:
            limit = f" (data.max_samples = {self.max_samples})" if self.max_samples else ""
            raise QuantlabError(
                f"the model has a fixed batch dimension of {self.batch_size}, so it takes exactly {self.batch_size} "
                f"samples per batch, but the data gives fewer{limit}: add samples"
                + (" or raise data.max_samples" if limit else "")
            )


def sample_infos(reader: Limited) -> list[ImageInfo] | None:
    """The :class:`ImageInfo` of each sample a reader yields (``None`` unless it reads images)."""
    if not isinstance(reader.reader, ImageFolder):
        return None
    infos = reader.reader.infos()
    return infos[: reader.max_samples] if reader.max_samples else infos


def resolve_tokenizer(spec: str | Path, resolve: Callable[[str], Path] | None = None) -> Path:
    """The tokenizer path named by ``data.tokenizer``: through ``resolve`` (usually
    :meth:`Config.resolve`, which also reads relative paths against the config file's folder) when
    given; otherwise ``pkg:NAME/sub/path`` is found in the installed package and any other path is
    taken as it is."""
    text = str(spec)
    if resolve is not None:
        return Path(resolve(text))
    return package_path(text[4:]) if text.startswith("pkg:") else Path(text).expanduser()


def make_reader(
    config: DataConfig,
    folder: str | Path,
    inputs: Sequence[InputSpec],
    *,
    glob: str = "*",
    crops: int = 1,
    resize: int | None = None,
    resolve: Callable[[str], Path] | None = None,
) -> Limited:
    """The reader a data folder calls for, batched as the model allows.

    ``glob`` picks files by name; ``crops`` and ``resize`` ask images for a crops x crops grid per
    image after scaling the shorter side to ``resize`` (see :class:`ImageFolder`); ``resolve``
    turns ``config.tokenizer`` into a path for text data (see :func:`resolve_tokenizer`).
    """
    kind, files = list_data_files(folder, config.kind, glob)
    fixed = next((s.shape[0] for s in inputs if s.shape and s.shape[0] is not None), None)
    batch = fixed or config.batch_size
    check(crops == 1 or kind == "images", f"a grid of {crops}x{crops} crops needs image data, but '{folder}' holds {kind}")
    reader: ImageFolder | ArrayFolder | TextFolder
    if kind == "images":
        check(
            len(inputs) == 1,
            f"image data feeds one input but the model has {len(inputs)} ({', '.join(s.name for s in inputs)}): "
            "use .npz files keyed by input name",
        )
        reader = ImageFolder(files, inputs[0], config.preprocess, batch, crops=crops, resize=resize)
    elif kind == "text":
        check(
            config.tokenizer is not None,
            "text data needs a tokenizer: set data.tokenizer to the model's tokenizer.json (or a folder holding it)",
        )
        tokenizer = resolve_tokenizer(config.tokenizer, resolve)
        reader = TextFolder(files, inputs, tokenizer, config.max_length, batch)
    else:
        reader = ArrayFolder(files, inputs, batch)
    return Limited(reader, config.max_samples, batch, drop_last=fixed is not None and fixed > 1)
