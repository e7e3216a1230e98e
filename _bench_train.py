"""Training speed and quality on CPU against nanoGPT's "baby" shakespeare_char run."""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
# nanoGPT's baby shakespeare_char run (4 layers x 128, block 64, batch 12, lr 1e-3, 2000 iters), measured on
# this 2-core CPU by the author: nanoGPT is not a package, so these are reference figures
NANOGPT = {"val_loss": 1.886, "seconds": 116.0, "tok_s": 14.8e3, "tok_s_compiled": 17.1e3}


def _train(*args):
    """Run train.py; return wall seconds, median tok/s of the log lines, and the list of eval records."""
    out = tempfile.mkdtemp(prefix="bench-train-")
    t0 = time.time()
    p = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={out}", "--sample_at_end=False",
                        "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    recs = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
    rates = sorted(r["tok_per_sec"] for r in recs if "tok_per_sec" in r)
    evals = [r for r in recs if "val_loss" in r]
    return wall, rates[len(rates) // 2], evals


def _first_below(evals, target):
    for r in evals:
        if r["val_loss"] <= target:
            return r["step"]
    return None


def bench_train():
    """nanoGPT's baby config in GPT-2 style (same loss at >= 1.2x its tokens/s), with and without
    torch.compile, and our Llama-style CPU recipe (val loss <= 1.886 in <= half of nanoGPT's time)."""
    data = ROOT / "data" / "shakespeare" / "raw" / "input.txt"
    if not data.exists():
        if not (SHARED / "tinyshakespeare.txt").exists():
            print("bench_train: no tiny Shakespeare (data/shakespeare/raw/input.txt or ../shared/data): skipped")
            return
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes((SHARED / "tinyshakespeare.txt").read_bytes())
    subprocess.run([sys.executable, "prepare.py", "--dataset=shakespeare", "--tokenizer=byte"], cwd=ROOT,
                   check=True, capture_output=True)
    print(f"{'run (tiny Shakespeare, bytes, CPU)':<44}{'wall s':>8}{'tok/s':>9}{'val loss':>10}{'vs nanoGPT':>12}")
    print(f"{'nanoGPT baby (reference figures)':<44}{NANOGPT['seconds']:>8.0f}{NANOGPT['tok_s']:>9.0f}"
          f"{NANOGPT['val_loss']:>10.3f}{'1.00x':>12}")
    for label, extra in (("ours, same GPT-2-style config", []),
                         ("ours, same config, compile=True", ["--compile=True"])):
        wall, tok_s, evals = _train("config/shakespeare_char.py", *extra)
        ratio = tok_s / NANOGPT["tok_s"]
        print(f"{label:<44}{wall:>8.0f}{tok_s:>9.0f}{evals[-1]['val_loss']:>10.3f}{ratio:>11.2f}x"
              f"  (target >= 1.2x tok/s, val loss <= {NANOGPT['val_loss']})")
    wall, tok_s, evals = _train("config/shakespeare_char_fast.py")
    step = _first_below(evals, NANOGPT["val_loss"])
    print(f"{'ours, Llama-style recipe':<44}{wall:>8.0f}{tok_s:>9.0f}{evals[-1]['val_loss']:>10.3f}"
          f"{NANOGPT['seconds'] / wall:>11.2f}x  (target: val loss <= {NANOGPT['val_loss']} in <= "
          f"{NANOGPT['seconds'] / 2:.0f} s; reached at step {step})")
