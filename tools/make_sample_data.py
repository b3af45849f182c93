"""Rebuild optical_ray/sample_data/ from the shared multilingual Flickr30k tables.

    python tools/make_sample_data.py ../shared/data/flickr30k-ml

The sample is what the embedded demo runs on where ../shared is absent: a seeded subset of the
Multi30k task-1 train and val images, and the whole Multi30k test_2018_flickr set, each with the
task-1 (en, de, fr, cs) rows and the MultiScript30k machine translations (ar, ay, es, gn, qu, uk, zh).
For the train and val images it also keeps their five Flickr30k English captions (Multi30k task 2), what
`optical-ray teacher` trains and evaluates an English caption<->caption retriever on.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parents[1] / "optical_ray" / "sample_data"
SPLITS = {"train": 1500, "val": 300, "test_2018_flickr": None}  # images kept (None: all)
NAMES = {"train": "train_captions", "val": "val_captions", "test_2018_flickr": "test_2018_captions"}
ENGLISH = {"train": "train_english_captions", "val": "val_english_captions"}  # the five captions per image


def main(shared: Path) -> None:
    for split, n_images in SPLITS.items():
        table = pa.concat_tables([pq.read_table(shared / f"multi30k_task1_{split}.parquet"),
                                  pq.read_table(shared / f"multiscript30k_mt_{split}.parquet")])
        images = np.unique(table["image_id"].to_numpy(zero_copy_only=False))
        if n_images is not None:
            images = np.random.default_rng(0).choice(images, size=n_images, replace=False)
        else:
            images = None
        write(table, images, NAMES[split])
        if split in ENGLISH:
            english = pq.read_table(shared / f"multi30k_task2_{split}.parquet")
            write(english.filter(pc.equal(english["lang"], "en")), images, ENGLISH[split])


def write(table: pa.Table, images: np.ndarray | None, name: str) -> None:
    if images is not None:
        table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(images)))
    table = table.sort_by([(c, "ascending") for c in ("image_id", "caption_idx", "lang", "source")])
    pq.write_table(table, OUT / f"{name}.parquet", compression="zstd")
    print(name, table.num_rows, "rows,", len(np.unique(table["image_id"].to_numpy(zero_copy_only=False))), "images")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
