"""The on-disk model format: a sentence-transformers folder.

config.json + model.safetensors + tokenizer at the top (what ``transformers.AutoModel`` loads), mean
pooling in 1_Pooling, L2 norm in 2_Normalize, the prompts in config_sentence_transformers.json and the
maximum sequence length in sentence_bert_config.json, so ``sentence_transformers.SentenceTransformer``
loads a folder unchanged. :func:`read_settings` is how every reader here learns what a folder says about
itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ST_CONFIG = "config_sentence_transformers.json"
SBERT_CONFIG = "sentence_bert_config.json"


@dataclass(frozen=True)
class FolderSettings:
    """What a folder says about how to encode with it."""

    prompts: dict[str, str] = field(default_factory=dict)  # prompt name -> text prepended ("query" -> "query: ")
    max_seq_length: int | None = None  # tokens per text; None where the folder does not say


def read_settings(folder: str | Path) -> FolderSettings:
    folder = Path(folder)
    st_config, sbert_config = folder / ST_CONFIG, folder / SBERT_CONFIG
    prompts = json.loads(st_config.read_text()).get("prompts", {}) if st_config.is_file() else {}
    length = json.loads(sbert_config.read_text()).get("max_seq_length") if sbert_config.is_file() else None
    return FolderSettings(prompts=prompts, max_seq_length=length)


def write(path: str | Path, model: nn.Module, tokenizer, settings: FolderSettings) -> Path:
    """Write ``model`` (a transformers model without pooler), its tokenizer and ``settings`` as a folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dim = model.config.hidden_size
    model.save_pretrained(path, safe_serialization=True)
    _add_identity_pooler(path / "model.safetensors", dim)
    tokenizer.save_pretrained(path)
    name_tokenizer_class(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True,
    }
    st_config = {"prompts": settings.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    _write_json(path / "modules.json", modules)
    _write_json(path / SBERT_CONFIG, {"max_seq_length": settings.max_seq_length, "do_lower_case": False})
    _write_json(path / ST_CONFIG, st_config)
    (path / "1_Pooling").mkdir(exist_ok=True)
    _write_json(path / "1_Pooling" / "config.json", pooling)
    (path / "2_Normalize").mkdir(exist_ok=True)
    return path


def _add_identity_pooler(weights: Path, dim: int) -> None:
    """Give the saved weights the pooler that ``AutoModel`` builds for BERT-like models: without it every
    load reports "newly initialized" weights and tells the user to train on a downstream task. The
    embedding is the mean of the token states, so the pooler is never used; identity + zero bias says so."""
    from safetensors.torch import load_file, save_file

    if not weights.is_file():
        return
    state = load_file(weights)
    if "pooler.dense.weight" in state or not any(k.startswith("encoder.layer.") for k in state):
        return
    dtype = next(iter(state.values())).dtype
    state["pooler.dense.weight"] = torch.eye(dim, dtype=dtype)
    state["pooler.dense.bias"] = torch.zeros(dim, dtype=dtype)
    save_file(state, weights, metadata={"format": "pt"})


# transformers 5 writes "TokenizersBackend", a class transformers 4 (and servers pinned to it, such as
# infinity-emb) does not have; these names load under both generations.
TOKENIZER_CLASSES = {"Unigram": "XLMRobertaTokenizerFast", "WordPiece": "BertTokenizerFast"}


def name_tokenizer_class(folder: Path) -> None:
    """Name a concrete tokenizer class in a saved folder's tokenizer_config.json, by the tokenizer's model."""
    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()):
        return
    config = json.loads(config_path.read_text())
    kind = json.loads(tokenizer_path.read_text())["model"]["type"]
    if config.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast") and kind in TOKENIZER_CLASSES:
        config["tokenizer_class"] = TOKENIZER_CLASSES[kind]
        _write_json(config_path, config)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
