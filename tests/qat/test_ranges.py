"""Learned quantization ranges (LSQ): the gradient, and QAT of a converted tiny model with them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantlab.config import load_config, override
from quantlab.errors import QuantlabError
from quantlab.qdq.lint import lint_tensorrt

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")

from quantlab.qat import run_qat  # noqa: E402
from quantlab.qat.ranges import LearnedQuantizer  # noqa: E402


def test_lsq_value_and_gradient_match_the_formula():
    """q = s clip(round(x/s)); dq/ds = round(x/s) - x/s inside, qmax/qmin outside, scaled by g."""
    q = LearnedQuantizer(2.54)  # s = 0.02
    x = torch.tensor([[0.4567, 3.0, -3.0, 0.01]], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([[0.46, 2.54, -2.56, 0.0]]), atol=1e-6)
    y.sum().backward()
    g = 1 / np.sqrt(4 * 127)
    s = 0.02
    expected = g * s * ((23 - 22.835) + 127 - 128 + (0 - 0.5))  # dL/dlog s = s dL/ds
    assert q.log_step.grad.item() == pytest.approx(expected, rel=1e-4)
    assert x.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]  # straight through inside, zero outside
    q.disable()
    assert q(x) is x


def _feed(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _qdq_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Activation tensor (QuantizeLinear's input) or INT8 weight (DequantizeLinear's) -> its scale."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in model.graph.node
            if n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] in inits)}


@pytest.mark.parametrize("mode", ["activations", "all"])
def test_learned_ranges_move_and_the_export_carries_them(tiny_run, tmp_path, mode):
    run, config_path = tiny_run
    config = override(load_config(config_path), "qat", epochs=2, lr=1e-3, optimizer="adam", calib_batches=1,
                      learn_ranges=mode, range_lr=0.05)
    fp32, placement = run / "model_fp32.onnx", run / "int8" / "minmax.tensorrt.onnx"
    start = _qdq_scales(onnx.load(str(placement)))
    amax = {t: float(v) * 127 for t, v in start.items() if t in {"input", "r1", "flat"}}
    train = [_feed(4, seed) for seed in range(3)]
    a = run_qat(config, amax=amax, out=tmp_path / "a.onnx", train=train, model=fp32, placement=placement)
    b = run_qat(config, amax=amax, out=tmp_path / "b.onnx", train=train, model=fp32, placement=placement)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()  # deterministic
    assert a.tensorrt_rules == "pass" and lint_tensorrt(str(a.path)) and a.mapped == a.quantizers == 3
    learned = 3 + (3 if mode == "all" else 0)
    assert a.ranges["mode"] == mode and a.ranges["learned"] == learned
    assert a.ranges["min_ratio"] < 0.99 or a.ranges["max_ratio"] > 1.01  # the steps moved
    end = _qdq_scales(onnx.load(str(a.path)))
    for tensor in ("input", "r1", "flat"):  # the export carries the learned activation steps
        assert end[tensor].shape == () and not np.isclose(end[tensor], start[tensor], rtol=1e-3), tensor
    weights = [t for t in end if t not in ("input", "r1", "flat")]
    moved = [not np.allclose(end[w], start[w], rtol=1e-4) for w in weights]
    assert any(moved) == (mode == "all")


def test_learned_ranges_need_the_onnx_source(tmp_path, tiny_run):
    _, config_path = tiny_run
    config = override(load_config(config_path), "model", pytorch="quantlab.zoo:efficientnet_lite0")
    config = override(config, "qat", source="pytorch", learn_ranges="activations")
    with pytest.raises(QuantlabError, match="learn_ranges = 'activations' needs the onnx source"):
        run_qat(config, amax={}, out=tmp_path / "m.onnx", train=[_feed()])
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("setting, source, mode", [
    ("auto", "onnx", "activations"), ("auto", "pytorch", "off"), ("all", "onnx", "all"), ("off", "onnx", "off"),
])
def test_auto_learns_activation_ranges_only_where_the_source_can(setting, source, mode):
    from quantlab.config import QatConfig
    from quantlab.qat.train import range_mode

    assert range_mode(QatConfig(learn_ranges=setting), source) == mode
