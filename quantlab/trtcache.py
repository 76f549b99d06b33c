"""The legacy TensorRT INT8 calibration cache: a small text file of per-tensor scales.

TensorRT's implicit-INT8 calibrators (``IInt8EntropyCalibrator2`` and friends, deprecated in
TensorRT 10.1 and removed in 11.0) save their result in this format, and still read it back in
TensorRT <= 10, on DLA, and through ONNX Runtime's TensorRT execution provider.  quantlab writes
it as a legacy export next to the explicit Q/DQ ONNX model.

Format
------
The first line names the TensorRT version and the calibration algorithm::

    TRT-<version>-<algorithm>

``<algorithm>`` is one of ``EntropyCalibration2``, ``EntropyCalibration``, ``MinMaxCalibration``
or ``LegacyCalibration``.  ``<version>`` is TensorRT's ``NV_TENSORRT_VERSION`` integer: since
TensorRT 10 it is ``major * 10000 + minor * 100 + patch`` (10.3.0 -> ``100300``); before that it was
``major * 1000 + minor * 100 + patch`` (8.6.1 -> ``8601``).  TensorRT compares the header with the
calibrator it is building with and recalibrates when they disagree, so match it to the target
(:func:`encode_tensorrt_version` turns ``"10.3.0"`` into ``100300``).

Every further line holds one tensor::

    <tensor name>: <8 hex digits>

The hex digits are the big-endian IEEE-754 float32 bit pattern of the symmetric INT8 scale
``scale = amax / 127``, where ``amax`` is the calibrated clipping threshold of the tensor.

Worked example: ``x: 4000890a`` reads as the bits ``0x4000890a``: sign 0, exponent ``0x80``
(``2 ** 1``), mantissa ``0x00890a / 2 ** 23 = 0.0041821``, so ``scale = 2 * 1.0041821 = 2.0083642``
and ``amax = 127 * scale = 255.062``, the range of an input of 0..255 pixel values.

quantlab writes the tensor lines sorted by name, so the same ranges give byte-identical files
however the mapping was built, and it never writes a scale of 0 (TensorRT would divide by it):
``amax <= 0`` or non-finite is refused, and callers floor zero ranges before.
"""

from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TRT_VERSION",
    "CalibrationCache",
    "encode_tensorrt_version",
    "format_calibration_cache",
    "parse_calibration_cache",
    "read_calibration_cache",
    "write_calibration_cache",
]

#: Algorithm names TensorRT writes after the version in the header line.
ALGORITHMS: tuple[str, ...] = (
    "EntropyCalibration2",
    "EntropyCalibration",
    "MinMaxCalibration",
    "LegacyCalibration",
)

#: TensorRT 10.3.0 (``10 * 10000 + 3 * 100 + 0``): the last TensorRT line that still builds implicit
#: INT8 from a cache on every platform, shipped by JetPack 6.1/6.2, whose DLA cores are the main
#: remaining users of calibration caches.  Pass ``trt_version`` to match another release.
DEFAULT_TRT_VERSION: int = 100300

#: Symmetric signed INT8 uses the levels -127..127: ``scale = amax / 127``.
INT8_MAX_LEVEL = 127

_HEADER = re.compile(r"TRT-(?P<version>[0-9]+)-(?P<algorithm>[A-Za-z0-9]+)")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
_VERSION = re.compile(r"(?P<major>[0-9]+)\.(?P<minor>[0-9]+)(?:\.(?P<patch>[0-9]+))?(?:\.[0-9]+)*")


@dataclass(frozen=True)
class CalibrationCache:
    """The content of a calibration cache: header fields and one float32 scale per tensor.

    ``scales`` keeps the file's line order.  ``amaxes`` gives the clipping thresholds back,
    ``amax = 127 * scale``; since a float32 times 127 is exact in float64, formatting ``amaxes``
    again reproduces the same scale bits.

    >>> cache = parse_calibration_cache("TRT-100300-EntropyCalibration2\\nx: 4000890a\\n")
    >>> cache.trt_version, cache.algorithm, round(cache.scales["x"], 6)
    (100300, 'EntropyCalibration2', 2.008364)
    >>> round(cache.amaxes["x"], 3)
    255.062
    """

    trt_version: int
    algorithm: str
    scales: dict[str, float]

    @property
    def header(self) -> str:
        """The first line of the file, e.g. ``TRT-100300-EntropyCalibration2``."""
        return f"TRT-{self.trt_version}-{self.algorithm}"

    @property
    def amaxes(self) -> dict[str, float]:
        """Clipping threshold per tensor: ``amax = scale * 127``."""
        return {name: scale * INT8_MAX_LEVEL for name, scale in self.scales.items()}


def encode_tensorrt_version(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` integer for a version string, as the header writes it.

    TensorRT 10 and later: ``major * 10000 + minor * 100 + patch``; earlier releases:
    ``major * 1000 + minor * 100 + patch``.  A fourth (build) component is ignored, so
    ``tensorrt.__version__`` can be passed as it is.

    >>> encode_tensorrt_version("10.3.0"), encode_tensorrt_version("8.6.1.6")
    (100300, 8601)
    """
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        raise QuantlabError(
            f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]; "
            "pass e.g. '10.3.0' or tensorrt.__version__"
        )
    major, minor = int(match["major"]), int(match["minor"])
    patch = int(match["patch"] or 0)
    if major >= 10:
        if minor > 99 or patch > 99:
            raise QuantlabError(f"TensorRT version {version!r}: minor and patch must be 0..99")
        return major * 10000 + minor * 100 + patch
    if minor > 9 or patch > 99:
        raise QuantlabError(
            f"TensorRT version {version!r}: before TensorRT 10 minor must be 0..9 and patch 0..99"
        )
    return major * 1000 + minor * 100 + patch


def _scale_bits(name: str, amax: float) -> str:
    """The 8 lowercase hex digits of float32(``amax / 127``); refuses a scale that is not > 0."""
    try:
        value = float(amax)
    except (TypeError, ValueError):
        raise QuantlabError(
            f"amax for tensor {name!r} is {amax!r}, not a number; pass a positive float"
        ) from None
    if not math.isfinite(value) or value <= 0.0:
        raise QuantlabError(
            f"amax for tensor {name!r} is {value!r}; a calibration cache needs a finite amax > 0 "
            "(scale = amax / 127 must not be 0): floor zero ranges to a small positive value first"
        )
    try:
        packed = struct.pack(">f", value / INT8_MAX_LEVEL)
    except OverflowError:
        raise QuantlabError(
            f"amax for tensor {name!r} is {value!r}; scale = amax / 127 overflows float32, "
            "clip the range below 4.3e40"
        ) from None
    scale = struct.unpack(">f", packed)[0]
    if scale <= 0.0 or not math.isfinite(scale):
        raise QuantlabError(
            f"amax for tensor {name!r} is {value!r}; scale = amax / 127 is not a positive float32 "
            "(it rounds to 0 or infinity): floor or clip the range first"
        )
    return packed.hex()


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
        raise QuantlabError(
            f"tensor name {name!r} cannot be written to a calibration cache; "
            "use a non-empty string without line breaks"
        )
    return name


def format_calibration_cache(
    amaxes: Mapping[str, float],
    *,
    algorithm: str = "EntropyCalibration2",
    trt_version: int = DEFAULT_TRT_VERSION,
) -> str:
    """The text of a calibration cache holding ``scale = amax / 127`` for every tensor.

    Tensor lines are sorted by name (so the output depends only on the content of ``amaxes``)
    and the text ends with a newline.  Each scale is ``amax / 127`` computed in float64 and
    rounded to the nearest float32, written as 8 lowercase hex digits of its big-endian bits.

    >>> print(format_calibration_cache({"x": 255.0622534751892, "a": 127.0}), end="")
    TRT-100300-EntropyCalibration2
    a: 3f800000
    x: 4000890a

    Raises :class:`QuantlabError` for an ``amax`` that is not finite and > 0, an unknown
    ``algorithm`` or a ``trt_version`` that is not a positive integer.
    """
    if algorithm not in ALGORITHMS:
        raise QuantlabError(
            f"calibration algorithm {algorithm!r} is not one TensorRT writes; "
            f"use one of {', '.join(ALGORITHMS)}"
        )
    if isinstance(trt_version, bool) or not isinstance(trt_version, int) or trt_version <= 0:
        raise QuantlabError(
            f"trt_version {trt_version!r} is not a positive integer; pass TensorRT's "
            "NV_TENSORRT_VERSION, e.g. 100300 for 10.3.0 (see encode_tensorrt_version)"
        )
    lines = [f"TRT-{trt_version}-{algorithm}"]
    for name in sorted(_check_name(name) for name in amaxes):
        lines.append(f"{name}: {_scale_bits(name, amaxes[name])}")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    directory = path.parent
    if not directory.is_dir():
        raise QuantlabError(
            f"cannot write {path}: folder {directory} does not exist; create it first"
        )
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def write_calibration_cache(
    path: str | os.PathLike[str],
    amaxes: Mapping[str, float],
    *,
    algorithm: str = "EntropyCalibration2",
    trt_version: int = DEFAULT_TRT_VERSION,
) -> Path:
    """Write :func:`format_calibration_cache` output to ``path`` atomically; return the path.

    The text goes to a temporary file in the same folder, which is then renamed over ``path``
    (``os.replace``), so an interrupted run leaves either the old file or the new one, never a
    partial cache.  The text is UTF-8 with ``\\n`` line ends on every platform.
    """
    target = Path(path)
    text = format_calibration_cache(amaxes, algorithm=algorithm, trt_version=trt_version)
    _write_atomic(target, text.encode("utf-8"))
    return target


def _parse_header(line: str, source: str) -> tuple[int, str]:
    match = _HEADER.fullmatch(line.strip())
    if match is None:
        raise QuantlabError(
            f"{source} line 1: expected a header 'TRT-<version>-<algorithm>' such as "
            f"'TRT-{DEFAULT_TRT_VERSION}-EntropyCalibration2', got {line[:80]!r}; "
            "is this a TensorRT calibration cache?"
        )
    if match["algorithm"] not in ALGORITHMS:
        raise QuantlabError(
            f"{source} line 1: unknown calibration algorithm {match['algorithm']!r}; "
            f"expected one of {', '.join(ALGORITHMS)}"
        )
    return int(match["version"]), match["algorithm"]


def parse_calibration_cache(text: str, *, source: str = "calibration cache") -> CalibrationCache:
    """Read the text of a calibration cache; ``source`` names it in error messages.

    Blank lines are skipped, ``\\r\\n`` line ends are accepted, a tensor name may itself contain
    ``:`` (the value follows the last one) and hex digits may be of either case.  Scales must be
    finite and >= 0.

    Raises :class:`QuantlabError` naming the line for a bad header, a line without ``:``, hex
    digits that are not 1 to 8 hex characters, a negative or non-finite scale, or a tensor that
    appears twice.
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise QuantlabError(
            f"{source} line 1: empty, expected a header 'TRT-<version>-<algorithm>'; "
            "is this a TensorRT calibration cache?"
        )
    version, algorithm = _parse_header(lines[0].lstrip("\ufeff"), source)
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, colon, digits = line.rpartition(":")
        if not colon or not name:
            raise QuantlabError(
                f"{source} line {number}: expected '<tensor name>: <8 hex digits>', "
                f"got {line[:80]!r}"
            )
        digits = digits.strip()
        if _HEX.fullmatch(digits) is None:
            raise QuantlabError(
                f"{source} line {number}: {digits[:20]!r} for tensor {name!r} is not a float32 "
                "bit pattern of 1 to 8 hex digits (e.g. 4000890a)"
            )
        scale = struct.unpack(">f", int(digits, 16).to_bytes(4, "big"))[0]
        if not math.isfinite(scale) or scale < 0.0:
            raise QuantlabError(
                f"{source} line {number}: scale {scale!r} of tensor {name!r} is not finite and "
                ">= 0; recalibrate this tensor"
            )
        if name in scales:
            raise QuantlabError(
                f"{source} line {number}: tensor {name!r} appears a second time; keep one line "
                "per tensor"
            )
        scales[name] = scale
    return CalibrationCache(trt_version=version, algorithm=algorithm, scales=scales)


def read_calibration_cache(path: str | os.PathLike[str]) -> CalibrationCache:
    """Read and parse the calibration cache at ``path`` (UTF-8 text)."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        raise QuantlabError(f"calibration cache {target} does not exist; check the path") from None
    except IsADirectoryError:
        raise QuantlabError(
            f"calibration cache {target} is a folder; pass the cache file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QuantlabError(
            f"calibration cache {target} is not UTF-8 text (byte {exc.start}); "
            "pass a text cache, not a serialized engine"
        ) from None
    return parse_calibration_cache(text, source=str(target))
