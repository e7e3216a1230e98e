"""
Speed of the whole prepare step (issue 3): MB/s of cleaned text through clean (including the pydocs extract
or reading the file), tokenizer training and encode+write, for pydocs and for tiny Shakespeare given as a
local file, both with our BPE at vocab 4096. Baseline measured in the same run: the same tokenizer's
tiktoken encode_batch on the same documents, with nothing written.
"""
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"


def bench_prepare():
    import prepare
    from common import load_tokenizer
    cases = [("pydocs", dict(dataset="pydocs"))]
    if (SHARED / "tinyshakespeare.txt").exists():
        cases.append(("shakespeare (local)", dict(dataset="local", input=str(SHARED / "tinyshakespeare.txt"))))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, kw in cases:
            quiet = io.StringIO()
            t0 = time.time()
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                data_dir = prepare.prepare(data_root=d, tokenizer="bpe", vocab_size=4096, **kw)
            total = time.time() - t0
            meta = prepare.load_meta(data_dir)
            mb = (meta["train"]["bytes"] + meta["val"]["bytes"]) / 1e6
            t = meta["timing"]
            # baseline: encoding alone, same tokenizer, same cleaned documents, same threads
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                raw = prepare.load_documents(kw["dataset"], data_dir, kw.get("input"), 8192, 0.1, False, {})
                docs = prepare.clean(raw, 16)
            tok = load_tokenizer(meta["tokenizer"])
            texts = [text for _, text, _ in docs]
            t1 = time.time()
            tok.encode_batch(texts, num_threads=os.cpu_count())
            base = time.time() - t1
            rows.append((label, mb, t["clean_s"], t["tokenizer_s"], t["encode_write_s"], total, base))
    print(f"{'prepare, bpe 4096':<22}{'MB':>6}{'clean':>14}{'tok train':>14}{'encode+write':>16}{'whole':>14}"
          f"{'encode only':>14}{'ratio':>7}")
    for label, mb, c, tt, e, total, base in rows:
        def f(s):
            return f"{s:5.2f}s {mb / s:5.1f}MB/s" if s > 0 else "-"
        print(f"{label:<22}{mb:6.2f}{f(c):>14}{f(tt):>14}{f(e):>16}{f(total):>14}{f(base):>14}{e / base:6.2f}x")
    print("(MB = UTF-8 MB of cleaned text; clean includes extracting/reading; ratio = encode+write time / "
          "tiktoken encode_batch alone)")


if __name__ == "__main__":
    sys.exit("run through the bench runner (bench_prepare)")
