"""The caption tables, rebuilt from the files of their upstream repositories.

``optical-ray data build`` reads checkouts of the repositories that ../shared/data/flickr30k-ml was built
from (its README names them and their commits) and writes the same Parquet tables, one per source and
split, in the schema of :data:`optical_ray.data.CAPTION_COLUMNS`:

* Multi30k (github.com/multi30k/dataset): task 1 ``data/task1/raw/<split>.<lang>.gz``, line by line
  with ``data/task1/image_splits/<split>.txt``; ``caption_idx`` is the English line's index among the
  image's five Flickr30k captions (task 2's ``<split>.<k>.en.gz``), 0 for the non-Flickr30k test sets.
  Task 2 ``data/task2/raw/<split>.<k>.<lang>.gz`` with ``data/task2/image_splits/<split>_images.txt``.
* MultiScript30k (github.com/ufdatastudio/multi30k-extension): ``multi30k-dataset-en-<x>/<split>.<x>``,
  machine translations of the task 1 English, line by line.
* IGLUE (github.com/e-bug/iglue): ``datasets/flickr30k/annotations_machine-translate/valid-<lang>_gmt.jsonl``,
  whose first sentence translates Flickr30k caption 0 (the other four are untranslated English).
* Dutch descriptions (github.com/cltl/DutchDescriptions): ``Data/Dutch/{Val/val,Test/test}.<k>`` with
  ``Data/splits/{val,test}_images.txt``.

A blank line is an error naming the file and line, unless ``drop_blank``: then it is dropped and
counted per file and language. Line counts that do not match their image list are always errors.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa

from . import storage
from .data import CAPTION_COLUMNS, DataError, count_by_language, validate_captions

log = logging.getLogger(__name__)

TASK1_SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2018_flickr", "test_2017_mscoco")
TASK1_LANGS = ("en", "de", "fr", "cs")
# Task 2 names its splits differently; only Flickr30k images have five English captions there.
TASK2_SPLITS = {"train": "train", "val": "val", "test_2016_flickr": "test_2016"}
MULTISCRIPT_LANGS = {"ar": "ar_arab", "ay": "ay", "es": "es", "gn": "gn", "qu": "qu", "uk": "uk", "zh": "zh_hans"}
IGLUE_LANGS = ("bn", "de", "es", "id", "ja", "ko", "ru", "tr", "zh")
DUTCH_SPLITS = {"val": "Val/val", "test_2016_flickr": "Test/test"}


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n").strip() for line in f]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (is the repository checkout complete?)") from None


def image_list(path: Path) -> list[str]:
    """Image file names, one per line, as ids: ``1000092795.jpg`` -> ``1000092795``."""
    return [line.rsplit(".", 1)[0] for line in read_lines(path) if line]


def aligned(path: Path, images: list[str]) -> list[str]:
    lines = read_lines(path)
    if lines and lines[-1] == "" and len(lines) == len(images) + 1:
        lines = lines[:-1]  # a trailing newline
    if len(lines) != len(images):
        raise DataError(f"{path}: {len(lines)} lines for {len(images)} images; line-by-line alignment is unsafe")
    return lines


class TableBuilder:
    """Rows of one output table; blank texts refused (naming file and line) or dropped and counted."""

    def __init__(self, name: str, drop_blank: bool):
        self.name, self.drop_blank, self.rows, self.blank = name, drop_blank, [], {}

    def add(self, path: Path, line: int, image_id: str, caption_idx: int, lang: str, text: str, source: str) -> None:
        if not text:
            if not self.drop_blank:
                raise DataError(f"{path}: line {line + 1} is blank (--drop-blank drops such lines)")
            self.blank.setdefault(str(path), []).append(lang)
            return
        self.rows.append({"image_id": image_id, "caption_idx": caption_idx, "lang": lang, "text": text, "source": source})

    def table(self) -> pa.Table:
        for path, langs in self.blank.items():
            log.warning("%s: dropped %s", path, count_by_language(langs, "blank line"))
        table = pa.Table.from_pylist(self.rows, schema=pa.schema(CAPTION_COLUMNS))
        table = table.sort_by([("image_id", "ascending"), ("caption_idx", "ascending"), ("lang", "ascending"),
                               ("source", "ascending")])
        return validate_captions(table, self.name)


def task1_lines(repo: Path, split: str) -> tuple[list[str], list[int]]:
    """(image id, Flickr30k caption index) of each line of task 1's ``split``: what every line-aligned
    translation of it (task 1's own, MultiScript30k's) is keyed by."""
    images = image_list(repo / "data/task1/image_splits" / f"{split}.txt")
    english = aligned(repo / "data/task1/raw" / f"{split}.en.gz", images)
    return images, _flickr30k_caption_index(repo, split, images, english)


def multi30k_task1(repo: Path, split: str, drop_blank: bool = False) -> pa.Table:
    images, caption_idx = task1_lines(repo, split)
    out = TableBuilder(f"multi30k_task1_{split}", drop_blank)
    for lang in TASK1_LANGS:
        path = repo / "data/task1/raw" / f"{split}.{lang}.gz"
        if lang != "en" and not path.exists():
            continue  # not every split has every language (no Czech in test_2017, say)
        for i, text in enumerate(aligned(path, images)):
            out.add(path, i, images[i], caption_idx[i], lang, text, "multi30k-task1")
    return out.table()


def _flickr30k_caption_index(repo: Path, split: str, images: list[str], english: list[str]) -> list[int]:
    """For each task 1 English line, its index among the image's five Flickr30k captions (task 2)."""
    if split not in TASK2_SPLITS:
        return [0] * len(images)
    task2 = TASK2_SPLITS[split]
    task2_images = image_list(repo / "data/task2/image_splits" / f"{task2}_images.txt")
    captions = {}
    for k in range(1, 6):
        for image, text in zip(task2_images, aligned(repo / "data/task2/raw" / f"{task2}.{k}.en.gz", task2_images)):
            captions.setdefault(image, {}).setdefault(text, k - 1)
    index = []
    for i, (image, text) in enumerate(zip(images, english)):
        if text not in captions.get(image, {}):
            raise DataError(f"{repo}/data/task1/raw/{split}.en.gz: line {i + 1} is none of image {image}'s "
                            "five Flickr30k captions (task 2), so its caption_idx is unknown")
        index.append(captions[image][text])
    return index


def multi30k_task2(repo: Path, split: str, drop_blank: bool = False) -> pa.Table:
    task2 = TASK2_SPLITS[split]
    images = image_list(repo / "data/task2/image_splits" / f"{task2}_images.txt")
    out = TableBuilder(f"multi30k_task2_{split}", drop_blank)
    for lang in ("en", "de"):
        if lang != "en" and not any((repo / "data/task2/raw" / f"{task2}.{k}.{lang}.gz").exists() for k in range(1, 6)):
            continue
        for k in range(1, 6):
            path = repo / "data/task2/raw" / f"{task2}.{k}.{lang}.gz"
            for i, text in enumerate(aligned(path, images)):
                out.add(path, i, images[i], k - 1, lang, text, "multi30k-task2")
    return out.table()


def multiscript30k(repo: Path, multi30k: Path, split: str, drop_blank: bool = False) -> pa.Table | None:
    """Machine translations of task 1's English of ``split`` (``multi30k``: the Multi30k checkout)."""
    images, caption_idx = task1_lines(multi30k, split)
    out = TableBuilder(f"multiscript30k_mt_{split}", drop_blank)
    for lang, folder in MULTISCRIPT_LANGS.items():
        path = repo / f"multi30k-dataset-en-{folder}" / f"{split}.{folder}"
        if not path.exists():
            continue
        for i, text in enumerate(aligned(path, images)):
            out.add(path, i, images[i], caption_idx[i], lang, text, f"multiscript30k-mt-en2{folder}")
    return out.table() if out.rows else None


def iglue_val(repo: Path, drop_blank: bool = False) -> pa.Table:
    folder = repo / "datasets/flickr30k/annotations_machine-translate"
    out = TableBuilder("iglue_flickr30k_val_mt_gmt", drop_blank)
    for lang in IGLUE_LANGS:
        path = folder / f"valid-{lang}_gmt.jsonl"
        for i, line in enumerate(read_lines(path)):
            if not line:
                continue
            try:
                record = json.loads(line)
                image_id, text = str(record["id"]), str(record["sentences"][0]).strip()
            except (ValueError, KeyError, IndexError, TypeError) as err:
                raise DataError(f"{path}: line {i + 1}: not an IGLUE record with 'id' and 'sentences' ({err})") from None
            out.add(path, i, image_id, 0, lang, text, "iglue-flickr30k-val-gmt")
    return out.table()


def dutch_descriptions(repo: Path, split: str, drop_blank: bool = False) -> pa.Table:
    images = image_list(repo / "Data/splits" / f"{DUTCH_SPLITS[split].split('/')[1]}_images.txt")
    out = TableBuilder(f"dutch_descriptions_{split}", drop_blank)
    for k in range(5):
        path = repo / "Data/Dutch" / f"{DUTCH_SPLITS[split]}.{k}"
        for i, text in enumerate(aligned(path, images)):
            out.add(path, i, images[i], k, "nl", text, "cltl-dutch-descriptions")
    return out.table()


def build_tables(out: str, multi30k: Path | None = None, multiscript30k_repo: Path | None = None,
                 iglue: Path | None = None, dutch: Path | None = None, drop_blank: bool = False) -> list[str]:
    """Every table the given checkouts make, written under ``out`` (local or s3://). Returns their URIs."""
    tables: dict[str, pa.Table] = {}
    if multiscript30k_repo and not multi30k:
        raise DataError("MultiScript30k's lines are keyed by Multi30k's: give the Multi30k checkout too")
    if multi30k:
        for split in TASK1_SPLITS:
            if (multi30k / "data/task1/image_splits" / f"{split}.txt").exists():
                tables[f"multi30k_task1_{split}"] = multi30k_task1(multi30k, split, drop_blank)
        for split, task2 in TASK2_SPLITS.items():
            if (multi30k / "data/task2/image_splits" / f"{task2}_images.txt").exists():
                tables[f"multi30k_task2_{split}"] = multi30k_task2(multi30k, split, drop_blank)
    if multiscript30k_repo:
        for split in TASK1_SPLITS:
            if (multi30k / "data/task1/image_splits" / f"{split}.txt").exists():
                table = multiscript30k(multiscript30k_repo, multi30k, split, drop_blank)
                if table is not None:
                    tables[f"multiscript30k_mt_{split}"] = table
    if iglue:
        tables["iglue_flickr30k_val_mt_gmt"] = iglue_val(iglue, drop_blank)
    if dutch:
        for split in DUTCH_SPLITS:
            tables[f"dutch_descriptions_{split}"] = dutch_descriptions(dutch, split, drop_blank)
    if not tables:
        raise DataError("no upstream checkout given (--multi30k, --multiscript30k, --iglue, --dutch)")
    written = []
    for name, table in tables.items():
        uri = storage.join(out, f"{name}.parquet")
        storage.write_parquet(table, uri)
        log.info("%s: %d rows (%s)", uri, table.num_rows, count_by_language(table["lang"], "caption"))
        written.append(uri)
    return written
