"""Learned quantization ranges for QAT: LSQ step sizes in the log domain.

modelopt 0.47 keeps an INT8 quantizer's ``amax`` fixed during training: the straight-through
estimator passes gradients to the input inside ``[-amax, amax]`` and none to ``amax``.  When the
calibrated range is too wide (a min-max range stretched by one outlier) or too narrow, training the
weights alone cannot undo the rounding error it causes.  Learned Step-size Quantization (LSQ,
Esser et al. 2020, arXiv 1902.08153) makes the step ``s`` a parameter and trains it with the rest:

    q(x) = s * clip(round(x / s), qmin, qmax)

    dq/ds = round(x / s) - x / s     inside the range (the rounding error's own gradient)
          = qmin or qmax             below or above it (clipping pulls the range outward)
    dq/dx = 1 inside, 0 outside      (the straight-through estimator, as with fixed ranges)

LSQ scales the step's gradient by ``g = 1 / sqrt(N * qmax)`` (``N``: the elements one step
serves per sample, or per output channel for a weight) so that it moves at the weights' pace under
SGD.  :class:`LearnedQuantizer` stores ``t = log s`` instead of ``s`` (as TQT, Jain et al. 2019,
learns ``log2`` thresholds): one learning rate then means the same *relative* change for a step of
0.001 (a LayerNorm output) and of 0.5 (attention scores), and ``s`` can never become zero or
negative.  By the chain rule ``dL/dt = s * g * dL/ds``.  Under Adam, the optimizer QAT uses on the
GPU, the update of ``t`` is about ``range_lr`` per step whatever the gradient's scale, so
``[qat] range_lr = 1e-2`` (the default) moves a step by about 1% per optimizer step at most.

Rounding is half to even in both ``torch.round`` and ONNX ``QuantizeLinear``, so the exported
Q/DQ model computes what the fake quantizer computed.  Worked example: ``s = 0.02``,
``x = 0.4567``: ``x / s = 22.835`` rounds to 23, ``q = 0.46``; ``dq/ds = 23 - 22.835 = 0.165``:
a larger step would lower the rounding error of this input.  ``x = 3.0`` is above
``127 * 0.02 = 2.54``: ``q = 2.54`` and ``dq/ds = 127``.

Activations use the signed range ``[-128, 127]`` of ``QuantizeLinear``; weights ``[-127, 127]``,
the symmetric range quantlab stores weights in.  :func:`learn_ranges` swaps the quantizers of a
converted model (:mod:`quantlab.qat.graph`) for learned ones, starting from their current ``amax``
(quantlab's calibrated ranges); :func:`quantlab.qat.graph.export_qdq` writes the learned steps as
the Q/DQ scales.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantlab.errors import check


class LearnedQuantizer(torch.nn.Module):
    """Signed INT8 fake quantizer whose step ``s = exp(log_step)`` trains (LSQ, see the module docstring).

    Args:
        amax: the starting range, a scalar (per tensor) or a tensor broadcastable against the input
            (per channel, e.g. ``[C, 1, 1, 1]`` for a Conv weight); ``s = amax / qmax``.
        weight: ``True`` for a weight (range ``[-127, 127]``, gradient scale per output channel).
    """

    def __init__(self, amax: torch.Tensor | float, *, weight: bool = False) -> None:
        super().__init__()
        value = torch.as_tensor(amax, dtype=torch.float32).detach().clone()
        check(bool(torch.isfinite(value).all()) and bool((value > 0).all()),
              "a learned range must start from a finite amax > 0")
        self.qmax = 127
        self.qmin = -127 if weight else -128
        self.weight = weight
        self.log_step = torch.nn.Parameter(torch.log(value / self.qmax))
        self.register_buffer("start_step", value / self.qmax, persistent=False)
        self._enabled = True

    @property
    def step(self) -> torch.Tensor:
        """The current step ``s`` (the Q/DQ scale)."""
        return torch.exp(self.log_step)

    @property
    def amax(self) -> torch.Tensor:
        """``qmax * s``: the range, as modelopt's quantizers report it."""
        return self.step * self.qmax

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return x
        s = self.step.to(x.dtype)
        per = x.numel() // max(s.numel(), 1) if self.weight else x[0].numel() if x.dim() else 1
        g = 1.0 / math.sqrt(max(per, 1) * self.qmax)
        s = s * g + (s - s * g).detach()  # the value s, the gradient scaled by g
        v = torch.clamp(x / s, self.qmin, self.qmax)
        v = v + (torch.round(v) - v).detach()  # round forward, identity backward
        return v * s

    def extra_repr(self) -> str:
        return f"range=[{self.qmin}, {self.qmax}], per_channel={self.log_step.numel() > 1}"


def learn_ranges(module: torch.nn.Module, quantizers: Any, *, weights: bool = False) -> list[str]:
    """Replace the activation quantizers (and with ``weights`` the weight quantizers) of a
    converted model by :class:`LearnedQuantizer` s starting from their ``amax``.

    ``module.quantizers`` is the ``ModuleDict`` of :class:`quantlab.qat.convert.OnnxModule`;
    ``quantizers`` the :class:`quantlab.qat.graph.Quantizers` attached to it (names by tensor).
    Returns the names of the replaced quantizers.
    """
    names = list(quantizers.activations.values())
    if weights:
        names += list(quantizers.weights.values())
    kinds = {n: n in set(quantizers.weights.values()) for n in names}
    for name in names:
        old = module.quantizers[name]
        amax = old.amax.detach().float().clamp_min(1e-8)
        module.quantizers[name] = LearnedQuantizer(amax, weight=kinds[name])
    return names


def range_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The learned steps of ``module`` (each :class:`LearnedQuantizer`'s ``log_step``), in module order."""
    return [m.log_step for m in module.modules() if isinstance(m, LearnedQuantizer)]


def range_summary(module: torch.nn.Module) -> dict[str, Any]:
    """How far the learned steps moved from quantlab's: count, and the median and largest factor
    ``s / s0`` below and above 1 (over every step, per channel included)."""
    ratios = [(m.step / m.start_step).detach().float().cpu().reshape(-1)
              for m in module.modules() if isinstance(m, LearnedQuantizer)]
    if not ratios:
        return {"learned": 0}
    r = torch.cat(ratios)
    return {"learned": len(ratios), "median_ratio": round(float(r.median()), 5),
            "min_ratio": round(float(r.min()), 5), "max_ratio": round(float(r.max()), 5)}


__all__ = ["LearnedQuantizer", "learn_ranges", "range_parameters", "range_summary"]
