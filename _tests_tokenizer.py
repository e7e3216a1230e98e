"""Tests of tokenizer.py (merged into test_all.py later). Run: python test_all.py -k tokeniz"""
import contextlib
import functools
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest
from collections import Counter
from pathlib import Path

import regex

import tokenizer as T

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"

HARD_STRINGS = [
    "Hello world! 👋🏽 Emoji: 🤖🧠👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "    indented\n\n\n\ttabs\t\t and   runs of    spaces   \n  \r\n\r\n   ",
    "it's they're we've I'm you'll she'd IT'S WE'VE 'tis 's",
    "<|endoftext|> is plain text here, and so is <|user|> and <|end|>",
    "numbers 1234567 3.14159 1e-10 0x1F 12,345",
    "mixed\u00a0nbsp\u2003em-space\u3000ideographic\x0bvt\x0cff\x1cfs\x85nel\u2028ls",
    "combining: e\u0301 a\u0308 \U0001d54f\U0001d4b6 math, zero\u200bwidth, rtl \u05e9\u05dc\u05d5\u05dd",
    "",
    " ",
    "\n",
    "x" * 3000,
]


def shared_file(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p


def reference_gpt2():
    """tiktoken's GPT-2 encoder built directly from the ranks file (offline: no get_encoding)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    path = shared_file("gpt2.tiktoken")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the file as is, no copy into a cache
    try:
        ranks = load_tiktoken_bpe(str(path))
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return tiktoken.Encoding("gpt2-reference", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def random_unicode(rng, n):
    """A string mixing ASCII, whitespace, Latin, CJK, emoji, combining marks and rare planes."""
    ranges = [(0x20, 0x7e), (0x09, 0x0d), (0xa0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x6ff),
              (0x300, 0x36f), (0x2000, 0x206f), (0x3000, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3),
              (0x1f300, 0x1faff), (0x10000, 0x10ffff)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if 0xd800 <= c <= 0xdfff:  # surrogates are not characters
            c = 0x20
        out.append(chr(c))
    return "".join(out)


def naive_train(chunk_counts, n_merges):
    """Reference BPE trainer: recount every pair of every chunk before each merge. Same rules as
    train_bpe: most frequent pair, ties to the smallest (a, b); overlapping pairs counted; merged
    left to right; a merge spelling existing bytes reuses that id."""
    words = [list(c.encode("utf-8")) for c in chunk_counts]
    freqs = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    ids = {b: i for i, b in enumerate(vocab)}
    merges = []
    for _ in range(n_merges):
        stats = Counter()
        for w, f in zip(words, freqs):
            for p in zip(w, w[1:]):
                stats[p] += f
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        merges.append(pair)
        new = vocab[pair[0]] + vocab[pair[1]]
        if new not in ids:
            ids[new] = len(vocab)
            vocab.append(new)
        z = ids[new]
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(z)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return merges


def run_dies(fn, *args, **kwargs):
    """Run fn expecting common.die(): returns its stderr line (exit code 2 checked)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            fn(*args, **kwargs)
        except SystemExit as e:
            assert e.code == 2, e.code
            return err.getvalue()
    raise AssertionError(f"{fn.__name__} did not die")


@functools.lru_cache(maxsize=None)
def small_bpe(vocab_size=600):
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000] + " ".join(HARD_STRINGS)
    return T.get_tokenizer("bpe", vocab_size=vocab_size, text=text, verbose=False)

# -----------------------------------------------------------------------------


def test_tokenizer_gpt2_matches_tiktoken_on_shakespeare():
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    ref = reference_gpt2().encode(text, disallowed_special=())
    tok = T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken"))
    assert tok.encode(text) == ref
    assert tok.encode_slow(text) == ref  # pure Python, with its per-chunk cache
    assert tok.encode_batch([text[:5000], text[5000:9000]]) == [tok.encode(text[:5000]), tok.encode(text[5000:9000])]
    assert tok.decode(ref) == text


def test_tokenizer_gpt2_matches_tiktoken_on_hard_strings():
    ref = reference_gpt2()
    tok = T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken"))
    for s in HARD_STRINGS:
        want = ref.encode(s, disallowed_special=())
        assert tok.encode(s) == want, s
        assert tok.encode_slow(s) == want, s
        assert tok.decode(want) == s
    # special-token text is plain text unless allowed; allowed, it is the one special id
    s = "a<|endoftext|>b"
    assert 50256 not in tok.encode(s) and tok.encode(s) == ref.encode(s, disallowed_special=())
    assert tok.encode(s, allowed_special={"<|endoftext|>"}) == ref.encode(s, allowed_special={"<|endoftext|>"})
    assert tok.encode_slow(s, allowed_special="all") == tok.encode(s, allowed_special="all")
    assert tok.encode("<|user|>hi<|end|>", allowed_special="all") == [50258, *ref.encode("hi"), 50260]


def test_tokenizer_special_token_layout():
    gpt2 = T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken"))
    assert gpt2.n_vocab == 50261 and gpt2.eot_id == 50256
    assert gpt2.special == {"<|endoftext|>": 50256, "<|system|>": 50257, "<|user|>": 50258,
                            "<|assistant|>": 50259, "<|end|>": 50260}
    byte = T.get_tokenizer("byte")
    assert byte.n_vocab == 261 and byte.eot_id == 256 and byte.encode("hé") == [104, 0xc3, 0xa9]
    bpe = small_bpe(600)
    assert bpe.n_vocab == 600 and bpe.eot_id == 595
    assert sorted(bpe.special.values()) == list(range(595, 600))
    assert sorted(bpe.ranks.values()) == list(range(595))
    for tok in (byte, bpe):
        plain = tok.encode("<|assistant|>")
        assert len(plain) > 1 and all(i < tok.n_vocab - 5 for i in plain)
        assert tok.encode("<|assistant|>", allowed_special={"<|assistant|>"}) == [tok.special["<|assistant|>"]]
    assert "261" in run_dies(T.train_bpe, "some text", 260, verbose=False)


def test_tokenizer_bpe_incremental_matches_naive():
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000] + " ".join(HARD_STRINGS)
    chunks = T.count_chunks(text, verbose=False)
    assert T.train_bpe(dict(chunks), 256 + 5 + 300, verbose=False) == naive_train(chunks, 300)
    # tiny alphabets make overlaps ('aaaa', 'abab') and count ties everywhere, and run out of pairs
    for seed in range(40):
        rng = random.Random(seed)
        chunks = {"".join(rng.choice("ab" if seed % 2 else "abc") for _ in range(rng.randint(1, 12))):
                  rng.randint(1, 5) for _ in range(rng.randint(1, 30))}
        assert T.train_bpe(chunks, 256 + 5 + 80, verbose=False) == naive_train(chunks, 80), seed


def test_tokenizer_bpe_learns_a_useful_vocabulary():
    tok = small_bpe(1024)
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[100_000:150_000]
    ids = tok.encode(text)
    assert tok.encode_slow(text) == ids  # the teaching encoder agrees with tiktoken on our ranks
    assert len(text.encode()) / len(ids) > 2.5  # bytes per token on unseen text: ~2.7 here, 1.0 for bytes


def test_tokenizer_split_pieces_chunk_like_the_whole_text():
    # cutting big texts into pieces at "safe" newlines must not change a single chunk
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\n", "\r", "\r\n", ".", "1", "'", "'s", "\u3000", "\x0b", "\x1c",
                "\x85", "é", "😀", ")\n", "    "]
    pat = regex.compile(T.GPT4_PATTERN)
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(3000))
        pieces = list(T.split_at_safe_newlines(text, size=50))
        assert len(pieces) > 10 and "".join(pieces) == text
        assert Counter(c for p in pieces for c in pat.findall(p)) == Counter(pat.findall(text))
    assert T.count_chunks([text, text], verbose=False) == Counter(pat.findall(text) * 2)


def test_tokenizer_decode_encode_roundtrip_random_unicode():
    rng = random.Random(1234)
    texts = [random_unicode(rng, rng.randint(0, 200)) for _ in range(200)]
    for tok in (small_bpe(600), T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken")), T.get_tokenizer("byte")):
        batch = tok.encode_batch(texts, num_threads=2)
        for s, ids in zip(texts, batch):
            assert ids == tok.encode(s)
            assert tok.decode(ids) == s, (tok.kind, s)
            assert tok.decode_bytes(ids) == s.encode("utf-8")
        for s in texts[:40]:
            assert tok.encode_slow(s) == tok.encode(s), (tok.kind, s)


def test_tokenizer_save_load_roundtrip():
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[200_000:230_000] + "".join(HARD_STRINGS)
    with tempfile.TemporaryDirectory() as d:
        for tok in (small_bpe(600), T.get_tokenizer("byte"), T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken"))):
            out = Path(d) / tok.kind
            tok.save(out)
            assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]
            back = T.load(out)
            assert (back.kind, back.n_vocab, back.eot_id, back.special, back.pattern, back.ranks) == \
                (tok.kind, tok.n_vocab, tok.eot_id, tok.special, tok.pattern, tok.ranks)
            assert back.encode(text) == tok.encode(text)
            assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        # the ranks file is tiktoken's own format
        from tiktoken.load import load_tiktoken_bpe
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            assert load_tiktoken_bpe(str(Path(d) / "bpe" / "tokenizer.tiktoken")) == small_bpe(600).ranks
        finally:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        # get_tokenizer('bpe', path) loads a saved one instead of training
        assert T.get_tokenizer("bpe", path=Path(d) / "bpe").ranks == small_bpe(600).ranks


def test_tokenizer_missing_or_corrupt_files_die():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        assert "tokenizer.json" in run_dies(T.load, d / "nothing")
        T.get_tokenizer("byte").save(d / "tok")
        ranks = (d / "tok" / "tokenizer.tiktoken").read_text()
        (d / "tok" / "tokenizer.tiktoken").write_text(ranks.replace("AA== 0", "AA==x 0"))
        msg = run_dies(T.load, d / "tok")
        assert "line 1" in msg and msg.startswith("error: ") and msg.count("\n") == 1
        (d / "tok" / "tokenizer.tiktoken").unlink()
        assert "not found" in run_dies(T.load, d / "tok")
        (d / "tok" / "tokenizer.json").write_text('{"kind": "bpe", "pattern"')
        assert "corrupt" in run_dies(T.load, d / "tok")
        assert "not found" in run_dies(T.get_tokenizer, "gpt2", path=d / "missing.tiktoken")
        assert "unknown tokenizer kind" in run_dies(T.get_tokenizer, "sentencepiece")


def test_tokenizer_render_chat_mask():
    tok = T.get_tokenizer("gpt2", path=shared_file("gpt2.tiktoken"))
    S = tok.special
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And <|end|> in text?"},
        {"role": "assistant", "content": "Plain text: <|end|>!"},
    ]
    ids, mask = T.render_chat(tok, messages)
    want_ids, want_mask = [], []
    for m in messages:
        content = tok.encode(m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        want_ids += [S[f"<|{m['role']}|>"]] + content + [S["<|end|>"]]
        want_mask += [0] + [learn] * len(content) + [learn]
    assert ids == want_ids and mask == want_mask and len(ids) == len(mask)
    # exactly the assistant replies and their <|end|> are learned, read back as text
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "4.<|end|>Plain text: <|end|>!<|end|>"
    assert sum(1 for i in ids if i == S["<|end|>"]) == 5  # the typed '<|end|>' stayed plain text
    ids2, mask2 = T.render_chat(tok, messages[:2], add_generation_prompt=True)
    assert ids2[-1] == S["<|assistant|>"] and mask2 == [0] * len(ids2)
    try:
        T.render_chat(tok, [{"role": "robot", "content": "hi"}])
    except ValueError as e:
        assert "robot" in str(e)
    else:
        raise AssertionError("a bad role must raise ValueError")


def test_tokenizer_cli_trains_and_reports():
    text_path = shared_file("tinyshakespeare.txt")
    with tempfile.TemporaryDirectory() as d:
        sample = Path(d) / "sample.txt"
        sample.write_text(text_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
        cmd = [sys.executable, str(ROOT / "tokenizer.py"), f"--input={sample}", "--vocab_size=512", f"--out={d}/tok"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=d)
        assert r.returncode == 0, r.stderr
        assert "bytes/token" in r.stdout
        tok = T.load(Path(d) / "tok")
        assert tok.kind == "bpe" and tok.n_vocab == 512
        info = json.loads((Path(d) / "tok" / "tokenizer.json").read_text())
        assert info["special_tokens"]["<|endoftext|>"] == 507
        # a second run would replace it: refused without --force, nothing changed
        before = (Path(d) / "tok" / "tokenizer.tiktoken").read_bytes()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=d)
        assert r.returncode == 2 and "--force" in r.stderr
        assert (Path(d) / "tok" / "tokenizer.tiktoken").read_bytes() == before


def test_tokenizer_cli_bad_input_exits_2():
    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.txt"
        empty.write_text("")
        binary = Path(d) / "bin.txt"
        binary.write_bytes(b"ok\xff\xfe")
        for args, words in ([f"--input={d}/missing.txt"], "not found"), ([f"--input={empty}"], "empty"), \
                ([f"--input={binary}"], "UTF-8"), (["--vocab_size=4096"], "--input"), \
                ([f"--input={ROOT / 'tokenizer.py'}", "--vocab_size=100"], "too small"), \
                (["--vocab=1"], "unknown config key"):
            r = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), *args, f"--out={d}/out"],
                               capture_output=True, text=True, timeout=60, cwd=d)
            assert r.returncode == 2, (args, r.returncode, r.stderr)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and words in r.stderr, (args, r.stderr)
            assert not (Path(d) / "out").exists()
