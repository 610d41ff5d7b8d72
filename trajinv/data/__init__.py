"""Token data: load text through Hugging Face `datasets`, tokenize once, cache as memmaps.

Modules: `sources` (where documents come from), `tokens` (tokenize, split, cache:
`load_data`), `batches` (`sample_batch`, `validation_batches`), `bootstrap` (fixed
resamples of the validation windows: `window_resamples`, `boot_means`), `tokenizer`.

Sources (``DataConfig.source``):

- ``"stdlib"`` (default): the Python standard library's own ``.py`` files on this
  machine (sorted by relative path; test folders, ``site-packages`` and caches
  excluded). Real text that is there offline on every machine: about 12 MB in
  ~730 files on CPython 3.11, i.e. ~12M byte tokens.
- a path to a ``.txt`` / ``.jsonl`` (``.json``) / ``.parquet`` file, or a folder
  of them (searched recursively, sorted). A text file is one document; a jsonl
  line or parquet row is one document, its text in ``text_field``.
- ``"hf:<name>[:<config>]"``: the ``train`` split of a hub dataset (with
  ``max_tokens`` it is streamed, so only what is used is downloaded). The hub is
  probed first (a TCP connect, 3 s): when it is unreachable, or ``HF_HUB_OFFLINE``
  is set, the dataset is read from the local Hugging Face cache (not streamed), and
  one line says so if it is not there.

Pipeline: documents -> ``Dataset.map(batched=True)`` with the tokenizer ->
one flat token stream, each document followed by the separator (byte 0 for
bytes, the tokenizer's end-of-text token otherwise) -> deterministic split by
*documents* (train and validation never share a file) -> two ``.bin`` files
written atomically (temp file + rename) plus ``manifest.json`` in
``cache_dir/<source>-<key>/``. The key hashes the source (file names, sizes,
mtimes, ctimes), the tokenizer (its JSON's sha256), ``text_field``, ``val_fraction``
and ``max_tokens``; a later ``load_data`` with the same key memory-maps the
files and does no tokenization. Delete the folder to force a rebuild.

Batches: ``sample_batch`` draws random windows from a generator seeded by
``(seed, step)`` only. The data position *is* the step counter: a run resumed at
step s sees exactly the batches of an uninterrupted run, and every member of a
population (which all call it with the same seed and step) sees the same
batches. ``validation_batches`` is a fixed set of evenly spaced windows.

Validation size: 512 windows of the trainer's context by default
(``TrainConfig.eval_seqs``; 32,768 tokens at context 64). The stdlib validation split is ~607k tokens
(52 of 731 documents), so these windows never overlap. The set is fixed, so
every member and every step is scored on the same tokens. Measured with a byte
bigram model fit on the stdlib train split, at context 64 the per-window mean
loss has a standard deviation of 0.43 nat. The mean over 50 random sets of 512
windows varied with a std of 0.019 nat, against 0.092 for sets of 16 windows
(the size an early calibration run found too noisy). Differences between members on the one
fixed set are paired, so they are less noisy still.
"""

from trajinv.config import DataConfig
from trajinv.data.batches import sample_batch, validation_batches
from trajinv.data.bootstrap import boot_means, boot_se, window_resamples
from trajinv.data.sources import DataError, stdlib_files
from trajinv.data.tokens import TokenData, cache_root, load_data, split_documents

__all__ = [
    "DataConfig",
    "DataError",
    "TokenData",
    "boot_means",
    "boot_se",
    "cache_root",
    "load_data",
    "sample_batch",
    "split_documents",
    "stdlib_files",
    "validation_batches",
    "window_resamples",
]
