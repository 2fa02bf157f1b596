"""The data layer: corpus reading, tokenizers, token shards, batches, samplers and `memoryformer prepare`."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from memoryformer.cli import main
from memoryformer.data import (
    EOT_TOKEN,
    Corpus,
    TokenData,
    choose_dtype,
    data_fingerprint,
    default_corpus,
    default_corpus_files,
    embedded_corpus,
    eot_id,
    fingerprint_mismatch,
    is_val_block,
    load_tokenizer,
    normalize_text,
    prepare,
    read_text_file,
    resolve_sources,
    train_bpe,
)
from memoryformer.data import corpus as corpus_module
from memoryformer.data import fingerprint as fingerprint_module

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega the of and to in is that it for as with was on").split()


def make_docs(n: int, words: int = 60, seed: int = 0) -> list[str]:
    """n distinct documents of plain words, numbered so no two are equal."""
    rng = random.Random(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for i in range(n)]


def write_docs(directory: Path, docs: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = directory / f"doc{i:03d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


def split_runs(data: TokenData, split: str) -> list[str]:
    """Decode a split, cut at end-of-text tokens (a trailing piece without one included)."""
    tok = data.tokenizer()
    ids = data.tokens(split).astype(np.int64)
    cuts = np.flatnonzero(ids == data.eot_id)
    pieces = np.split(ids, cuts + 1)
    runs = [tok.decode(p[:-1].tolist()) for p in pieces[:-1]]
    return runs + ([tok.decode(pieces[-1].tolist())] if len(pieces[-1]) else [])


def split_documents(data: TokenData, split: str) -> list[str]:
    """Decode a split into documents; each must end with end-of-text."""
    ids = data.tokens(split)
    assert ids[-1] == data.eot_id, "every split ends with end-of-text when documents are whole blocks"
    return split_runs(data, split)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, list[str]]:
    """40 documents, byte-level BPE of 300 ids, 10% validation."""
    root = tmp_path_factory.mktemp("prepared")
    docs = make_docs(40)
    write_docs(root / "corpus", docs)
    prepare([str(root / "corpus")], root / "tokens", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "tokens", docs


# ---------------------------------------------------------------- corpus reading


def test_normalisation_of_line_endings_and_bom(tmp_path, monkeypatch):
    raw = "\ufeffone\r\ntwo\rthree\nfour\r\n\r\nfive\r"
    assert normalize_text(raw) == "one\ntwo\nthree\nfour\n\nfive\n"
    path = tmp_path / "crlf.txt"
    path.write_bytes(raw.encode("utf-8"))
    assert read_text_file(path) == "one\ntwo\nthree\nfour\n\nfive\n"
    # a CRLF split between two reads is still one newline
    monkeypatch.setattr(corpus_module, "READ_CHARS", 3)
    assert read_text_file(path) == "one\ntwo\nthree\nfour\n\nfive\n"
    assert "".join(corpus_module._normalized(["a\r", "\nb\r", "c"])) == "a\nb\nc"
    # invalid UTF-8 is replaced, not fatal, and counted per file
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe end")
    assert read_text_file(bad) == "ok \ufffd\ufffd end"
    report = corpus_module.CorpusReport()
    assert "".join(corpus_module._read_chunks(bad, report)) == "ok \ufffd\ufffd end"
    assert report.non_utf8 == {str(bad): 2}
    (tmp_path / "literal.txt").write_text("a real \ufffd in UTF-8")  # a literal U+FFFD is not an error
    assert "".join(corpus_module._read_chunks(tmp_path / "literal.txt", report)) == "a real \ufffd in UTF-8"
    assert list(report.non_utf8) == [str(bad)]


def test_prepare_normalises_text(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes("\ufeffline one\r\nline two\rline three".encode())
    write_docs(tmp_path / "c" / "more", make_docs(5))
    prepare([str(tmp_path / "c")], tmp_path / "out", vocab_size=280, val_fraction=0.2, progress=False)
    data = TokenData(tmp_path / "out")
    docs = split_documents(data, "train") + split_documents(data, "val")
    assert "line one\nline two\nline three" in docs
    assert not any("\r" in d or "\ufeff" in d for d in docs)


def test_jsonl_field(tmp_path):
    path = tmp_path / "records.jsonl"
    rows = [{"text": f"body {i}\r\nend", "title": f"title {i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(Corpus.from_args([str(path)]).documents()) == [f"body {i}\nend" for i in range(3)]
    assert list(Corpus.from_args([str(path)], jsonl_field="title").documents()) == [f"title {i}" for i in range(3)]
    with pytest.raises(ValueError, match="no field 'body'.*--jsonl-field"):
        list(Corpus.from_args([str(path)], jsonl_field="body").documents())
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        list(Corpus.from_args([str(tmp_path / "broken.jsonl")]).documents())


def test_directories_and_globs(tmp_path):
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("ay")
    (root / "sub" / "c.py").write_text("print('c')")
    (root / "sub" / "deeper" / "d").write_text("no suffix but text")
    (root / "sub" / "e.jsonl").write_text('{"text": "from jsonl"}\n')
    (root / "blob.bin").write_bytes(bytes(range(256)))
    (root / "image").write_bytes(b"\x89PNG\0\0\0")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config").write_text("hidden too")
    docs = list(Corpus.from_args([str(root)]).documents())
    # text files sorted by path (directories walked in sorted order), then jsonl records
    assert docs == ["ay", "bee", "print('c')", "no suffix but text", "from jsonl"]

    docs = list(Corpus.from_args([str(root / "**" / "*.txt"), str(root / "sub" / "*.py")]).documents())
    assert docs == ["bee", "print('c')"]
    with pytest.raises(ValueError, match="matches no text files"):
        Corpus.from_args([str(root / "*.nothing")])


def test_default_corpus_is_found():
    files = default_corpus_files()
    names = {f.name for f in files}
    assert len(files) > 100 and {"os.py", "textwrap.py", "__init__.py"} <= names
    assert all("site-packages" not in f.parts and "test" not in f.parts for f in files)
    assert [f.as_posix() for f in files] == sorted(f.as_posix() for f in files)
    corpus = default_corpus(max_bytes=200_000)
    blocks = list(corpus.blocks())
    assert sum(len(b.text.encode()) for b in blocks) == 200_000
    text = "".join(b.text for b in blocks)
    assert text.count("def ") > 50 and text.count("import ") > 20
    assert len({b.doc_index for b in blocks}) > 5
    assert list(default_corpus(max_bytes=200_000).blocks()) == blocks  # deterministic
    topics = list(corpus_module.PydocTopics().documents())
    assert len(topics) > 10 and "".join(next(iter(topics[0])))


def test_max_bytes_and_blocks(tmp_path):
    text = "".join(f"line {i:04d}\n" for i in range(1000))  # 10 000 chars
    (tmp_path / "t.txt").write_text(text)
    corpus = Corpus.from_args([str(tmp_path / "t.txt")])
    blocks = list(corpus.blocks(block_chars=1000))
    assert "".join(b.text for b in blocks) == text
    assert all(len(b.text) <= 1000 and b.text.endswith("\n") for b in blocks)
    assert [b.doc_end for b in blocks] == [False] * (len(blocks) - 1) + [True]
    limited = list(Corpus.from_args([str(tmp_path / "t.txt")], max_bytes=2500).blocks(block_chars=1000))
    assert "".join(b.text for b in limited) == text[:2500] and limited[-1].doc_end


def test_hugging_face_dataset_source(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"text": "first\r\nrow"}, {"text": "second"}]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = Corpus.from_args(["hf:wikitext:wikitext-2-raw-v1@validation"])
    assert list(corpus.documents()) == ["first\nrow", "second"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", True)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(RuntimeError, match="needs the `datasets` package"):
        list(Corpus.from_args(["some-dataset-name"]).documents())


# ---------------------------------------------------------------- tokenizers


def test_bpe_training_small_vocab():
    docs = make_docs(30)
    tok = train_bpe(docs, vocab_size=300)
    assert 257 <= tok.get_vocab_size() <= 300
    assert tok.token_to_id(EOT_TOKEN) == 0 and eot_id(tok) == 0
    # byte-level: anything round-trips, also characters never seen in training
    for text in (docs[3], "Ünïcödé ✓ 🙂\n\ttabs  and  spaces", ""):
        assert tok.decode(tok.encode(text).ids) == text
    # merges were learned: common words take fewer tokens than bytes
    assert len(tok.encode(docs[0]).ids) < 0.75 * len(docs[0].encode())
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(docs, vocab_size=100)


def wordlevel_tokenizer(n_words: int) -> Tokenizer:
    """A tokenizer with `n_words` ids plus end-of-text (id n_words), for the uint32 path."""
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab[EOT_TOKEN] = n_words
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_dtype_choice_and_uint32_shards(tmp_path):
    assert choose_dtype(4096) == "uint16" and choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32" and choose_dtype(100, "uint32") == "uint32"
    with pytest.raises(ValueError, match="does not fit in uint16.*--dtype uint32"):
        choose_dtype(70_000, "uint16")

    tok = wordlevel_tokenizer(70_000)
    tok.save(str(tmp_path / "big.json"))
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(20)]
    (tmp_path / "c").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(doc)
    with pytest.raises(ValueError, match="does not fit in uint16"):
        prepare([str(tmp_path / "c")], tmp_path / "forced", tokenizer=tmp_path / "big.json", dtype="uint16",
                progress=False)
    meta = prepare([str(tmp_path / "c")], tmp_path / "out", tokenizer=tmp_path / "big.json", val_fraction=0.2,
                   progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eot_id"] == 70_000
    data = TokenData(tmp_path / "out")
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert ids.max() > 65535  # ids above uint16 survive
    expected = sorted([int(w[1:]) for w in doc.split()] + [70_000] for doc in docs)
    pieces = np.split(ids, np.flatnonzero(ids == 70_000) + 1)[:-1]
    assert sorted(p.tolist() for p in pieces) == expected


def test_unknown_tokenizer(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="unknown tokenizer"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown tokenizer 'no-such-tokenizer'"):
        load_tokenizer("no-such-tokenizer")
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a `tokenizers` JSON file"):
        load_tokenizer(tmp_path / "junk.json")
    no_eot = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="no end-of-text token"):
        eot_id(no_eot)


# ---------------------------------------------------------------- shards and the split


def test_round_trip_and_meta(prepared):
    path, docs = prepared
    data = TokenData(path)
    meta = json.loads((path / "meta.json").read_text())
    assert data.meta == meta
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 0 and meta["vocab_size"] <= 300
    assert meta["documents"] == meta["blocks"] == 40 and meta["tokenizer"] == "tokenizer.json"
    assert meta["train_tokens"] == data.num_tokens("train") and meta["val_tokens"] == data.num_tokens("val")
    assert meta["text_bytes"] == sum(len(d.encode()) for d in docs)
    train, val = split_documents(data, "train"), split_documents(data, "val")
    assert len(train) == meta["train_documents"] and len(val) == meta["val_documents"]
    # text -> shards -> decode gives the documents back, each exactly once, in corpus order per split
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]
    # the validation split is the stratified rule's choice, disjoint from train, about 10%
    expected_val = [docs[i] for i in range(40) if is_val_block(i, 0, 0.1)]
    assert val == expected_val and 3 <= len(val) <= 5 and not set(val) & set(train)
    assert not list(path.glob(".*.tmp"))


def test_split_is_deterministic_and_seeded(tmp_path, prepared):
    path, docs = prepared
    again = tmp_path / "again"
    prepare([str(path.parent / "corpus")], again, vocab_size=300, val_fraction=0.1, progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again / name).read_bytes() == (path / name).read_bytes()
    prepare([str(path.parent / "corpus")], tmp_path / "seeded", tokenizer=path / "tokenizer.json",
            val_fraction=0.1, seed=5, progress=False)
    other = split_documents(TokenData(tmp_path / "seeded"), "val")
    assert other and other != split_documents(TokenData(path), "val")
    # the rule holds out round(f * n) blocks, give or take one, for any seed
    for seed in range(20):
        assert abs(sum(is_val_block(i, seed, 0.03) for i in range(1000)) - 30) <= 1


def test_small_corpus_never_has_an_empty_split(tmp_path):
    docs = ["short one\n", "the longest of the three documents by far, " * 5 + "\n", "another short\n"]
    write_docs(tmp_path / "c", docs)
    seeds_with_empty_rule = [s for s in range(10) if not any(is_val_block(i, s, 0.01) for i in range(3))]
    seed = seeds_with_empty_rule[0]
    meta = prepare([str(tmp_path / "c")], tmp_path / "out", vocab_size=270, seed=seed, progress=False)
    data = TokenData(tmp_path / "out")
    assert split_documents(data, "val") == [docs[1]] and meta["val_fallback_block"] == 1
    assert split_documents(data, "train") == [docs[0], docs[2]]
    # and the other way round: a rule that holds out every block leaves the longest one for training
    seed = next(s for s in range(100) if all(is_val_block(i, s, 0.9) for i in range(3)))
    meta = prepare([str(tmp_path / "c")], tmp_path / "out2", vocab_size=270, seed=seed, val_fraction=0.9,
                   progress=False)
    data = TokenData(tmp_path / "out2")
    assert split_documents(data, "train") == [docs[1]] and split_documents(data, "val") == [docs[0], docs[2]]
    # one document cannot be split
    write_docs(tmp_path / "one", docs[1:2])
    with pytest.raises(ValueError, match="too small to split"):
        prepare([str(tmp_path / "one")], tmp_path / "out1", vocab_size=270, progress=False)


def test_long_documents_are_split_into_blocks(tmp_path):
    text = "".join(f"sentence number {i} of a long book.\n" for i in range(400))  # ~14 kB
    (tmp_path / "book.txt").write_text(text)
    meta = prepare([str(tmp_path / "book.txt")], tmp_path / "out", vocab_size=300, val_fraction=0.2,
                   block_chars=1000, progress=False)
    data = TokenData(tmp_path / "out")
    assert meta["documents"] == 1 and meta["blocks"] >= 14 and meta["val_blocks"] >= 2
    runs = split_runs(data, "train") + split_runs(data, "val")
    # contiguous runs of the book, separated by end-of-text, together the whole book exactly once
    assert len(runs) >= 3 and all(r and r in text for r in runs)
    assert "".join(sorted(runs, key=text.index)) == text


# ---------------------------------------------------------------- batches


def test_get_batch_shapes_shift_and_reproducibility(prepared):
    data = TokenData(prepared[0])
    tokens = np.asarray(data.tokens("train"), dtype=np.int64)
    x, y = data.get_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = torch.randint(0, len(tokens) - 16, (4,), generator=torch.Generator().manual_seed(3))
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == tokens[s:s + 16].tolist() and y[row].tolist() == tokens[s + 1:s + 17].tolist()
    x2, y2 = data.get_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch("train", 4, 16, torch.Generator().manual_seed(4))
    assert not torch.equal(x, x3)


def test_rank_slices_make_the_single_process_batch(prepared):
    data = TokenData(prepared[0])
    g = torch.Generator().manual_seed(0)
    whole = [data.get_batch("train", 6, 8, g) for _ in range(3)]
    gens = [torch.Generator().manual_seed(0) for _ in range(3)]
    for step in range(3):
        parts = [data.get_batch("train", 2, 8, gens[r], rank=r, world_size=3) for r in range(3)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[step][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[step][1])
    for shuffle in ("epoch", "random"):
        single = data.sampler("train", 4, 8, seed=1, shuffle=shuffle)
        ranks = [data.sampler("train", 2, 8, seed=1, shuffle=shuffle, rank=r, world_size=2) for r in range(2)]
        for _ in range(5):
            x, y = single.next_batch()
            parts = [s.next_batch() for s in ranks]
            assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="rank 2 is not valid"):
        data.get_batch("train", 2, 8, rank=2, world_size=2)


@pytest.mark.parametrize("shuffle", ["epoch", "random"])
def test_sampler_state_restores_the_same_batches(prepared, shuffle):
    data = TokenData(prepared[0])
    sampler = data.sampler("train", 3, 8, seed=7, shuffle=shuffle)
    for _ in range(4):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON round trip
    expected = [sampler.next_batch() for _ in range(5)]
    resumed = data.sampler("train", 3, 8, seed=7, shuffle=shuffle)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(5)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # resuming with another world size but the same global batch continues identically
    ranks = [data.sampler("train", 1, 8, seed=7, shuffle=shuffle, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.load_state_dict(state)
    x = torch.cat([s.next_batch()[0] for s in ranks])
    assert torch.equal(x, expected[0][0])
    with pytest.raises(ValueError, match="seq_len=8.*same data"):
        data.sampler("train", 3, 16, seed=7, shuffle=shuffle).load_state_dict(state)


def test_epoch_sampler_visits_every_window_once_per_epoch(prepared):
    data = TokenData(prepared[0])
    seq_len = 8
    n_windows = (data.num_tokens("train") - 1) // seq_len
    sampler = data.sampler("train", 5, seq_len, seed=2)
    tokens = torch.from_numpy(np.asarray(data.tokens("train"), dtype=np.int64))
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)
    seen = torch.cat([sampler.next_batch()[0] for _ in range(-(-2 * n_windows // 5))])[: 2 * n_windows]
    # every window exactly once in each of two epochs (compared as multisets: contents may repeat)
    all_windows = sorted(tuple(w.tolist()) for w in windows)
    first = [tuple(r.tolist()) for r in seen[:n_windows]]
    second = [tuple(r.tolist()) for r in seen[n_windows:]]
    assert sorted(first) == all_windows and sorted(second) == all_windows
    assert first != second  # reshuffled
    assert sampler.epoch >= 2


def test_eval_batches_cover_the_split_exactly(prepared):
    data = TokenData(prepared[0])
    n = data.num_tokens("val")
    tokens = np.asarray(data.tokens("val"), dtype=np.int64)
    seq_len = 7
    batches = list(data.eval_batches("val", batch_size=3, seq_len=seq_len))
    n_windows = (n - 1) // seq_len
    assert data.num_eval_windows("val", seq_len) == n_windows and n_windows > 3
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (n_windows, seq_len)
    assert y.flatten().tolist() == tokens[1:1 + n_windows * seq_len].tolist()  # each target once, in order
    assert x.flatten().tolist() == tokens[:n_windows * seq_len].tolist()
    ranks = [list(data.eval_batches("val", 3, seq_len, rank=r, world_size=2)) for r in range(2)]
    rows = [torch.cat([b[0] for b in r]) for r in ranks]
    assert torch.equal(rows[0], x[0::2]) and torch.equal(rows[1], x[1::2])
    assert len(list(data.eval_batches("val", 2, seq_len, max_windows=3))) == 2


# ---------------------------------------------------------------- errors


def test_errors_for_bad_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        Corpus.from_args([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no text files"):
        Corpus.from_args([str(tmp_path / "empty")])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match="contains no text files"):
        Corpus.from_args([str(tmp_path / "bin")])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        prepare([str(tmp_path / "blank")], tmp_path / "out", tokenizer=_saved_bpe(tmp_path), progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(tmp_path / "blank")], tmp_path / "out", val_fraction=0.0)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    write_docs(tmp_path / "c", make_docs(4))
    with pytest.raises(ValueError, match="not empty and holds no prepared token data"):
        prepare([str(tmp_path / "c")], tmp_path / "foreign", tokenizer=_saved_bpe(tmp_path), progress=False)


def _saved_bpe(tmp_path: Path) -> Path:
    path = tmp_path / "bpe.json"
    if not path.exists():
        train_bpe(make_docs(5), vocab_size=270).save(str(path))
    return path


def test_errors_for_bad_token_directories(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="no prepared data.*memoryformer prepare"):
        TokenData(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenData(tmp_path / "plain")
    (tmp_path / "plain" / "meta.json").write_text('{"name": "something else"}')
    with pytest.raises(ValueError, match="not a memoryformer token directory"):
        TokenData(tmp_path / "plain")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in prepared[0].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train.bin holds .* bytes but meta.json says"):
        TokenData(copy)
    (copy / "train.bin").write_bytes((prepared[0] / "train.bin").read_bytes())
    (copy / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin is missing"):
        TokenData(copy)
    data = TokenData(prepared[0])
    n = data.num_tokens("val")
    with pytest.raises(ValueError, match=f"seq_len {n} is longer than the val split"):
        data.get_batch("val", 2, n)
    with pytest.raises(ValueError, match="longer than the train split"):
        data.sampler("train", 2, data.num_tokens("train"))
    with pytest.raises(ValueError, match="unknown split"):
        data.tokens("test")


# ---------------------------------------------------------------- the command


def test_cli_prepare_end_to_end(tmp_path, capsys):
    write_docs(tmp_path / "corpus", make_docs(30))
    rc = main(["prepare", str(tmp_path / "corpus" / "*.txt"), "--out", str(tmp_path / "tok"),
               "--vocab-size", "280", "--val-fraction", "0.1", "--seed", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "documents:  30" in out and "uint16" in out and str(tmp_path / "tok") in out
    data = TokenData(tmp_path / "tok")
    assert data.meta["seed"] == 3 and data.vocab_size <= 280
    assert sorted(split_documents(data, "train") + split_documents(data, "val")) == sorted(make_docs(30))
    # the default corpus, limited, with the tokenizer just made
    rc = main(["prepare", "--out", str(tmp_path / "default"), "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"),
               "--max-bytes", "64k", "--no-progress"])
    assert rc == 0 and TokenData(tmp_path / "default").meta["text_bytes"] == 65536
    assert "embedded default corpus" in capsys.readouterr().out
    # errors: one line on stderr, exit status 1
    rc = main(["prepare", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file or directory" in err and err.count("\n") == 1
    rc = main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "y"), "--dtype", "uint16",
               "--tokenizer", str(tmp_path / "missing.json")])
    assert rc == 1 and "unknown tokenizer" in capsys.readouterr().err


def test_resolve_sources_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    kinds = [type(s).__name__ for s in resolve_sources([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                                                        "hf:owner/name", "owner/dataset"])]
    assert kinds == ["TextFiles", "JsonlFile", "HFDataset", "HFDataset"]


# ---------------------------------------------------------------- file classification


def test_classify_file(tmp_path):
    classify = corpus_module.classify_file
    (tmp_path / "latin1").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, d\u00e9j\u00e0 vu\n".encode("latin-1") * 20)
    (tmp_path / "noise").write_bytes(random.Random(0).randbytes(4000).replace(b"\0", b"\1"))
    (tmp_path / "nul.txt").write_bytes(b"text\0more")
    (tmp_path / "model.pt").write_bytes(b"plain bytes")
    (tmp_path / "utf8").write_text("\u00fcber na\u00efve \u2713\n" * 20)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "pipe")
    kinds = {name: classify(tmp_path / name) for name in
             ("latin1", "noise", "nul.txt", "model.pt", "utf8", "dangling", "loop", "pipe")}
    assert kinds["latin1"] == ("text", "") and kinds["utf8"] == ("text", "")  # 8-bit text is text
    assert kinds["noise"] == kinds["nul.txt"] == kinds["model.pt"] == ("binary", "")
    assert kinds["dangling"] == ("unreadable", "broken symbolic link")
    assert kinds["loop"][0] == "unreadable" and "symbolic links" in kinds["loop"][1]
    assert kinds["pipe"] == ("unreadable", "not a regular file")


# ---------------------------------------------------------------- the python-site-packages corpus


def fake_site_packages(root: Path) -> Path:
    """Two distributions (with RECORDs), a file owned by none, a duplicate, a test suite, bytecode."""
    site = root / "site-packages"
    files = {
        "zz_loose.py": "LOOSE = 1\n",
        "pkga/__init__.py": "from pkga.core import f\n",
        "pkga/core.py": "def f(x):\n    return x + 1\n",
        "pkga/tests/test_core.py": "def test_f():\n    assert True\n",
        "pkgb/helpers.py": "def f(x):\n    return x + 1\n",  # the same bytes as pkga/core.py
        "pkgb/main.py": "import pkga\nprint(pkga.f(1))\n",
        "pkgb/.hidden/secret.py": "X = 2\n",
    }
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (site / "pkga" / "__pycache__").mkdir()
    (site / "pkga" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0\1")
    for name, version, owned in (("pkga", "1.2", ["pkga/__init__.py", "pkga/core.py", "pkga/tests/test_core.py"]),
                                 ("pkgb", "0.3", ["pkgb/helpers.py", "pkgb/main.py"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("".join(f"{f},,\n" for f in owned) + f"{info.name}/RECORD,,\n")
    return site


def test_site_packages_corpus_on_a_fake_site(tmp_path):
    site = fake_site_packages(tmp_path)
    corpus = embedded_corpus("python-site-packages", site_dirs=[site], include_stdlib=False)
    (part,) = corpus.sources
    # sorted by relative path, the duplicate's later copy, tests, bytecode and hidden folders left out
    assert [p.relative_to(site).as_posix() for p in part.paths] == \
        ["pkga/__init__.py", "pkga/core.py", "pkgb/main.py", "zz_loose.py"]
    assert part.duplicates == 1 and part.owners == ["pkga==1.2", "pkga==1.2", "pkgb==0.3", ""]
    expected_lines = "".join(f"python-site-packages/{p.relative_to(site).as_posix()}\t"
                             f"{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in part.paths)
    assert part.files_sha256() == hashlib.sha256(expected_lines.encode()).hexdigest()
    assert list(corpus.documents()) == [p.read_text() for p in part.paths]  # each file one document

    meta = prepare(corpus=corpus, out=tmp_path / "tokens", vocab_size=270, val_fraction=0.3, progress=False)
    recorded = meta["corpus"]["parts"][0]
    assert meta["corpus"]["python"] == platform.python_version()
    assert recorded["files_sha256"] == part.files_sha256() and recorded["files"] == 4
    assert recorded["packages"] == ["pkga==1.2", "pkgb==0.3"] and recorded["files_read"] == 4
    assert recorded["files_read_without_package"] == 1 and recorded["duplicates_dropped"] == 1
    assert meta["tokens"] == meta["train_tokens"] + meta["val_tokens"] == sum(
        TokenData(tmp_path / "tokens").num_tokens(s) for s in ("train", "val"))
    # the split is by document: each file lands whole in one split
    data = TokenData(tmp_path / "tokens")
    docs = split_documents(data, "train") + split_documents(data, "val")
    assert sorted(docs) == sorted(p.read_text() for p in part.paths) and meta["val_documents"] >= 1

    # with max_bytes only the files read count: the first two files are both pkga's
    first_two = sum(len(p.read_bytes()) for p in part.paths[:2])
    limited = embedded_corpus("python-site-packages", first_two, site_dirs=[site], include_stdlib=False)
    meta = prepare(corpus=limited, out=tmp_path / "limited", vocab_size=270, val_fraction=0.3, progress=False)
    assert meta["corpus"]["parts"][0]["packages"] == ["pkga==1.2"] and meta["corpus"]["parts"][0]["files_read"] == 2


def test_embedded_corpus_names(tmp_path):
    stdlib = Corpus.from_args(["embedded:python-stdlib"])
    assert stdlib.sources[0].paths == default_corpus_files()
    with pytest.raises(ValueError, match="unknown embedded corpus 'python-everything'.*python-site-packages"):
        Corpus.from_args(["embedded:python-everything"])
    with pytest.raises(FileNotFoundError, match="no Python sources found in the site-packages"):
        embedded_corpus("python-site-packages", site_dirs=[tmp_path], include_stdlib=False)
    # the site-packages part starts after the stdlib part, which is deduplicated against it
    site = fake_site_packages(tmp_path)
    (site / "pkgb" / "copy_of_os.py").write_bytes(Path(os.__file__).read_bytes())
    parts = embedded_corpus("python-site-packages", site_dirs=[site]).sources
    assert [type(p).__name__ for p in parts] == ["CodeFiles", "PydocTopics", "CodeFiles"]
    assert all(p.name != "copy_of_os.py" for p in parts[2].paths)
    assert len(set(parts[0].digests + parts[2].digests)) == len(parts[0].digests) + len(parts[2].digests)


@pytest.mark.slow
def test_site_packages_corpus_on_this_installation():
    corpus = embedded_corpus("python-site-packages")
    stdlib, _, site = corpus.sources
    assert len(site.paths) > 1000 and any(o.startswith("torch==") for o in site.owners)
    assert len(set(stdlib.digests + site.digests)) == len(stdlib.digests) + len(site.digests)
    assert corpus.size_hint() > 50 * 2**20


# ---------------------------------------------------------------- fingerprints


def test_ends_hash_against_a_plain_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint_module, "END_BYTES", 1000)
    rng = random.Random(1)
    for size in (0, 10, 999, 1000, 1500, 2000, 2001, 7777):
        data = rng.randbytes(size)
        (tmp_path / "f").write_bytes(data)
        reference = hashlib.sha256(size.to_bytes(8, "little") + data[:1000] + data[max(1000, size - 1000):])
        assert fingerprint_module._ends_sha256(tmp_path / "f", size) == reference.hexdigest()


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_fingerprint_names_what_changed(tmp_path, prepared):
    path, docs = prepared
    saved = json.loads(json.dumps(data_fingerprint(path)))  # survives JSON (it goes into checkpoints)
    assert fingerprint_mismatch(saved, data_fingerprint(path)) is None
    assert fingerprint_mismatch(saved, data_fingerprint(copy_dir(path, tmp_path / "moved"))) is None
    assert saved["train_tokens"] == TokenData(path).num_tokens("train") and saved["shards"]["train"]["sha256"]

    # fewer documents, same tokenizer
    write_docs(tmp_path / "fewer", docs[:25])
    prepare([str(tmp_path / "fewer")], tmp_path / "fewer_tokens", tokenizer=path / "tokenizer.json",
            val_fraction=0.1, progress=False)
    problem = fingerprint_mismatch(saved, data_fingerprint(tmp_path / "fewer_tokens"))
    old, new = saved["train_tokens"], TokenData(tmp_path / "fewer_tokens").num_tokens("train")
    assert problem.startswith(f"the data in {(tmp_path / 'fewer_tokens').resolve()} changed since this run started: "
                              f"training tokens {old:,} -> {new:,}; ")
    assert "tokenizer" not in problem and "\n" not in problem

    # same corpus, another tokenizer
    prepare([str(path.parent / "corpus")], tmp_path / "retok", vocab_size=280, val_fraction=0.1, progress=False)
    problem = fingerprint_mismatch(saved, data_fingerprint(tmp_path / "retok"))
    assert "tokenizer differs" in problem and "training tokens" in problem

    # same sizes, other bytes: a swapped token at the start of train.bin
    same_size = copy_dir(path, tmp_path / "edited")
    tokens = np.fromfile(same_size / "train.bin", dtype=np.uint16)
    tokens[0] = (int(tokens[0]) + 1) % 256
    tokens.tofile(same_size / "train.bin")
    problem = fingerprint_mismatch(saved, data_fingerprint(same_size))
    assert problem is not None and "train.bin contents differ (same size)" in problem
    assert "val.bin" not in problem and "training tokens" not in problem

    # another split seed: the counts change and the setting is named
    prepare([str(path.parent / "corpus")], tmp_path / "seeded", tokenizer=path / "tokenizer.json",
            val_fraction=0.1, seed=4, progress=False)
    assert "split seed 0 -> 4" in fingerprint_mismatch(saved, data_fingerprint(tmp_path / "seeded"))

    # an older fingerprint without some keys compares what it has; a broken one is said to be
    partial = {k: v for k, v in saved.items() if k not in ("shards", "tokenizer_sha256")}
    assert fingerprint_mismatch(partial, data_fingerprint(same_size)) is None
    assert "not readable" in fingerprint_mismatch({"train_tokens": 3}, data_fingerprint(path))


def test_prepare_in_a_log_writes_timed_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMORYFORMER_PROGRESS_EVERY", "0")  # a line per update instead of every 30 s
    write_docs(tmp_path / "c", make_docs(30))
    prepare([str(tmp_path / "c")], tmp_path / "out", vocab_size=280, val_fraction=0.1)  # progress by default
    err = capsys.readouterr().err  # not a terminal: lines, not a bar
    total = sum(len(d.encode()) for d in make_docs(30))
    assert f"reading text for the BPE: {total}/{total} bytes (100.0%)" in err
    tokenising = [line for line in err.splitlines() if line.startswith("tokenising: ")]
    assert tokenising and "tokens/s" in tokenising[-1] and "elapsed" in tokenising[-1]
    prepare([str(tmp_path / "c")], tmp_path / "quiet", vocab_size=280, val_fraction=0.1, progress=False)
    assert capsys.readouterr().err == ""


def test_prepare_into_the_working_directory(tmp_path, monkeypatch):
    write_docs(tmp_path / "c", make_docs(10))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    prepare([str(tmp_path / "c")], ".", vocab_size=280, val_fraction=0.2, progress=False)
    assert sorted(os.listdir(tmp_path / "here")) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
