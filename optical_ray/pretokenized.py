"""Bitext tokenised once, at preparation, so that a training step does tensor work only.

On an H200 a bf16 distillation step spent 61-86% of its time tokenising (bench/RESULTS.md, GPU
check): the tokenizer, asked for character offsets for the content mask, is far slower than the GPU's
work, and the trainer's few CPU cores cannot keep up. ``optical-ray data prepare --tokenize-for MODEL``
therefore stores, beside each text column of the bitext shards, the token ids and content mask that
MODEL reads for it -- English as the corpus (``passage``), the translation as a query, as
:class:`optical_ray.distill.Distiller` encodes them -- and training only pads those (to a multiple of
8, the tensor cores' tile) into tensors.

Why at preparation and not in a Ray Data stage beside the trainer: a corpus is tokenised once, not
once per epoch and per worker; the shards stay the single input of the training order, which is a pure
function of (seed, step), so exact resume holds unchanged; and no CPU worker has to keep pace with
the GPU at run time (bench/bench_supply.py measures what the trainer still does per pair).

Columns are keyed by what decides the tokens: the tokenizer itself (its serialised vocabulary and
rules), the prompt text and the maximum length. A run whose tokenizer, prompt or length differs finds
no columns under its key and tokenises on the trainer, with a warning naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .encoder import Encoder

log = logging.getLogger(__name__)

# How retrieval reads each side of a bitext pair (see Distiller.prepare): the English sentence is the
# corpus, its translation a query.
SIDES = (("english", "passage"), ("translation", "query"))
PAD_TO_MULTIPLE = 8


def token_key(encoder: Encoder, prompt: str | None) -> str:
    """What decides the tokens of a text: the tokenizer's rules and vocabulary, the prompt text
    prepended and the maximum length (12 hex digits)."""
    rules = json.loads(encoder.tokenizer.backend_tokenizer.to_str())
    # The tokenizer stores the padding and truncation of its last call: not part of what it is.
    rules.pop("padding", None)
    rules.pop("truncation", None)
    described = {"tokenizer": rules, "prompt": encoder.prompts.get(prompt, "") if prompt else "",
                 "max_length": encoder.max_length}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def column_names(column: str, key: str) -> tuple[str, str]:
    """The (token ids, content mask) columns holding ``column`` tokenised under ``key``."""
    return f"{column}.ids.{key}", f"{column}.content.{key}"


def token_lists(encoder: Encoder, texts: list[str], prompt: str | None) -> tuple[pa.ListArray, pa.ListArray]:
    """Each text's token ids and content mask as :meth:`Encoder.tokenize` makes them, unpadded."""
    batch = encoder.tokenize(texts, prompt)
    real = batch["attention_mask"].bool()
    offsets = pa.array(np.r_[0, np.cumsum(real.sum(1).numpy())].astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(batch["input_ids"][real].numpy().astype(np.int32)))
    content = pa.ListArray.from_arrays(offsets, pa.array(batch["content_mask"][real].numpy()))
    return ids, content


def add_tokens(pairs: pa.Table, encoder: Encoder, model: str, chunk: int = 4096, progress: bool = False
               ) -> tuple[pa.Table, dict[str, dict]]:
    """``pairs`` with the token columns ``encoder`` reads for each of :data:`SIDES`, and what each ids
    column holds (for the preparation's ``_SUCCESS.json``)."""
    described = {}
    for column, prompt in SIDES:
        key = token_key(encoder, prompt)
        texts = pairs[column].to_pylist()
        ids, content = [], []
        for start in tqdm(range(0, len(texts), chunk), desc=f"tokenising {column} for {model}", unit="chunk",
                          disable=not progress):
            chunk_ids, chunk_content = token_lists(encoder, texts[start : start + chunk], prompt)
            ids.append(chunk_ids)
            content.append(chunk_content)
        ids_name, content_name = column_names(column, key)
        for name, arrays in ((ids_name, ids), (content_name, content)):
            if name in pairs.column_names:
                pairs = pairs.drop_columns([name])
            pairs = pairs.append_column(name, pa.chunked_array(arrays, type=arrays[0].type if arrays else None))
        described[ids_name] = {"column": column, "model": model, "prompt": prompt, "max_length": encoder.max_length}
    return pairs, described


def tokenize_for(pairs: pa.Table, models: list[str], max_length: int, progress: bool = False
                 ) -> tuple[pa.Table, dict[str, dict]]:
    """:func:`add_tokens` for each of ``models`` (names or folders) at ``max_length`` tokens."""
    described: dict[str, dict] = {}
    for model in models:
        pairs, added = add_tokens(pairs, Encoder.load(model, max_length=max_length), model, progress=progress)
        described.update(added)
    return pairs, described


def find_columns(prepared: dict[str, dict], encoder: Encoder, column: str, prompt: str | None) -> tuple[str, str] | None:
    """The token columns of a preparation (``prepared``: its ``_SUCCESS.json`` ``tokens``) for ``column``
    as ``encoder`` reads it with ``prompt``, or None (and a warning when the column was tokenised for
    another tokenizer, prompt or length)."""
    names = column_names(column, token_key(encoder, prompt))
    if names[0] in prepared:
        return names
    others = [f"{d['model']} ({d['prompt']}, max_length {d['max_length']})" for d in prepared.values() if d["column"] == column]
    if others:
        log.warning("the bitext's %s column is tokenised for %s, not for this run's tokenizer with prompt %r and "
                    "max_length %d: tokenising it on the trainer (prepare the data with --tokenize-for the run's "
                    "model and --max-length)", column, ", ".join(others), prompt, encoder.max_length)
    return None


def collate(ids: pa.Array | list[pa.Array], content: pa.Array | list[pa.Array], pad_id: int,
            multiple: int = PAD_TO_MULTIPLE) -> dict[str, torch.Tensor]:
    """Token lists padded (on the right) to the batch's longest, rounded up to ``multiple``: the inputs
    :meth:`Encoder.forward` takes. Several arrays are stacked in order (queries, then passages)."""
    ids = pa.concat_arrays(ids) if isinstance(ids, list) else ids
    content = pa.concat_arrays(content) if isinstance(content, list) else content
    lengths = ids.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    width = max(multiple, -(-int(lengths.max(initial=0)) // multiple) * multiple)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    input_ids[rows, cols] = ids.flatten().to_numpy(zero_copy_only=False)
    attention = np.zeros((len(lengths), width), dtype=np.int64)
    attention[rows, cols] = 1
    mask = np.zeros((len(lengths), width), dtype=bool)
    mask[rows, cols] = content.flatten().to_numpy(zero_copy_only=False)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "content_mask": torch.from_numpy(mask)}
