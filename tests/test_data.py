"""Data readers on real images and arrays, and every bad data input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from quantlab.config import DataConfig, Preprocess
from quantlab.data import InputSpec, make_reader
from quantlab.errors import QuantlabError

from conftest import ROOT

IMG = InputSpec("input", (None, 3, 224, 224), np.dtype("float32"))
LITE = Preprocess(resize=256, crop=(224, 224), mean=(127.0,) * 3, std=(128.0,) * 3)


def test_real_images_are_batched_and_normalised():
    reader = make_reader(DataConfig(batch_size=8, preprocess=LITE), ROOT / "calib_data", [IMG])
    batches = list(reader)
    assert [b["input"].shape[0] for b in batches] == [8, 8, 3] and len(reader) == 3
    x = batches[0]["input"]
    assert x.dtype == np.float32 and x.shape[1:] == (3, 224, 224)
    assert -127 / 128 - 1e-6 <= x.min() and x.max() <= 1.0  # (p - 127) / 128 for p in [0, 255]
    again = list(make_reader(DataConfig(batch_size=8, preprocess=LITE), ROOT / "calib_data", [IMG]))
    np.testing.assert_array_equal(again[2]["input"], batches[2]["input"])


def test_preprocessing_arithmetic_and_layouts(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 10
    Image.fromarray(pixels).save(folder / "a.png")
    pre = Preprocess(resize=0, crop=None, mean=(127.0,) * 3, std=(128.0,) * 3, channel_order="BGR", layout="NHWC")
    x = next(iter(make_reader(DataConfig(preprocess=pre), folder, [InputSpec("x", (None, 4, 6, 3), np.dtype("float32"))])))["x"]
    assert x.shape == (1, 4, 6, 3)
    np.testing.assert_allclose(x[0, 0, 0], [(10 - 127) / 128, -127 / 128, 1.0])  # B, G, R


def test_max_samples_trims_the_last_batch():
    reader = make_reader(DataConfig(batch_size=4, max_samples=6, preprocess=LITE), ROOT / "calib_data", [IMG])
    assert [b["input"].shape[0] for b in reader] == [4, 2]


def test_arrays_for_several_inputs(tmp_path):
    specs = [InputSpec("ids", (None, 5), np.dtype("int64")), InputSpec("mask", (None, 5), np.dtype("int64"))]
    np.savez(tmp_path / "a.npz", ids=np.arange(15).reshape(3, 5), mask=np.ones((3, 5), np.int64))
    np.savez(tmp_path / "b.npz", ids=np.arange(5), mask=np.ones(5, np.int64))  # one sample, no batch axis
    batches = list(make_reader(DataConfig(batch_size=3), tmp_path, specs))
    assert [b["ids"].shape for b in batches] == [(3, 5), (1, 5)]
    assert batches[1]["ids"].tolist() == [[0, 1, 2, 3, 4]]


def _err(folder, specs=(IMG,), config=DataConfig(preprocess=LITE)) -> str:
    with pytest.raises(QuantlabError) as info:
        list(make_reader(config, folder, list(specs)))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_folders(tmp_path):
    assert "does not exist" in _err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "holds no" in _err(tmp_path / "empty")
    (tmp_path / "file.jpg").write_bytes(b"")
    assert "is not a folder" in _err(tmp_path / "file.jpg")


def test_unreadable_image_names_the_file(tmp_path):
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    msg = _err(tmp_path)
    assert "cannot read image" in msg and "broken.jpg" in msg


def test_mixed_size_images_without_resizing(tmp_path):
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((200, 224, 3), np.uint8)).save(tmp_path / "b.png")
    msg = _err(tmp_path, config=DataConfig(preprocess=Preprocess(resize=0)))
    assert "'b.png' is 200x224" in msg and "set data.preprocess.resize" in msg


def test_images_smaller_than_the_crop(tmp_path):
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "small.png")
    assert "smaller than the crop" in _err(tmp_path, config=DataConfig(preprocess=Preprocess(resize=0, crop=(224, 224))))


def test_arrays_that_do_not_match_the_model(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 100, 100), np.float32))
    assert "expects Nx3x224x224" in _err(tmp_path)


def test_npz_keyed_by_the_wrong_names(tmp_path):
    np.savez(tmp_path / "a.npz", image=np.zeros((3, 224, 224), np.float32))
    assert "key the arrays by input name" in _err(tmp_path)


def test_mixing_images_and_arrays(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.zeros(3))
    assert "mixes images and arrays" in _err(tmp_path)


def test_images_for_a_model_with_two_inputs():
    specs = [IMG, InputSpec("extra", (None, 3), np.dtype("float32"))]
    assert "feeds one input" in _err(ROOT / "calib_data", specs)
