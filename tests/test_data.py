import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optical_ray import data, storage
from optical_ray.data import DataError


def captions(rows):
    cols = ["image_id", "caption_idx", "lang", "text", "source"]
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)},
                    schema=pa.schema([("image_id", pa.string()), ("caption_idx", pa.int32()), ("lang", pa.string()),
                                      ("text", pa.string()), ("source", pa.string())]))


T1 = "multi30k-task1"
ROWS = [
    ("img1", 0, "en", "A dog runs.", T1),
    ("img1", 0, "de", "Ein Hund rennt.", T1),
    ("img1", 0, "qu", "Allqu phawan.", "multiscript30k-mt-en2qu"),
    ("img2", 3, "en", "Two kids play.", T1),
    ("img2", 3, "de", "Zwei Kinder spielen.", T1),
    ("img2", 3, "de", "Zwei Kinder spielen.", T1),  # duplicate
    ("img2", 1, "de", "Kinder im Sand.", "multi30k-task2"),  # independent description
    ("img3", 0, "de", "Eine Frau liest.", T1),  # no English partner
    ("test1", 0, "en", "A cat sleeps.", T1),
    ("test1", 0, "de", "Eine Katze schläft.", T1),  # evaluation image
]


def write(tmp_path, table, name="t.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_bitext_pairs_join_and_account_for_every_dropped_row(tmp_path):
    table = data.read_captions(write(tmp_path, captions(ROWS)))
    pairs, report = data.bitext_pairs(table, ["de", "qu"], exclude_images={"test1"})
    got = sorted(zip(pairs["lang"].to_pylist(), pairs["english"].to_pylist(), pairs["translation"].to_pylist()))
    assert got == [("de", "A dog runs.", "Ein Hund rennt."), ("de", "Two kids play.", "Zwei Kinder spielen."),
                   ("qu", "A dog runs.", "Allqu phawan.")]
    assert report.pairs == {"de": 2, "qu": 1}
    assert report.reasons() == {"independent descriptions (not translations)": 1, "evaluation images": 1,
                              "duplicates": 1, "no English caption with the same image_id and caption_idx": 1}
    de_rows = sum(1 for r in ROWS if r[2] == "de")
    assert report.pairs["de"] + sum(report.dropped["de"].values()) == de_rows  # nothing lost silently


def test_image_pivot_pairs_a_caption_with_another_english_description_of_its_image(tmp_path):
    """By hand: img1 has English descriptions 0, 1 and 2 (Multi30k task 2); its German translation of
    description 1 gets description 2, the German independent description 0 gets 1, and the Quechua
    translation of 2 gets 0 (cyclically the next index there is). img2 has one English caption: its
    German translation has no other description to pair with, and is counted."""
    t2 = "multi30k-task2"
    rows = [("img1", 0, "en", "A dog runs.", t2), ("img1", 1, "en", "A brown dog on grass.", t2),
            ("img1", 2, "en", "An animal outdoors.", t2), ("img1", 1, "de", "Ein brauner Hund auf Gras.", T1),
            ("img1", 0, "de", "Ein Hund spielt draußen.", t2), ("img1", 2, "qu", "Uywa hawapi.", "multiscript30k-mt-en2qu"),
            ("img2", 0, "en", "Two kids play.", T1), ("img2", 0, "de", "Zwei Kinder spielen.", T1),
            ("test1", 0, "en", "A cat sleeps.", t2), ("test1", 1, "en", "A cat on a bed.", t2),
            ("test1", 0, "de", "Eine Katze schläft.", T1)]
    table = data.read_captions(write(tmp_path, captions(rows)))
    pairs, report = data.bitext_pairs(table, ["de", "qu"], exclude_images={"test1"}, pairing="image_pivot")
    got = sorted(zip(pairs["lang"].to_pylist(), pairs["translation"].to_pylist(), pairs["english"].to_pylist()))
    assert got == [("de", "Ein Hund spielt draußen.", "A brown dog on grass."),
                   ("de", "Ein brauner Hund auf Gras.", "An animal outdoors."),
                   ("qu", "Uywa hawapi.", "A dog runs.")]
    assert report.pairs == {"de": 2, "qu": 1}
    assert report.dropped == {"de": {"evaluation images": 1, "no other English description of the image": 1}}
    translated, _ = data.bitext_pairs(table, ["de", "qu"], exclude_images={"test1"})  # the default: translations
    assert sorted(translated["english"].to_pylist()) == ["A brown dog on grass.", "An animal outdoors.", "Two kids play."]
    with pytest.raises(DataError, match="pairing 'pivot' is not one of translation, image_pivot"):
        data.bitext_pairs(table, ["de"], pairing="pivot")


def test_bitext_for_a_language_with_no_pairs_is_an_error(tmp_path):
    table = data.read_captions(write(tmp_path, captions(ROWS)))
    with pytest.raises(DataError, match="no bitext pairs for language.*fr"):
        data.bitext_pairs(table, ["de", "fr"])
    with pytest.raises(DataError, match="bitext languages: 'xx' is not a valid BCP-47"):
        data.bitext_pairs(table, ["xx"])


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop_columns(["text"]), r"t.parquet: missing column 'text'"),
    (lambda t: t.set_column(1, "caption_idx", pa.array(["0"] * t.num_rows)), r"column 'caption_idx' has type string, expected an integer"),
    (lambda t: t.set_column(3, "text", pa.array([r[3] if i != 4 else "   " for i, r in enumerate(ROWS)])), r"t.parquet: row 4: field 'text' is empty"),
    (lambda t: t.set_column(2, "lang", pa.array([r[2] if i != 2 else "xx" for i, r in enumerate(ROWS)])), r"row 2: field 'lang': 'xx' is not a valid BCP-47"),
    (lambda t: t.set_column(2, "lang", pa.array([r[2] if i != 5 else "zh_Hant" for i, r in enumerate(ROWS)])),
     r"row 5: field 'lang': 'zh_Hant' is not a BCP-47 tag: subtags are separated by '-' \(did you mean 'zh-Hant'\?\)"),
    (lambda t: t.set_column(0, "image_id", pa.array([r[0] if i != 7 else None for i, r in enumerate(ROWS)], pa.string())), r"row 7: field 'image_id' is missing"),
])
def test_bad_tables_name_file_row_and_field(tmp_path, mutate, message):
    path = write(tmp_path, mutate(captions(ROWS)))
    with pytest.raises(DataError, match=message):
        data.read_captions(path)


def test_int64_caption_idx_is_accepted(tmp_path):
    table = captions(ROWS).set_column(1, "caption_idx", pa.array([r[1] for r in ROWS], pa.int64()))
    assert data.read_captions(write(tmp_path, table)).schema.field("caption_idx").type == pa.int32()


def test_s3_and_local_read_the_same(tmp_path, s3):
    local = write(tmp_path, captions(ROWS))
    uri = f"s3://{s3['bucket']}/captions/part-0.parquet"
    s3["client"].upload_file(local, s3["bucket"], "captions/part-0.parquet")
    assert data.read_captions(uri).equals(data.read_captions(local))
    assert data.read_captions(f"s3://{s3['bucket']}/captions").equals(data.read_captions(local))  # a folder


def test_missing_s3_key_bucket_and_corrupt_file_are_named(tmp_path, s3):
    with pytest.raises(storage.StorageError, match=r"s3://optical-ray-test/nope.parquet: no such file"):
        data.read_captions(f"s3://{s3['bucket']}/nope.parquet")
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        data.read_captions("s3://no-such-bucket/captions.parquet")
    s3["client"].put_object(Bucket=s3["bucket"], Key="bad/corrupt.parquet", Body=b"not parquet at all")
    with pytest.raises(storage.StorageError, match=r"s3://optical-ray-test/bad/corrupt.parquet: not a readable Parquet"):
        data.read_captions(f"s3://{s3['bucket']}/bad/corrupt.parquet")


def test_real_shared_bitext_keeps_evaluation_images_out(shared_data):
    train = data.read_captions([str(shared_data / "multi30k_task1_train.parquet"),
                                str(shared_data / "multiscript30k_mt_train.parquet"),
                                str(shared_data / "flickr30k_en_entities_train.parquet")])
    test_images = data.image_ids([str(shared_data / "multi30k_task1_test_2016_flickr.parquet")])
    pairs, report = data.bitext_pairs(train, ["de", "ay", "qu"], exclude_images=test_images)
    assert report.pairs == {"de": 29000, "ay": 29000, "qu": 29000}
    assert not set(pairs["image_id"].to_pylist()) & test_images
    # Entities' train split holds test images; their English captions must not pair in either.
    entities = data.read_captions(str(shared_data / "flickr30k_en_entities_train.parquet"))
    assert len(set(entities["image_id"].to_pylist()) & test_images) == 944


def test_corpus_is_deduplicated_and_queries_kept_in_order():
    table = captions([("a", 0, "en", "x", "s1"), ("a", 0, "en", "x", "s2"), ("b", 0, "en", "x", "s1"),
                      ("a", 0, "de", "q1", "s1"), ("b", 0, "de", "q2", "s1")])
    corpus = data.corpus_captions(table)
    assert corpus["text"].to_pylist() == ["x", "x"] and corpus["image_id"].to_pylist() == ["a", "b"]
    assert data.query_captions(table, "de")["text"].to_pylist() == ["q1", "q2"]
    with pytest.raises(DataError, match="no captions in query language 'fr'"):
        data.query_captions(table, "fr")


def test_blank_captions_are_dropped_and_counted_only_when_asked(tmp_path, caplog):
    import logging

    blank = {1, 2, 4}  # two German rows and a Quechua one
    table = captions([(r[0], r[1], r[2], "  " if i in blank else r[3], r[4]) for i, r in enumerate(ROWS)])
    path = write(tmp_path, table)
    with pytest.raises(DataError, match=r"t.parquet: row 1: field 'text' is empty \(drop_blank: true drops such rows\)"):
        data.read_captions(path)
    with caplog.at_level(logging.WARNING, logger="optical_ray"):
        kept = data.read_captions(path, drop_blank=True)
    assert kept.num_rows == len(ROWS) - 3 and "  " not in kept["text"].to_pylist()
    assert "t.parquet: dropped 3 blank captions (de 2, qu 1)" in caplog.text


def test_distill_config_drop_blank_reaches_the_training_data(tmp_path):
    from optical_ray.config import DistillConfig, load_config
    from optical_ray.distill import load_bitext

    table = captions([(r[0], r[1], r[2], "" if i == 1 else r[3], r[4]) for i, r in enumerate(ROWS)])
    cfg = load_config(DistillConfig, {"data": {"train": [write(tmp_path, table)], "languages": ["de", "qu"],
                                               "exclude_images_from": []}})
    with pytest.raises(DataError, match="row 1: field 'text' is empty"):
        load_bitext(cfg)
    cfg.data.drop_blank = True
    assert sorted(load_bitext(cfg)["translation"].to_pylist()) == ["Allqu phawan.", "Eine Katze schläft.", "Zwei Kinder spielen."]
