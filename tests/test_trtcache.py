"""The legacy TensorRT calibration cache: worked example, bit-exact round trips, malformed files."""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from quantlab.errors import QuantlabError
from quantlab.trtcache import (
    ALGORITHMS,
    DEFAULT_TRT_VERSION,
    CalibrationCache,
    encode_tensorrt_version,
    format_calibration_cache,
    parse_calibration_cache,
    read_calibration_cache,
    write_calibration_cache,
)

#: The classic example: a 0..255 input whose entropy-calibrated scale is 0x4000890a.
EXAMPLE_AMAX = struct.unpack(">f", bytes.fromhex("4000890a"))[0] * 127


def _oracle_hex(amax: float) -> str:
    """Reference: round amax / 127 to float32 with NumPy and print its big-endian bits."""
    return np.array([amax / 127], dtype=">f4").tobytes().hex()


def test_worked_example_formats_to_known_bits() -> None:
    text = format_calibration_cache({"x": EXAMPLE_AMAX})
    assert text == f"TRT-{DEFAULT_TRT_VERSION}-EntropyCalibration2\nx: 4000890a\n"


def test_worked_example_parses_to_scale_and_amax() -> None:
    cache = parse_calibration_cache("TRT-8510-EntropyCalibration2\nx: 4000890a\n")
    assert cache == CalibrationCache(8510, "EntropyCalibration2", {"x": cache.scales["x"]})
    assert cache.scales["x"] == pytest.approx(2.0083642, abs=1e-7)
    assert cache.amaxes["x"] == pytest.approx(255.0622, abs=1e-4)
    assert cache.header == "TRT-8510-EntropyCalibration2"


def test_default_version_is_tensorrt_10_3_0() -> None:
    assert DEFAULT_TRT_VERSION == encode_tensorrt_version("10.3.0") == 100300


def test_random_amaxes_round_trip_bit_exact() -> None:
    rng = np.random.default_rng(1234)
    amaxes = {f"t{i}/out": float(a) for i, a in enumerate(rng.lognormal(0.0, 6.0, size=500))}
    text = format_calibration_cache(amaxes)
    lines = text.splitlines()
    assert len(lines) == 1 + len(amaxes)
    assert all(re.fullmatch(r".+: [0-9a-f]{8}", line) for line in lines[1:])
    cache = parse_calibration_cache(text)
    for name, amax in amaxes.items():
        assert struct.pack(">f", cache.scales[name]).hex() == _oracle_hex(amax)
        assert cache.scales[name] == float(np.float32(amax / 127))
    # amaxes read back format to the very same bytes
    assert format_calibration_cache(cache.amaxes) == text


def test_output_is_sorted_and_independent_of_insertion_order() -> None:
    forward = {"b": 1.0, "a": 2.0, "c": 3.0}
    backward = dict(reversed(list(forward.items())))
    text = format_calibration_cache(forward)
    assert text == format_calibration_cache(backward)
    assert [line.split(":")[0] for line in text.splitlines()[1:]] == ["a", "b", "c"]
    assert format_calibration_cache(forward).encode() == text.encode()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_header_carries_algorithm_and_version(algorithm: str) -> None:
    text = format_calibration_cache({"x": 1.0}, algorithm=algorithm, trt_version=8601)
    assert text.splitlines()[0] == f"TRT-8601-{algorithm}"
    cache = parse_calibration_cache(text)
    assert (cache.trt_version, cache.algorithm) == (8601, algorithm)


def test_tensor_names_with_colons_round_trip() -> None:
    amaxes = {"input:0": 1.5, "(Unnamed Layer* 4) [Fully Connected]_output": 3.0}
    cache = parse_calibration_cache(format_calibration_cache(amaxes))
    assert cache.amaxes == pytest.approx(amaxes)


def test_empty_mapping_gives_header_only() -> None:
    text = format_calibration_cache({})
    assert text == f"TRT-{DEFAULT_TRT_VERSION}-EntropyCalibration2\n"
    assert parse_calibration_cache(text).scales == {}


@pytest.mark.parametrize("amax", [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 1e41, "big"])
def test_rejects_amax_that_would_not_give_a_positive_scale(amax: object) -> None:
    with pytest.raises(QuantlabError, match="'conv1/out'"):
        format_calibration_cache({"ok": 1.0, "conv1/out": amax})  # type: ignore[dict-item]


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb", 3])
def test_rejects_unwritable_names(name: object) -> None:
    with pytest.raises(QuantlabError, match="tensor name"):
        format_calibration_cache({name: 1.0})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "Entropy"}, "calibration algorithm"),
        ({"trt_version": 0}, "trt_version"),
        ({"trt_version": True}, "trt_version"),
        ({"trt_version": "10.3.0"}, "trt_version"),
    ],
)
def test_rejects_bad_header_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(QuantlabError, match=match):
        format_calibration_cache({"x": 1.0}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("", 1),
        ("\nx: 4000890a\n", 1),
        ("x: 4000890a\n", 1),
        ("TRT-8XXX-EntropyCalibration2\nx: 4000890a\n", 1),
        ("TRT-100300-KLCalibration\nx: 4000890a\n", 1),
        ("TRT-100300-EntropyCalibration2\nx: 4000890a\ny 3f800000\n", 3),
        ("TRT-100300-EntropyCalibration2\nx: 40g0890a\n", 2),
        ("TRT-100300-EntropyCalibration2\nx: 4000890a0\n", 2),
        ("TRT-100300-EntropyCalibration2\nx:\n", 2),
        ("TRT-100300-EntropyCalibration2\n: 3f800000\n", 2),
        ("TRT-100300-EntropyCalibration2\nx: 7fc00000\n", 2),
        ("TRT-100300-EntropyCalibration2\nx: bf800000\n", 2),
        ("TRT-100300-EntropyCalibration2\nx: 3f800000\n\nx: 40000000\n", 4),
    ],
)
def test_malformed_caches_name_the_line(text: str, line: int) -> None:
    with pytest.raises(QuantlabError, match=f"line {line}:"):
        parse_calibration_cache(text)


def test_parser_is_lenient_about_layout() -> None:
    text = "TRT-8601-MinMaxCalibration\r\nx: 4000890A\r\n\r\ny:3F800000\r\nz: 0\n"
    cache = parse_calibration_cache(text)
    assert list(cache.scales) == ["x", "y", "z"]
    assert cache.scales["y"] == 1.0 and cache.scales["z"] == 0.0
    assert struct.pack(">f", cache.scales["x"]).hex() == "4000890a"


@pytest.mark.parametrize(
    ("version", "number"),
    [("10.3.0", 100300), ("10.13.2.6", 101302), ("8.6.1", 8601), ("7.2", 7200)],
)
def test_encode_tensorrt_version(version: str, number: int) -> None:
    assert encode_tensorrt_version(version) == number


@pytest.mark.parametrize("version", ["ten", "10", "8.10.0", "10.100.0"])
def test_encode_tensorrt_version_rejects_bad_strings(version: str) -> None:
    with pytest.raises(QuantlabError, match="TensorRT version"):
        encode_tensorrt_version(version)


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    amaxes = {"x": EXAMPLE_AMAX, "conv1/out": 4.0}
    path = write_calibration_cache(tmp_path / "model.cache", amaxes, algorithm="MinMaxCalibration")
    assert path == tmp_path / "model.cache"
    assert path.read_bytes() == format_calibration_cache(
        amaxes, algorithm="MinMaxCalibration"
    ).encode()
    assert os.listdir(tmp_path) == ["model.cache"]
    cache = read_calibration_cache(path)
    assert cache.algorithm == "MinMaxCalibration"
    assert cache.amaxes == pytest.approx(amaxes)


def test_write_is_byte_identical_for_the_same_input(tmp_path: Path) -> None:
    amaxes = {f"t{i}": 0.5 + i for i in range(20)}
    first = write_calibration_cache(tmp_path / "a.cache", amaxes).read_bytes()
    second = write_calibration_cache(tmp_path / "b.cache", dict(reversed(amaxes.items())))
    assert second.read_bytes() == first


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_calibration_cache(tmp_path / "model.cache", {"x": 1.0})
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_calibration_cache(path, {"x": 2.0})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.cache"]


def test_invalid_amax_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(QuantlabError):
        write_calibration_cache(tmp_path / "model.cache", {"x": 0.0})
    assert os.listdir(tmp_path) == []


def test_write_into_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(QuantlabError, match="does not exist"):
        write_calibration_cache(tmp_path / "missing" / "model.cache", {"x": 1.0})


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(QuantlabError, match="does not exist"):
        read_calibration_cache(tmp_path / "none.cache")
    binary = tmp_path / "engine.cache"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(QuantlabError, match="not UTF-8"):
        read_calibration_cache(binary)
    broken = tmp_path / "broken.cache"
    broken.write_text("TRT-100300-EntropyCalibration2\nx 4000890a\n", encoding="utf-8")
    with pytest.raises(QuantlabError, match=r"broken\.cache line 2:"):
        read_calibration_cache(broken)
