"""Raw text to the files training reads: a tokenizer and two token files.

    python -m data.prepare                                  # Shakespeare (the default)
    python -m data.prepare data=text data.paths=[a.txt,notes/] data.name=notes
    python -m data.prepare data.vocab_size=8192

writes, under <data.root>/<data.name>/ (out/data/shakespeare by default):

    tokenizer.model   the SentencePiece model, trained on the training split only
    train.bin         the training split's token ids, one flat array (uint16 when the
    val.bin           vocabulary fits in 16 bits, else uint32), no header
    meta.json         source, input hashes, the documents of each split, vocabulary size,
                      token and byte counts per split, bytes per token, dtype

How:
1. Load the documents (data/sources.py): one per play or per file.
2. Split by document with a fixed seed, so validation text is never seen in training.
   With fewer documents than a fair split needs (one file, say), every document is first
   cut into pieces at line boundaries (see `MIN_PIECES`) and the pieces are split.
3. Train the tokenizer on the training split; encode both splits. Every document is
   preceded by <|eos|> and the stream ends with one, so the model learns where documents
   end, and sampling from [<|eos|>] starts a fresh one.
4. Write everything into a temporary directory, then swap it in: a failed or killed run
   never destroys a previous good preparation.

A key (SHA-256 over the input hashes and the settings) is stored in meta.json; when it
matches, `prepare` returns at once without reading the text again. Training calls
`prepare(settings.data)` itself, so `make pretrain` prepares the data when needed.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tokenizer as tokenizers
from checks import CommandSettings
from command import entry_point
from data.sources import DataConfig, Document, input_hashes, load_documents
from errors import UserError
from tokenizer import Tokenizer

FORMAT = 1  # bump when the layout of the prepared files changes: forces a rebuild
TOKENIZER_FILE = "tokenizer.model"
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"
# With fewer documents than this, documents are cut into pieces before splitting, so that
# the validation split gets a fair share (about val_fraction) of the text.
MIN_PIECES = 20


@dataclass
class Prepared:
    """What `prepare` made (or found): paths, the tokenizer and the metadata."""

    dir: Path
    tokenizer: Tokenizer
    meta: dict
    train_path: Path
    val_path: Path
    rebuilt: bool = False


def settings_of(data: DataConfig) -> dict:
    """The settings that determine the output (what the preparation's key covers)."""
    return {
        "format": FORMAT,
        "source": data.source,
        "vocab_size": data.vocab_size,
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "tokenizer": data.tokenizer,
    }


def prepare(data: DataConfig) -> Prepared:
    """Make (or find up to date) the tokenizer and token files `data` describes."""
    settings = settings_of(data)
    out = _output_dir(data)
    recover_interrupted(out)
    inputs = input_hashes(data)  # checks that the inputs exist
    key = _sha256_json({"settings": settings, "inputs": inputs})
    found = _up_to_date(out, key)
    if found is not None:
        return found

    start = time.perf_counter()
    train_docs, val_docs, split_by = _load_and_split(data, inputs)
    tok = _train_tokenizer(train_docs, settings, split_by)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    with _staging(out) as stage:
        tok.save(stage / TOKENIZER_FILE)
        splits = {}
        for split, file, part in (("train", TRAIN_FILE, train_docs), ("val", VAL_FILE, val_docs)):
            splits[split] = {"file": file, **_write_split(stage / file, part, tok, dtype, split)}
        meta = {
            "format": FORMAT,
            "name": out.name,
            "key": key,
            "source": settings["source"],
            "inputs": inputs,
            "settings": settings,
            "tokenizer": {"kind": tok.kind, "file": TOKENIZER_FILE, "vocab_size": tok.vocab_size},
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "split_by": split_by,
            "separator": "<|eos|> before every document and after the last",
            "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (stage / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return Prepared(out, tok, meta, out / TRAIN_FILE, out / VAL_FILE, rebuilt=True)


def _output_dir(data: DataConfig) -> Path:
    """<data.root>/<data.name>: the folder the preparation lives in."""
    name = data.name
    if "/" in name or name.startswith("."):
        raise UserError(f"data.name '{name}' must be a plain folder name, like 'shakespeare'")
    return Path(data.root) / name


def _load_and_split(data: DataConfig, inputs: dict) -> tuple[list[Document], list[Document], str]:
    """The corpus's non-empty documents, split into training and validation
    (split_documents); UserError when there is no text at all."""
    docs = [d for d in load_documents(data) if d.text]
    if not docs:
        where = ", ".join(inputs) or data.source
        raise UserError(f"the corpus is empty: {where} holds no text; give it some text")
    return split_documents(docs, data.val_fraction, data.seed)


def _train_tokenizer(train_docs: list[Document], settings: dict, split_by: str) -> Tokenizer:
    """The tokenizer of `settings`, trained on the training split only."""
    n_bytes = sum(len(d.text.encode()) for d in train_docs)
    print(
        f"training a {settings['vocab_size']}-token {settings['tokenizer']} tokenizer on "
        f"{n_bytes:,} bytes ({len(train_docs)} {split_by}s)",
        file=sys.stderr,
    )
    try:
        return tokenizers.train_tokenizer(
            (d.text for d in train_docs), settings["vocab_size"], settings["tokenizer"]
        )
    except UserError as e:
        raise UserError(f"{e} (data.vocab_size={settings['vocab_size']})") from None


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document], str]:
    """Shuffle documents with `seed` and put about `val_fraction` of them in validation.

    Returns (train, val, unit): unit is "document", or "piece" when there were fewer than
    MIN_PIECES documents and each was cut at line boundaries into pieces of similar size.
    """
    unit = "document"
    if len(docs) < MIN_PIECES:
        docs, unit = cut_into_pieces(docs, MIN_PIECES), "piece"
    if len(docs) < 2:
        raise UserError(
            f"cannot split {docs[0].name} into training and validation text: it is too short; "
            "give it more text"
        )
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val = sorted(order[:n_val])  # keep the corpus order within each split
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val], unit


def cut_into_pieces(docs: list[Document], n_pieces: int) -> list[Document]:
    """About `n_pieces` pieces in all, each document cut in proportion to its length.

    Cuts fall after a newline when the piece has one, else after a space, else anywhere.
    Piece k of "notes.txt" is named "notes.txt#k".
    """
    total = sum(len(d.text) for d in docs)
    pieces = []
    for d in docs:
        k = max(1, min(len(d.text), math.ceil(n_pieces * len(d.text) / total)))
        size = math.ceil(len(d.text) / k)
        start, i = 0, 0
        while start < len(d.text):
            end = min(start + size, len(d.text))
            if end < len(d.text):
                for sep in ("\n", " "):
                    cut = d.text.rfind(sep, start, end)
                    if cut >= start:
                        end = cut + 1
                        break
            pieces.append(Document(f"{d.name}#{i}", d.text[start:end]))
            start, i = end, i + 1
    return pieces


def _write_split(path: Path, docs: list[Document], tok: Tokenizer, dtype, split: str) -> dict:
    """Encode the documents into one token file; return the split's counts."""
    eos = tok.eos_id
    n_bytes = n_tokens = 0
    with open(path, "wb") as f:
        batch = 16  # documents per encode_batch call, for a progress bar that moves
        bar = tqdm(total=len(docs), desc=f"encoding {split}", unit="doc", disable=None)
        for i in range(0, len(docs), batch):
            chunk = docs[i : i + batch]
            for ids in tok.encode_batch([d.text for d in chunk]):
                arr = np.array([eos, *ids], dtype=dtype)
                arr.tofile(f)
                n_tokens += len(arr)
            n_bytes += sum(len(d.text.encode()) for d in chunk)
            bar.update(len(chunk))
        bar.close()
        np.array([eos], dtype=dtype).tofile(f)
        n_tokens += 1
    return {
        "documents": [d.name for d in docs],
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": round(n_bytes / n_tokens, 4),
        "tokens_per_byte": round(n_tokens / n_bytes, 4) if n_bytes else None,
    }


def _up_to_date(out: Path, key: str) -> Prepared | None:
    """The existing preparation in `out` if it was made from the same inputs and settings."""
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    for split in ("train", "val"):
        info = meta.get("splits", {}).get(split, {})
        path = out / info.get("file", f"{split}.bin")
        if not path.is_file() or path.stat().st_size != info.get("tokens", -1) * itemsize:
            return None
    try:
        tok = tokenizers.load_tokenizer(out / TOKENIZER_FILE, meta["tokenizer"]["kind"])
    except (UserError, KeyError, TypeError):
        return None
    return Prepared(out, tok, meta, out / TRAIN_FILE, out / VAL_FILE, rebuilt=False)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to write into. When the block ends, the folder replaces
    `out` (_swap_in); when it fails, the folder is removed and `out` stays as it was."""
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` by the finished `stage`; the old directory goes only after the swap."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(out: Path) -> None:
    """Clean up after a preparation that was killed, before starting another.

    Killed between the two renames of _swap_in, a run leaves the old preparation in
    `.NAME.old-PID` and no `NAME`: the old one is put back. Killed while writing, it leaves
    its `.NAME.tmp-PID` folder: removed, unless that process is still running (another
    preparation at work).
    """
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stage in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stage.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(stage, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (a pid reused after a kill)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to someone else
    return True


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def describe(p: Prepared) -> str:
    """One line about a preparation, for the console."""
    m = p.meta
    tr, va = m["splits"]["train"], m["splits"]["val"]
    return (
        f"{p.dir}: vocab {m['vocab_size']} ({m['dtype']}); train {tr['tokens']:,} tokens "
        f"from {tr['bytes']:,} bytes in {len(tr['documents'])} {m['split_by']}s; val "
        f"{va['tokens']:,} tokens from {va['bytes']:,} bytes in {len(va['documents'])}; "
        f"{va['bytes_per_token']} bytes/token"
    )


@dataclass
class PrepareSettings(CommandSettings):
    """python -m data.prepare's settings (conf/prepare.yaml): the corpus alone."""

    data: DataConfig


def run(settings: PrepareSettings) -> Prepared:
    """The entry point's work: prepare, then say what was done and how long it took."""
    start = time.perf_counter()
    p = prepare(settings.data)
    state = "prepared" if p.rebuilt else "up to date"
    print(f"{state} in {time.perf_counter() - start:.2f}s: {describe(p)}")
    return p


@entry_point("prepare", PrepareSettings)
def main(settings: PrepareSettings) -> None:
    """`python -m data.prepare [overrides]`; UserErrors print one line and exit 2."""
    run(settings)


if __name__ == "__main__":
    main()
