"""`optical-ray data build`: the caption tables rebuilt from files in the upstream repositories'
formats. The fixture writes a few images of the shared tables back into those formats (gzip line files
with image lists, MultiScript30k's text files, IGLUE's jsonl, the Dutch description files); the build
must give back exactly the shared rows."""

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from optical_ray.data import DataError, read_captions
from optical_ray.upstream import MULTISCRIPT_LANGS, build_tables

IMAGES = {"val": 4, "test_2016_flickr": 3}


def shared_rows(shared: Path, name: str, images: list[str]) -> pa.Table:
    table = read_captions(str(shared / f"{name}.parquet"))
    return table.filter(pc.is_in(table["image_id"], value_set=pa.array(images)))


def text_of(table: pa.Table, image: str, lang: str, caption_idx: int | None = None) -> str:
    rows = [r for r in table.to_pylist() if r["image_id"] == image and r["lang"] == lang
            and (caption_idx is None or r["caption_idx"] == caption_idx)]
    assert len(rows) == 1, (image, lang, caption_idx, rows)
    return rows[0]["text"]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def upstream(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    picked = {}
    for split, n in IMAGES.items():
        # Images with every row the formats hold (the shared tables left a few German rows out).
        counts = {}
        for name, langs in ((f"multi30k_task1_{split}", ("en", "de", "fr", "cs")), (f"multi30k_task2_{split}", ("en", "de")),
                            (f"dutch_descriptions_{split}", ("nl",))):
            table = read_captions(str(shared_data / f"{name}.parquet"))
            for image, lang in zip(table["image_id"].to_pylist(), table["lang"].to_pylist()):
                counts.setdefault(image, {}).setdefault((name, lang), 0)
                counts[image][(name, lang)] += 1
        if split != "val":  # the shared tables left test_2016's German descriptions out (xFlickr&CO's test)
            counts = {i: {k: v for k, v in c.items() if k != (f"multi30k_task2_{split}", "de")} for i, c in counts.items()}
        need = 7 if split == "val" else 6
        complete = [i for i, c in counts.items() if len(c) == need and all(v == (1 if "task1" in k[0] else 5) for k, v in c.items())]
        picked[split] = sorted(complete)[:n]
    multi30k, multiscript, iglue, dutch = (root / n for n in ("multi30k", "multiscript", "iglue", "dutch"))
    for split, images in picked.items():
        task1 = shared_rows(shared_data, f"multi30k_task1_{split}", images)
        write_lines(multi30k / "data/task1/image_splits" / f"{split}.txt", [f"{i}.jpg" for i in images])
        for lang in ("en", "de", "fr", "cs"):
            write_lines(multi30k / "data/task1/raw" / f"{split}.{lang}.gz", [text_of(task1, i, lang) for i in images])
        task2_name = {"val": "val", "test_2016_flickr": "test_2016"}[split]
        task2 = shared_rows(shared_data, f"multi30k_task2_{split}", images)
        write_lines(multi30k / "data/task2/image_splits" / f"{task2_name}_images.txt", [f"{i}.jpg" for i in images])
        for lang in ("en", "de") if split == "val" else ("en",):
            for k in range(1, 6):
                write_lines(multi30k / "data/task2/raw" / f"{task2_name}.{k}.{lang}.gz",
                            [text_of(task2, i, lang, k - 1) for i in images])
        mt = shared_rows(shared_data, f"multiscript30k_mt_{split}", images)
        for lang, folder in MULTISCRIPT_LANGS.items():
            if lang in mt["lang"].to_pylist():
                write_lines(multiscript / f"multi30k-dataset-en-{folder}" / f"{split}.{folder}",
                            [text_of(mt, i, lang) for i in images])
        nl = shared_rows(shared_data, f"dutch_descriptions_{split}", images)
        folder = {"val": "Val/val", "test_2016_flickr": "Test/test"}[split]
        write_lines(dutch / "Data/splits" / f"{folder.split('/')[1]}_images.txt", [f"{i}.jpg" for i in images])
        for k in range(5):
            write_lines(dutch / "Data/Dutch" / f"{folder}.{k}", [text_of(nl, i, "nl", k) for i in images])
    gmt = shared_rows(shared_data, "iglue_flickr30k_val_mt_gmt", picked["val"])
    for lang in ("bn", "de", "es", "id", "ja", "ko", "ru", "tr", "zh"):
        write_lines(iglue / "datasets/flickr30k/annotations_machine-translate" / f"valid-{lang}_gmt.jsonl",
                    [json.dumps({"sentences": [text_of(gmt, i, lang), "An untranslated English caption."] ,
                                 "id": i, "img_path": f"{i}.jpg"}) for i in picked["val"]])
    return {"multi30k": multi30k, "multiscript30k_repo": multiscript, "iglue": iglue, "dutch": dutch,
            "images": picked}


def test_the_upstream_files_rebuild_the_shared_tables(upstream, shared_data, tmp_path):
    written = build_tables(str(tmp_path / "out"), **{k: v for k, v in upstream.items() if k != "images"})
    names = sorted(Path(uri).stem for uri in written)
    assert names == sorted([
        "multi30k_task1_val", "multi30k_task1_test_2016_flickr", "multi30k_task2_val", "multi30k_task2_test_2016_flickr",
        "multiscript30k_mt_val", "multiscript30k_mt_test_2016_flickr", "iglue_flickr30k_val_mt_gmt",
        "dutch_descriptions_val", "dutch_descriptions_test_2016_flickr"])
    for uri in written:
        name = Path(uri).stem
        split = "val" if name.endswith("val") or "val_" in name else "test_2016_flickr"
        built = read_captions(uri)
        expected = shared_rows(shared_data, name, upstream["images"][split])
        if name == "multi30k_task2_test_2016_flickr":  # its German is not in the shared tables (see the fixture)
            expected = expected.filter(pc.equal(expected["lang"], "en"))
        assert built.num_rows == expected.num_rows > 0, name
        assert built.to_pylist() == expected.to_pylist(), name  # same rows, same order, same caption_idx


def test_blank_lines_are_refused_by_name_or_dropped_and_counted(upstream, tmp_path, caplog):
    path = upstream["dutch"] / "Data/Dutch/Val/val.3"
    original = path.read_text()
    lines = original.splitlines()
    lines[1] = "   "
    path.write_text("\n".join(lines) + "\n")
    try:
        with pytest.raises(DataError, match=rf"{path}: line 2 is blank \(--drop-blank drops such lines\)"):
            build_tables(str(tmp_path / "refused"), dutch=upstream["dutch"])
        with caplog.at_level(logging.WARNING, logger="optical_ray"):
            written = build_tables(str(tmp_path / "dropped"), dutch=upstream["dutch"], drop_blank=True)
        val = read_captions(next(uri for uri in written if uri.endswith("dutch_descriptions_val.parquet")))
        assert val.num_rows == 5 * IMAGES["val"] - 1
        assert f"{path}: dropped 1 blank line (nl 1)" in caplog.text
    finally:
        path.write_text(original)


def test_a_line_count_that_does_not_match_the_images_is_an_error(upstream, tmp_path):
    path = upstream["multi30k"] / "data/task1/raw/val.fr.gz"
    original = path.read_bytes()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("Une ligne de trop.\n" * (IMAGES["val"] + 1))
    try:
        with pytest.raises(DataError, match=rf"{path}: {IMAGES['val'] + 1} lines for {IMAGES['val']} images"):
            build_tables(str(tmp_path / "out"), multi30k=upstream["multi30k"])
    finally:
        path.write_bytes(original)
