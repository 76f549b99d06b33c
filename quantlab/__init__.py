"""quantlab: INT8 post-training quantization, calibration and analysis for ONNX models.

``import quantlab`` stays light: heavy dependencies (onnxruntime, torch, matplotlib) load only when
the function that needs them runs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from quantlab.errors import QuantlabError

__all__ = ["QuantlabError", "__version__"]
