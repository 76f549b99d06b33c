"""Quantization-aware training: the last rung of the escalation ladder.

* :mod:`quantlab.qat.train`: :func:`run_qat`, fine-tuning with modelopt's fake quantizers and the
  Q/DQ export, for a PyTorch model or for the prepared ONNX graph converted to PyTorch;
* :mod:`quantlab.qat.convert`: an ONNX graph as a trainable ``torch.nn.Module``;
* :mod:`quantlab.qat.graph`: quantizer placement on a converted graph and its Q/DQ export;
* :mod:`quantlab.qat.ranges`: learned quantization ranges (LSQ steps in the log domain);
* :mod:`quantlab.qat.run`: QAT of a PTQ run folder (``quantlab qat``, ``tune``'s QAT rung).
"""

from quantlab.qat.train import (
    EpochReport, QatResult, activation_amax, qat_source, run_qat, scope_inputs, training_data,
)

__all__ = ["EpochReport", "QatResult", "activation_amax", "qat_source", "run_qat", "scope_inputs", "training_data"]
