"""ONNX Runtime inference for a saved encoder: a faster CPU backend for serving.

The transformer is exported once with ``torch.onnx`` (token ids + attention mask -> token states), and
optionally quantised to int8 weights with ONNX Runtime's dynamic quantisation; tokenising, mean pooling
and the L2 norm stay exactly those of :class:`optical_ray.encoder.Encoder`, so the two backends differ
only in how the matrix products are computed. The files sit where sentence-transformers looks for them
(``onnx/model.onnx``, ``onnx/model_qint8.onnx`` in the model folder) or, when the folder is not
writable (a shipped or downloaded model), in the local model cache.

Not through Hugging Face ``optimum``: its ONNX exporter (``optimum-onnx``) pins transformers < 4.58,
and this project runs transformers 5.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .encoder import Encoder, encode_in_batches
from .model_store import cache_dir, resolve_model

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
FILES = {"onnx": "model.onnx", "onnx-int8": "model_qint8.onnx"}


class _TokenStates(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_folder(model: str | os.PathLike) -> Path:
    """Where a model's ONNX files go: its own ``onnx/`` when writable, else a cache folder per model."""
    path = resolve_model(model)
    if os.access(path, os.W_OK):
        return path / "onnx"
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
    return cache_dir() / "onnx" / digest


def export(model: str | os.PathLike, backend: str = "onnx") -> Path:
    """The ONNX file of ``model`` for ``backend`` ("onnx": float32, "onnx-int8": int8 weights),
    exported (and quantised) on first use. Returns its path."""
    if backend not in FILES:
        raise ValueError(f"ONNX backend must be one of {', '.join(FILES)}, got {backend!r}")
    folder = onnx_folder(model)
    target = folder / FILES[backend]
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / FILES["onnx"]
    if not fp32.exists():
        encoder = Encoder.load(model).eval()
        sample = encoder.tokenize(["a dog runs across a field", "two"], "query")
        partial = fp32.with_suffix(f".{os.getpid()}.partial")  # replicas starting together each write their own
        with torch.no_grad():
            torch.onnx.export(_TokenStates(encoder.model), (sample["input_ids"], sample["attention_mask"]), str(partial),
                              input_names=["input_ids", "attention_mask"], output_names=["token_states"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"},
                                            "token_states": {0: "batch", 1: "tokens"}},
                              opset_version=17, dynamo=False)
        partial.replace(fp32)  # a half-written export is never taken for a finished one
        log.info("exported %s to %s", model, fp32)
    if backend == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        partial = target.with_suffix(f".{os.getpid()}.partial")
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
        partial.replace(target)
        log.info("quantised %s to int8 weights: %s", model, target)
    return target


class OnnxEncoder:
    """:meth:`optical_ray.encoder.Encoder.encode` on ONNX Runtime (CPU): the same tokens, pooling and
    normalisation; ``threads`` caps ONNX Runtime's intra-op threads (0: its default)."""

    def __init__(self, model: str | os.PathLike, backend: str = "onnx", max_length: int | None = None, threads: int = 0):
        import onnxruntime as ort

        self.tokenizer_side = Encoder.load(model, max_length=max_length)
        self.dim = self.tokenizer_side.dim
        # Only its tokenize() and embed_states() are used here: drop the transformer's weights (0.47 GB
        # for mE5-small) a replica would otherwise hold twice.
        self.tokenizer_side.model = torch.nn.Identity()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(export(model, backend)), options, providers=["CPUExecutionProvider"])

    def tokenize(self, texts: list[str], prompt: str | None = None) -> dict:
        return self.tokenizer_side.tokenize(texts, prompt)

    def embed_tokens(self, batch: dict) -> np.ndarray:
        """Sentence embeddings of a tokenised batch: :meth:`optical_ray.encoder.Encoder.embed_tokens`."""
        mask = batch["attention_mask"].numpy()
        states = self.session.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": mask})[0]
        # The folder's pooling, Dense layers and norm: the torch encoder's own, on these states.
        with torch.inference_mode():
            return self.tokenizer_side.embed_states(torch.from_numpy(states), batch["attention_mask"]).float().numpy()

    def encode(self, texts: list[str], prompt: str | None = None, batch_size: int = 64,
               progress: str | None = None) -> np.ndarray:
        return encode_in_batches(self, texts, prompt, batch_size, progress)


def load_query_encoder(model: str, backend: str = "torch", max_length: int | None = None):
    """The encoder a service embeds queries with: :class:`Encoder` ("torch") or :class:`OnnxEncoder`."""
    if backend not in BACKENDS:
        raise ValueError(f"encoder backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return Encoder.load(model, max_length=max_length)
    return OnnxEncoder(model, backend, max_length=max_length)
