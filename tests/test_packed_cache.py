"""The packed weights kept on disk (edgellama/packed_cache.py): a second load maps what the first
packed, computes exactly the same, and every way the cache can be wrong or unusable falls back to
packing in memory without changing a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edgellama
from edgellama import packed_cache
from edgellama.gguf import GGUFFile
from edgellama.packed_cache import PackedCache, wait_for_writes
from edgellama.quants import GGMLType
from tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
IDS = [5, 17, 200, 3, 99, 42]
K_SIZE = dict(dim=256, ffn=512)  # K-quant rows are 256-element super-blocks


def _load(path, folder):
    return edgellama.load(path, n_ctx=32, threads=2, packed_cache=folder)


def _packed_cache(folder, path, layout, sizes) -> PackedCache:
    """The PackedCache of the model file at ``path`` (opened here, as a load opens it)."""
    f = GGUFFile(path)
    try:
        return PackedCache(folder, str(path), f.stat, f.pread, layout, sizes)
    finally:
        f.close()


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.packed")) if folder.exists() else []


@pytest.mark.parametrize("qtype,size,tied", [(GGMLType.Q4_0, {}, True), (GGMLType.Q8_0, {}, False),
                                             (GGMLType.Q5_1, {}, True), (GGMLType.Q6_K, K_SIZE, True),
                                             (GGMLType.Q4_K, K_SIZE, False)],
                         ids=["Q4_0-tied", "Q8_0-untied", "Q5_1-tied", "Q6_K-tied", "Q4_K-untied"])
def test_a_second_load_maps_the_first_ones_packing_and_computes_the_same(tmp_path, qtype, size, tied):
    path = write_tiny_model(tmp_path / "m.gguf", qtype, tied=tied, **size)
    folder = tmp_path / "cache"
    expected = _load(path, False)
    assert expected.weights.pack_source == "memory" and not folder.exists()
    first = _load(path, folder)
    assert first.weights.pack_source == "saving"
    wait_for_writes()
    (cache_file,) = _cache_files(folder)
    assert not list(folder.glob("*.tmp"))
    second = _load(path, folder)
    assert second.weights.pack_source == "mapped"
    # the kernels read the file's pages: every packed byte equal, and so every logit, bit for bit
    assert np.array_equal(second.weights.packed, expected.weights.packed)
    assert np.array_equal(second.weights.output.packed, expected.weights.output.packed)
    assert not second.weights.packed.flags.writeable
    if sys.platform.startswith("linux"):
        assert str(cache_file) in Path("/proc/self/maps").read_text()
    want = expected.logits(IDS)
    assert np.array_equal(first.logits(IDS), want)
    assert np.array_equal(second.logits(IDS), want)
    expected.reset()
    second.reset()
    for token in IDS:  # the one-token path too
        assert np.array_equal(second.eval([token]), expected.eval([token]))


def test_float_weights_need_no_cache(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.F16)
    model = _load(path, tmp_path / "cache")
    assert model.weights.pack_source == "memory"
    wait_for_writes()
    assert _cache_files(tmp_path / "cache") == []


def _mapped_after_rewrite(tmp_path, rewrite) -> tuple[str, np.ndarray, np.ndarray]:
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0, seed=1)
    folder = tmp_path / "cache"
    _load(path, folder)
    wait_for_writes()
    rewrite(path)
    model = _load(path, folder)
    return model.weights.pack_source, model.logits(IDS), _load(path, False).logits(IDS)


def test_a_model_rewritten_in_place_is_packed_again(tmp_path):
    """Same path, size, inode and (within a clock tick) times: the sampled content tells them apart."""
    def rewrite(path):
        stat = os.stat(path)
        data = write_tiny_model(tmp_path / "other.gguf", GGMLType.Q4_0, seed=2).read_bytes()
        assert len(data) == stat.st_size
        with open(path, "r+b") as fh:  # the same inode
            fh.write(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    source, got, want = _mapped_after_rewrite(tmp_path, rewrite)
    assert source == "saving"
    assert np.array_equal(got, want)


def test_a_model_replaced_while_it_loads_keys_the_copy_by_the_file_packed(tmp_path):
    """Another file renamed over the path between the open and the packing (a download, a
    quantizer's --force): the copy written describes the file whose weights it holds, so a later
    load of the new file packs that one instead of mapping the old weights."""
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_1, seed=1)
    new = write_tiny_model(tmp_path / "new.gguf", GGMLType.Q4_1, seed=2)
    folder = tmp_path / "cache"
    old_want = _load(path, False).logits(IDS)
    new_want = _load(new, False).logits(IDS)
    assert not np.array_equal(old_want, new_want)
    f = GGUFFile(path)
    os.replace(new, path)  # after the open, before the packing
    first = edgellama.Model(f, n_ctx=32, threads=2, packed_cache=folder)
    assert first.weights.pack_source == "saving"
    assert np.array_equal(first.logits(IDS), old_want)  # the file it opened
    wait_for_writes()
    later = _load(path, folder)
    assert later.weights.pack_source == "saving"  # (another file: its own copy)
    assert np.array_equal(later.logits(IDS), new_want)
    wait_for_writes()
    again = _load(path, folder)
    assert again.weights.pack_source == "mapped" and np.array_equal(again.logits(IDS), new_want)


def test_a_corrupt_or_truncated_cache_file_is_ignored_and_replaced(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    folder = tmp_path / "cache"
    want = _load(path, False).logits(IDS)
    _load(path, folder)
    wait_for_writes()
    (cache_file,) = _cache_files(folder)
    good = cache_file.read_bytes()
    header_len = int.from_bytes(good[8:12], "little")
    key = json.loads(good[12:12 + header_len])
    for damaged in (good[:len(good) // 2],                                  # truncated
                    b"NOTPACK!" + good[8:],                                 # another file
                    good[:8] + (1 << 20).to_bytes(4, "little") + good[12:],  # header length past its room
                    good[:12] + b"}" + good[13:],                           # header not JSON
                    good[:12] + json.dumps({**key, "layout": "0" * 64}).encode().ljust(header_len)
                    + good[12 + header_len:]):                              # another layout
        cache_file.write_bytes(damaged)
        model = _load(path, folder)
        assert model.weights.pack_source == "saving"
        assert np.array_equal(model.logits(IDS), want)
        wait_for_writes()
        assert cache_file.read_bytes() == good  # written again, whole
    assert _load(path, folder).weights.pack_source == "mapped"


def test_no_room_no_folder_or_a_failing_disk_packs_in_memory(tmp_path, monkeypatch):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    want = _load(path, False).logits(IDS)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    model = _load(path, not_a_folder)  # mkdir fails
    assert model.weights.pack_source == "memory" and np.array_equal(model.logits(IDS), want)

    folder = tmp_path / "cache"
    monkeypatch.setattr(packed_cache, "MIN_FREE_BYTES", 1 << 62)  # the copy would leave too little free
    model = _load(path, folder)
    assert model.weights.pack_source == "memory" and np.array_equal(model.logits(IDS), want)
    monkeypatch.undo()

    def full_disk(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packed_cache.os, "pwrite", full_disk)
    monkeypatch.setattr(packed_cache.os, "pwritev", full_disk)
    model = _load(path, folder)
    assert model.weights.pack_source == "saving"  # the writer fails later, in its thread
    wait_for_writes()
    assert np.array_equal(model.logits(IDS), want)
    # neither a cache file nor its temporary file (the tokenizer's small tables are kept beside)
    assert [p.name for p in folder.iterdir() if not p.is_dir()] == []


def test_the_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EDGELLAMA_PACKED_CACHE")
    assert packed_cache.default_folder() == tmp_path / "xdg" / "edgellama" / "packed"
    for off in ("off", "0", "", "OFF", "false"):
        monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", off)
        assert packed_cache.default_folder() is None
        assert packed_cache.resolve_folder(None) is None
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "here"))
    assert packed_cache.resolve_folder(None) == tmp_path / "here"
    assert packed_cache.resolve_folder(True) == tmp_path / "here"
    assert packed_cache.resolve_folder(False) is None
    assert packed_cache.resolve_folder(tmp_path / "there") == tmp_path / "there"


def test_writing_removes_the_copies_of_gone_or_changed_models_and_old_temporary_files(tmp_path):
    folder = tmp_path / "cache"
    gone = write_tiny_model(tmp_path / "gone.gguf", GGMLType.Q4_0)
    changed = write_tiny_model(tmp_path / "changed.gguf", GGMLType.Q4_0)
    kept = write_tiny_model(tmp_path / "kept.gguf", GGMLType.Q4_0)
    for path in (gone, changed, kept):
        _load(path, folder)
    wait_for_writes()
    assert len(_cache_files(folder)) == 3
    names = {json.loads(p.read_bytes()[12:12 + int.from_bytes(p.read_bytes()[8:12], "little")])["model"]: p
             for p in _cache_files(folder)}
    gone.unlink()
    write_tiny_model(changed, GGMLType.Q4_0, seed=5)
    os.utime(changed, ns=(0, 10**9))
    stem = "0123456789abcdef" * 2
    old_temp, new_temp = folder / f"{stem}.k3x_9q.tmp", folder / f"{stem}.abc123.tmp"
    # a user's files in the folder (EDGELLAMA_PACKED_CACHE may name a shared one): never removed
    foreign = [folder / "draft.tmp", folder / "photos.packed", folder / f"{stem}.packed.bak", folder / f"{stem}.tmp"]
    for p in (old_temp, new_temp, *foreign):
        p.write_bytes(b"x")
    long_ago = time.time() - 2 * packed_cache.STALE_TEMP_SECONDS
    for p in (old_temp, *foreign):
        os.utime(p, (long_ago, long_ago))
    import fcntl

    with open(new_temp, "rb") as held:  # a writer of another process holds its file locked
        fcntl.flock(held, fcntl.LOCK_EX)
        _load(write_tiny_model(tmp_path / "new.gguf", GGMLType.Q4_0), folder)  # a write sweeps the folder
        wait_for_writes()
    left = set(_cache_files(folder)) - set(foreign)
    assert names[os.path.realpath(kept)] in left
    assert names[os.path.realpath(gone)] not in left and names[os.path.realpath(changed)] not in left
    assert len(left) == 2
    assert not old_temp.exists() and new_temp.exists()
    assert all(p.read_bytes() == b"x" for p in foreign)


def test_the_copy_is_written_in_whole_aligned_windows(tmp_path, monkeypatch):
    """The cache file is written window by window at multiples of WRITE_CHUNK, each window whole
    (in one call, or a few consecutive ones where it spans many buffers) whatever sections and gaps
    it covers, so that the page cache keeps it in large folios; it reads back exactly, with zeros
    between the sections.  Here: windows of 64 KiB over sections of many sizes, 3 buffers a call."""
    window = 1 << 16
    monkeypatch.setattr(packed_cache, "WRITE_CHUNK", window)
    monkeypatch.setattr(packed_cache, "_IOV_MAX", 3)
    sizes = [1, 4096, 5000, 70000, 200000, 10, 4095, 131072, 3]
    rng = np.random.default_rng(0)
    sections = [rng.integers(1, 256, n, dtype=np.uint8) for n in sizes]
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    cache = _packed_cache(tmp_path / "c", path, {"target": {"lanes": 8}}, sizes)
    calls = []
    real = os.pwritev

    def record(fd, buffers, offset):
        assert len(buffers) <= 3
        written = real(fd, buffers, offset)
        calls.append((offset, written))
        return written

    monkeypatch.setattr(packed_cache.os, "pwritev", record)
    assert cache.save(sections)
    wait_for_writes()
    end = cache.offsets[-1]
    at, first = 0, {}
    for offset, written in calls:  # in order, back to back, from 0 to the end of the file
        assert offset == at and written > 0
        assert (offset + written - 1) // window == offset // window  # each call within one window
        first.setdefault(offset // window, offset)
        at += written
    n_windows = -(-end // window)
    assert at == end and len(calls) > n_windows  # (some windows took several calls)
    assert sorted(first) == list(range(n_windows)) and all(o == w * window for w, o in first.items())
    loaded = cache.load()
    assert loaded is not None and all(np.array_equal(a, b) for a, b in zip(loaded, sections))
    data = np.fromfile(cache.path, np.uint8)
    inside = np.zeros(end, bool)
    inside[:packed_cache.DATA_OFFSET] = True  # the header
    for offset, size in zip(cache.offsets, sizes):
        inside[offset:offset + size] = True
    assert len(data) == end and not data[~inside].any()


def test_cache_files_are_named_per_model_and_layout(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    a = _packed_cache(tmp_path, path, {"target": {"lanes": 8}}, [100])
    b = _packed_cache(tmp_path, path, {"target": {"lanes": 4}}, [100])
    c = _packed_cache(tmp_path, tmp_path / "m.gguf", {"target": {"lanes": 8}, "x": 1}, [100])
    assert a.path != b.path and a.path == c.path and a.key != c.key
    assert a.offsets[0] % 65536 == 0 and a.offsets[-1] == packed_cache.DATA_OFFSET + 4096


def test_the_cli_says_it_keeps_a_copy_once_and_the_second_run_gives_the_same_text(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_1)
    env = {**os.environ, "EDGELLAMA_PACKED_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "edgellama.cli", "run", "-m", str(path), "-p", "hello", "-n", "8", "--temp", "0",
           "-t", "2"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert "keeping the packed weights for faster loads" in runs[0].stderr
    assert str(tmp_path / "cache") in runs[0].stderr
    assert "keeping the packed weights" not in runs[1].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    assert len(_cache_files(tmp_path / "cache")) == 1  # the first process finished writing before it exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names are bytes on Linux")
def test_a_model_whose_path_is_not_utf8(tmp_path):
    path = write_tiny_model(tmp_path / os.fsdecode(b"model-\xff.gguf"), GGMLType.Q4_0)
    want = _load(path, False).logits(IDS)
    assert _load(path, tmp_path / "cache").weights.pack_source == "saving"
    wait_for_writes()
    model = _load(path, tmp_path / "cache")
    assert model.weights.pack_source == "mapped"
    assert np.array_equal(model.logits(IDS), want)


# ----- the BPE merge table kept beside the packed weights -------------------------------------------

TEXTS = ["Hello world, this is a test.", "  spaces\tand\nnewlines  ", "élan café naïve 日本語 🙂", "x" * 300,
         "The capital of France is Paris.", "1234567 + 89 = ?"]


def _tokenizer(meta, source="test"):
    from edgellama.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(meta, source=source)


def test_the_merge_table_is_kept_reused_and_checked(smollm2_path, tmp_path, monkeypatch):
    from edgellama.gguf import GGUFFile

    meta = GGUFFile(smollm2_path).metadata
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", "off")
    want = [_tokenizer(meta).encode(t) for t in TEXTS]
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    assert [_tokenizer(meta).encode(t) for t in TEXTS] == want  # computed, then kept
    (table,) = (tmp_path / "bpe-merges").glob("*.bin")
    good = table.read_bytes()
    assert len(good) == 8 * len(meta["tokenizer.ggml.merges"]) + 32
    calls = []
    import edgellama.tokenizer.bpe as bpe

    original = bpe._merge_results
    monkeypatch.setattr(bpe, "_merge_results", lambda *a: calls.append(1) or original(*a))
    assert [_tokenizer(meta).encode(t) for t in TEXTS] == want
    assert calls == []  # read from the table
    for damaged in (good[:-1], good[:8] + bytes([good[8] ^ 1]) + good[9:]):  # short; a flipped bit
        table.write_bytes(damaged)
        assert [_tokenizer(meta).encode(t) for t in TEXTS] == want
        assert calls and table.read_bytes() == good  # computed and kept again
        calls.clear()
    # a whole table (its hash matches) whose token ids are out of range is not used either
    bad = np.frombuffer(good[:-32], np.int64).copy()
    bad[7] = len(meta["tokenizer.ggml.tokens"])
    import hashlib

    table.write_bytes(bad.tobytes() + hashlib.sha256(bad.tobytes()).digest())
    assert [_tokenizer(meta).encode(t) for t in TEXTS] == want and calls


def test_merges_that_fail_their_checks_are_never_kept(tmp_path, monkeypatch):
    from edgellama.tokenizer import TokenizerError
    from tiny_model import tiny_vocab

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.merges": merges + ["no-such-token alsonot"]}
    for _ in range(2):
        with pytest.raises(TokenizerError, match="not in tokenizer.ggml.tokens"):
            _tokenizer(meta)
    assert not list(tmp_path.glob("bpe-merges/*.bin"))


def test_at_most_max_tables_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    monkeypatch.setattr(packed_cache, "MAX_TABLES", 3)
    for i in range(5):
        packed_cache.keep_table("k", f"{i:064x}", np.arange(i + 1, dtype=np.int64))
        os.utime(tmp_path / "k" / f"{i:064x}.bin", (1000 + i, 1000 + i))
    kept = sorted(p.name[-5] for p in (tmp_path / "k").glob("*.bin"))
    assert kept == ["2", "3", "4"]
    assert np.array_equal(packed_cache.load_table("k", f"{4:064x}", np.int64, 5), np.arange(5))
    assert packed_cache.load_table("k", f"{4:064x}", np.int64, 4) is None  # another length
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", "off")
    assert packed_cache.load_table("k", f"{4:064x}", np.int64, 5) is None


# ----- a byte-level BPE tokenizer kept beside them -------------------------------------------------------

def _same_tokenizer(a, b, texts=TEXTS) -> None:
    """Two tokenizers that answer everything alike: encodings (with and without special tokens), the
    decoding of every id, specials, attributes, pieces and texts."""
    for name in ("kind", "pre", "n_vocab", "bos_id", "eos_id", "eot_id", "eom_id", "unk_id", "pad_id",
                 "eog_ids", "add_bos", "add_eos", "add_space_prefix", "clean_spaces", "_special_all",
                 "_special_user"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.token_texts() == b.token_texts()
    assert np.array_equal(a._attrs, b._attrs) and np.array_equal(a._hidden, b._hidden)
    ids = list(range(a.n_vocab))
    assert [a.token_bytes(i) for i in ids] == [b.token_bytes(i) for i in ids]
    assert a.decode(ids) == b.decode(ids) and a.decode(ids, special=True) == b.decode(ids, special=True)
    specials = "".join(t for t, _ in a._special_all[:8])
    for t in list(texts) + [specials + texts[0] + specials]:
        for special in (False, True):
            assert a.encode(t, special=special) == b.encode(t, special=special), (t, special)


def _kept_tokenizers(folder: Path) -> list[Path]:
    return sorted((folder / "tokenizers").glob("*.bin"))


def _no_building(monkeypatch):
    """Make building a tokenizer from metadata fail: what comes back was read from its record."""
    import edgellama.tokenizer.tokenizer as tokenizer_module

    def fail(*args, **kwargs):
        raise AssertionError("built, not read back")

    monkeypatch.setattr(tokenizer_module, "_read_tokens", fail)


def test_a_kept_tokenizer_reads_back_as_built(smollm2_path, tmp_path, monkeypatch):
    from edgellama.gguf import GGUFFile
    from edgellama.tokenizer import Tokenizer

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", "off")
    plain = Tokenizer.from_gguf(GGUFFile(smollm2_path))  # nothing kept, nothing read
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    first = GGUFFile(smollm2_path, keep_header=True)
    assert first.header_digest is not None
    built = Tokenizer.from_gguf(first)
    assert len(_kept_tokenizers(tmp_path)) == 1
    with monkeypatch.context() as m:
        _no_building(m)
        for f in (first, GGUFFile(smollm2_path, keep_header=True)):  # parsed, then its kept header
            kept = Tokenizer.from_gguf(f)
            assert kept.source == str(smollm2_path)
            _same_tokenizer(kept, plain)
            _same_tokenizer(kept, built)
        with pytest.raises(AssertionError, match="built, not read back"):  # metadata alone: built
            Tokenizer.from_gguf_metadata(first.metadata)


@pytest.mark.parametrize("pre", ["falcon", "llama3", "smollm"])  # a chain of regexes; merges ignored; one regex
def test_kept_tokenizers_of_every_pre_tokenizer_kind(pre, tmp_path, monkeypatch):
    from edgellama.tokenizer import Tokenizer
    from tiny_model import tiny_vocab

    tokens, types, merges = tiny_vocab()
    tokens = tokens + ["", "<|eot_id|>", "unreached" * 2]  # an empty token, an end of turn, a token no merge makes
    types = types + [1, 3, 1]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": True}
    texts = TEXTS + ["the other 12345 th er t", "unreachedunreached"]
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    plain = Tokenizer.from_gguf_metadata(meta)
    built = Tokenizer.from_gguf_metadata(meta, identity=b"x" * 32)
    with monkeypatch.context() as m:
        _no_building(m)
        kept = Tokenizer.from_gguf_metadata(meta, identity=b"x" * 32)
    assert (kept._encoder.chain is None) == (pre != "falcon")
    for other in (plain, built):
        _same_tokenizer(kept, other, texts)


@pytest.mark.parametrize("empty", [False, True])
def test_a_files_tokenizer_reads_its_token_strings_in_place(empty, tmp_path, monkeypatch):
    """The tokenizer of a file takes the file's token strings as they are read (no list of Python
    strings), built or read back, from a parsed or a kept header; a vocabulary with an empty token
    gets a list with it named, as llama.cpp names it, in every path."""
    from edgellama import gguf
    from edgellama.gguf import GGUFFile, StringArray, TensorSpec, write_gguf
    from edgellama.tokenizer import Tokenizer
    from tiny_model import tiny_vocab

    tokens, types, merges = tiny_vocab()
    if empty:
        tokens, types = tokens + [""], types + [1]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama3",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.merges": merges}
    path = tmp_path / "vocab.gguf"
    write_gguf(path, meta, [TensorSpec("w", GGMLType.F32, (4,))], [np.zeros(4, np.float32).tobytes()])
    expected = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    reference = Tokenizer.from_gguf_metadata(meta)  # lists: built as before
    assert list(reference.token_texts()) == expected
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(gguf, "KEEP_HEADER_MIN_BYTES", 0)
    seen = []
    for _ in range(2):  # parsed (tokenizer built), then kept (tokenizer read back)
        f = GGUFFile(path, keep_header=True)
        tok = Tokenizer.from_gguf(f)
        seen.append(f.header_source)
        assert isinstance(f.metadata["tokenizer.ggml.tokens"], StringArray)
        assert list(tok.token_texts()) == expected
        assert [tok.token_text(i) for i in range(len(tokens))] == expected
        assert (tok._texts is f.metadata["tokenizer.ggml.tokens"]) == (not empty)
        _same_tokenizer(tok, reference)
    assert seen == ["parsed", "kept"]


def _record(folder: Path) -> tuple:
    import marshal

    (path,) = _kept_tokenizers(folder)
    return marshal.loads(path.read_bytes()[:-32])


def _write_record(folder: Path, state) -> None:
    import hashlib
    import marshal

    (path,) = _kept_tokenizers(folder)
    body = marshal.dumps(state)
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_a_damaged_or_foreign_kept_tokenizer_is_not_used(smollm2_path, tmp_path, monkeypatch):
    from edgellama.gguf import GGUFFile
    from edgellama.tokenizer import Tokenizer, kept

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    f = GGUFFile(smollm2_path, keep_header=True)
    want = Tokenizer.from_gguf(f)
    good = _record(tmp_path)
    n = good[3]
    calls = []
    import edgellama.tokenizer.tokenizer as tokenizer_module

    original = tokenizer_module._read_tokens
    monkeypatch.setattr(tokenizer_module, "_read_tokens", lambda meta: calls.append(1) or original(meta))
    ranks = np.frombuffer(good[14], np.int64).copy()
    ranks[5] = n  # a token id past the vocabulary
    pieces_ends = np.frombuffer(good[11][1], np.int64).copy()
    pieces_ends[7] = pieces_ends[8] + 1  # pieces whose ends go backwards
    key_ends = np.frombuffer(good[12][1], np.int64).copy()
    key_ends[7] = key_ends[8] + 1  # BPE strings whose ends go backwards
    rank_values = np.frombuffer(good[13], np.int64).copy()
    rank_values[1] = rank_values[0]  # two strings of one rank
    damaged = [
        good[:12] + ((good[12][0], key_ends.tobytes()),) + good[13:],
        good[:13] + (rank_values.tobytes(),) + good[14:],
        good[:3] + (n + 1,) + good[4:],                       # another vocabulary size
        good[:4] + ((n, *good[4][1:]),) + good[5:],           # a BOS id past the vocabulary
        good[:9] + (good[9] + (("x", -1),),) + good[10:],     # a special token with a negative id
        good[:11] + ((good[11][0], pieces_ends.tobytes()),) + good[12:],
        good[:14] + (ranks.tobytes(),) + good[15:],
        good[:15] + (123,) + good[16:],                       # a pattern that is no string
        good[:8] + (good[8][:-1],) + good[9:],                # control-token flags one byte short
        (kept.FORMAT + 1,) + good[1:],                        # another format
        good[:5],                                             # another layout
    ]
    for state in damaged:
        _write_record(tmp_path, state)
        calls.clear()
        _same_tokenizer(Tokenizer.from_gguf(f), want)
        assert calls, state[:4]  # built again
        assert _record(tmp_path) == good  # and kept again
    # a record under another header's name is never read: the identity is in the name
    other = Tokenizer.from_gguf_metadata(f.metadata, identity=b"y" * 32)
    assert len(_kept_tokenizers(tmp_path)) == 2
    _same_tokenizer(other, want)


def test_a_tokenizer_that_fails_its_checks_is_never_kept(tmp_path, monkeypatch):
    from edgellama.tokenizer import Tokenizer, TokenizerError
    from tiny_model import tiny_vocab

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens + tokens[:1],
            "tokenizer.ggml.token_type": np.array(types + types[:1], np.int32), "tokenizer.ggml.merges": merges}
    for _ in range(2):
        with pytest.raises(TokenizerError, match="duplicate token"):
            Tokenizer.from_gguf_metadata(meta, identity=b"z" * 32)
    assert not _kept_tokenizers(tmp_path)


# ----- the parsed GGUF header kept beside them ---------------------------------------------------------

def _same_parse(a, b) -> None:
    """Two GGUFFile objects hold the same header: every value, of the same type; numeric arrays
    read-only views of their own file's map."""
    assert (a.version, a.alignment, a.data_offset, a.header_memory) == (b.version, b.alignment, b.data_offset,
                                                                          b.header_memory)
    assert list(a.metadata) == list(b.metadata) and a.value_types == b.value_types
    for key, x in a.metadata.items():
        y = b.metadata[key]
        assert type(x) is type(y), key
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), key
            assert not y.flags.writeable and np.shares_memory(y, b.buf), key
        else:
            assert x == y, key
    assert a.tensors == b.tensors and [type(t.qtype) for t in b.tensors.values()] == [GGMLType] * len(b.tensors)
    assert all(np.array_equal(a.raw(n), b.raw(n)) for n in list(a.tensors)[:3])


def _kept_headers(folder: Path) -> list[Path]:
    return sorted((folder / "gguf-headers").glob("*.bin"))


def test_a_kept_header_reads_back_exactly_as_parsed(smollm2_path, tmp_path, monkeypatch):
    from edgellama.gguf import GGUFFile
    from edgellama.tokenizer import Tokenizer

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    plain = GGUFFile(smollm2_path)
    first = GGUFFile(smollm2_path, keep_header=True)
    assert (plain.header_source, first.header_source) == ("parsed", "parsed")
    assert len(_kept_headers(tmp_path)) == 1
    second = GGUFFile(smollm2_path, keep_header=True)
    assert second.header_source == "kept"
    _same_parse(plain, second)
    assert second.typed_metadata().keys() == plain.typed_metadata().keys()
    tok_plain = Tokenizer.from_gguf_metadata(plain.metadata)
    tok_kept = Tokenizer.from_gguf_metadata(second.metadata)
    assert [tok_kept.encode(t) for t in TEXTS] == [tok_plain.encode(t) for t in TEXTS]


@pytest.mark.parametrize("damage", ["past the header", "backwards"])
def test_a_kept_header_whose_string_bounds_do_not_fit_is_parsed_again(damage, smollm2_path, tmp_path, monkeypatch):
    """A kept header (checksum intact) whose string array bounds point past the header or go
    backwards is not used: the file is parsed again and reads as before."""
    import hashlib
    import marshal

    from edgellama.gguf import GGUFFile

    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path))
    want = list(GGUFFile(smollm2_path, keep_header=True).metadata["tokenizer.ggml.tokens"])
    (kept,) = _kept_headers(tmp_path)
    fmt, size, end, digest, (version, meta, *rest) = marshal.loads(kept.read_bytes()[:-32])
    bounds = np.frombuffer(meta["tokenizer.ggml.tokens"][0], np.int64).copy()
    if damage == "backwards":
        bounds[5], bounds[6] = bounds[6], bounds[5]
    else:
        bounds[-1] = end + 100
    meta = {**meta, "tokenizer.ggml.tokens": (bounds.tobytes(),)}
    body = marshal.dumps((fmt, size, end, digest, (version, meta, *rest)))
    kept.write_bytes(body + hashlib.sha256(body).digest())
    again = GGUFFile(smollm2_path, keep_header=True)
    assert again.header_source == "parsed" and list(again.metadata["tokenizer.ggml.tokens"]) == want


def test_a_header_is_kept_only_when_asked_long_enough_and_with_the_cache_on(tmp_path, monkeypatch):
    from edgellama import gguf

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "c"))
    assert gguf.GGUFFile(path, keep_header=True).header_source == "parsed"
    assert not _kept_headers(tmp_path / "c")  # a tiny header: parsing it costs nothing
    monkeypatch.setattr(gguf, "KEEP_HEADER_MIN_BYTES", 0)
    gguf.GGUFFile(path)
    assert not _kept_headers(tmp_path / "c")  # not asked
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", "off")
    for _ in range(2):
        assert gguf.GGUFFile(path, keep_header=True).header_source == "parsed"
    assert not (tmp_path / "c").exists() and not (tmp_path / "off").exists()
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "c"))
    model = edgellama.load(path, n_ctx=32, threads=2, packed_cache=tmp_path / "p")  # the API keeps it too,
    assert not _kept_headers(tmp_path / "c") and len(_kept_headers(tmp_path / "p")) == 1  # where it says
    assert gguf.GGUFFile(path, keep_header=True).header_source == "parsed"  # (the environment's folder)
    assert edgellama.load(path, n_ctx=32, threads=2, packed_cache=tmp_path / "p").file.header_source == "kept"
    kept = {kind: sorted((tmp_path / kind).rglob("*.bin")) for kind in "cp"}
    off = edgellama.load(path, n_ctx=32, threads=2, packed_cache=False)  # keeps nothing anywhere
    assert off.file.header_source == "parsed"
    assert {kind: sorted((tmp_path / kind).rglob("*.bin")) for kind in "cp"} == kept
    assert np.array_equal(off.logits(IDS), model.logits(IDS))


def test_a_changed_file_is_parsed_again_whatever_its_times_say(tmp_path, monkeypatch):
    from edgellama import gguf
    from edgellama.gguf import GGUFFile, ModelFormatError

    monkeypatch.setattr(gguf, "KEEP_HEADER_MIN_BYTES", 0)
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "c"))
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    GGUFFile(path, keep_header=True)
    assert GGUFFile(path, keep_header=True).header_source == "kept"
    data = path.read_bytes()
    st = path.stat()
    # the same length, the same times: only the header's bytes tell
    path.write_bytes(data.replace(b"tiny-random", b"tiny-RANDOM", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = GGUFFile(path, keep_header=True)
    assert changed.header_source == "parsed" and changed.metadata["general.name"] == "tiny-RANDOM"
    _same_parse(GGUFFile(path), changed)
    assert GGUFFile(path, keep_header=True).header_source == "kept"  # kept again, for the new bytes
    # a file cut short in its tensor data (the header intact) fails as it does without the cache
    path.write_bytes(data[:-100])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for keep in (False, True):
        with pytest.raises(ModelFormatError, match="truncated or incomplete"):
            GGUFFile(path, keep_header=keep)


def _forged_layouts(state, size):
    """A kept header's state with its tensor layout changed (its SHA-256 trailer made again: only a
    hand with write access to the cache makes these; an adversarial pass crashed the runtime with
    the first): each one is refused and the header parsed again."""
    version, meta, types, alignment, memory, data_offset, tensors = state
    *rest, (name, q, shape, offset, nbytes) = tensors
    first = tensors[0]

    def with_tensors(ts, align=alignment, data=data_offset):
        return (version, meta, types, align, memory, data, ts)

    f32_bytes = 4 * int(np.prod(shape))
    yield with_tensors([*rest, (name, 0, shape, size - f32_bytes, f32_bytes)])   # F32 at the file's end: bigger
    yield with_tensors([*rest, (name, 0, shape, offset, nbytes)])                # another type, its old size
    yield with_tensors([*rest, (name, q, shape, size - nbytes + 32, nbytes)])    # past the end
    yield with_tensors([*rest, (name, q, shape, first[3], nbytes)])              # over the first tensor
    yield with_tensors([*rest, (name, q, shape, data_offset - 64, nbytes)])      # before the data section
    yield with_tensors([*rest, (name, q, (shape[0], shape[1] + 1), offset, nbytes)])  # a row of another length
    yield with_tensors(tensors, align=48)                                        # not a power of two
    yield with_tensors(tensors, data=data_offset + 32)                           # data elsewhere


def test_a_damaged_or_foreign_kept_header_is_ignored_and_replaced(tmp_path, monkeypatch):
    import hashlib
    import marshal

    from edgellama import gguf
    from edgellama.gguf import GGUFFile

    monkeypatch.setattr(gguf, "KEEP_HEADER_MIN_BYTES", 0)
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(tmp_path / "c"))
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_1)
    want = GGUFFile(path)
    GGUFFile(path, keep_header=True)
    (kept,) = _kept_headers(tmp_path / "c")
    good = kept.read_bytes()
    payload = good[:-32]

    def whole(data: bytes) -> bytes:  # what keep_blob writes: the data and its SHA-256
        return data + hashlib.sha256(data).digest()

    fmt, size, end, digest, state = marshal.loads(payload)
    for damaged in (good[:-1], good[:40] + bytes([good[40] ^ 1]) + good[41:], b"",
                    whole(b"not marshal data"), whole(marshal.dumps((fmt + 1, size, end, digest, state))),
                    whole(marshal.dumps((fmt, size + 1, end, digest, state))),
                    whole(marshal.dumps((fmt, size, end - 1, digest, state))),
                    whole(marshal.dumps((fmt, size, end, digest, state[:-1]))),
                    *(whole(marshal.dumps((fmt, size, end, digest, forged))) for forged in _forged_layouts(state, size))):
        kept.write_bytes(damaged)
        got = GGUFFile(path, keep_header=True)
        assert got.header_source == "parsed"
        _same_parse(want, got)
        assert kept.read_bytes() == good  # written again


def test_the_packed_copies_are_keyed_by_the_packing_sources_only():
    """The key's stamp covers the module of the packing code and every edgellama module it takes
    code or constants from (but the thread launch, which moves no byte), and not the products or
    the attention: editing those keeps GBs of packed copies."""
    import ast
    import inspect

    from edgellama.kernels import cache, layout

    covered = {p.resolve() for p in cache.LAYOUT_FILES}
    assert all(p.is_file() for p in covered)
    assert Path(inspect.getsourcefile(layout.pack_rows)).resolve() in covered
    package = Path(layout.__file__).resolve().parent
    tree = ast.parse(Path(layout.__file__).read_text())
    imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert (1, "common") in imported and (2, "quants") in imported
    for level, module in imported - {(1, "parallel")}:
        path = (package if level == 1 else package.parent) / (module.replace(".", "/") + ".py")
        assert path.resolve() in covered, f"layout.py imports {module}, which the packed cache's key does not cover"
    assert (package / "products.py").resolve() not in covered and (package / "attention.py").resolve() not in covered


def test_abandoned_writes_leave_no_file_and_later_ones_are_written(tmp_path, monkeypatch):
    """Ctrl-C while a command waits for its packed copy (console_main): the writers stop at their
    next chunk and remove their unfinished files; the copy is made again by a later load."""
    import threading

    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q4_0)
    folder = tmp_path / "cache"
    started, release = threading.Event(), threading.Event()
    original = packed_cache._write_window

    def slow_disk(fd, start, end, pieces):  # the first chunk waits until the test has asked to stop
        started.set()
        assert release.wait(60)
        return original(fd, start, end, pieces)

    monkeypatch.setattr(packed_cache, "_write_window", slow_disk)
    monkeypatch.setattr(packed_cache, "WRITE_CHUNK", 4096)  # several chunks for the tiny model
    first = _load(path, folder)
    assert first.weights.pack_source == "saving" and started.wait(60)
    stopper = threading.Thread(target=packed_cache.abandon_writes)
    stopper.start()
    while not packed_cache._ABANDON.is_set():
        time.sleep(0.001)
    release.set()
    stopper.join(60)
    assert not stopper.is_alive() and not packed_cache._ABANDON.is_set()
    assert _cache_files(folder) == [] and not list(folder.glob("*.tmp"))
    monkeypatch.setattr(packed_cache, "_write_window", original)
    again = _load(path, folder)
    assert again.weights.pack_source == "saving"
    wait_for_writes()
    assert len(_cache_files(folder)) == 1 and _load(path, folder).weights.pack_source == "mapped"


def test_ctrl_c_while_the_command_waits_for_its_copy_exits_130(monkeypatch, capsys):
    from edgellama import cli

    calls = []

    def interrupted():
        calls.append("wait")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setattr(packed_cache, "wait_for_writes", interrupted)
    monkeypatch.setattr(packed_cache, "abandon_writes", lambda: calls.append("abandon"))
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: None)
    # (the run's other threads, e.g. tests/test_targets.py's readers of its children, are not ours)
    monkeypatch.setattr(cli.threading, "enumerate", lambda: [cli.threading.current_thread()])
    codes = []
    monkeypatch.setattr(cli.os, "_exit", lambda code: codes.append(code))
    cli.console_main()
    assert calls == ["wait", "abandon"] and codes == [130]
    assert "packed weights were not kept" in capsys.readouterr().err


# ----- a fifth review: hostile or messy cache folders ---------------------------------------------

def test_killed_writers_temp_files_go_at_the_next_write_and_live_ones_stay(tmp_path):
    """A writer killed mid-copy (SIGKILL, the OOM killer, a closed terminal) left a temp file as large
    as the copy for 24 hours, one more per kill.  A writer holds its temp file locked: the next
    save removes those nobody holds, and only those."""
    import fcntl

    folder = tmp_path / "cache"
    folder.mkdir()
    dead = folder / ("0" * 32 + ".killed.tmp")
    dead.write_bytes(b"x" * 4096)
    live = folder / ("1" * 32 + ".writing.tmp")
    live.write_bytes(b"y" * 4096)
    other = folder / "notes.tmp"  # not named as this module names its files
    other.write_text("mine")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (another open file description: as another process's writer)
        path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
        assert _load(path, folder).weights.pack_source == "saving"
        wait_for_writes()
        names = sorted(p.name for p in folder.iterdir() if not p.is_dir())
    assert not dead.exists() and live.exists() and other.exists()
    assert [n for n in names if n.endswith(".packed")] and len(names) == 3


def test_side_tables_prune_only_their_own_files_and_never_through_a_link(tmp_path, monkeypatch):
    """keep_blob pruned every *.bin of its folder beyond the 63 newest, a user's files included, and
    followed a symlink another user of a shared folder planted (writing and pruning in its target)."""
    folder = tmp_path / "cache"
    kind = folder / "bpe-merges"
    kind.mkdir(parents=True)
    mine = [kind / f"user-file-{i}.bin" for i in range(70)]
    for p in mine:
        p.write_bytes(b"keep me")
    monkeypatch.setenv("EDGELLAMA_PACKED_CACHE", str(folder))
    for i in range(packed_cache.MAX_TABLES + 5):
        packed_cache.keep_blob("bpe-merges", f"{i:064x}", b"table %d" % i)
    own = sorted(p.name for p in kind.iterdir() if p.name not in {m.name for m in mine})
    assert all(p.exists() for p in mine) and len(own) == packed_cache.MAX_TABLES
    assert bytes(packed_cache.load_blob("bpe-merges", f"{packed_cache.MAX_TABLES + 4:064x}")) == b"table 68"
    # a kind folder that is our own link (to another disk, say) is used
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder / "gguf-headers")
    packed_cache.keep_blob("gguf-headers", "e" * 64, b"header")
    assert bytes(packed_cache.load_blob("gguf-headers", "e" * 64)) == b"header"
    assert [p.name for p in elsewhere.iterdir()] == ["e" * 64 + ".bin"]
    if os.getuid() != 0:
        return  # (a link of another user's needs root to make)
    # one another user of a shared folder planted: nothing kept or read through it
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.bin").write_bytes(b"x")
    os.symlink(victim, folder / "tokenizers")
    os.lchown(folder / "tokenizers", 65534, 65534)
    packed_cache.keep_blob("tokenizers", "a" * 64, b"state")
    assert sorted(p.name for p in victim.iterdir()) == ["precious.bin"]
    (victim / ("b" * 64 + ".bin")).write_bytes(b"planted")
    assert packed_cache.load_blob("tokenizers", "b" * 64) is None


def test_foreign_files_named_like_copies_neither_hang_nor_break_a_load(tmp_path):
    """A FIFO named like a copy hung every load of a new model (its sweep opened it); a copy-named
    file whose JSON header nests 20,000 levels raised RecursionError.  In a child: a hang is a
    timeout here, not a stuck test run."""
    folder = tmp_path / "cache"
    folder.mkdir()
    os.mkfifo(folder / ("ab" * 16 + ".packed"))
    nested = b"[" * 20000 + b"]" * 20000
    (folder / ("cd" * 16 + ".packed")).write_bytes(packed_cache._HEADER.pack(packed_cache.MAGIC, len(nested)) + nested)
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    code = ("import sys, numpy as np, edgellama; from edgellama.packed_cache import wait_for_writes; "
            f"m = edgellama.load({str(path)!r}, n_ctx=32, threads=1, packed_cache={str(folder)!r}); "
            f"print(m.weights.pack_source, np.asarray(m.logits({IDS})).tobytes().hex()); wait_for_writes()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    source, logits = r.stdout.split()
    assert source == "saving"
    assert bytes.fromhex(logits) == np.asarray(_load(path, False).logits(IDS)).tobytes()
    assert not (folder / ("cd" * 16 + ".packed")).exists()  # swept: not a copy of anything


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG spec: a relative $XDG_CACHE_HOME is ignored (it moved the caches with the working
    directory)."""
    from edgellama.kernels import cache

    monkeypatch.delenv("EDGELLAMA_PACKED_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("numba.core.config.CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert packed_cache.default_folder() == tmp_path / "home" / ".cache" / "edgellama" / "packed"
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "edgellama"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packed_cache.default_folder() == tmp_path / "xdg" / "edgellama" / "packed"
    assert cache.cache_root() == tmp_path / "xdg" / "edgellama"
    import pwd

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "")  # (it made the caches /.cache/edgellama)
    assert packed_cache.user_cache() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache"


def test_this_process_never_sweeps_its_own_writers_files(tmp_path, monkeypatch):
    """A review: where locks are per process (NFS emulates flock with POSIX locks), a second save in
    the process could take its own live writer's temp file for a killed one's."""
    folder = tmp_path / "cache"
    folder.mkdir()
    live = folder / ("2" * 32 + ".live.tmp")
    live.write_bytes(b"z")
    monkeypatch.setattr(packed_cache, "_abandoned", lambda path: True)  # (as every file looks there)
    monkeypatch.setattr(packed_cache, "_OWN_TEMPS", {os.path.abspath(live)})
    path = write_tiny_model(tmp_path / "m.gguf", GGMLType.Q8_0)
    assert _load(path, folder).weights.pack_source == "saving"
    wait_for_writes()
    assert live.exists()
    monkeypatch.setattr(packed_cache, "_OWN_TEMPS", set())
    assert _load(write_tiny_model(tmp_path / "n.gguf", GGMLType.Q8_0, seed=4), folder).weights.pack_source == "saving"
    wait_for_writes()
    assert not live.exists()
