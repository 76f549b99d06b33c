"""The statistics pass (quantlab.collect): pipelined inference and compiled histograms give, byte for
byte, the statistics the NumPy reference computes from every activation at once."""

from __future__ import annotations

import numpy as np

from conftest import conv_net, save_model
from quantlab.collect import _augmented, collect_stats, ort_session
from quantlab.model import prepare_model
from quantlab.stats import StatsSet, TensorStats


def _batches(sizes: list[int], seed: int = 5) -> list[dict[str, np.ndarray]]:
    """Batches whose magnitudes grow, so histogram ranges double between batches."""
    g = np.random.default_rng(seed)
    return [{"input": (g.standard_normal((n, 3, 8, 8)) * 2.0**i).astype(np.float32)} for i, n in enumerate(sizes)]


def test_statistics_file_equals_the_numpy_reference_byte_for_byte(tmp_path) -> None:
    prepared = prepare_model(save_model(conv_net(), tmp_path / "net.onnx"))
    batches = _batches([3, 5, 2, 6])
    fast = collect_stats(prepared, batches)

    # the reference: every calibrated tensor of every sample in one run, binned by TensorStats.from_array
    session = ort_session(_augmented(prepared))
    names = [o.name for o in session.get_outputs() if o.name in set(prepared.tensors)]
    feed = {"input": np.concatenate([b["input"] for b in batches])}
    values = dict(zip(names, session.run(names, feed)))
    values["input"] = feed["input"]
    tensors = {n: TensorStats.from_array(n, values[n]) for n in prepared.tensors if n in values}
    folded = {k: v for k, v in prepared.folded.items() if v in tensors}
    reference = StatsSet(tensors, folded, prepared.sha256, 16)

    assert list(fast.tensors) == list(reference.tensors) and len(fast.tensors) >= 4
    fast.save(tmp_path / "fast.npz")
    reference.save(tmp_path / "reference.npz")
    assert (tmp_path / "fast.npz").read_bytes() == (tmp_path / "reference.npz").read_bytes()
    # and the batching does not matter: one batch of all samples gives the same file
    collect_stats(prepared, [feed]).save(tmp_path / "one.npz")
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "fast.npz").read_bytes()
