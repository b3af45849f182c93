"""A text encoder: tokenizer + transformer + pooling (+ Dense layers) (+ L2 norm), as its folder says.

An :class:`Encoder` exposes token states (for optimal-transport distillation) and sentence embeddings
(for the contrastive and MSE losses and for retrieval). It loads anything
:func:`optical_ray.model_store.resolve_model` resolves and saves in the :mod:`optical_ray.st_folder`
format, which ``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import st_folder
from .model_store import resolve_model

DEFAULT_MAX_LENGTH = 128  # for a folder that does not say (sentence_bert_config.json absent)

log = logging.getLogger(__name__)


@dataclass
class EncoderOutput:
    token_states: torch.Tensor  # [B, L, H]
    content_mask: torch.Tensor  # [B, L] bool: real text tokens (no specials, prompt or padding)
    embedding: torch.Tensor  # [B, D], pooled token states (then Dense layers, L2 norm) as the folder says


# A fast tokenizer sets padding and truncation on its Rust object at every call, so two threads calling
# it at once fail ("Already borrowed"); training prepares the next batches in a background thread
# while the main thread may be evaluating.
_TOKENIZER_LOCK = threading.Lock()


def pool(states: torch.Tensor, attention: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from token ``states`` [B, L, H] over the ``attention`` mask [B, L], as
    sentence-transformers' Pooling does: the mean, the first (CLS) token, the elementwise max, or the
    last attended token (for left or right padding alike)."""
    weights = attention.unsqueeze(-1).to(states.dtype)
    if mode == "mean":
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        return states.masked_fill(weights == 0, torch.finfo(states.dtype).min).max(1).values
    if mode == "lasttoken":
        positions = torch.arange(attention.shape[1], device=attention.device)
        last = (attention.bool() * positions).argmax(1)
        return states[torch.arange(len(states), device=states.device), last]
    raise ValueError(f"pooling must be one of {', '.join(st_folder.POOLING_MODES)}, got {mode!r}")


class Encoder(nn.Module):
    """Tokenizer + transformer + pooling (+ Dense layers) (+ L2 norm).

    ``prompts`` maps a prompt name ("query", "passage") to the text prepended before tokenising, as
    E5 expects; models without prompts (MiniLM) use the text as it is. ``pooling``, ``dense`` and
    ``normalize`` are what the model's folder states (:func:`optical_ray.st_folder.read_settings`).
    """

    def __init__(self, model: nn.Module, tokenizer, prompts: dict[str, str] | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 pooling: str = "mean", dense: list[nn.Module] = (), normalize: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = dict(prompts or {})
        self.max_length = max_length
        self.pooling, self.normalize = pooling, normalize
        self.dense = nn.ModuleList(dense)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, max_length: int | None = None) -> Encoder:
        """A model by name or location (see :func:`~optical_ray.model_store.resolve_model`), encoding
        at ``max_length`` tokens or, by default, at the length the saved folder states."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # MiniLM's unused pooler is reported on every load
        hf_logging.disable_progress_bar()
        path = resolve_model(name_or_path)
        model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.is_fast:
            raise st_folder.FolderFormatError(
                f"model {name_or_path!r}: its tokenizer ({type(tokenizer).__name__}) is a slow one, without the "
                "character offsets the content masks need; give the folder a tokenizer.json (a fast tokenizer)")
        settings = st_folder.read_settings(path)
        if not settings.stated:
            log.warning("%s has no modules.json (a plain Hugging Face folder): encoding with mean pooling and "
                        "L2 norm", name_or_path)
        length = max_length or settings.max_seq_length or DEFAULT_MAX_LENGTH
        dense = [st_folder.read_dense(path / sub) for sub in settings.dense]
        return cls(model, tokenizer, prompts=settings.prompts, max_length=length, pooling=settings.pooling,
                   dense=dense, normalize=settings.normalize)

    @property
    def dim(self) -> int:
        """The embedding's size: the last Dense layer's output, else the transformer's hidden size."""
        return self.dense[-1][0].out_features if len(self.dense) else self.model.config.hidden_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], prompt: str | list[str | None] | None = None) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and content mask for ``texts``, each prefixed with its prompt:
        one prompt name for all texts, or one per text (so queries and passages can share a batch)."""
        names = prompt if isinstance(prompt, list) else [prompt] * len(texts)
        if len(names) != len(texts):
            raise ValueError(f"{len(names)} prompts for {len(texts)} texts")
        prefixes = [self.prompts.get(name, "") if name else "" for name in names]
        with _TOKENIZER_LOCK:
            batch = self.tokenizer(
                [prefix + t for prefix, t in zip(prefixes, texts)], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt", return_offsets_mapping=True,
            )
        offsets = batch.pop("offset_mapping")
        prefix_len = torch.tensor([len(prefix) for prefix in prefixes]).unsqueeze(-1)
        # A token is text when it covers a character past the prompt; specials and padding cover
        # none. (The first word's token also covers the space that ends the prompt.)
        content = (offsets[..., 1] > offsets[..., 0]) & (offsets[..., 1] > prefix_len)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "content_mask": content & batch["attention_mask"].bool(),
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        device = self.device
        attention = batch["attention_mask"].to(device)
        states = self.model(input_ids=batch["input_ids"].to(device), attention_mask=attention).last_hidden_state
        return EncoderOutput(token_states=states, content_mask=batch["content_mask"].to(device),
                             embedding=self.embed_states(states, attention))

    def embed_states(self, states: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings from token states: pooling, the Dense layers, the L2 norm."""
        embedding = pool(states, attention, self.pooling)
        for layer in self.dense:
            embedding = layer(embedding)
        return nn.functional.normalize(embedding, dim=-1) if self.normalize else embedding

    @torch.inference_mode()
    def embed_tokens(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Sentence embeddings of a batch :meth:`tokenize` made, as float32 numpy [B, dim]."""
        was_training = self.training
        self.eval()
        try:
            return self(batch).embedding.float().cpu().numpy()
        finally:
            self.train(was_training)

    def encode(self, texts: list[str], prompt: str | None = None, batch_size: int = 64,
               progress: str | None = None) -> np.ndarray:
        """Sentence embeddings as float32 numpy, [len(texts), dim]."""
        return encode_in_batches(self, texts, prompt, batch_size, progress)

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load the weights a saved folder holds -- the transformer's (strictly: every weight present, none
        else, less the identity pooler that :meth:`save` adds for ``AutoModel``) and its Dense layers'."""
        from safetensors.torch import load_file

        folder = Path(folder)
        state = load_file(folder / "model.safetensors", device=str(self.device))
        if getattr(self.model, "pooler", None) is None:
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        self.model.load_state_dict(state)
        saved = st_folder.read_settings(folder).dense
        if len(saved) != len(self.dense):
            raise st_folder.FolderFormatError(f"{folder}: {len(saved)} Dense layer(s), this encoder has {len(self.dense)}")
        for layer, sub in zip(self.dense, saved):
            layer.load_state_dict(st_folder.read_dense(folder / sub).state_dict())

    def freeze_word_embeddings(self) -> None:
        """Freeze the word-embedding matrix: for mE5-small it is 82% of the parameters, and training
        it makes a CPU step about 12x slower while the transformer layers do the aligning."""
        self.model.get_input_embeddings().weight.requires_grad_(False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a sentence-transformers folder that states this encoder's prompts and length."""
        settings = st_folder.FolderSettings(self.prompts, self.max_length, self.pooling, normalize=self.normalize)
        return st_folder.write(path, self.model, self.tokenizer, settings, list(self.dense))


def encode_in_batches(encoder, texts: list[str], prompt: str | None, batch_size: int, progress: str | None) -> np.ndarray:
    """``encoder.embed_tokens(encoder.tokenize(...))`` over ``texts`` in batches, as float32 numpy
    [len(texts), encoder.dim]. Texts are sorted by length so batches carry little padding; the output
    keeps the input order. Any encoder with ``tokenize``, ``embed_tokens`` and ``dim`` (torch, ONNX)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=progress, disable=progress is None, unit="batch"):
        idx = order[start : start + batch_size]
        out[idx] = encoder.embed_tokens(encoder.tokenize([texts[i] for i in idx], prompt))
    return out
