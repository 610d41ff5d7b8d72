"""Tokenize a source once, split it by documents, cache the tokens as memmaps: `load_data`.

The cache folder ``cache_dir/<source>-<key>/`` holds ``train.bin``, ``val.bin``
and ``manifest.json``, written atomically, arrays first: a manifest on disk
means complete arrays beside it. Tokenization works in a scratch folder
``cache_dir/.hf-scratch-<pid>-*`` removed afterwards; what a killed process left
(its scratch folder, temporary files of interrupted writes) is removed by the next
`load_data` once that pid no longer runs. The key hashes the source identity, the
tokenizer, ``text_field``, ``val_fraction`` and ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trajinv.atomic import pid_alive, atomic_write, remove_stale_temps
from trajinv.config import DataConfig, default
from trajinv.data.batches import check_int
from trajinv.data.sources import DataError, no_progress_bars, one_line, resolve_source
from trajinv.data.tokenizer import Tokenizer, load_tokenizer, separator_ids, token_dtype

_FORMAT = 1  # bump when the on-disk layout or the pipeline's output changes
_SPLIT_SEED = 0x7A1D  # the train/val split must not move when the batch seed does


@dataclass
class TokenData:
    """The tokenized, split corpus returned by ``load_data``."""

    train: np.ndarray
    """1-D read-only memmap of token ids (uint16 if the vocabulary fits, else uint32)."""
    val: np.ndarray
    """1-D read-only memmap of the held-out documents' token ids."""
    vocab_size: int
    """Number of token ids (256 for bytes)."""
    manifest: dict
    """source, content_hash, tokens (total/train/val), tokenizer, split, documents, ..."""


# ----------------------------------------------------------------------------- tokenize


def _tokenize(ds, column: str, tok: Tokenizer, max_tokens: int | None) -> tuple[np.ndarray, np.ndarray, str, int]:
    """Documents -> (flat ids with a separator after each document, per-document lengths,
    sha256 of the documents' UTF-8 text, number of documents read).

    With ``max_tokens`` only as many documents as needed are tokenized (chunks of
    doubling size), and the last one is cut so the stream has exactly the cap.
    """
    import datasets
    import pyarrow.compute as pc

    dtype = token_dtype(tok.vocab_size)
    sep = np.asarray(separator_ids(tok), dtype=dtype)
    # "absent": the document had no text (no such key in its JSON line, or null); counted where it is taken
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name)), "absent": datasets.Value("bool")})
    digest = hashlib.sha256()

    def encode(batch: dict) -> dict:
        texts = batch[column]
        for t in texts:
            if t is not None and not isinstance(t, str):
                raise DataError(f"column {column!r} holds {type(t).__name__} values, not text")
        absent = [t is None for t in texts]
        texts = [t or "" for t in texts]
        for t in texts:  # runs in this process, in order (num_proc=None): a deterministic digest
            digest.update(t.encode("utf-8", errors="replace") + b"\0")
        return {"ids": [np.concatenate([ids.astype(dtype, copy=False), sep]) if len(ids) else ids.astype(dtype) for ids in tok.encode_batch(texts)],
                "absent": absent}

    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    total = 0
    n_read = 0
    missing = 0  # documents without the text field (absent from a JSON line, or null): skipped, and said

    def take(tokenized) -> None:
        nonlocal total, missing
        missing += int(pc.sum(tokenized.data.column("absent")).as_py() or 0)
        table = tokenized.data.column("ids")
        lens = pc.list_value_length(table).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(table).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        pieces.append(flat)
        lengths.append(lens)
        total += int(flat.size)

    if isinstance(ds, datasets.IterableDataset):
        # Streaming hub data: batches in order until the cap is reached.
        it = ds.select_columns([column]).map(encode, batched=True, batch_size=256, remove_columns=[column], features=features)
        buf: list[np.ndarray] = []
        try:
            for row in it:
                n_read += 1
                missing += bool(row["absent"])
                buf.append(np.asarray(row["ids"], dtype=dtype))
                total += len(buf[-1])
                if max_tokens is not None and total >= max_tokens:
                    break
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading the hub stream failed: {one_line(e)}") from None
        lengths = [np.asarray([len(b) for b in buf], dtype=np.int64)]
        pieces = [np.concatenate(buf) if buf else np.zeros(0, dtype)]
    else:
        from tqdm.auto import tqdm

        ds = ds.select_columns([column])
        n = len(ds)
        # Chunks of doubling size: with a cap, only the documents it needs; without, a bar that moves. The bar
        # is ours, on a terminal only and erased when done (datasets' own stayed above a one-line error about
        # the data, such as too few tokens for --eval-seqs, and filled CI logs with carriage returns).
        start, size = 0, (64 if max_tokens is not None else max(1024, n // 16))
        with no_progress_bars(), tqdm(total=n, desc="tokenize", unit=" docs", leave=False, disable=None) as bar:
            while start < n and (max_tokens is None or total < max_tokens):
                chunk = ds.select(range(start, min(n, start + size))) if (start, size) != (0, n) else ds
                key = f"{ds._fingerprint}-{start}-{size}-{tok.identity}"
                tokenized = chunk.map(encode, batched=True, batch_size=256, remove_columns=[column], features=features,
                                      keep_in_memory=True, new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
                take(tokenized)
                n_read += len(chunk)
                start += len(chunk)
                size *= 2
                bar.update(len(chunk))

    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if max_tokens is not None and flat.size > max_tokens:
        flat = flat[:max_tokens]
        ends = np.cumsum(lens)
        keep = int(np.searchsorted(ends, max_tokens, side="left")) + 1  # documents touched by the cap
        lens = lens[:keep].copy()
        lens[-1] -= int(ends[keep - 1] - max_tokens)
    nonempty = lens > 0
    if missing:
        print(f"note: {missing} of {n_read} documents have no {column!r} (absent or null) and were skipped; "
              "if they hold their text under another name, name it with --text-field", file=sys.stderr, flush=True)
    return flat, lens[nonempty], digest.hexdigest(), n_read


def split_documents(lengths: np.ndarray, val_fraction: float) -> tuple[np.ndarray | None, str]:
    """Choose validation documents: a fixed shuffle, taken greedily until their
    tokens reach ``val_fraction`` of the total (documents that would overshoot the
    target by half are skipped). Returns (boolean mask over documents, "documents"),
    or (None, "tail_tokens") when documents are too few or too large to split this way.
    """
    n = len(lengths)
    total = int(lengths.sum())
    target = val_fraction * total
    if n < 2 or target < 1:
        return None, "tail_tokens"
    order = np.random.Generator(np.random.PCG64(_SPLIT_SEED)).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    got = 0
    for i in order:
        if got >= target:
            break
        if got + lengths[i] <= 1.5 * target:
            is_val[i] = True
            got += int(lengths[i])
    if got < 0.5 * target or is_val.all():
        return None, "tail_tokens"
    return is_val, "documents"


# ----------------------------------------------------------------------------- cache


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, or ``$TRAJINV_CACHE`` when the config leaves the default."""
    env = os.environ.get("TRAJINV_CACHE")
    return Path(env if env and cfg.cache_dir == default(DataConfig, "cache_dir") else cfg.cache_dir).expanduser()


def _open_cached(folder: Path, key: str) -> TokenData | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    dtype = np.dtype(manifest["dtype"])
    arrays = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        n = int(manifest["tokens"][split])
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            return None
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
    return TokenData(train=arrays[0], val=arrays[1], vocab_size=int(manifest["vocab_size"]), manifest=manifest)


_SCRATCH = ".hf-scratch-"


def _remove_stale_scratch(root: Path) -> None:
    """Scratch folders of tokenizations whose process is gone (killed mid-way)."""
    for d in root.glob(f"{_SCRATCH}*"):
        pid = d.name[len(_SCRATCH):].split("-")[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _validate(cfg: DataConfig) -> None:
    if not isinstance(cfg.source, str) or not cfg.source:
        raise DataError(f"data source must be a non-empty string, got {cfg.source!r}")
    if not isinstance(cfg.text_field, str) or not cfg.text_field:
        raise DataError(f"text_field must be a non-empty string, got {cfg.text_field!r}")
    if isinstance(cfg.val_fraction, bool) or not isinstance(cfg.val_fraction, numbers.Real) or not 0 < cfg.val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    if cfg.max_tokens is not None and (
        isinstance(cfg.max_tokens, bool) or not isinstance(cfg.max_tokens, numbers.Integral) or cfg.max_tokens < 2
    ):
        raise DataError(f"max_tokens must be None or an integer >= 2, got {cfg.max_tokens!r}")
    check_int("seed", cfg.seed, 0)


def load_data(cfg: DataConfig) -> TokenData:
    """Tokenize ``cfg.source`` once into cached memmaps; reuse them while the key matches.

    The returned ``manifest`` records: source (string and resolved identity),
    content_hash (sha256 of the UTF-8 text of every document read, each followed by NUL), tokenizer identity, vocab_size,
    dtype, tokens (total / train / val), documents (total / train / val), split mode,
    val_fraction, max_tokens and the cache key.
    """
    _validate(cfg)
    try:
        tok = load_tokenizer(cfg.tokenizer)
    except ValueError as e:
        raise DataError(str(e)) from None
    root = cache_root(cfg)
    src = resolve_source(cfg, root)
    key_fields = {
        "format": _FORMAT,
        "source": src.identity,
        "text_field": cfg.text_field if src.kind != "stdlib" else "text",
        "tokenizer": tok.identity,
        "val_fraction": float(cfg.val_fraction),
        "max_tokens": None if cfg.max_tokens is None else int(cfg.max_tokens),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    folder = root / f"{src.slug}-{key[:16]}"
    cached = _open_cached(folder, key)
    if cached is not None:
        return cached

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {str(root)!r}: {one_line(e)}") from None
    _remove_stale_scratch(root)
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{_SCRATCH}{os.getpid()}-") as scratch:
        ds, column = src.load(Path(scratch))
        flat, lens, content_hash, n_read = _tokenize(ds, column, tok, cfg.max_tokens)
    if flat.size < 2:
        raise DataError(f"data source {cfg.source!r} yields {flat.size} tokens; need at least 2")

    is_val, mode = split_documents(lens, float(cfg.val_fraction))
    if is_val is None:
        n_val = min(flat.size - 1, max(1, int(round(cfg.val_fraction * flat.size))))
        train, val = flat[: flat.size - n_val], flat[flat.size - n_val :]
        docs = {"total": int(lens.size), "train": None, "val": None}
    else:
        mask = np.repeat(is_val, lens)
        train, val = flat[~mask], flat[mask]
        docs = {"total": int(lens.size), "train": int((~is_val).sum()), "val": int(is_val.sum())}

    manifest = {
        "format": _FORMAT,
        "key": key,
        "source": cfg.source,
        "source_identity": src.identity,
        "text_field": key_fields["text_field"],
        "content_hash": content_hash,
        "tokenizer": tok.identity,
        "vocab_size": int(tok.vocab_size),
        "dtype": flat.dtype.name,
        "tokens": {"total": int(flat.size), "train": int(train.size), "val": int(val.size)},
        "documents": docs,
        "documents_read": int(n_read),
        "split": mode,
        "val_fraction": float(cfg.val_fraction),
        "max_tokens": key_fields["max_tokens"],
        "created_unix": time.time(),
    }
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {str(folder)!r}: {one_line(e)}") from None
    remove_stale_temps(folder)
    # Arrays first, manifest last: a manifest on disk means complete arrays beside it.
    atomic_write(folder / "train.bin", lambda f: f.write(np.ascontiguousarray(train).tobytes()))
    atomic_write(folder / "val.bin", lambda f: f.write(np.ascontiguousarray(val).tobytes()))
    atomic_write(folder / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2) + "\n"), mode="w")
    opened = _open_cached(folder, key)
    assert opened is not None, f"cache just written in {folder} does not read back"
    return opened


