"""Benchmarks of tokenizer.py (merged into bench.py later): BPE training time against HF tokenizers'
BpeTrainer on the same texts, and encoding throughput."""
import sysconfig
import time
from pathlib import Path

import tokenizer as T

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
TARGET = 3.0  # ours may take at most this many times HF's (Rust, multithreaded) trainer


def stdlib_corpus(max_bytes=30_000_000):
    """This machine's Python standard library sources, in sorted path order, up to max_bytes of UTF-8:
    one text per file (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, n = [], 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or n >= max_bytes:
            continue
        data = p.read_bytes()
        texts.append(data.decode("utf-8", errors="replace"))
        n += len(data)
    return texts


def hf_train_seconds(texts, vocab_size):
    """Wall time of HF tokenizers' BpeTrainer (GPT-2 byte-level pre-tokenizer) on the same texts, or None."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    t0 = time.time()
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=T.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return time.time() - t0


def bench_bpe_train():
    rows = []
    if (SHARED / "tinyshakespeare.txt").exists():
        rows.append(("tiny shakespeare", [(SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")], 4096))
    else:
        print(f"(skipping tiny shakespeare: {SHARED / 'tinyshakespeare.txt'} not found)")
    rows.append(("python stdlib .py", stdlib_corpus(), 32768))
    print(f"{'corpus':<18} {'MB':>6} {'vocab':>6} {'ours s':>7} {'HF s':>6} {'ratio':>6}  target")
    for name, texts, vocab_size in rows:
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        t0 = time.time()
        merges = T.train_bpe(texts, vocab_size, verbose=False)
        ours = time.time() - t0
        assert len(merges) == vocab_size - 256 - len(T.SPECIAL_TOKENS)
        hf = hf_train_seconds(texts, vocab_size)
        ratio = f"{ours / hf:6.2f}" if hf else "     -"
        verdict = ("ok" if ours <= TARGET * hf else "SLOW") if hf else "(tokenizers not installed)"
        print(f"{name:<18} {mb:6.1f} {vocab_size:>6} {ours:7.2f} {hf or float('nan'):6.2f} {ratio}  "
              f"<= {TARGET:.0f}x {verdict}")


def bench_encode():
    path = SHARED / "tinyshakespeare.txt"
    if not path.exists():
        print(f"(skipping: {path} not found)")
        return
    text = path.read_text(encoding="utf-8")
    docs = text.split("\n\n")
    mb = len(text.encode("utf-8")) / 1e6
    tok = T.get_tokenizer("bpe", vocab_size=4096, text=text, verbose=False)
    print(f"{'encoder (bpe 4096, tiny shakespeare)':<40} {'s':>6} {'MB/s':>7}")
    for name, fn in [("tiktoken encode", lambda: tok.encode(text)),
                     ("tiktoken encode_batch (paragraphs)", lambda: tok.encode_batch(docs)),
                     ("pure Python encode_slow (cold cache)", lambda: tok.encode_slow(text))]:
        t0 = time.time()
        fn()
        dt = time.time() - t0
        print(f"{name:<40} {dt:6.2f} {mb / dt:7.1f}")


if __name__ == "__main__":
    bench_bpe_train()
    bench_encode()
