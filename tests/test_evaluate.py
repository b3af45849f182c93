"""rank_queries and build_report on a hand-computed case: the retrieval logic, not the model, is under
test, so the encoder is a lookup table of fixed vectors."""

import numpy as np
import pyarrow as pa
import pytest

from optical_ray.evaluate import build_report, rank_queries

VECTORS = {  # English corpus captions (images a, b, c) and queries
    "a dog": [1.0, 0.0, 0.0], "a dog.": [1.0, 0.0, 0.0], "a cat": [0.0, 1.0, 0.0], "a car": [0.0, 0.0, 1.0],
    "ein Hund": [0.9, 0.1, 0.0],       # image a: the first corpus hit -> rank 1
    "eine Katze": [0.8, 0.6, 0.0],     # image b: "a dog" and "a dog." score higher -> rank 3
    "ein Auto": [0.0, 0.1, 0.9],       # image c -> rank 1
    "p'isi": [0.0, 1.0, 0.0],          # image b -> rank 1
    "anka": [0.1, 0.0, 0.0],           # image d has no English caption: never a hit
}


class LookupEncoder:
    def encode(self, texts, kind, batch_size=64, progress=None):
        return np.asarray([VECTORS[t] for t in texts], dtype=np.float32)


def captions(rows, caption_idx=None, source=None):
    image, lang, text = zip(*rows)
    return pa.table({"image_id": list(image), "caption_idx": caption_idx or [0] * len(rows), "lang": list(lang),
                     "text": list(text), "source": source or ["s"] * len(rows)})


TABLE = captions([("a", "en", "a dog"), ("a", "en", "a dog."), ("b", "en", "a cat"), ("c", "en", "a car"),
                  ("a", "en", "a dog"),  # the same caption from a second source: one corpus entry
                  ("a", "de", "ein Hund"), ("b", "de", "eine Katze"), ("c", "de", "ein Auto"),
                  ("b", "qu", "p'isi"), ("d", "qu", "anka")])


def test_ranks_per_language_by_hand():
    ranks = rank_queries(LookupEncoder(), TABLE, ["de", "qu"], progress=False)
    np.testing.assert_array_equal(ranks["de"], [1, 3, 1])
    assert ranks["qu"][0] == 1 and np.isinf(ranks["qu"][1])


def test_report_gap_is_high_minus_low_mean_r1():
    report = build_report(rank_queries(LookupEncoder(), TABLE, ["de", "qu"], progress=False), ["de"], ["qu"])
    assert report["languages"]["de"]["R@1"] == pytest.approx(2 / 3)
    assert report["languages"]["qu"]["R@1"] == pytest.approx(1 / 2)
    assert report["languages"]["de"]["R@5"] == 1.0
    assert report["gap"] == {"high": ["de"], "low": ["qu"], "R@1": pytest.approx(2 / 3 - 1 / 2)}


SEMANTIC = {"the dog runs": [1.0, 0.0, 0.0], "a brown animal": [0.6, 0.8, 0.0], "a dog on grass": [0.8, 0.6, 0.0],
            "a red car": [0.0, 0.0, 1.0], "a parked car": [0.0, 0.3, 0.95], "a kitten": [0.0, 1.0, 0.0],
            "der Hund rennt": [1.0, 0.0, 0.0], "ein rotes Auto": [0.0, 0.0, 1.0], "Hund": [0.5, 0.5, 0.0]}


class SemanticEncoder:
    def encode(self, texts, kind, batch_size=64, progress=None):
        return np.asarray([SEMANTIC[t] for t in texts], dtype=np.float32)


def test_semantic_protocol_masks_the_caption_a_query_translates():
    """3 images, 2 English captions each. A German query that translates caption 0 of its image finds
    that caption first; masked, it must find its image through caption 1, behind another image's caption."""
    table = captions([("a", "en", "the dog runs"), ("a", "en", "a brown animal"),
                      ("b", "en", "a dog on grass"), ("b", "en", "a kitten"),
                      ("c", "en", "a red car"), ("c", "en", "a parked car"),
                      ("a", "de", "der Hund rennt"), ("c", "de", "ein rotes Auto"),
                      ("b", "de", "Hund"),  # a German caption from an independent source: not a query
                      ], caption_idx=[0, 1, 0, 1, 0, 1, 0, 0, 1], source=["en"] * 6 + ["mt"] * 2 + ["other"])
    plain = rank_queries(SemanticEncoder(), table, ["de"], progress=False)["de"]
    masked = rank_queries(SemanticEncoder(), table, ["de"], progress=False, mask_source=True)["de"]
    np.testing.assert_array_equal(plain, [1, 1])
    # "der Hund rennt" without "the dog runs": "a dog on grass" (b, 0.8) beats "a brown animal" (a, 0.6).
    # "ein rotes Auto" without "a red car": "a parked car" (c, 0.95) is still first.
    np.testing.assert_array_equal(masked, [2, 1])
