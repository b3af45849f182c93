"""The on-disk model format: a sentence-transformers folder.

config.json + model.safetensors + tokenizer at the top (what ``transformers.AutoModel`` loads), the
pooling in 1_Pooling (mean, CLS, max or last token), optional Dense layers, L2 norm in a Normalize
module, the prompts in config_sentence_transformers.json and the maximum sequence length in
sentence_bert_config.json, so ``sentence_transformers.SentenceTransformer`` loads a folder unchanged.
:func:`read_settings` is how every reader here learns what a folder says about itself -- a folder
written by sentence-transformers (2 to 6) or by this package; a plain Hugging Face folder (no
modules.json) gets mean pooling and L2 norm, and says so (``stated``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ST_CONFIG = "config_sentence_transformers.json"
SBERT_CONFIG = "sentence_bert_config.json"


POOLING_MODES = ("mean", "cls", "max", "lasttoken")
# sentence-transformers' older pooling config: one boolean per mode.
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean"}


class FolderFormatError(ValueError):
    """A model folder states something this package cannot encode with; the message names it."""


@dataclass(frozen=True)
class FolderSettings:
    """What a folder says about how to encode with it."""

    prompts: dict[str, str] = field(default_factory=dict)  # prompt name -> text prepended ("query" -> "query: ")
    max_seq_length: int | None = None  # tokens per text; None where the folder does not say
    pooling: str = "mean"  # one of POOLING_MODES
    dense: tuple[str, ...] = ()  # the Dense modules' folders, in order, after pooling
    normalize: bool = True  # L2 norm last
    stated: bool = True  # False: no modules.json, the defaults above were assumed


def read_settings(folder: str | Path) -> FolderSettings:
    folder = Path(folder)
    st_config, sbert_config = folder / ST_CONFIG, folder / SBERT_CONFIG
    prompts = json.loads(st_config.read_text()).get("prompts", {}) if st_config.is_file() else {}
    length = json.loads(sbert_config.read_text()).get("max_seq_length") if sbert_config.is_file() else None
    if not (folder / "modules.json").is_file():
        return FolderSettings(prompts=prompts, max_seq_length=length, stated=False)
    pooling, dense, normalize = None, [], False
    for module in json.loads((folder / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Transformer" and module.get("path", "") in ("", "0_Transformer"):
            continue
        if kind == "Pooling":
            pooling = _pooling_mode(folder / module["path"] / "config.json")
        elif kind == "Dense":
            dense.append(module["path"])
        elif kind == "Normalize":
            normalize = True
        else:
            raise FolderFormatError(f"{folder}: modules.json has a {kind} module ({module['type']}); this package "
                                    "encodes with Transformer, Pooling, Dense and Normalize modules only")
    if pooling is None:
        raise FolderFormatError(f"{folder}: modules.json has no Pooling module")
    return FolderSettings(prompts, length, pooling, tuple(dense), normalize)


def _pooling_mode(path: Path) -> str:
    config = json.loads(path.read_text())
    if config.get("include_prompt", True) is False:
        raise FolderFormatError(f"{path}: include_prompt: false (pooling without the prompt's tokens) is not "
                                "supported")
    if "pooling_mode" in config:  # sentence-transformers 5.2+
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
    else:
        modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise FolderFormatError(f"{path}: pooling {' + '.join(modes) or 'none'} is not supported (one of: "
                                f"{', '.join(POOLING_MODES)})")
    return modes[0]


def read_dense(folder: Path) -> nn.Sequential:
    """A sentence-transformers Dense module (Linear + activation) from its folder's config.json and
    model.safetensors (or, from older versions, pytorch_model.bin read with ``weights_only``)."""
    config = json.loads((folder / "config.json").read_text())
    linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors")
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    name = config.get("activation_function", "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if not hasattr(nn, name):
        raise FolderFormatError(f"{folder}: activation {config['activation_function']} is not a torch.nn module")
    return nn.Sequential(linear, getattr(nn, name)())


def embedding_dimension(folder: str | Path) -> int:
    """The size of the vectors a folder's model makes: its last Dense layer's, else the hidden size."""
    folder = Path(folder)
    settings = read_settings(folder)
    if settings.dense:
        return json.loads((folder / settings.dense[-1] / "config.json").read_text())["out_features"]
    return json.loads((folder / "config.json").read_text())["hidden_size"]


def write(path: str | Path, model: nn.Module, tokenizer, settings: FolderSettings,
          dense: list[nn.Sequential] = ()) -> Path:
    """Write ``model`` (a transformers model without pooler), its tokenizer, ``settings`` and the
    ``dense`` layers (one per ``settings.dense`` entry) as a folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dim = model.config.hidden_size
    model.save_pretrained(path, safe_serialization=True)
    _add_identity_pooler(path / "model.safetensors", dim)
    tokenizer.save_pretrained(path)
    name_tokenizer_class(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    # The older boolean form: what sentence-transformers 2 to 6 and infinity-emb all read.
    pooling = {"word_embedding_dimension": dim, "include_prompt": True,
               **{flag: mode == settings.pooling for flag, mode in _POOLING_FLAGS.items()}}
    (path / "1_Pooling").mkdir(exist_ok=True)
    _write_json(path / "1_Pooling" / "config.json", pooling)
    for layer in dense:
        name = f"{len(modules)}_Dense"
        linear, activation = layer[0], layer[1]
        (path / name).mkdir(exist_ok=True)
        _write_json(path / name / "config.json", {
            "in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None,
            "activation_function": f"{type(activation).__module__}.{type(activation).__name__}"})
        save_file({f"linear.{k}": v.detach().contiguous().cpu() for k, v in linear.state_dict().items()},
                  path / name / "model.safetensors")
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": name,
                        "type": "sentence_transformers.models.Dense"})
    if settings.normalize:
        name = f"{len(modules)}_Normalize"
        (path / name).mkdir(exist_ok=True)
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": name,
                        "type": "sentence_transformers.models.Normalize"})
    st_config = {"prompts": settings.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    _write_json(path / "modules.json", modules)
    _write_json(path / SBERT_CONFIG, {"max_seq_length": settings.max_seq_length, "do_lower_case": False})
    _write_json(path / ST_CONFIG, st_config)
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
