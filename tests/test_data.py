"""Data pipeline: sources, tokenizers, cache, split, batches, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sysconfig

from trajinv import data as D
from trajinv.data import tokens as T
from trajinv.data.tokenizer import load_tokenizer
from trajinv.data import DataConfig, DataError, load_data, sample_batch, validation_batches


def _docs(n: int = 12) -> list[str]:
    # Distinct, marker-tagged documents of varied length, so a token stream can be mapped back.
    return [f"<doc{i:03d}> " + ("word%d " % i) * (5 + 7 * (i % 5)) + f"</doc{i:03d}>\n" for i in range(n)]


def _split_docs(arr: np.ndarray) -> list[str]:
    parts = bytes(arr.astype(np.uint8)).split(b"\0")
    return [p.decode() for p in parts if p]


def _no_retokenize(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retokenized although the cache matches")

    monkeypatch.setattr(T, "_tokenize", boom)


# ----------------------------------------------------------------------------- stdlib


def test_stdlib_files_sorted_without_tests():
    files = D.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(rel) > 300 and rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    for r in rel:
        dirs = r.split("/")[:-1]
        assert not any(d.startswith("test") or d in ("site-packages", "idle_test", "__pycache__") for d in dirs), r
    assert "os.py" in rel and "json/decoder.py" in rel


def test_stdlib_deterministic_and_cached(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path / "a"), max_tokens=30_000)
    first = load_data(cfg)
    m = first.manifest
    assert first.vocab_size == 256 and first.train.dtype == np.uint16
    assert m["tokens"]["total"] == 30_000 == first.train.size + first.val.size
    assert m["tokens"] == {"total": 30_000, "train": first.train.size, "val": first.val.size}
    assert m["tokenizer"]["name"] == "bytes" and len(m["content_hash"]) == 64 and m["source"] == "stdlib"
    assert first.val.size >= 1_000  # about 5 %
    # The stream starts with the first stdlib file's bytes (unless that document went to val).
    docs = [p.read_bytes() for p in D.stdlib_files()[:4]]
    stream = bytes(np.concatenate([first.train, first.val]).astype(np.uint8))
    assert any(d[:200] in stream for d in docs)
    assert isinstance(first.train, np.memmap)

    # Same key: memory-mapped from the cache, no tokenization; a new batch seed reuses it too.
    _no_retokenize(monkeypatch)
    again = load_data(DataConfig(cache_dir=str(tmp_path / "a"), max_tokens=30_000, seed=7))
    assert again.manifest == m
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    monkeypatch.undo()

    # A fresh cache folder rebuilds bit-identical arrays.
    fresh = load_data(DataConfig(cache_dir=str(tmp_path / "b"), max_tokens=30_000))
    np.testing.assert_array_equal(fresh.train, first.train)
    np.testing.assert_array_equal(fresh.val, first.val)
    assert fresh.manifest["content_hash"] == m["content_hash"]


def test_cache_env_and_corrupt_cache_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJINV_CACHE", str(tmp_path / "env"))
    assert D.cache_root(DataConfig()) == tmp_path / "env"
    assert D.cache_root(DataConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"  # explicit wins
    d = load_data(DataConfig(max_tokens=5_000))
    (folder,) = [p for p in (tmp_path / "env").iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "train.bin", "val.bin"]
    train = np.array(d.train)
    # A truncated array (e.g. a disk-full copy) is detected and rebuilt, not trusted.
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(100)
    d2 = load_data(DataConfig(max_tokens=5_000))
    np.testing.assert_array_equal(d2.train, train)


def test_leftovers_of_a_killed_tokenization_are_removed(tmp_path, monkeypatch):
    """A process killed while tokenizing leaves its scratch folder (and maybe half-written
    arrays); the next load_data removes what belongs to processes that are gone."""
    monkeypatch.setenv("TRAJINV_CACHE", str(tmp_path))
    dead = tmp_path / ".hf-scratch-999999999-abcd"  # no such pid
    (dead / "downloads").mkdir(parents=True)
    (dead / "downloads" / "x.arrow").write_bytes(b"x" * 10)
    old_style = tmp_path / ".hf-scratch-k2j4h5"  # no pid in its name: an older version's
    old_style.mkdir()
    live = tmp_path / f".hf-scratch-{os.getppid()}-efgh"  # a running tokenization's: kept
    live.mkdir()
    d = load_data(DataConfig(max_tokens=5_000))
    assert not dead.exists() and not old_style.exists() and live.exists()
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    # a kill while the arrays were written leaves temporary files beside them: removed on rebuild
    (folder / "manifest.json").unlink()
    stale = folder / ".train.bin.999999999.abcdefgh.tmp"
    stale.write_bytes(b"half")
    d2 = load_data(DataConfig(max_tokens=5_000))
    np.testing.assert_array_equal(d2.train, d.train)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


# ----------------------------------------------------------------------------- local files


def test_text_folder_split_by_documents(tmp_path, monkeypatch):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    docs = _docs(30)
    for i, t in enumerate(docs):
        (src / ("sub" if i % 3 == 0 else "") / f"f{i:02d}.txt").write_text(t)
    (src / "ignored.bin").write_bytes(b"\xff\xfe")
    cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "c"), val_fraction=0.2)
    d = load_data(cfg)
    assert d.manifest["split"] == "documents"
    train_docs, val_docs = _split_docs(d.train), _split_docs(d.val)
    # Each file is exactly one document, whole, in exactly one split.
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert not set(train_docs) & set(val_docs)
    assert d.manifest["documents"] == {"total": 30, "train": len(train_docs), "val": len(val_docs)}
    share = d.val.size / (d.val.size + d.train.size)
    assert 0.1 <= share <= 0.3
    # Editing a file changes the key: the cache is rebuilt with the new text.
    (src / "f01.txt").write_text("changed\n")
    os.utime(src / "f01.txt", ns=(1, 1))
    d2 = load_data(cfg)
    assert d2.manifest["key"] != d.manifest["key"] and d2.manifest["content_hash"] != d.manifest["content_hash"]
    assert "changed\n" in _split_docs(d2.train) + _split_docs(d2.val)


def test_single_text_file_falls_back_to_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    d = load_data(DataConfig(source=str(f), cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    assert d.manifest["split"] == "tail_tokens"
    stream = np.concatenate([d.train, d.val])
    assert bytes(stream.astype(np.uint8)) == b"abcdefghij" * 100 + b"\0"
    assert d.val.size == round(0.1 * stream.size)


def test_jsonl_and_parquet_with_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(10)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(docs)))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": docs, "n": list(range(10))}), pqf)
    for path in (jl, pqf):
        d = load_data(DataConfig(source=str(path), text_field="content", cache_dir=str(tmp_path / "c")))
        got = _split_docs(d.train) + _split_docs(d.val)
        assert sorted(got) == sorted(docs), path
        assert d.manifest["text_field"] == "content"
    with pytest.raises(DataError, match=r"'text'.*d\.jsonl.*columns: id, content"):
        load_data(DataConfig(source=str(jl), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"column 'id' holds int values, not text"):
        load_data(DataConfig(source=str(jl), text_field="id", cache_dir=str(tmp_path / "c")))
    # A folder mixing builders: the text file and every jsonl row are documents.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("plain text file\n")
    (mixed / "b.jsonl").write_text(jl.read_text())
    d = load_data(DataConfig(source=str(mixed), text_field="content", cache_dir=str(tmp_path / "c")))
    assert sorted(_split_docs(d.train) + _split_docs(d.val)) == sorted(docs + ["plain text file\n"])



def test_non_utf8_file_named_with_its_offset(tmp_path):
    # datasets said "DatasetGenerationError: An error occurred while generating the dataset" (text)
    # or failed mid-tokenize with a traceback (jsonl: pyarrow keeps the bad bytes).
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x80 latin-1 or worse")
    msg = _one_line_error(lambda: load_data(DataConfig(source=str(bad), cache_dir=str(tmp_path / "c"))),
                          repr(str(bad)), "not UTF-8", "0xff", "offset 0")
    assert "DatasetGenerationError" not in msg
    folder = tmp_path / "corpus"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "good.txt").write_text("fine\n")
    (folder / "b.txt").write_bytes("café\n".encode() * 3 + b"x\xe9t\xe9\n")  # 0xe9 at byte 19
    (folder / "c.txt").write_bytes(b"\xff later, never named")
    _one_line_error(lambda: load_data(DataConfig(source=str(folder), cache_dir=str(tmp_path / "c"))),
                    repr(str(folder / "b.txt")), repr(str(folder)), "0xe9", "offset 19")
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')  # 0xff at byte 15 + 10
    _one_line_error(lambda: load_data(DataConfig(source=str(jl), cache_dir=str(tmp_path / "c"))),
                    repr(str(jl)), "not UTF-8", "offset 25")
    assert not list(tmp_path.rglob("*.bin"))


def test_first_non_utf8_offset_across_read_chunks(tmp_path):
    from trajinv.data.sources import _first_non_utf8

    f = tmp_path / "big.txt"
    head = b"a" * ((1 << 20) - 1) + "é".encode()  # a 2-byte character split by the 1 MiB reads
    f.write_bytes(head + b"ok")
    assert _first_non_utf8([str(f)]) is None
    f.write_bytes(head + b"\x80")
    assert _first_non_utf8([str(f)]) == (str(f), len(head), 0x80)
    f.write_bytes(head + b"\xe2\x82")  # truncated at the end of the file
    assert _first_non_utf8([str(f)]) == (str(f), len(head), 0xE2)

def test_max_tokens_caps_exactly(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(40)))
    d = load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c"), max_tokens=777))
    assert d.train.size + d.val.size == 777 == d.manifest["tokens"]["total"]


def test_tokenizers_json_file(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = _docs(20)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    d = load_data(DataConfig(source=str(src), tokenizer=str(tok_path), cache_dir=str(tmp_path / "c"), val_fraction=0.2))
    assert d.vocab_size == tok.get_vocab_size() and d.train.dtype == np.uint16
    assert d.manifest["tokenizer"]["eos_id"] == eos and len(d.manifest["tokenizer"]["sha256"]) == 64
    stream = np.concatenate([d.train, d.val])
    assert int((stream == eos).sum()) == len(docs)  # one separator per document
    assert stream.max() < d.vocab_size
    assert (d.train.size + d.val.size) < sum(len(t) for t in docs)  # BPE merges: fewer tokens than bytes
    # The first train document decodes back to one of the source documents.
    first = np.asarray(d.train[: int(np.argmax(d.train == eos))]).tolist()
    assert tok.decode(first) in docs
    # A different tokenizer file is a different cache entry.
    bytes_d = load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c"), val_fraction=0.2))
    assert bytes_d.manifest["key"] != d.manifest["key"] and bytes_d.vocab_size == 256


def test_streaming_path_matches_map_path():
    # The hub path streams (IterableDataset) when max_tokens is set; it must give
    # the same tokens, lengths and digest as the map-style path.
    import datasets

    docs = _docs(50) + [""]
    ds = datasets.Dataset.from_dict({"text": docs})
    tok = load_tokenizer("bytes")
    for cap in (None, 1_234):
        a = T._tokenize(ds, "text", tok, cap)
        b = T._tokenize(ds.to_iterable_dataset(), "text", tok, cap if cap else None)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        if cap is None:
            assert a[2] == b[2] and a[3] == b[3] == 51
            assert a[1].size == 50 and bytes(a[0].astype(np.uint8)) == b"".join(t.encode() + b"\0" for t in docs if t)  # empty doc dropped
        else:
            assert a[0].size == 1_234 and a[1].sum() == 1_234


# ----------------------------------------------------------------------------- split


def test_split_documents_deterministic_and_sized():
    rng = np.random.default_rng(1)
    lens = rng.integers(50, 500, size=200)
    mask, mode = D.split_documents(lens, 0.1)
    assert mode == "documents"
    again, _ = D.split_documents(lens, 0.1)
    np.testing.assert_array_equal(mask, again)
    share = lens[mask].sum() / lens.sum()
    assert 0.1 <= share <= 0.11
    assert 0 < mask.sum() < 200
    assert D.split_documents(np.array([1000]), 0.1) == (None, "tail_tokens")
    # One document holding almost everything cannot be split by documents near the target.
    assert D.split_documents(np.array([10_000, 5, 5]), 0.1)[1] == "tail_tokens"


# ----------------------------------------------------------------------------- batches


def test_sample_batch_shapes_shift_and_determinism(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint32)  # token value == position: windows are readable
    x, y = sample_batch(tokens, 8, 16, seed=0, step=5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) <= 9_999
    x2, y2 = sample_batch(tokens, 8, 16, seed=0, step=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_batch(tokens, 8, 16, seed=0, step=6)[0])
    assert not torch.equal(x, sample_batch(tokens, 8, 16, seed=1, step=5)[0])
    # Memmaps and in-memory arrays give the same windows.
    u16 = (np.arange(10_000) % 251).astype(np.uint16)
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="w+", shape=u16.shape)
    mm[:] = u16
    a, b = sample_batch(u16, 4, 32, seed=2, step=3), sample_batch(mm, 4, 32, seed=2, step=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Smallest possible corpus: one window.
    xs, ys = sample_batch(np.array([3, 4], dtype=np.uint16), 3, 1, seed=0, step=0)
    assert xs.tolist() == [[3]] * 3 and ys.tolist() == [[4]] * 3


def test_sample_batch_pinned_values_across_processes():
    # The stream depends only on (seed, step): pinned values catch any change of
    # generator, seeding or reduction, and a child process must agree.
    tokens = np.arange(10**6, dtype=np.uint32)
    assert sample_batch(tokens, 4, 8, seed=0, step=0)[0][:, 0].tolist() == [918127, 468409, 248200, 339981]
    assert sample_batch(tokens, 4, 8, seed=3, step=17)[0][:, 0].tolist() == [821002, 599431, 54824, 94571]
    code = (
        "import numpy as np; from trajinv.data import sample_batch; "
        "print(sample_batch(np.arange(10**6, dtype=np.uint32), 4, 8, 3, 17)[0][:, 0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[821002, 599431, 54824, 94571]"


def test_sample_batch_resume_reproduces_stream():
    tokens = np.arange(5_000, dtype=np.uint16)
    run = [sample_batch(tokens, 4, 8, seed=9, step=s)[0] for s in range(6)]
    resumed = [sample_batch(tokens, 4, 8, seed=9, step=s)[0] for s in range(3, 6)]
    for a, b in zip(run[3:], resumed):
        assert torch.equal(a, b)
    assert len({tuple(r[:, 0].tolist()) for r in run}) == 6


def test_validation_batches_fixed_and_non_overlapping():
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = validation_batches(tokens, seq_len=9, n_seqs=25, batch_size=10)
    assert [b[0].shape for b in batches] == [(10, 9), (10, 9), (5, 9)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, x + 1)
    starts = x[:, 0]
    assert starts[0] == 0 and bool((starts[1:] - starts[:-1] >= 10).all())  # windows of 10 never overlap
    assert int(y.max()) <= 999 and int(starts[-1]) >= 1_000 - 10 - 40  # spread over the whole split
    again = validation_batches(tokens, 9, 25, 10)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # Exactly full: 100 windows of 10 tokens tile the 1000 tokens.
    tiled = torch.cat([b[0] for b in validation_batches(tokens, 9, 100, 64)])
    assert tiled[:, 0].tolist() == list(range(0, 1000, 10))
    one = validation_batches(tokens, 4, 1, 8)
    assert len(one) == 1 and one[0][0].tolist() == [[0, 1, 2, 3]]


# ----------------------------------------------------------------------------- errors


def _one_line_error(fn, *names):
    with pytest.raises(DataError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (n, msg)
    return msg


def test_bad_input_errors(tmp_path):
    missing = str(tmp_path / "nope" / "corpus.txt")
    _one_line_error(lambda: load_data(DataConfig(source=missing, cache_dir=str(tmp_path))), repr(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(lambda: load_data(DataConfig(source=str(empty), cache_dir=str(tmp_path))), repr(str(empty)))
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    _one_line_error(lambda: load_data(DataConfig(source=str(odd), cache_dir=str(tmp_path))), "'.csv'")
    tok = str(tmp_path / "tok.json")
    _one_line_error(lambda: load_data(DataConfig(tokenizer=tok, cache_dir=str(tmp_path))), repr(tok))
    Path(tok).write_text("{not json")
    _one_line_error(lambda: load_data(DataConfig(tokenizer=tok, cache_dir=str(tmp_path))), repr(tok))
    for bad in (0, 1, -0.1, 1.5):
        _one_line_error(lambda: load_data(DataConfig(val_fraction=bad, cache_dir=str(tmp_path))), repr(bad))
    _one_line_error(lambda: load_data(DataConfig(max_tokens=1, cache_dir=str(tmp_path))), "max_tokens")
    tokens = np.arange(10, dtype=np.uint16)
    _one_line_error(lambda: sample_batch(tokens, 2, 10, 0, 0), "10")
    _one_line_error(lambda: sample_batch(tokens, 0, 4, 0, 0), "batch_size")
    _one_line_error(lambda: sample_batch(tokens, 2, 4, -1, 0), "seed", "-1")
    _one_line_error(lambda: sample_batch(tokens, 2, 4, 0, 1.5), "step", "1.5")
    _one_line_error(lambda: validation_batches(tokens, 4, 3, 2), "--eval-seqs 3", "at most 2")
    # Nothing was written for the failed loads apart from (empty) folders.
    assert not list(tmp_path.rglob("*.bin"))


def test_hub_offline_error_names_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    from trajinv.data import sources

    def no_probe(endpoint):
        raise AssertionError("probed the hub although offline mode is on")

    monkeypatch.setattr(sources, "_hub_reachable", no_probe)
    name = "trajinv-test/does-not-exist"
    msg = _one_line_error(lambda: load_data(DataConfig(source=f"hf:{name}", cache_dir=str(tmp_path))), repr(name),
                          "offline mode", "--data PATH")
    assert msg.startswith("cannot load hub dataset")
    _one_line_error(lambda: load_data(DataConfig(source="hf:", cache_dir=str(tmp_path))), "'hf:'")
    assert not list(tmp_path.rglob("*.bin"))


def test_validation_too_small_said_in_the_users_terms(tmp_path):
    # Was "n_seqs 512 windows of 65 tokens do not fit in 150 tokens (at most 2)".
    small = tmp_path / "small.txt"
    small.write_text("x" * 3000)
    d = load_data(DataConfig(source=str(small), cache_dir=str(tmp_path / "c")))
    assert d.val.size == 150
    msg = _one_line_error(lambda: validation_batches(d.val, 64, 512, 64),
                          f"validation split of {str(small)!r} holds 150 tokens", "at most 2 windows",
                          "context 64 + 1", "--eval-seqs 512", "lower --eval-seqs")
    assert "n_seqs" not in msg
    # no window fits: no --eval-seqs helps, a shorter context does; the CLI sets it by --preset (there is no --context)
    msg = _one_line_error(lambda: validation_batches(d.val, 200, 4, 64), "holds 150 tokens, too few for one window of "
                          "context 200 + 1 tokens: give more data, or a shorter context: --preset tiny (context 64; "
                          "--eval-seqs at most 2)")
    assert "--preset small" not in msg and "--eval-seqs 4" not in msg  # 256 is no shorter; 4 was not the problem
    _one_line_error(lambda: validation_batches(d.val, 64, 4, 64), "enough for at most 2 windows")
    _one_line_error(lambda: validation_batches(d.val[:100], 64, 4, 64), "enough for at most 1 window of context 64",
                    "lower --eval-seqs to at most 1")
    _one_line_error(lambda: validation_batches(d.val[:60], 64, 4, 64),
                    "holds 60 tokens, too few for one window of context 64 + 1 tokens: give more data (the shortest "
                    "context, --preset tiny's 64, needs 65 tokens)")
    msg = _one_line_error(lambda: validation_batches(d.val[:10], 16, 4, 64), "holds 10 tokens", "context 16 + 1")
    assert msg.endswith(": give more data")  # a context shorter than every preset's (the API's): none to name


# ----------------------------------------------------------------------------- hub, no network


@pytest.fixture
def no_network(monkeypatch):
    """Name lookups fail at once (a test never reaches the network), and the hub's offline flags are
    off, as for a user who set no HF_HUB_OFFLINE (conftest sets it for every other test)."""
    import socket

    import datasets.config
    from huggingface_hub import constants

    def no_lookup(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return datasets.config, constants


def _cache_hub_dataset(hf_cache: Path, repo: str, texts: list[str]) -> None:
    """What a download of hub dataset `repo` leaves in datasets' cache (built from a local jsonl)."""
    import shutil

    import datasets

    src = hf_cache.parent / "src.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(hf_cache.parent / "build"))
    built = next((hf_cache.parent / "build" / "json").glob("*/*/*/dataset_info.json")).parent
    name = repo.split("/")[-1]
    dest = hf_cache / repo.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    dest.mkdir(parents=True)
    shutil.copy(built / "json-train.arrow", dest / f"{name}-train.arrow")
    (dest / "dataset_info.json").write_text((built / "dataset_info.json").read_text().replace('"json"', json.dumps(name)))


def test_hub_unreachable_fails_fast_or_reads_the_cache(tmp_path, monkeypatch, no_network):
    import time

    from trajinv.data import sources

    config, constants = no_network
    probed = []
    # raising=False: so the old code, which had no probe, fails here on what it did, not on the name
    monkeypatch.setattr(sources, "_hub_reachable", lambda endpoint: probed.append(endpoint) or False, raising=False)
    # Not cached: one line naming the dataset, at once (datasets alone retried for ~27 s).
    t0 = time.monotonic()
    name = "trajinv-test/not-cached"
    msg = _one_line_error(lambda: load_data(DataConfig(source=f"hf:{name}", cache_dir=str(tmp_path))),
                          repr(name), "unreachable", "not in the local cache", "--data stdlib", "--data PATH")
    assert time.monotonic() - t0 < 10, msg
    assert probed == [config.HF_ENDPOINT]
    assert config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False  # restored
    # Cached: loads offline, also with max_tokens (which streams when the hub is there).
    docs = _docs(12)
    _cache_hub_dataset(tmp_path / "hf", "trajinv-test/tiny", docs)
    d = load_data(DataConfig(source="hf:trajinv-test/tiny", cache_dir=str(tmp_path)))
    assert sorted(_split_docs(d.train) + _split_docs(d.val)) == sorted(docs)
    capped = load_data(DataConfig(source="hf:trajinv-test/tiny", cache_dir=str(tmp_path), max_tokens=300))
    assert capped.train.size + capped.val.size == 300
    assert config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


def test_hub_probe(monkeypatch):
    """The probe opens a TCP connection to the endpoint, or to the proxy in front of it; all local."""
    import socket

    from trajinv.data.sources import _hub_reachable

    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        assert _hub_reachable(f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert not _hub_reachable(f"http://127.0.0.1:{closed.getsockname()[1]}", timeout=1)
        # Behind a proxy the probe asks the proxy (here the listening socket), never the hub's name.
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{listening.getsockname()[1]}")
        real = socket.getaddrinfo

        def local_only(host, *a, **k):
            if host != "127.0.0.1":
                raise socket.gaierror(socket.EAI_NONAME, f"looked up {host}")
            return real(host, *a, **k)

        monkeypatch.setattr(socket, "getaddrinfo", local_only)
        assert _hub_reachable("https://huggingface.co")
        monkeypatch.setenv("no_proxy", "huggingface.co")
        assert not _hub_reachable("https://huggingface.co")


def test_a_cache_or_hidden_folder_inside_the_data_folder_is_not_data(tmp_path):
    # `--data .` with the default cache (./.cache/trajinv) read its own manifest.json back as a jsonl file
    src = tmp_path / "corpus"
    (src / ".ipynb_checkpoints").mkdir(parents=True)
    for i, t in enumerate(_docs(6)):
        (src / f"f{i}.txt").write_text(t)
    (src / ".ipynb_checkpoints" / "f0-checkpoint.txt").write_text("a stale copy\n")
    first = load_data(DataConfig(source=str(src), cache_dir=str(src / "cache")))
    again = load_data(DataConfig(source=str(src), cache_dir=str(src / "cache")))  # the cache is there now
    assert first.manifest["key"] == again.manifest["key"] and first.manifest["documents"]["total"] == 6


def test_an_edit_that_restores_size_and_mtime_is_noticed(tmp_path):
    # (name, size, mtime) keyed the cache: `cp -p`, `rsync -t` or os.utime served the old tokens
    src = tmp_path / "c.txt"
    src.write_text("the first text\n" * 50)
    st = src.stat()
    d = load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")))
    src.write_text("the other text\n" * 50)  # the same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    d2 = load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")))
    assert d2.manifest["content_hash"] != d.manifest["content_hash"]


def test_a_tokenizer_that_cannot_encode_or_has_id_gaps(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "hw.txt"
    src.write_text("hello world hello world foo\n" * 200)  # "foo" is unknown to both
    broken = Tokenizer(models.WordLevel({"hello": 0, "world": 1}, unk_token="[UNK]"))  # its unk is not in it
    broken.pre_tokenizer = pre_tokenizers.Whitespace()
    broken.save(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match=r"broken\.json' cannot encode the data \(.*UNK") as e:
        load_data(DataConfig(source=str(src), tokenizer=str(tmp_path / "broken.json"), cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(e.value)
    # ids with a gap: 3 tokens, yet "world" is id 300; the vocabulary must cover it (training indexed past it)
    sparse = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 300}, unk_token="[UNK]"))
    sparse.pre_tokenizer = pre_tokenizers.Whitespace()
    sparse.save(str(tmp_path / "sparse.json"))
    d = load_data(DataConfig(source=str(src), tokenizer=str(tmp_path / "sparse.json"), cache_dir=str(tmp_path / "c")))
    assert d.vocab_size == 301 and int(np.concatenate([d.train, d.val]).max()) == 300 < d.vocab_size


def test_a_folder_of_jsonl_files_with_other_columns_reads_and_a_bad_file_is_named(tmp_path):
    # read as one table, files whose other columns differ were refused ("An error occurred while generating
    # the dataset"), and one bad file failed the folder without being named
    src = tmp_path / "js"
    src.mkdir()
    docs = _docs(8)
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:4])))
    (src / "b.jsonl").write_text("".join(json.dumps({"text": t, "meta": {"k": 1}}) + "\n" for t in docs[4:]))
    d = load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")))
    assert sorted(_split_docs(d.train) + _split_docs(d.val)) == sorted(docs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqs = tmp_path / "pq"
    pqs.mkdir()
    pq.write_table(pa.table({"text": docs[:4], "id": list(range(4))}), pqs / "a.parquet")
    pq.write_table(pa.table({"text": pa.array(docs[4:], type=pa.large_string()), "m": [0.5] * 4}), pqs / "b.parquet")
    d = load_data(DataConfig(source=str(pqs), cache_dir=str(tmp_path / "c")))
    assert sorted(_split_docs(d.train) + _split_docs(d.val)) == sorted(docs)
    (src / "c.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    with pytest.raises(DataError, match=r"data file '.*c\.jsonl' \(in '.*js'\) line 2 is not JSON") as e:
        load_data(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(e.value)


def test_a_bad_json_line_is_named_and_rows_without_the_text_field_are_counted(tmp_path, capsys):
    # datasets said only "An error occurred while generating the dataset"; and rows lacking the field
    # (another key, or null) were dropped without a word: half a corpus could go missing
    docs = _docs(10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": docs[0]}) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match=r"^data file '.*bad\.jsonl' line 3 is not JSON \(Expecting property name"):
        load_data(DataConfig(source=str(bad), cache_dir=str(tmp_path / "c")))
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"text": t} if i % 2 else ({"content": t} if i % 4 else {"text": None}) for i, t in enumerate(docs)]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = load_data(DataConfig(source=str(mixed), cache_dir=str(tmp_path / "c")))
    assert sorted(_split_docs(d.train) + _split_docs(d.val)) == sorted(docs[1::2])
    err = capsys.readouterr().err
    assert "note: 5 of 10 documents have no 'text' (absent or null) and were skipped" in err
    load_data(DataConfig(source=str(mixed), text_field="text", cache_dir=str(tmp_path / "c")))
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    load_data(DataConfig(source=str(full), cache_dir=str(tmp_path / "c")))
    assert "note:" not in capsys.readouterr().err  # a cached corpus, and a whole one, say nothing
    # a capped stream counts only the documents it took (the mapped batch of 256 was counted whole)
    import datasets

    from trajinv.data.tokenizer import ByteTokenizer
    from trajinv.data.tokens import _tokenize

    stream = datasets.IterableDataset.from_generator(
        lambda: ({"text": None if i % 2 else f"doc {i} " * 10} for i in range(1000)))
    _, lens, _, n_read = _tokenize(stream, "text", ByteTokenizer(), 500)
    assert f"note: {n_read - len(lens)} of {n_read} documents have no 'text'" in capsys.readouterr().err
