"""Faults around prepared data: a killed `prepare`, replacing data a run depends on, damaged shards and
meta.json, a full disk, and input that is not plain UTF-8 text. Every error is one line with exit code 1."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import memoryformer
from memoryformer.cli import main
from memoryformer.data import TokenData, data_fingerprint, prepare
from memoryformer.data import shards as shards_module

SRC = str(Path(memoryformer.__file__).resolve().parents[1])
WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega".split()
FILES = ("meta.json", "tokenizer.json", "train.bin", "val.bin")


def write_corpus(root: Path, n_docs: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = " ".join(f"{rng.choice(WORDS)}{rng.randrange(50)}" for _ in range(words))
        (root / f"doc{i:03d}.txt").write_text(f"Document {i}.\n{body}\n")
    return root


def snapshot(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


def hidden_temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memoryformer ") and ": error: " in lines[0]
    return lines[0]


def prepare_command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "memoryformer.cli", "prepare", str(corpus), "--out", str(out),
            "--val-fraction", "0.1", "--no-progress", *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def old_data(tmp_path) -> Path:
    """A complete prepared directory that a run could depend on."""
    out = tmp_path / "tokens"
    prepare([str(write_corpus(tmp_path / "old_corpus", 20, 80))], out, vocab_size=300, val_fraction=0.2,
            progress=False)
    return out


# ---------------------------------------------------------------- a killed prepare


def temporaries_of(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.prepare-*.tmp"))


def run_and_time(command: list[str], out: Path) -> tuple[float, float]:
    """Run to the end; seconds until its temporary directory appeared, and until it finished."""
    started = time.monotonic()
    child = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    appeared = None
    while child.poll() is None:
        if appeared is None and temporaries_of(out):
            appeared = time.monotonic() - started
        time.sleep(0.005)
    finished = time.monotonic() - started
    assert child.returncode == 0, child.stderr.read()
    child.stderr.close()
    assert appeared is not None, "the build directory was never seen"
    return appeared, finished


@pytest.fixture(scope="module")
def replacement(tmp_path_factory):
    """Old data, and a timed, complete replacement of it by a prepare that the tests then kill."""
    root = tmp_path_factory.mktemp("kill")
    out = root / "tokens"
    prepare([str(write_corpus(root / "old_corpus", 20, 80))], out, vocab_size=300, val_fraction=0.2,
            progress=False)
    before = snapshot(out)
    (root / "tokenizer.json").write_bytes(before["tokenizer.json"])
    corpus = write_corpus(root / "new_corpus", 600, 600, seed=1)
    command = prepare_command(corpus, out, "--tokenizer", str(root / "tokenizer.json"), "--force")
    appeared, finished = run_and_time(command, out)
    return {"out": out, "command": command, "before": before, "after": snapshot(out),
            "appeared": appeared, "finished": finished}


@pytest.mark.parametrize("seed, phase", [(0, "starting"), (1, "building"), (2, "building"), (3, "building")])
def test_kill_9_mid_prepare_keeps_the_old_data_and_a_rerun_works(replacement, seed, phase):
    out, command, before, after = (replacement[k] for k in ("out", "command", "before", "after"))
    for name, data in before.items():  # the old data, as a run started on it saw it
        (out / name).write_bytes(data)
    rng = random.Random(seed)
    child = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if phase == "starting":
        time.sleep(rng.uniform(0.2, 1.0) * replacement["appeared"])
    else:
        while not temporaries_of(out) and child.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 1.0) * (replacement["finished"] - replacement["appeared"]))
    child.send_signal(signal.SIGKILL)
    child.wait()
    if not out.exists():  # killed between its two renames: a reader moves the old data back
        TokenData(out)
    state = snapshot(out)
    assert state in (before, after)  # the old data whole or (killed after its swap) the new, never a mix
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    TokenData(out)

    left = hidden_temporaries(out.parent)
    rerun = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(out) == after and hidden_temporaries(out.parent) == []  # prepare is deterministic
    notes = [line for line in rerun.stderr.splitlines() if "leftover" in line]
    if left:
        assert len(notes) == 1 and f"removed {len(left)} leftover temporar" in notes[0] and left[0] in notes[0]
    else:
        assert notes == []


def test_killed_between_the_two_renames_restores_the_previous_data(tmp_path, old_data, capsys):
    before = snapshot(old_data)
    aside = old_data.parent / f".{old_data.name}.old-{2**22 + 12345}-0badcafe.tmp"  # a pid no process has
    half_built = old_data.parent / f".{old_data.name}.prepare-{2**22 + 12345}-0badcafe.tmp"
    os.rename(old_data, aside)
    half_built.mkdir()
    (half_built / "train.bin").write_bytes(b"\0" * 10)
    data = TokenData(old_data)  # a reader moves the previous data back
    assert snapshot(old_data) == before and data.num_tokens("train") > 0
    assert "restored the previous data" in capsys.readouterr().err

    os.rename(old_data, aside)
    rc, _, err = cli(capsys, "prepare", str(write_corpus(tmp_path / "c", 8, 30)), "--out", str(old_data),
                     "--vocab-size", "280", "--no-progress")
    line = one_error_line(err.split("\n", 2)[-1])  # after the two notes, the refusal: data is there again
    assert rc == 1 and "already holds prepared token data" in line
    assert "restored the previous data" in err and "removed 1 leftover temporary" in err
    assert snapshot(old_data) == before and hidden_temporaries(old_data.parent) == []


def test_hidden_temporaries_inside_an_empty_looking_directory_are_cleaned(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train.bin.4321.abcd1234.tmp").write_bytes(b"\1" * 100)  # what an older prepare left
    assert os.listdir(out) and not [p for p in os.listdir(out) if not p.startswith(".")]
    rc, _, err = cli(capsys, "prepare", str(write_corpus(tmp_path / "c", 8, 30)), "--out", str(out),
                     "--vocab-size", "280", "--no-progress")
    assert rc == 0, err
    assert err.strip() == "prepare: note: removed 1 leftover temporary of an interrupted prepare " \
                          "(.train.bin.4321.abcd1234.tmp)"
    assert sorted(os.listdir(out)) == sorted(FILES)


# ---------------------------------------------------------------- replacing data a run depends on


def test_refuses_to_replace_prepared_data_without_force(tmp_path, old_data, capsys):
    before = snapshot(old_data)
    fingerprint = data_fingerprint(old_data)
    corpus = write_corpus(tmp_path / "other", 10, 40, seed=3)
    rc, out, err = cli(capsys, "prepare", str(corpus), "--out", str(old_data), "--vocab-size", "280",
                       "--no-progress")
    line = one_error_line(err)
    assert rc == 1 and out == ""
    assert f"--out {old_data} already holds prepared token data ({fingerprint['train_tokens']:,} training " \
           f"tokens)" in line and "--force" in line
    assert snapshot(old_data) == before

    rc, out, err = cli(capsys, "prepare", str(corpus), "--out", str(old_data), "--vocab-size", "280",
                       "--no-progress", "--force")
    assert rc == 0 and err == "" and f"written to: {old_data}" in out
    assert snapshot(old_data) != before and hidden_temporaries(old_data.parent) == []

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    rc, _, err = cli(capsys, "prepare", str(corpus), "--out", str(foreign), "--force", "--no-progress")
    assert rc == 1 and "is not empty and holds no prepared token data" in one_error_line(err)
    assert (foreign / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------- a full disk


def test_full_disk_leaves_the_previous_data(tmp_path, old_data, capsys, monkeypatch):
    before = snapshot(old_data)
    real_write = shards_module._SplitWriter.write
    calls = []

    def fill_up(self, ids):
        calls.append(len(ids))
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.handle.name))
        real_write(self, ids)

    monkeypatch.setattr(shards_module._SplitWriter, "write", fill_up)
    rc, out, err = cli(capsys, "prepare", str(write_corpus(tmp_path / "c", 20, 60)), "--out", str(old_data),
                       "--vocab-size", "280", "--no-progress", "--force")
    line = one_error_line(err)
    assert rc == 1 and out == "" and "no space left for the token data" in line
    assert f"the previous data in {old_data} is unchanged" in line and "train.bin" in line
    assert snapshot(old_data) == before and hidden_temporaries(old_data.parent) == []


def test_file_size_limit_in_a_real_process(tmp_path, old_data):
    """RLIMIT_FSIZE makes real writes fail (EFBIG) the way a full disk does (ENOSPC)."""
    before = snapshot(old_data)
    limit = 40_000

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    corpus = write_corpus(tmp_path / "big", 200, 200)
    result = subprocess.run(prepare_command(corpus, old_data, "--vocab-size", "280", "--force"), env=child_env(),
                            capture_output=True, text=True, preexec_fn=limit_file_size)
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and "no space left for the token data" in line and "File too large" in line
    assert snapshot(old_data) == before and hidden_temporaries(old_data.parent) == []


# ---------------------------------------------------------------- damaged prepared data


def damaged_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


def reader_error(path: Path, kind: type[Exception] = ValueError) -> str:
    with pytest.raises(kind) as info:
        TokenData(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_damaged_shards_and_meta_are_named(tmp_path, old_data):
    d = damaged_copy(old_data, tmp_path / "truncated")
    (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-6])
    message = reader_error(d)
    assert message.startswith(f"{d / 'train.bin'} holds ") and "it is truncated" in message

    d = damaged_copy(old_data, tmp_path / "longer")
    with open(d / "val.bin", "ab") as f:
        f.write(b"\0\0")
    assert "val.bin" in reader_error(d) and "longer than recorded" in reader_error(d)

    d = damaged_copy(old_data, tmp_path / "cut_meta")
    (d / "meta.json").write_bytes((d / "meta.json").read_bytes()[:40])
    assert reader_error(d).startswith(f"{d / 'meta.json'} is not valid JSON")

    d = damaged_copy(old_data, tmp_path / "foreign_meta")
    (d / "meta.json").write_text(json.dumps({"format": "someone-elses-tokens", "train_tokens": 5}))
    assert "is not a memoryformer token directory" in reader_error(d)

    d = damaged_copy(old_data, tmp_path / "bad_field")
    edit_meta(d, train_tokens="lots")
    assert reader_error(d) == (f"{d / 'meta.json'}: train_tokens is 'lots', not a non-negative integer; the file "
                               "is damaged: prepare the data again")
    edit_meta(d, train_tokens=json.loads((old_data / "meta.json").read_text())["train_tokens"], eot_id=10**6)
    assert "eot_id 1000000 is not below vocab_size" in reader_error(d)

    d = damaged_copy(old_data, tmp_path / "no_tokenizer")
    (d / "tokenizer.json").unlink()
    message = reader_error(d, FileNotFoundError)
    assert message.startswith(f"{d / 'tokenizer.json'} is missing (the tokenizer of the prepared data)")

    d = damaged_copy(old_data, tmp_path / "bad_tokenizer")
    (d / "tokenizer.json").write_text('{"model": "not really"}')
    with pytest.raises(ValueError, match=r"bad_tokenizer/tokenizer.json is not a `tokenizers` JSON file"):
        TokenData(d).tokenizer()


def test_verify_finds_a_changed_byte_in_the_middle(tmp_path, old_data):
    TokenData(old_data).verify()
    d = damaged_copy(old_data, tmp_path / "flipped")
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    tokens[len(tokens) // 2] ^= 1
    tokens.tofile(d / "train.bin")
    data = TokenData(d)  # the size is right, so opening succeeds
    with pytest.raises(ValueError, match=r"flipped/train.bin does not match the sha256 in meta.json"):
        data.verify()


def test_cli_reader_error_is_one_line(tmp_path, old_data, capsys):
    d = damaged_copy(old_data, tmp_path / "truncated")
    (d / "val.bin").write_bytes(b"\0")
    rc, _, err = cli(capsys, "train", "--preset", "mf-tiny", "--data", str(d), "--out", str(tmp_path / "run"),
                     "--max-steps", "1", "--device", "cpu", "--no-progress", "--no-tensorboard")
    assert rc == 1 and f"{d / 'val.bin'} holds 1 bytes" in one_error_line(err)


# ---------------------------------------------------------------- input that is not plain UTF-8 text


def test_non_utf8_binary_and_unreadable_inputs_are_reported(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", 10, 40)
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\nna\u00efve\n".encode("latin-1"))
    (corpus / "cp1252 notes").write_bytes("d\u00e9j\u00e0 vu, \u00e7a va\n".encode("latin-1") * 10)
    (corpus / "weights.bin").write_bytes(bytes(range(256)))
    (corpus / "image").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (corpus / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    (corpus / "loop.txt").symlink_to(corpus / "loop.txt")
    os.mkfifo(corpus / "pipe.txt")
    rc, out, err = cli(capsys, "prepare", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "280",
                       "--no-progress")
    assert rc == 0 and "written to" in out
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert lines[0] == (f"prepare: note: 2 files are not valid UTF-8: their invalid bytes were read as U+FFFD "
                        f"(33 characters; first: {corpus / 'cp1252 notes'})")  # 3 + 10 * 3 accents
    assert lines[1] == f"prepare: note: skipped 2 binary files: {corpus / 'image'}, {corpus / 'weights.bin'}"
    assert lines[2].startswith("prepare: note: skipped 3 unreadable files: "
                               f"{corpus / 'dangling.txt'} (broken symbolic link), {corpus / 'loop.txt'} (")
    assert lines[2].endswith(f"{corpus / 'pipe.txt'} (not a regular file)")
    recorded = TokenData(tmp_path / "out").meta["input"]
    assert recorded["non_utf8_files"] == 2 and recorded["binary_skipped"] == 2 and recorded["unreadable_skipped"] == 3


@pytest.mark.parametrize("name, expected", [
    ("dangling.txt", "is a broken symbolic link (to "),
    ("pipe.txt", "cannot read {path}: not a regular file"),
    ("blob.bin", "{path} does not look like a text file (binary content)"),
])
def test_a_named_input_that_cannot_be_used_is_an_error(tmp_path, capsys, name, expected):
    path = tmp_path / name
    if name == "dangling.txt":
        path.symlink_to(tmp_path / "gone.txt")
    elif name == "pipe.txt":
        os.mkfifo(path)
    else:
        path.write_bytes(b"\0\1\2")
    rc, _, err = cli(capsys, "prepare", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert rc == 1 and expected.format(path=path) in one_error_line(err)
    assert not (tmp_path / "out").exists()
