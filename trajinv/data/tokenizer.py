"""Tokenizers for the data pipeline: raw bytes (default) or a `tokenizers` JSON file.

Both expose the same small surface, which is all `trajinv.data` needs:
``encode_batch(texts) -> list[np.ndarray]``, ``decode(ids) -> str``,
``vocab_size``, ``eos_id`` (the document separator, or None) and ``identity``
(a dict that changes whenever the token ids a text maps to could change; it goes
into the cache key and the manifest).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

import numpy as np

# Special tokens tried, in order, as the document separator of a JSON tokenizer.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<EOS>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    identity: dict

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train, identical everywhere.

    Byte 0 (NUL) separates documents: it never occurs in text, so the model sees an
    unambiguous boundary without growing the vocabulary past 256.
    """

    vocab_size = 256
    eos_id = 0
    identity = {"name": "bytes", "vocab_size": 256, "eos_id": 0}

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # errors="replace": a lone surrogate in a hub dataset must not kill a long run.
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizers` JSON file (``Tokenizer.from_file``).

    The separator is the first of the usual end-of-text special tokens found in the
    vocabulary (``<|endoftext|>``, ``</s>``, ...); failing that, the ids of ``"\\n"``;
    failing that (e.g. a whitespace-splitting WordLevel model), no separator.
    Special tokens are not added while encoding documents: the separator is inserted
    by the data pipeline, once per document.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path!r} (expected 'bytes' or a tokenizers JSON file)")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            self._tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"not a tokenizers JSON file: {path!r} ({_first_line(e)})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # the largest id + 1, not the number of tokens: a vocabulary with gaps ({..., "world": 300} in 3
        # tokens) gave ids past the model's embedding, which failed mid-training
        self.vocab_size = max(int(self._tok.get_vocab_size(with_added_tokens=True)), max(vocab.values(), default=-1) + 1)
        self._path = path
        self.eos_id = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
        self._sep = [self.eos_id] if self.eos_id is not None else list(self._tok.encode("\n", add_special_tokens=False).ids)
        self.identity = {
            "name": "tokenizers-json",
            "path": os.path.abspath(path),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }

    @property
    def separator(self) -> list[int]:
        return list(self._sep)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        dtype = token_dtype(self.vocab_size)
        # encode_batch parallelises in Rust; no Python worker processes needed.
        try:
            encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        except Exception as e:  # tokenizers raises a bare Exception (a WordLevel model without its unk token)
            raise ValueError(f"tokenizer {self._path!r} cannot encode the data ({_first_line(e)})") from None
        return [np.asarray(e.ids, dtype=dtype) for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _first_line(e: BaseException) -> str:
    """The first line of `e`'s message (its type when it has none): tokenizers' errors run long."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def separator_ids(tok: Tokenizer) -> list[int]:
    """Token ids appended after every document."""
    if isinstance(tok, JsonTokenizer):
        return tok.separator
    return [tok.eos_id] if tok.eos_id is not None else []


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` or a path to a `tokenizers` JSON file."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be 'bytes' or a path to a tokenizers JSON file, got {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    return JsonTokenizer(spec)
