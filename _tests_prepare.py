"""
Tests of prepare.py (issue 3): the download helper against a real local http.server, exact round trips
from shards back to the cleaned text, bad input (exit 2, one line, nothing left behind), idempotence.
"""
import contextlib
import hashlib
import http.server
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import unicodedata
import unittest
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable


def _shared(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p


@contextlib.contextmanager
def _server(data, plan=()):
    """A threaded http.server on 127.0.0.1 (free port) serving `data` (bytes) at any path, or a dict
    {file name: bytes} by the last part of the path (404 for others), with Range support.
    `plan` scripts the first requests: 'cut' sends half the body then closes, '500' and '404' fail.
    Yields (base URL, list of the request headers received)."""
    plan, log = list(plan), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append(dict(self.headers))
            mode = plan.pop(0) if plan else "ok"
            body = data if isinstance(data, bytes) else data.get(self.path.rsplit("/", 1)[-1])
            if body is None:
                mode = "404"
            if mode in ("500", "404"):
                self.send_error(int(mode))
                return
            rng = self.headers.get("Range")
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            size, body = len(body), body[start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body[:len(body) // 2] if mode == "cut" else body)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up early (a failed check)
                pass
            self.close_connection = True  # 'cut': the client sees the connection end mid-body

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", log
    finally:
        srv.shutdown()
        srv.server_close()


def _expect_die(fn, *args, **kwargs):
    """fn must stop through common.die (exit code 2); returns what it printed on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            fn(*args, **kwargs)
        except SystemExit as e:
            assert e.code == 2, f"exit code {e.code}"
        else:
            raise AssertionError("expected an error exit")
    return err.getvalue()


def _cli(*args, cwd=ROOT):
    return subprocess.run([PY, str(ROOT / "prepare.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _one_error_line(r):
    """exit code 2 and exactly one 'error: ...' line on stderr, no traceback; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def _files(d):
    """{relative path: (mtime_ns, sha256)} of every file under d."""
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _decode_splits(data_dir):
    """Decode every shard of data_dir with the tokenizer meta.json names and cut at the eot tokens:
    {split: [document text]}, after checking the counts meta.json gives."""
    import prepare
    from common import load_tokenizer
    meta = prepare.load_meta(data_dir)
    tok = load_tokenizer(meta["tokenizer"])
    assert tok.n_vocab == meta["vocab_size"] and tok.eot_id == meta["eot_id"]
    out = {}
    for split in ("train", "val"):
        toks = np.concatenate([np.asarray(prepare.read_bin(data_dir / f)) for f in meta[split]["shards"]])
        assert len(toks) == meta[split]["tokens"] and toks[0] == tok.eot_id
        cuts = list(np.flatnonzero(toks == tok.eot_id)) + [len(toks)]
        docs = [tok.decode_bytes(toks[a + 1:b].tolist()).decode("utf-8") for a, b in zip(cuts, cuts[1:])]
        assert len(docs) == meta[split]["docs"]
        assert sum(len(d.encode()) for d in docs) == meta[split]["bytes"]
        out[split] = docs
    return meta, out

# -----------------------------------------------------------------------------
# the download helper against a local server


def test_prepare_download_verified():
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        dest = Path(d) / "raw" / "input.txt"
        assert prepare.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, size=len(data)) == dest
        assert dest.read_bytes() == data and len(log) == 1
        assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]  # no temp file left
        prepare.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256)  # there and verified
        assert len(log) == 1


def test_prepare_download_resumes_after_cut():
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["cut"]) as (url, log):
        dest = Path(d) / "input.txt"
        prepare.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, backoff=0.01)
        assert len(log) == 2 and "Range" not in log[0], log
        start = int(log[1]["Range"].removeprefix("bytes=").removesuffix("-"))
        assert 0 < start <= len(data) // 2, log[1]  # it asked only for what it did not have
        assert dest.read_bytes() == data
        assert sorted(p.name for p in Path(d).iterdir()) == ["input.txt"]


def test_prepare_download_resumes_on_next_run():
    """A cut with no retries left stops with a clear error and keeps the .part; the next call resumes it."""
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["cut", "500"]) as (url, log):
        dest = Path(d) / "input.txt"
        err = _expect_die(prepare.download, url + "/input.txt", dest, size=len(data), retries=0)
        assert "HTTP 500" in err and "resumed on the next run" in err and not dest.exists(), err
        prepare.download(url + "/input.txt", dest, size=len(data), sha256=prepare.SHAKESPEARE_SHA256)
        assert log[-1]["Range"].startswith("bytes=") and dest.read_bytes() == data


def test_prepare_download_bad_checksum_leaves_nothing():
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        dest = Path(d) / "input.txt"
        err = _expect_die(prepare.download, url + "/input.txt", dest, sha256="0" * 64)
        assert "sha256" in err and url in err, err
        assert list(Path(d).iterdir()) == []
        err = _expect_die(prepare.download, url + "/input.txt", dest, size=len(data) + 1)
        assert "expected" in err and list(Path(d).iterdir()) == []


def test_prepare_download_retries_500_and_stops_on_404():
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["500", "500"]) as (url, log):
        dest = Path(d) / "input.txt"
        prepare.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, backoff=0.01)
        assert len(log) == 3 and dest.read_bytes() == data
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["404"]) as (url, log):
        err = _expect_die(prepare.download, url + "/missing.txt", Path(d) / "x.txt", backoff=0.01)
        assert "HTTP 404" in err and len(log) == 1 and list(Path(d).iterdir()) == [], err


def test_prepare_download_offline_clear_error():
    """No server, and a host name that cannot resolve: exit 2, one line naming the URL and where to put
    the file by hand, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / "shakespeare" / "raw" / "input.txt"
        for mirror in (f"http://127.0.0.1:{port}", "http://no-such-host.invalid"):
            r = _cli("--dataset=shakespeare", f"--data_root={d}", f"--mirror={mirror}", "--retries=1")
            line = _one_error_line(r)
            assert f"{mirror}/input.txt" in line and str(dest) in line, line
            assert list(Path(d).iterdir()) == []  # not even an empty folder

# -----------------------------------------------------------------------------
# the whole step: round trips, idempotence


def test_prepare_pydocs_roundtrip_and_idempotent():
    import prepare
    with tempfile.TemporaryDirectory() as d:
        opts = dict(dataset="pydocs", data_root=d, tokenizer="bpe", vocab_size=4096, shard_tokens=200_000)
        data_dir = prepare.prepare(**opts)
        meta, decoded = _decode_splits(data_dir)
        assert meta["tokenizer"]["kind"] == "bpe" and meta["vocab_size"] == 4096 and meta["dtype"] == "uint16"
        assert len(meta["train"]["shards"]) >= 2  # documents run across shard boundaries
        # the cleaned documents, in order, are exactly what the shards hold
        raw = prepare.pydocs_documents(data_dir / "raw", 0.1)
        expected = prepare.split_documents(prepare.clean(raw, 16), 0.1, "pydocs")
        names = json.loads((data_dir / "docs.json").read_text())
        for split in ("train", "val"):
            assert decoded[split] == [t for _, t in expected[split]]
            assert names[split] == [n for n, _ in expected[split]]
        docs = decoded["train"] + decoded["val"]
        assert len(set(docs)) == len(docs) and all("\r" not in t and len(t.strip()) >= 16 for t in docs)
        assert all(unicodedata.is_normalized("NFC", t) for t in docs)
        assert 1_500_000 < meta["train"]["bytes"] + meta["val"]["bytes"] < 4_000_000  # about 2 MB
        assert any(n.startswith("topic:") for n in names["train"] + names["val"])
        assert any(n == "json" or n.startswith("json.") for n in names["train"] + names["val"])
        assert not any(".test" in n or n.startswith(("test", "idlelib", "antigravity", "this")) or "._" in n
                       for n in names["train"] + names["val"])
        groups = {s: {n.split(".")[0] for n in names[s]} for s in names}
        assert not groups["train"] & groups["val"]  # whole packages are held out

        # a second run changes nothing; other settings are refused without --force
        before = _files(data_dir)
        args = [f"--data_root={d}", "--vocab_size=4096", "--shard_tokens=200000"]
        r = _cli(*args)
        assert r.returncode == 0 and "is ready" in r.stdout, r.stdout + r.stderr
        r = _cli(*args, "--tokenizer=byte")
        assert "--force" in _one_error_line(r)
        assert _files(data_dir) == before
        # a run interrupted after the tokenizer step reuses the trained tokenizer and gives the same shards
        (data_dir / "meta.json").unlink()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            prepare.prepare(**opts)
        assert "reusing" in out.getvalue(), out.getvalue()
        after = _files(data_dir)
        assert {k: v[1] for k, v in after.items() if k != "meta.json"} == \
               {k: v[1] for k, v in before.items() if k != "meta.json"}
        # --force with another tokenizer rebuilds, and the shards of the old run do not linger
        r = _cli(*args, "--tokenizer=byte", "--force=True")
        assert r.returncode == 0, r.stderr
        meta = prepare.load_meta(data_dir)
        assert meta["tokenizer"]["kind"] == "byte"
        assert sorted(p.name for p in data_dir.glob("*.bin")) == sorted(meta["train"]["shards"] + meta["val"]["shards"])
        assert _decode_splits(data_dir)[1] == decoded


def test_prepare_shakespeare_local_roundtrip():
    """tiny Shakespeare as a local .txt: the documents (paragraph groups) joined with blank lines give back
    the file exactly, and val is its last ~10% as in nanoGPT."""
    import prepare
    path = _shared("tinyshakespeare.txt")
    text = path.read_text()
    with tempfile.TemporaryDirectory() as d:
        data_dir = prepare.prepare(dataset="local", input=str(path), data_root=d, tokenizer="bpe", vocab_size=512)
        meta, decoded = _decode_splits(data_dir)
        assert "\n\n".join(decoded["train"] + decoded["val"]) == text
        val_share = len("\n\n".join(decoded["val"])) / len(text)
        assert 0.07 < val_share < 0.13, val_share
        assert meta["train"]["tokens"] < meta["train"]["bytes"] / 2  # the BPE merges are in use


def test_prepare_shakespeare_download_via_mirror():
    """--dataset=shakespeare end to end from a local server standing in for GitHub (--mirror), verified by
    its sha256, with the byte tokenizer (character level)."""
    import prepare
    data = _shared("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        data_dir = prepare.prepare(dataset="shakespeare", data_root=d, tokenizer="byte", mirror=url)
        assert (data_dir / "raw" / "input.txt").read_bytes() == data and log[0]
        meta, decoded = _decode_splits(data_dir)
        assert "\n\n".join(decoded["train"] + decoded["val"]) == data.decode()
        assert meta["vocab_size"] == 261 and meta["train"]["tokens"] == meta["train"]["bytes"] + meta["train"]["docs"]


def test_prepare_tinystories_and_fineweb_via_mirror():
    """The two big remote datasets end to end, from small files of the same formats on a local server:
    TinyStories (stories separated by <|endoftext|>, val from its own file) and llm.c's fineweb shards."""
    import prepare
    stories = [f"Once upon a time there was a {w} who liked to play." for w in ("cat", "dog", "bird", "fox")]
    files = {"TinyStoriesV2-GPT4-train.txt": "\n<|endoftext|>\n".join(stories[:3]).encode(),
             "TinyStoriesV2-GPT4-valid.txt": (stories[3] + "\n<|endoftext|>\n").encode()}
    shards = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for name, n in (("fineweb_val_000000.bin", 3000), ("fineweb_train_000001.bin", 5000),
                        ("fineweb_train_000002.bin", 4000)):
            tokens = rng.integers(0, 50257, n).astype(np.uint16)
            tokens[::100] = 50256
            prepare.write_bin(Path(d) / name, tokens)
            files[name] = (Path(d) / name).read_bytes()
            shards[name] = tokens
        with _server(files) as (url, log):
            data_dir = prepare.prepare(dataset="tinystories", data_root=d, tokenizer="gpt2", mirror=url)
            meta, decoded = _decode_splits(data_dir)
            assert decoded == {"train": stories[:3], "val": stories[3:]}
            assert meta["vocab_size"] == 50261 and meta["tokenizer"] == {"kind": "gpt2", "path": None}
            data_dir = prepare.prepare(dataset="fineweb10B", data_root=d, num_shards=1, mirror=url)
            meta = prepare.load_meta(data_dir)
            assert meta["train"]["shards"] == ["fineweb_train_000001.bin"] and meta["val"]["tokens"] == 3000
            assert meta["train"]["docs"] == 50 and meta["eot_id"] == 50256
            n = len(log)
            prepare.prepare(dataset="fineweb10B", data_root=d, mirror=url)  # 0: the shards already here
            prepare.prepare(dataset="fineweb10B", data_root=d, num_shards=2, mirror=url)  # one more
            assert len(log) == n + 1
            meta = prepare.load_meta(data_dir)
            toks = np.concatenate([np.asarray(prepare.read_bin(data_dir / f)) for f in meta["train"]["shards"]])
            assert np.array_equal(toks, np.concatenate([shards["fineweb_train_000001.bin"],
                                                        shards["fineweb_train_000002.bin"]]))


def test_prepare_local_folder_jsonl_and_bad_bytes():
    """A folder: files in sorted path order, .jsonl lines as documents, undecodable bytes replaced and
    reported, \\r\\n normalised, NFC applied, tiny and duplicate documents dropped."""
    import prepare
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        (src / "sub").mkdir(parents=True)
        (src / "b.txt").write_bytes(b"caf\xff and more text here\r\nsecond line of b\r\n")
        (src / "a.txt").write_text("The first document, long enough to stay.\n")
        rows = [{"text": "cafe\u0301 decomposed, becomes NFC in cleaning"}, {"text": "tiny"},
                {"text": "The first document, long enough to stay.\n"}, {"text": "the last one, held out for val"}]
        (src / "sub" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
        (src / "notes.md").write_text("not an input format: ignored")
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            data_dir = prepare.prepare(dataset="local", input=str(src), data_root=d, tokenizer="byte", val_frac=0.25)
        assert "replaced 1 undecodable" in err.getvalue() and "b.txt" in err.getvalue(), err.getvalue()
        assert "dropped 1 empty/tiny" in out.getvalue() and "1 duplicates" in out.getvalue(), out.getvalue()
        _, decoded = _decode_splits(data_dir)
        assert decoded["train"] == ["The first document, long enough to stay.\n",
                                    "caf\ufffd and more text here\nsecond line of b\n",
                                    "caf\u00e9 decomposed, becomes NFC in cleaning"]
        assert decoded["val"] == ["the last one, held out for val"]
        names = json.loads((data_dir / "docs.json").read_text())
        assert names == {"train": ["a.txt#0", "b.txt#0", "sub/c.jsonl:1"], "val": ["sub/c.jsonl:4"]}

# -----------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def test_prepare_bad_input_clear_errors():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "empty.txt").write_text("")
        (d / "small.txt").write_text("A single paragraph of text that cannot be split into train and val.\n")
        (d / "notext.jsonl").write_text('{"text": "a fine first line of text"}\n{"title": "no text here"}\n')
        (d / "broken.jsonl").write_text('{"text": "a fine first line of text"}\n\n{"text": "unterminated\n')
        cases = [("nope.txt", "not found"), ("empty.txt", "no documents"), ("small.txt", "too small"),
                 ("notext.jsonl", "notext.jsonl:2: no string 'text'"), ("broken.jsonl", "broken.jsonl:3: invalid JSON")]
        for name, expected in cases:
            out = d / "out"
            r = _cli("--dataset=local", f"--input={d / name}", f"--data_root={out}", "--tokenizer=byte")
            line = _one_error_line(r)
            assert expected in line and name in line, (name, line)
            assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))
        r = _cli("--dataset=shakespeare", f"--input={d / 'small.txt'}", f"--data_root={d / 'out'}")
        assert "--dataset=local" in _one_error_line(r)
        r = _cli("--dataset=nope", f"--data_root={d / 'out'}")
        assert "pydocs" in _one_error_line(r)


def test_prepare_failed_write_leaves_no_shards():
    """A crash while encoding (here an interrupt in the val split) removes the shards already written."""
    import prepare
    import tokenizer as T
    byte = T.get_tokenizer("byte")

    class Interrupted:  # the byte tokenizer, until the val split
        n_vocab, eot_id = byte.n_vocab, byte.eot_id

        def encode_batch(self, texts, num_threads=1):
            if texts[0].startswith("val"):
                raise KeyboardInterrupt
            return byte.encode_batch(texts, num_threads=num_threads)

    with tempfile.TemporaryDirectory() as d:
        splits = {"train": [(f"t{i}", f"train text {i} " * 50) for i in range(20)], "val": [("v", "val text")]}
        try:
            prepare.write_shards(Path(d), splits, Interrupted(), 1000, 1)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("expected the interrupt to propagate")
        assert list(Path(d).iterdir()) == []


def test_prepare_read_bin_validates():
    import prepare
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x" / "train_000000.bin"
        for dtype, version in ((np.uint16, 1), (np.uint32, 2)):
            tokens = np.arange(1000, dtype=dtype) * (70 if dtype == np.uint32 else 60)
            prepare.write_bin(p, tokens)
            header = np.fromfile(p, dtype=np.int32, count=256)
            assert list(header[:3]) == [20240520, version, 1000] and not header[3:].any()
            assert p.stat().st_size == 1024 + tokens.nbytes
            assert np.array_equal(prepare.read_bin(p), tokens)
        p.write_bytes(p.read_bytes()[:-2])  # truncated
        err = _expect_die(prepare.read_bin, p)
        assert str(p) in err and "--dataset=x --force" in err, err
        p.write_bytes(b"\0" * 2048)  # no magic
        assert "not a token shard" in _expect_die(prepare.read_bin, p)
        assert "not found" in _expect_die(prepare.load_meta, Path(d) / "x")
