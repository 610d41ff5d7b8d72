"""Token data: load text through Hugging Face `datasets`, tokenize once, cache as memmaps.

Sources (``DataConfig.source``):

- ``"stdlib"`` (default): the Python standard library's own ``.py`` files on this
  machine (sorted by relative path; test folders, ``site-packages`` and caches
  excluded). Real text that is there offline on every machine: about 12 MB in
  ~730 files on CPython 3.11, i.e. ~12M byte tokens.
- a path to a ``.txt`` / ``.jsonl`` (``.json``) / ``.parquet`` file, or a folder
  of them (searched recursively, sorted). A text file is one document; a jsonl
  line or parquet row is one document, its text in ``text_field``.
- ``"hf:<name>[:<config>]"``: the ``train`` split of a hub dataset (online only;
  with ``max_tokens`` it is streamed, so only what is used is downloaded).

Pipeline: documents -> ``Dataset.map(batched=True)`` with the tokenizer ->
one flat token stream, each document followed by the separator (byte 0 for
bytes, the tokenizer's end-of-text token otherwise) -> deterministic split by
*documents* (train and validation never share a file) -> two ``.bin`` files
written atomically (temp file + rename) plus ``manifest.json`` in
``cache_dir/<source>-<key>/``. The key hashes the source (file names, sizes,
mtimes), the tokenizer (its JSON's sha256), ``text_field``, ``val_fraction``
and ``max_tokens``; a later ``load_data`` with the same key memory-maps the
files and does no tokenization. Delete the folder to force a rebuild.

Batches: ``sample_batch`` draws random windows from a generator seeded by
``(seed, step)`` only. The data position *is* the step counter: a run resumed at
step s sees exactly the batches of an uninterrupted run, and every member of a
population (which all call it with the same seed and step) sees the same
batches. ``validation_batches`` is a fixed set of evenly spaced windows.

Validation size: ``DEFAULT_VAL_SEQS = 512`` windows of the trainer's context
(32,768 tokens at context 64). The stdlib validation split is ~607k tokens
(52 of 731 documents), so these windows never overlap. The set is fixed, so
every member and every step is scored on the same tokens. Measured with a byte
bigram model fit on the stdlib train split, at context 64 the per-window mean
loss has a standard deviation of 0.43 nat. The mean over 50 random sets of 512
windows varied with a std of 0.019 nat, against 0.092 for sets of 16 windows
(the "too noisy" size in DESIGN.md). Differences between members on the one
fixed set are paired, so they are less noisy still.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trajinv.atomic import atomic_write
from trajinv.tokenizer import Tokenizer, load_tokenizer, separator_ids, token_dtype

DEFAULT_CACHE_DIR = ".cache/trajinv"
DEFAULT_VAL_SEQS = 512
"""Default number of validation windows (see the module docstring for why)."""

_FORMAT = 1  # bump when the on-disk layout or the pipeline's output changes
_SPLIT_SEED = 0x7A1D  # the train/val split must not move when the batch seed does
_TEXT_EXT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test"}


class DataError(ValueError):
    """Bad data input; the message is one line and names the bad value."""


@dataclass
class DataConfig:
    """Where the tokens come from and how they are split and cached."""

    source: str = "stdlib"
    """``"stdlib"``; a path to a .txt/.jsonl/.parquet file or a folder of them;
    or ``"hf:<name>[:<config>]"`` (hub dataset, ``train`` split, online only)."""

    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hub datasets (text files are always ``text``)."""

    tokenizer: str = "bytes"
    """``"bytes"`` (UTF-8 bytes, vocabulary 256) or a path to a `tokenizers` JSON file."""

    cache_dir: str = DEFAULT_CACHE_DIR
    """Where token memmaps and manifests live. If left at the default and the
    environment variable ``TRAJINV_CACHE`` is set, that is used instead."""

    val_fraction: float = 0.05
    """Share of tokens held out for validation, chosen as whole documents by a
    fixed (seed-independent) shuffle; tail tokens if there are too few documents."""

    seed: int = 0
    """Seeds batch sampling (``sample_batch``); does not change the split."""

    max_tokens: int | None = None
    """Cap on the total token count (train + val), taking documents in order; for quick runs and tests."""


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


# ----------------------------------------------------------------------------- sources


@dataclass
class _Source:
    kind: str  # "stdlib" | "files" | "hub"
    slug: str  # readable prefix of the cache folder
    identity: dict  # goes into the cache key
    load: Callable[[Path], Any]  # scratch dir -> (Dataset | IterableDataset, text column)


def _is_test_dir(part: str) -> bool:
    return part.startswith("test") or part in _SKIP_DIRS


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, test folders excluded."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so site-packages (often far larger than the stdlib) is never walked.
        dirnames[:] = [d for d in dirnames if not _is_test_dir(d)]
        rel_dir = Path(dirpath).relative_to(root)
        rels.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return [root / r for r in sorted(rels)]


def _stat_list(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in files:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _files_digest(stats: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _stdlib_source() -> _Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise DataError(f"no .py files found in the standard library folder {str(root)!r}")
    identity = {
        "kind": "stdlib",
        "root": str(root),
        "python": sys.version.split()[0],
        "n_files": len(files),
        "files_sha256": _files_digest(_stat_list(files, root)),
    }

    def load(scratch: Path):
        import datasets

        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return datasets.Dataset.from_dict({"text": texts}), "text"

    return _Source("stdlib", "stdlib", identity, load)


def _file_source(source: str, text_field: str) -> _Source:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_EXT and not p.name.startswith(".")),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"no .txt/.jsonl/.parquet files in data folder {source!r}")
        root = path
    elif path.is_file():
        if path.suffix.lower() not in _TEXT_EXT:
            raise DataError(f"unsupported data file type {path.suffix!r} for {source!r} (use .txt, .jsonl or .parquet)")
        files, root = [path], path.parent
    else:
        raise DataError(
            f"data source not found: {source!r} (expected 'stdlib', a .txt/.jsonl/.parquet file or folder, or 'hf:<name>[:<config>]')"
        )
    identity = {
        "kind": "files",
        "path": str(path.resolve()),
        "n_files": len(files),
        "files_sha256": _files_digest(_stat_list(files, root)),
    }

    def load(scratch: Path):
        import datasets

        # Group by builder, keeping sorted order within each group; HF's own cache
        # goes to a scratch folder inside ours, deleted after tokenization.
        parts = []
        for builder in ("text", "json", "parquet"):
            group = [str(p) for p in files if _TEXT_EXT[p.suffix.lower()] == builder]
            if not group:
                continue
            kwargs = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(
                    builder, data_files=group, split="train", cache_dir=str(scratch), keep_in_memory=True, **kwargs
                )
            except Exception as e:
                raise DataError(f"cannot read {builder} data from {source!r}: {_one_line(e)}") from None
            column = "text" if builder == "text" else text_field
            if column not in ds.column_names:
                raise DataError(f"text_field {column!r} not found in {source!r} (columns: {', '.join(ds.column_names)})")
            ds = ds.select_columns([column])
            # One column name across builders (so they concatenate), and errors name the user's field.
            parts.append(ds.rename_column(column, text_field) if column != text_field else ds)
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return ds, text_field

    return _Source("files", _slug(path.stem or path.name), identity, load)


def _hub_source(source: str, text_field: str, max_tokens: int | None, cache_root: Path) -> _Source:
    spec = source[3:]
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"hub source needs a dataset name: {source!r} (use 'hf:<name>[:<config>]')")
    config = config or None
    identity = {"kind": "hub", "name": name, "config": config, "split": "train"}

    def load(scratch: Path):
        import datasets

        label = f"{name!r}" + (f" (config {config!r})" if config else "")
        try:
            ds = datasets.load_dataset(
                name, config, split="train", cache_dir=str(cache_root / "hf"), streaming=max_tokens is not None
            )
        except Exception as e:
            raise DataError(f"cannot load hub dataset {label}: {_one_line(e)}") from None
        if ds.column_names is not None and text_field not in ds.column_names:
            raise DataError(f"text_field {text_field!r} not found in hub dataset {label} (columns: {', '.join(ds.column_names)})")
        return ds, text_field

    return _Source("hub", _slug(name), identity, load)


def _resolve_source(cfg: DataConfig, cache_root: Path) -> _Source:
    if cfg.source == "stdlib":
        return _stdlib_source()
    if cfg.source.startswith("hf:"):
        return _hub_source(cfg.source, cfg.text_field, cfg.max_tokens, cache_root)
    return _file_source(cfg.source, cfg.text_field)


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
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))})
    digest = hashlib.sha256()

    def encode(batch: dict) -> dict:
        texts = batch[column]
        for t in texts:
            if t is not None and not isinstance(t, str):
                raise DataError(f"column {column!r} holds {type(t).__name__} values, not text")
        texts = [t or "" for t in texts]
        for t in texts:  # runs in this process, in order (num_proc=None): a deterministic digest
            digest.update(t.encode("utf-8", errors="replace") + b"\0")
        return {"ids": [np.concatenate([ids.astype(dtype, copy=False), sep]) if len(ids) else ids.astype(dtype) for ids in tok.encode_batch(texts)]}

    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    total = 0
    n_read = 0

    def take(tokenized) -> None:
        nonlocal total
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
                buf.append(np.asarray(row["ids"], dtype=dtype))
                total += len(buf[-1])
                if max_tokens is not None and total >= max_tokens:
                    break
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading the hub stream failed: {_one_line(e)}") from None
        lengths = [np.asarray([len(b) for b in buf], dtype=np.int64)]
        pieces = [np.concatenate(buf) if buf else np.zeros(0, dtype)]
    else:
        ds = ds.select_columns([column])
        n = len(ds)
        start, size = 0, (n if max_tokens is None else 64)
        while start < n and (max_tokens is None or total < max_tokens):
            chunk = ds.select(range(start, min(n, start + size))) if (start, size) != (0, n) else ds
            fingerprint = hashlib.sha256(f"{ds._fingerprint}-{start}-{size}-{tok.identity}".encode()).hexdigest()[:32]
            tokenized = chunk.map(
                encode,
                batched=True,
                batch_size=256,
                remove_columns=[column],
                features=features,
                keep_in_memory=True,
                new_fingerprint=fingerprint,
                desc="tokenize",
            )
            take(tokenized)
            n_read += len(chunk)
            start += len(chunk)
            size *= 2

    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if max_tokens is not None and flat.size > max_tokens:
        flat = flat[:max_tokens]
        ends = np.cumsum(lens)
        keep = int(np.searchsorted(ends, max_tokens, side="left")) + 1  # documents touched by the cap
        lens = lens[:keep].copy()
        lens[-1] -= int(ends[keep - 1] - max_tokens)
    nonempty = lens > 0
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


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _slug(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return keep.strip("._")[:40] or "data"


def cache_root(cfg: DataConfig) -> Path:
    """``cfg.cache_dir``, or ``$TRAJINV_CACHE`` when the config leaves the default."""
    env = os.environ.get("TRAJINV_CACHE")
    return Path(env if env and cfg.cache_dir == DEFAULT_CACHE_DIR else cfg.cache_dir).expanduser()


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
    _check_int("seed", cfg.seed, 0)


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
    src = _resolve_source(cfg, root)
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
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {str(folder)!r}: {_one_line(e)}") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".hf-scratch-") as scratch:
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
    # Arrays first, manifest last: a manifest on disk means complete arrays beside it.
    atomic_write(folder / "train.bin", lambda f: f.write(np.ascontiguousarray(train).tobytes()))
    atomic_write(folder / "val.bin", lambda f: f.write(np.ascontiguousarray(val).tobytes()))
    atomic_write(folder / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2) + "\n"), mode="w")
    opened = _open_cached(folder, key)
    assert opened is not None, f"cache just written in {folder} does not read back"
    return opened


# ----------------------------------------------------------------------------- batches


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise DataError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    buf = np.asarray(tokens[idx], dtype=np.int64)
    return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for training step ``step``: ``x, y`` int64 of shape (batch_size, seq_len), ``y`` = ``x`` shifted by one.

    Starts come from PCG64 seeded by ``SeedSequence([seed, step])``: its raw 64-bit
    output, which NumPy guarantees stable across versions and platforms, reduced
    modulo the number of starts (bias below 2^-24 for any corpus under 2^40 tokens).
    No state is carried between calls, so resuming at step s reproduces the
    uninterrupted stream, and members that share seed and step share batches.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_starts = tokens.size - seq_len
    if n_starts < 1:
        raise DataError(f"seq_len {seq_len} needs at least {seq_len + 1} tokens, got {tokens.size}")
    raw = np.random.PCG64(np.random.SeedSequence([seed, step])).random_raw(batch_size)
    starts = (raw % np.uint64(n_starts)).astype(np.int64)
    return _windows(tokens, starts, seq_len)


def validation_batches(tokens: np.ndarray, seq_len: int, n_seqs: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``n_seqs`` non-overlapping, evenly spaced windows of
    ``seq_len + 1`` tokens covering the split, as batches of at most ``batch_size``.

    ``DEFAULT_VAL_SEQS`` (512) is the recommended ``n_seqs``; see the module docstring.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    n_seqs = _check_int("n_seqs", n_seqs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if tokens.ndim != 1:
        raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    width = seq_len + 1
    fit = tokens.size // width
    if n_seqs > fit:
        raise DataError(f"n_seqs {n_seqs} windows of {width} tokens do not fit in {tokens.size} tokens (at most {fit})")
    stride = (tokens.size - width) // (n_seqs - 1) if n_seqs > 1 else 0
    starts = np.arange(n_seqs, dtype=np.int64) * stride
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, n_seqs, batch_size)]


__all__ = [
    "DEFAULT_VAL_SEQS",
    "DataConfig",
    "DataError",
    "TokenData",
    "cache_root",
    "load_data",
    "sample_batch",
    "split_documents",
    "stdlib_files",
    "validation_batches",
]
