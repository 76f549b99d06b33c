"""Graph transforms of the prepared FP32 model that make it quantize better.

Each transform is a function ``(model, calibration feeds, [transforms] config, nodes kept in float)
-> (model, TransformResult)`` on an ``onnx.ModelProto``, so it works on any ONNX model, whatever
framework it came from, and composes with every calibrator and target:

=====================  ===================================================================  =========
``equalize``           cross-layer equalization (Nagel et al. 2019): rescale channels of     exact
                       layer pairs joined by ReLU / ReLU6 (where exact) / nothing
``smoothquant``        SmoothQuant (Xiao et al. 2023): move activation outliers into the     exact
                       MatMul/Gemm weights, ``a`` searched per layer
``adaround``           AdaRound (Nagel et al. 2020): learn each weight's rounding on         rounds
                       calibration activations; weights become INT8-representable            weights
``bias-correction``    empirical bias correction (Nagel et al. 2019): fold the mean output   moves
                       shift INT8 weights cause into the bias                                biases
=====================  ===================================================================  =========

They run in that order whatever order they are named in (equalization and smoothing change the
weights that rounding and bias correction then work on).  "exact": the transformed model computes
the original function up to float rounding; the other two change the FP32 model on purpose, so a
PTQ run keeps the untransformed model as its FP32 reference.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import onnx

from quantlab.config import TRANSFORM_NAMES, TransformConfig
from quantlab.errors import check
from quantlab.model import PreparedModel
from quantlab.transforms.graph import Feed
from quantlab.transforms.result import TransformResult

Transform = Callable[[onnx.ModelProto, Sequence[Feed], TransformConfig, frozenset[str]],
                     tuple[onnx.ModelProto, TransformResult]]
NEEDS_DATA = frozenset({"smoothquant", "adaround", "bias-correction"})


def get_transform(name: str) -> Transform:
    """The transform function called ``name`` (one of :data:`quantlab.config.TRANSFORM_NAMES`)."""
    check(name in TRANSFORM_NAMES, f"unknown transform '{name}': choose one of {', '.join(TRANSFORM_NAMES)}")
    if name == "equalize":
        from quantlab.transforms.equalize import equalize

        return equalize
    if name == "smoothquant":
        from quantlab.transforms.smoothquant import smoothquant

        return smoothquant
    if name == "adaround":
        from quantlab.transforms.adaround import adaround

        return adaround
    from quantlab.transforms.biascorrect import bias_correction

    return bias_correction


def ordered(names: Sequence[str]) -> list[str]:
    """``names`` in the order the transforms run (:data:`TRANSFORM_NAMES`)."""
    for n in names:
        check(n in TRANSFORM_NAMES, f"unknown transform '{n}': choose one of {', '.join(TRANSFORM_NAMES)}")
    return [n for n in TRANSFORM_NAMES if n in names]


def apply_transforms(
    model: onnx.ModelProto, names: Sequence[str], data: Sequence[Feed], config: TransformConfig,
    keep: Sequence[str] = (),
) -> tuple[onnx.ModelProto, list[TransformResult]]:
    """Run the named transforms in order; each sees the model the previous one returned.

    ``keep`` names nodes that stay in float in the INT8 models: transforms that prepare layers for
    quantization leave them alone.  Nodes a transform adds to stay in float join them.
    """
    kept = set(keep)
    results = []
    for name in ordered(names):
        check(name not in NEEDS_DATA or len(data) > 0,
              f"transform '{name}' needs calibration data: pass --calib FOLDER or set [data] calib")
        t0 = time.perf_counter()
        model, result = get_transform(name)(model, data, config, frozenset(kept))
        result.seconds = time.perf_counter() - t0
        kept |= set(result.keep_float)
        results.append(result)
    return model, results


def _cache_key(sha256: str, names: Sequence[str], data: Sequence[Feed], config: TransformConfig,
               keep: Sequence[str]) -> str:
    """Everything a transformed model depends on: the model, the transforms and their parameters,
    the nodes kept in float, every calibration array, the transforms' own code and the versions of
    the numeric libraries."""
    from pathlib import Path

    import onnxruntime

    from quantlab import __version__

    h = hashlib.sha256(json.dumps([sha256, ordered(names), asdict(config), sorted(keep), onnxruntime.__version__,
                                   np.__version__, __version__]).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    if "adaround" in names:
        import torch

        h.update(torch.__version__.encode())
    for feed in data:
        for key in sorted(feed):
            a = np.ascontiguousarray(feed[key])
            h.update(f"{key}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def transform_prepared(prepared: PreparedModel, names: Sequence[str], data: Sequence[Feed],
                       config: TransformConfig, keep: Sequence[str] = ()) -> tuple[PreparedModel, list[TransformResult]]:
    """:func:`apply_transforms` on a prepared model, cached by :func:`_cache_key`.

    The transformed model and the records go into quantlab's cache, so a second run with the same
    model, data and settings (a gate, a tune rung, another calibrator) costs no optimisation.
    """
    from quantlab.model import cache_dir, prepared_from

    key = _cache_key(prepared.sha256, names, data, config, keep)
    record = cache_dir() / "transformed" / f"{key[:24]}.json"
    if record.exists():
        saved = json.loads(record.read_text(encoding="utf-8"))
        path = cache_dir() / "transformed" / saved["model"]
        if path.exists():
            t0 = time.perf_counter()
            out = prepared_from(onnx.load(str(path)), prepared.source)
            seconds = (time.perf_counter() - t0) / max(len(saved["results"]), 1)
            results = [TransformResult(**{**r, "seconds": seconds, "cached": True}) for r in saved["results"]]
            return out, results
    model, results = apply_transforms(onnx.load(str(prepared.path)), names, data, config, keep)
    out = prepared_from(model, prepared.source)
    payload = {"model": out.path.name, "results": [r.to_dict() for r in results]}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
    tmp.replace(record)
    return out, results


__all__ = ["NEEDS_DATA", "Transform", "TransformResult", "apply_transforms", "get_transform", "ordered",
           "transform_prepared"]
