import numpy as np
import pytest
import torch

from optical_ray.encoder import Encoder
from optical_ray.model_store import resolve_model

TEXTS = ["A man rides a bicycle.", "Zwei Kinder spielen im Sand am Strand.", "Una mujer lee."]


def test_content_mask_excludes_prompt_specials_and_padding(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir)
    batch = encoder.tokenize(["Ein Hund", "A dog runs fast"], "query")
    tokens = [encoder.tokenizer.convert_ids_to_tokens(ids) for ids in batch["input_ids"]]
    kept = [[t for t, keep in zip(row, mask) if keep] for row, mask in zip(tokens, batch["content_mask"])]
    assert kept[0] == ["▁Ein", "▁Hund"]
    assert "".join(kept[1]).replace("▁", " ").strip() == "A dog runs fast"
    assert not batch["content_mask"][0, batch["attention_mask"][0] == 0].any()


def test_per_text_prompts_match_one_prompt_batches(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir)
    mixed = encoder.tokenize(["Ein Hund", "A dog runs fast"], ["query", "passage"])
    for row, (text, prompt) in enumerate([("Ein Hund", "query"), ("A dog runs fast", "passage")]):
        alone = encoder.tokenize([text], prompt)
        n = alone["input_ids"].shape[1]
        assert torch.equal(mixed["input_ids"][row, :n], alone["input_ids"][0])
        assert torch.equal(mixed["content_mask"][row, :n], alone["content_mask"][0])
    with pytest.raises(ValueError, match="1 prompts for 2 texts"):
        encoder.tokenize(["a", "b"], ["query"])


def test_saved_model_loads_in_transformers_and_sentence_transformers(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    encoder = Encoder.load(tiny_model_dir)
    out = encoder.save(tmp_path / "saved")
    ours = encoder.encode(TEXTS, "query")

    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="query"), ours, atol=1e-5)

    model, loading = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing (pooler), unexpected or mismatched weights
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["query: " + t for t in TEXTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    np.testing.assert_allclose(pooled.numpy(), ours, atol=1e-5)


def test_freeze_word_embeddings(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir)
    encoder.freeze_word_embeddings()
    frozen = [n for n, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embeddings.word_embeddings.weight"]


def test_unknown_model_name_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not one of student-init, minilm-en"):
        resolve_model(tmp_path / "nope")


def test_shipped_teacher_loads():
    teacher = Encoder.load("minilm-en")
    emb = teacher.encode(["A dog runs.", "A puppy is running.", "The stock market fell."])
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_saved_tokenizer_names_a_class_transformers_4_knows(tmp_path, tiny_model_dir):
    """transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 (and servers pinned
    to it) cannot load; a saved student names the concrete fast class, and still loads here unchanged."""
    import json

    from optical_ray.st_folder import name_tokenizer_class

    encoder = Encoder.load(tiny_model_dir)
    saved = encoder.save(tmp_path / "student")
    config_path = saved / "tokenizer_config.json"
    assert json.loads(config_path.read_text())["tokenizer_class"] in ("XLMRobertaTokenizerFast", "XLMRobertaTokenizer")
    # What transformers 5 writes for a tokenizer built from tokenizer.json alone (student-init's case):
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "TokenizersBackend"}))
    name_tokenizer_class(saved)
    assert json.loads(config_path.read_text())["tokenizer_class"] == "XLMRobertaTokenizerFast"
    texts = ["Ein Hund rennt über eine Wiese.", "Allqu pampapi phawan."]
    again = Encoder.load(saved)
    assert again.tokenize(texts, "query")["input_ids"].tolist() == encoder.tokenize(texts, "query")["input_ids"].tolist()


def test_load_encodes_at_the_length_the_folder_states(tiny_model_dir, tmp_path):
    """A student trained at 64 tokens says so in its folder; every reader then encodes at 64 unless it
    asks for a length (as comparisons of several models do)."""
    import json

    saved = Encoder(*_parts(Encoder.load(tiny_model_dir)), max_length=64).save(tmp_path / "student")
    assert json.loads((saved / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert Encoder.load(saved).max_length == 64
    assert Encoder.load(saved, max_length=128).max_length == 128
    long_text = " ".join(["Hund"] * 200)
    assert Encoder.load(saved).tokenize([long_text])["input_ids"].shape[1] == 64
    (saved / "sentence_bert_config.json").unlink()
    assert Encoder.load(saved).max_length == 128  # a folder that does not say: the default


def _parts(encoder: Encoder) -> tuple:
    return encoder.model, encoder.tokenizer, encoder.prompts
