"""
Every check of the project, runnable as `python test_all.py` (or under pytest).
The runner at the bottom discovers the test_* functions in this file, runs them in order,
prints one line per test and ends with exactly `N passed, N failed[, N skipped]`.
Options: `-k SUBSTRING` runs only the tests whose name contains it; `-x` stops at the first failure.
"""
import os
import sys
import time
import traceback
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable


def shared_file(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p


# -----------------------------------------------------------------------------
# helpers shared by the tests

import json
import signal
import subprocess
import tempfile

_TMP = tempfile.mkdtemp(prefix="fromscratch-tests-")


def run(args, cwd=ROOT, timeout=240, env=None, check=None):
    """Run a script of ours; return the CompletedProcess (text)."""
    p = subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}, expected {check}\nstdout:{p.stdout[-3000:]}\nstderr:{p.stderr[-3000:]}"
    return p


def assert_clear_error(p, *needles):
    """Exit code 2, one line starting with 'error:', no traceback, naming what is wrong."""
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:{p.stdout[-2000:]}\nstderr:{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def tiny_data():
    """Tiny Shakespeare, byte tokenizer, prepared once per test run (fast: no BPE training)."""
    root = Path(_TMP) / "data"
    if not (root / "local" / "meta.json").exists():
        run(["prepare.py", "--dataset=local", f"--input={shared_file('tinyshakespeare.txt')}", "--tokenizer=byte",
             f"--data_root={root}"], check=0)
    return root


TINY = ["--dataset=local", f"--input={SHARED / 'tinyshakespeare.txt'}", "--tokenizer=byte", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64",
        "--block_size=32", "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--log_interval=1",
        "--sample_at_end=False", "--device=cpu", "--warmup_iters=2", "--learning_rate=3e-3"]


def train(out, *extra, check=0, timeout=240):
    return run(["train.py", f"--data_root={tiny_data()}", f"--out_dir={out}", *TINY, *extra],
               check=check, timeout=timeout)


def read_metrics(out):
    return [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]

# -----------------------------------------------------------------------------
# config overrides (common.configure)


def test_configure_overrides_and_types():
    from common import configure
    cfg_file = Path(_TMP) / "cfg_ok.py"
    cfg_file.write_text("batch_size = 7\nname = 'x'\nimport math\n")
    g = {"batch_size": 1, "lr": 1e-3, "name": "a", "flag": False, "maybe": None, "math": None, "_private": 3}
    cfg = configure(g, [str(cfg_file), "--lr=2", "--flag=True", "--maybe=(1, 2)", "--name=cpu"])
    assert cfg == {"batch_size": 7, "lr": 2.0, "name": "cpu", "flag": True, "maybe": (1, 2), "math": None}
    assert isinstance(g["lr"], float) and g["batch_size"] == 7


def test_config_errors_exit_2():
    assert_clear_error(run(["train.py", "--no_such_key=1"]), "unknown config key 'no_such_key'")
    assert_clear_error(run(["train.py", "--batch_size=abc"]), "batch_size", "int")
    assert_clear_error(run(["train.py", "--compile=1"]), "compile")
    assert_clear_error(run(["train.py", "--sample_at_end=yes"]), "sample_at_end", "True or False")
    assert_clear_error(run(["train.py", "config/does_not_exist.py"]), "config/does_not_exist.py")
    assert_clear_error(run(["train.py", "batch_size=3"]), "batch_size=3")
    bad = Path(_TMP) / "cfg_bad.py"
    bad.write_text("learnin_rate = 1e-3\n")
    assert_clear_error(run(["train.py", str(bad)]), "unknown config key 'learnin_rate'", "learning_rate")


def test_lr_schedule():
    from common import get_lr
    lrs = [get_lr(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup must rise"
    assert abs(lrs[10] - 1.0) < 1e-9 and abs(lrs[55] - 0.55) < 1e-9 and lrs[100] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine must not rise"
    wsd = [get_lr(s, 1.0, 0.0, 10, 100, "wsd", 0.2) for s in range(101)]
    assert wsd[10] == wsd[80] == 1.0 and abs(wsd[90] - 0.5) < 1e-9 and wsd[100] == 0.0

# -----------------------------------------------------------------------------
# train.py


def _weights(out):
    import torch
    return torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True)


def test_train_learns_and_logs():
    out = Path(_TMP) / "out-learn"
    p = train(out, "--max_iters=60", "--eval_interval=30")
    m = read_metrics(out)
    evals = [r for r in m if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals  # from ln(320)=5.8 towards ~3
    assert evals[-1]["val_bpb"] > 0 and "tok/s" in p.stdout and "ETA" in p.stdout
    ck = _weights(out)
    assert ck["step"] == 60 and ck["model_args"]["n_kv_head"] == 2 and ck["tokenizer"]["kind"] == "byte"


def test_resume_after_sigkill_is_exact():
    import torch
    full, killed = Path(_TMP) / "out-full", Path(_TMP) / "out-killed"
    args = ["--max_iters=40", "--eval_interval=8", "--dropout=0.1"]
    train(full, *args)
    cmd = [PY, "train.py", f"--data_root={tiny_data()}", f"--out_dir={killed}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill mid-run, after the checkpoint of step 16 and before the end
        if line.startswith("step 19/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _weights(killed)["step"] == 16
    train(killed, *args, "--init_from=resume")
    a, b = _weights(full), _weights(killed)
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    la = [r["loss"] for r in read_metrics(full) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(killed) if "loss" in r]
    assert la[-1] == lb[-1] and la[-5:] == lb[-5:]


def test_checkpoint_survives_sigkill_during_write():
    """Kill a process that keeps rewriting a large checkpoint, at several random moments:
    ckpt.pt must always load and be one complete version."""
    import random
    import torch
    from common import save_checkpoint
    path = Path(_TMP) / "atomic" / "ckpt.pt"
    save_checkpoint({"v": 0, "w": torch.zeros(4_000_000)}, path)
    code = ("import torch, sys; sys.path.insert(0, %r); from common import save_checkpoint\n"
            "v = 0\nprint('go', flush=True)\n"
            "while True:\n    v += 1\n    save_checkpoint({'v': v, 'w': torch.full((4_000_000,), float(v))}, %r)\n"
            % (str(ROOT), str(path)))
    rnd = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(0.3 + rnd.random() * 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = torch.load(path, weights_only=True)
        assert torch.all(ck["w"] == ck["v"]), "checkpoint holds a mix of versions"
    assert ck["v"] > 0, "the writer never completed a checkpoint; the test proves nothing"


def test_ddp_two_ranks_match_one_process():
    one, two = Path(_TMP) / "out-1rank", Path(_TMP) / "out-2rank"
    args = ["--max_iters=12", "--eval_interval=6", "--total_batch_size=512"]
    train(one, *args)
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        f"--data_root={tiny_data()}", f"--out_dir={two}", *TINY, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s) x 2 micro-steps" in p.stdout
    a = [r for r in read_metrics(one) if "loss" in r or "val_loss" in r]
    b = [r for r in read_metrics(two) if "loss" in r or "val_loss" in r]
    assert len(a) == len(b) == 15
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss"):
            if k in ra:
                assert abs(ra[k] - rb[k]) < 1e-4, (ra, rb)


def test_train_bad_inputs_exit_2_and_keep_checkpoint():
    out = Path(_TMP) / "out-bad"
    train(out, "--max_iters=4", "--eval_interval=4")
    before = (out / "ckpt.pt").read_bytes()
    # training from scratch into a run that exists would overwrite it
    assert_clear_error(train(out, "--max_iters=4", check=None), "already exists", "--init_from=resume")
    # data too short for the context
    assert_clear_error(train(out / "x", "--block_size=2000000", check=None), "block_size")
    # a dataset that is not there and cannot be made
    assert_clear_error(run(["train.py", f"--data_root={_TMP}/nothing", "--dataset=local", "--input=/no/such/file.txt",
                            f"--out_dir={out}/y", "--device=cpu"]), "/no/such/file.txt")
    # a checkpoint whose vocabulary does not match the data
    other = Path(_TMP) / "data-bpe"
    p = run(["train.py", f"--data_root={other}", f"--out_dir={out}", "--init_from=resume", *TINY,
             "--tokenizer=bpe", "--vocab_size=300", "--max_iters=8"])
    assert_clear_error(p, "tokenizer", "--out_dir")
    # a loss that blows up stops the run and leaves the last good checkpoint as it was
    assert_clear_error(train(out, "--init_from=resume", "--max_iters=12", "--eval_interval=100",
                             "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0", check=None), "loss is")
    assert (out / "ckpt.pt").read_bytes() == before

# -----------------------------------------------------------------------------
# runner


def _collect():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    # during development each area keeps its tests in _tests_<area>.py; they are merged here later
    import importlib
    for p in sorted(ROOT.glob("_tests_*.py")):
        mod = importlib.import_module(p.stem)
        tests += [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and callable(f)]
    return tests


def main(argv):
    pattern = argv[argv.index("-k") + 1] if "-k" in argv else ""
    stop_first = "-x" in argv
    os.chdir(ROOT)
    passed = failed = skipped = 0
    t_all = time.time()
    for name, fn in _collect():
        if pattern not in name:
            continue
        t0 = time.time()
        try:
            fn()
        except unittest.SkipTest as e:
            skipped += 1
            print(f"SKIP {name}: {e}", flush=True)
            continue
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
            if stop_first:
                break
            continue
        passed += 1
        print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
    print(f"total time {time.time() - t_all:.0f}s", flush=True)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""), flush=True)
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
