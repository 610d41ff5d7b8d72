"""Where documents come from: the embedded stdlib corpus, local files, or a hub dataset.

Each source is resolved to a `_Source`: a readable slug, an identity that goes
into the cache key (file names, sizes, mtimes, ctimes; the dataset name), and a loader
that returns a Hugging Face dataset and its text column.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import socket
import sys
import sysconfig
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from trajinv.config import DataConfig

_TEXT_EXT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idle_test"}


class DataError(ValueError):
    """Bad data input; the message is one line and names the bad value."""


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


def _stat_list(files: list[Path], root: Path) -> list[tuple[str, int, int, int]]:
    """(name, size, mtime, ctime) per file: ctime too, since an edit that keeps the size and puts the
    mtime back (os.utime, `cp -p`, `rsync -t`) was served stale from the cache; nothing sets ctime."""
    out = []
    for p in files:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return out


def _files_digest(stats: list[tuple[str, int, int, int]]) -> str:
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


def _file_source(source: str, text_field: str, cache_root: Path | None = None) -> _Source:
    path = Path(source).expanduser()
    if path.is_dir():
        # Not hidden files nor anything under a hidden folder (.cache/, .ipynb_checkpoints/), nor the token
        # cache: with the default cache (./.cache/trajinv) `--data .` read its own manifest.json back as data
        cache = cache_root.resolve() if cache_root is not None else None
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_EXT
             and not any(part.startswith(".") for part in p.relative_to(path).parts)
             and not (cache is not None and p.resolve().is_relative_to(cache))),
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
    stats = _stat_list(files, root)
    if not any(size for _, size, *_ in stats):
        raise DataError(f"data source {source!r} is empty (0 bytes)")
    identity = {
        "kind": "files",
        "path": str(path.resolve()),
        "n_files": len(files),
        "files_sha256": _files_digest(stats),
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
            column = "text" if builder == "text" else text_field

            def read(names: list[str]):
                with no_progress_bars():
                    ds = datasets.load_dataset(
                        builder, data_files=names, split="train", cache_dir=str(scratch), keep_in_memory=True, **kwargs
                    )
                if builder == "json":  # pyarrow's JSON reader keeps invalid UTF-8, which would fail mid-tokenize
                    ds.data.validate(full=True)
                return ds

            try:
                ds = read(group)
            except Exception as e:
                # datasets reports bad encoding as "An error occurred while generating the dataset":
                # find the file and byte it means (only on failure, so a good corpus is read once).
                def where(name: str) -> str:  # a file of a folder is named with the folder
                    return f"{name!r} (in {source!r})" if name != str(path) else repr(name)

                bad = _first_non_utf8(group) if builder != "parquet" else None
                if bad is not None:
                    raise DataError(f"data file {where(bad[0])} is not UTF-8 text: invalid byte 0x{bad[2]:02x} "
                                    f"at offset {bad[1]}; convert it to UTF-8") from None
                bad = _first_bad_json_line(group) if builder == "json" else None
                if bad is not None:  # datasets says only "An error occurred while generating the dataset"
                    raise DataError(f"data file {where(bad[0])} line {bad[1]} is not JSON ({bad[2]}); fix or remove "
                                    "that line") from None
                if builder == "text" or len(group) == 1:
                    raise DataError(f"cannot read {builder} data from {source!r}: {one_line(e)}") from None
                # Read as one table, files whose other columns differ fail; so does one bad file, unnamed.
                # File by file, only the text column kept: the first names the culprit, the second reads.
                with no_progress_bars():  # the casts' bars, on a read that succeeds
                    parts_of = [_text_column(lambda name=name: read([name]), column, name) for name in group]
                try:
                    ds = datasets.concatenate_datasets(parts_of)
                except Exception as e2:  # e.g. text in one file, numbers in another
                    raise DataError(f"cannot read {builder} data from {source!r}: {one_line(e2)}") from None
            if column not in ds.column_names:
                raise DataError(f"text_field {column!r} not found in {source!r} (columns: {', '.join(ds.column_names)}); "
                                "name the text column with --text-field")
            ds = ds.select_columns([column])
            # One column name across builders (so they concatenate), and errors name the user's field.
            parts.append(ds.rename_column(column, text_field) if column != text_field else ds)
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return ds, text_field

    return _Source("files", _slug(path.stem or path.name), identity, load)


def _text_column(read: Callable[[], object], column: str, name: str):
    """`read()`'s dataset reduced to `column`, as a string column; errors name the file `name`."""
    import datasets

    try:
        ds = read()
    except Exception as e:
        raise DataError(f"cannot read data file {name!r}: {one_line(e.__cause__ or e)}") from None
    if column not in ds.column_names:
        raise DataError(f"text_field {column!r} not found in {name!r} (columns: {', '.join(ds.column_names)}); "
                        "name the text column with --text-field")
    ds = ds.select_columns([column])
    kind = getattr(ds.features[column], "dtype", None)
    # string and large_string concatenate only once alike; anything else is left to be named later
    return ds.cast_column(column, datasets.Value("string")) if kind in ("string", "large_string") else ds


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
        # Without a network datasets retries for ~30 s before failing: probe once, and when the hub
        # is unreachable read the local cache in offline mode (no streaming: it needs the hub).
        endpoint = datasets.config.HF_ENDPOINT
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        unreachable = not offline and not _hub_reachable(endpoint)
        try:
            with _hub_offline() if unreachable else nullcontext():
                ds = datasets.load_dataset(
                    name, config, split="train", cache_dir=str(cache_root / "hf"),
                    streaming=max_tokens is not None and not (offline or unreachable),
                )
        except Exception as e:
            if not (offline or unreachable):
                raise DataError(f"cannot load hub dataset {label}: {one_line(e)}") from None
            why = f"the hub {endpoint} is unreachable" if unreachable else "offline mode is on (HF_HUB_OFFLINE)"
            # Offline, datasets raises ConnectionError when nothing is cached; anything else (another
            # config cached, a damaged cache) is worth its own words.
            cache = "it is not in the local cache" if isinstance(e, ConnectionError) else f"the local cache fails: {one_line(e)}"
            raise DataError(f"cannot load hub dataset {label}: {why} and {cache}; "
                            f"use the offline default (--data stdlib) or --data PATH to your own files") from None
        if ds.column_names is not None and text_field not in ds.column_names:
            raise DataError(f"text_field {text_field!r} not found in hub dataset {label} (columns: "
                            f"{', '.join(ds.column_names)}); name the text column with --text-field")
        return ds, text_field

    return _Source("hub", _slug(name), identity, load)


def resolve_source(cfg: DataConfig, cache_root: Path) -> _Source:
    if cfg.source == "stdlib":
        return _stdlib_source()
    if cfg.source.startswith("hf:"):
        return _hub_source(cfg.source, cfg.text_field, cfg.max_tokens, cache_root)
    return _file_source(cfg.source, cfg.text_field, cache_root)



def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (or the proxy in front of it) opens within `timeout` s."""
    from urllib.request import getproxies, proxy_bypass

    url = urlsplit(endpoint)
    proxy = getproxies().get(url.scheme)
    if proxy and url.hostname and not proxy_bypass(url.hostname):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, UnicodeError):
            pass

    # In a thread: create_connection's timeout does not cover the DNS lookup, which can hang longer.
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextmanager
def _hub_offline():
    """datasets and huggingface_hub in offline mode (read from the cache, no requests), restored after.

    Their HF_HUB_OFFLINE environment variables are read at import; these module flags are what
    they consult at each call."""
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextmanager
def no_progress_bars():
    """datasets' progress bars and its warnings off, then back: a read that fails would leave its bar's
    line (or its "Failed to read file" log line) above the one-line error, or beside a read that the
    file-by-file retry then makes. HF_DATASETS_DISABLE_PROGRESS_BARS, when set, has the last word on bars."""
    import datasets.config
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)  # its "Failed to read file ..." is logged as an error
    bars = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not are_progress_bars_disabled()
    if bars:
        disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            enable_progress_bars()
        hf_logging.set_verbosity(level)


def _first_non_utf8(files: list[str]) -> tuple[str, int, int] | None:
    """The first file that is not UTF-8, the offset of its first bad byte and that byte; None if all decode."""
    for name in files:
        dec = codecs.getincrementaldecoder("utf-8")()
        pos = 0  # file offset of the bytes read so far
        with open(name, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                start = pos - len(dec.buffer)  # the decoder sees its held-back bytes + chunk
                try:
                    dec.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    return name, start + e.start, e.object[e.start]
                if not chunk:
                    break
                pos += len(chunk)
    return None


def _first_bad_json_line(files: list[str]) -> tuple[str, int, str] | None:
    """The first file of JSON lines with a line that does not parse, that line's number (from 1) and the
    parser's message; None if every file parses (a .json file holding one JSON document counts)."""
    for name in files:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        if name.lower().endswith(".json"):
            try:
                json.loads(text)
                continue
            except ValueError:
                pass  # not one document: then JSON lines, as datasets reads it
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return name, number, getattr(e, "msg", str(e))
    return None


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _slug(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return keep.strip("._")[:40] or "data"
