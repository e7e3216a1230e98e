"""
Every check of the project, runnable as `python test_all.py` (or under pytest).
The runner at the bottom discovers the test_* functions in this file, runs them in order,
prints one line per test and ends with exactly `N passed, N failed[, N skipped]`.
Options: `-k SUBSTRING` runs only the tests whose name contains it; `-x` stops at the first failure.
Sections, in run order: config/train, model (model.py, sample.py), tokenizer, prepare, eval, finetune/dpo/chat.
"""
import contextlib
import copy
import functools
import gzip
import hashlib
import io
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import unicodedata
import unittest
import zipfile
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import numpy as np
import regex
import torch
import torch.nn.functional as F

import common
import eval as E
import hf as H
import model as M
import prepare
import tokenizer as T

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable
# every scratch folder of a run lives under one, removed when the run ends (KEEP_TEST_TMP=1 keeps it to look at)
RUN_TMP = tempfile.mkdtemp(prefix="fromscratch-test-run-")
_TMP = tempfile.mkdtemp(prefix="fromscratch-tests-", dir=RUN_TMP)  # scratch space of the config/train tests
# the eval tests' own scratch space: they prepare a dataset into EVAL_TMP / "data", which must stay apart from
# tiny_data()'s
EVAL_TMP = Path(tempfile.mkdtemp(prefix="fromscratch-eval-tests-", dir=RUN_TMP))


# ----- helpers shared by the tests -----


def shared_file(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p


# one thread per process: these tiny models gain nothing from two, and on a busy 2-core machine two
# threads per process run an order of magnitude slower (spinning OpenMP workers)
RUN_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# scripts that run in a process of their own: they start worker processes (clean.py's --workers, prepare.py
# through it) which must not fork this one
OWN_PROCESS = {"clean.py", "prepare.py"}


def run(args, cwd=ROOT, timeout=240, env=None, check=None, fresh=False):
    """Run a script of ours; return the CompletedProcess (text). A script of this folder runs in this process
    (run_here: ~2 s of interpreter and torch start-up saved each time) on one thread, as a subprocess would with
    RUN_ENV, unless fresh=True, the script is in OWN_PROCESS, or args are not a script (python -m ...)."""
    script = args[0]
    if not fresh and script.endswith(".py") and "/" not in script and script not in OWN_PROCESS:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            with mock.patch.dict(os.environ, {**RUN_ENV, **(env or {})}):
                p = run_here(script, args[1:], cwd=cwd)
        finally:
            torch.set_num_threads(threads)
    else:
        p = subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **RUN_ENV, **(env or {})})
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


def expect_die(fn, *args, **kwargs):
    """Call fn in-process (cheaper than a subprocess) expecting it to stop through common.die(): checks exit
    code 2 and returns what it printed on stderr, as is (not stripped)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            fn(*args, **kwargs)
        except SystemExit as e:
            assert e.code == 2, f"exit code {e.code}"
            return err.getvalue()
    raise AssertionError(f"{fn.__name__} did not die")


def static_server(site):
    """A quiet HTTP server of the folder site on 127.0.0.1 (a free port), serving in a daemon thread."""
    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(site), **kw)

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def one_thread(fn):
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine every parallel region
    waits for a descheduled worker (30x slower here): run these tests on one thread."""
    def wrapper():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(n)
    wrapper.__name__ = fn.__name__
    return wrapper


def need_transformers():
    try:
        import transformers
    except ImportError:
        raise unittest.SkipTest("transformers is not installed (pip install -r requirements-test.txt)")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ----- config / train: helpers -----


def tiny_data():
    """Tiny Shakespeare, byte tokenizer, prepared once per test run (fast: no BPE training)."""
    root = Path(_TMP) / "data"
    if not (root / "local" / "meta.json").exists():
        run(["prepare.py", "--dataset=local", f"--input={shared_file('tinyshakespeare.txt')}", "--tokenizer=byte",
             f"--data_root={root}"], check=0)
    return root


TINY = ["--dataset=local", f"--input={SHARED / 'tinyshakespeare.txt'}", "--tokenizer=byte", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64",
        "--block_size=32", "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--log_interval=1",
        "--sample_at_end=False", "--device=cpu", "--warmup_iters=2", "--learning_rate=3e-3",
        # the plain Llama style with AdamW, not the default run's recipe: what FSDP, TP, PP and hf.py all take
        "--optimizer=adamw", "--mlp=swiglu", "--qk_norm=False", "--zero_init=False", "--tie_embeddings=True",
        "--lr_schedule=cosine", "--dropout=0.0", "--weight_decay=0.1"]


def train(out, *extra, check=0, timeout=240):
    return run(["train.py", f"--data_root={tiny_data()}", f"--out_dir={out}", *TINY, *extra],
               check=check, timeout=timeout)


def read_metrics(out):
    return [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]


# ----- structure -----


def project_imports():
    """{module: the project modules it imports anywhere in its file (top level or inside functions)}."""
    import ast
    mods = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for m in mods:
        deps = set()
        for n in ast.walk(ast.parse((ROOT / f"{m}.py").read_text())):
            if isinstance(n, ast.Import):
                deps |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                deps.add(n.module.split(".")[0])
        graph[m] = deps & mods - {m}
    return graph


def test_structure_imports_point_down():
    """common.py is the ground floor, and no chain of imports comes back to where it started."""
    graph = project_imports()
    assert graph["common"] == set(), f"common.py imports {graph['common']}"
    assert graph["model"] == set(), f"model.py imports {graph['model']}"
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_runner_counts_a_die_as_that_tests_failure():
    """A test whose code calls die() (SystemExit) fails alone: the tests after it run and the summary line is
    printed."""
    from common import die
    probes = {"test_zzprobe_a_dies": lambda: die("probe"), "test_zzprobe_b_passes": lambda: None}
    globals().update(probes)
    try:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["-k", "zzprobe"])
    finally:
        for k in probes:
            del globals()[k]
    lines = out.getvalue().strip().splitlines()
    assert code == 1 and lines[-1] == "1 passed, 1 failed", lines
    assert any(l.startswith("FAIL test_zzprobe_a_dies") for l in lines) and "ok   test_zzprobe_b_passes" in out.getvalue()


# ----- config / train: config overrides (common.configure), LR schedule -----


def test_configure_overrides_and_types():
    from common import configure
    cfg_file = Path(_TMP) / "cfg_ok.py"
    cfg_file.write_text("batch_size = 7\nname = 'x'\nimport math\n")
    g = {"batch_size": 1, "lr": 1e-3, "name": "a", "flag": False, "maybe": None, "math": None, "_private": 3, "CONST": 1}
    cfg = configure(g, [str(cfg_file), "--lr=2", "--flag=True", "--maybe=(1, 2)", "--name=cpu"])
    assert cfg == {"batch_size": 7, "lr": 2.0, "name": "cpu", "flag": True, "maybe": (1, 2), "math": None}
    assert isinstance(g["lr"], float) and g["batch_size"] == 7


def test_config_errors_exit_2():
    assert_clear_error(run(["train.py", "--no_such_key=1"]), "unknown config key 'no_such_key'")
    here = lambda *args: run_here("train.py", list(args))  # dies while reading its config: in this process
    assert_clear_error(here("--batch_size=abc"), "batch_size", "int")
    assert_clear_error(here("--compile=1"), "compile")
    assert_clear_error(here("--sample_at_end=yes"), "sample_at_end", "True or False")
    assert_clear_error(here("config/does_not_exist.py"), "config/does_not_exist.py")
    assert_clear_error(here("batch_size=3"), "batch_size=3")
    bad = Path(_TMP) / "cfg_bad.py"
    bad.write_text("learnin_rate = 1e-3\n")
    assert_clear_error(here(str(bad)), "unknown config key 'learnin_rate'", "learning_rate")


def test_lr_schedule():
    from common import get_lr
    lrs = [get_lr(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "warmup must rise"
    assert abs(lrs[10] - 1.0) < 1e-9 and abs(lrs[55] - 0.55) < 1e-9 and lrs[100] == lrs[119] == 0.1
    assert abs(lrs[0] - 1 / 11) < 1e-12 and abs(lrs[9] - 10 / 11) < 1e-12  # step 0 already learns
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine must not rise"
    wsd = [get_lr(s, 1.0, 0.0, 10, 100, "wsd", 0.2) for s in range(101)]
    assert wsd[10] == wsd[80] == 1.0 and abs(wsd[90] - 0.5) < 1e-9 and wsd[100] == 0.0


def test_optimizer_step_clips_like_torch():
    """optimizer_step's clipping (skipped when below the limit) moves the weights as clip_grad_norm_ + SGD do."""
    from common import optimizer_step
    for max_norm, scale in ((1.0, 10.0), (1.0, 0.01), (0.0, 10.0)):
        a, b = tiny(), tiny()
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        for m in (a, b):
            (m(x, x)[1] * scale).backward()
        norm, bad = optimizer_step(torch.optim.SGD(a.parameters(), lr=0.5), a.parameters(), 0.5, max_norm)
        ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm if max_norm > 0 else float("inf"))
        assert abs(float(norm) - float(ref)) < 1e-4 * float(ref) and not bad  # the norm before clipping
        with torch.no_grad():
            for pa, pb in zip(a.parameters(), b.parameters()):
                assert pa.grad is None  # cleared
                assert torch.allclose(pa, pb - 0.5 * pb.grad, rtol=1e-5, atol=1e-7)


# ----- config / train: train.py -----


def _weights(out):
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
    full, killed = Path(_TMP) / "out-full", Path(_TMP) / "out-killed"
    args = ["--max_iters=40", "--eval_interval=8", "--dropout=0.1"]
    train(full, *args)
    cmd = [PY, "train.py", f"--data_root={tiny_data()}", f"--out_dir={killed}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **RUN_ENV})
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
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **RUN_ENV})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 rank(s) x 2 micro-steps" in p.stdout
    a = [r for r in read_metrics(one) if "loss" in r or "val_loss" in r]
    b = [r for r in read_metrics(two) if "loss" in r or "val_loss" in r]
    assert len(a) == len(b) == 15
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss"):
            if k in ra:
                assert abs(ra[k] - rb[k]) < 1e-4, (ra, rb)


# the loss-weighting worker: exec'd in-process for the single-process references and run under torchrun
LOSS_WEIGHTING = r'''
import sys
from contextlib import nullcontext
import torch
sys.path.insert(0, ROOT)
import chat_data as C
import model as M
from common import accumulate_gradients, setup_ddp


def lw_model():
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(vocab_size=64, block_size=80, n_layer=2, n_head=2, n_embd=32))


def lw_sft_examples():
    """(ids, mask) of 4 conversations whose replies have 2, 61, 5 and 30 tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for prompt, reply in ((5, 2), (3, 61), (10, 5), (2, 30)):
        ids = torch.randint(0, 60, (prompt + reply + 1,), generator=g).tolist()
        out.append((ids, [0] * (prompt + 1) + [1] * reply))
    return out


def lw_pairs():
    """(pairs, reference log-probs): 4 preference pairs of replies 1 to 40 tokens long."""
    g = torch.Generator().manual_seed(2)
    pairs = []
    for prompt, chosen, rejected in ((4, 1, 40), (9, 25, 3), (2, 7, 7), (6, 33, 12)):
        p = torch.randint(0, 60, (prompt + 1,), generator=g).tolist()
        c, r = torch.randint(0, 60, (chosen,), generator=g).tolist(), torch.randint(0, 60, (rejected,), generator=g).tolist()
        pairs.append((p + c, [0] * (prompt + 1) + [1] * chosen, p + r, [0] * (prompt + 1) + [1] * rejected))
    return pairs, -30 * torch.rand(2, 4, generator=g)


def lw_step(world, rank, ddp, grad_accum, kind):
    """(logged loss, gradients) of one optimizer step over the 4 examples (or pairs), split into grad_accum
    micro-steps on each of world ranks exactly as finetune.py and dpo.py split a global batch."""
    model = lw_model()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    bs = 4 // (world * grad_accum)
    rows = [(m * world + rank) * bs for m in range(grad_accum)]
    if kind == "sft":
        examples = lw_sft_examples()
        micro = [examples[r:r + bs] for r in rows]
        n_targets = sum(sum(mask[1:]) for ex in micro for _, mask in ex)
        loss = accumulate_gradients(net, [C.collate(ex, 0, "cpu") for ex in micro], n_targets, nullcontext(), ddp)
    else:
        pairs, ref = lw_pairs()

        def dpo_loss_sum(net, ix):
            x, y = C.pair_batch([pairs[i] for i in ix], 0, "cpu")
            lp = C.sequence_logps(net(x)[0], y)
            losses, _, _ = C.dpo_loss(lp[:len(ix)], lp[len(ix):], ref[0, ix], ref[1, ix], 0.1)
            return losses.sum()
        loss = accumulate_gradients(net, [list(range(r, r + bs)) for r in rows], bs * grad_accum, nullcontext(), ddp,
                                    loss_sum=dpo_loss_sum)
    return float(loss), [p.grad.clone() for p in model.parameters()]


if __name__ == "__main__":
    ddp, rank, _, world, _ = setup_ddp("cpu")
    out = {f"{kind}{ga}": lw_step(world, rank, True, ga, kind) for kind in ("sft", "dpo") for ga in (1, 2)}
    if rank == 0:
        torch.save(out, sys.argv[1])
    torch.distributed.destroy_process_group()
'''


def test_loss_weighting_accumulation_and_ddp_equal_one_batch():
    """One optimizer step over examples of very different reply lengths (2 to 61 tokens; DPO pairs of 1 to 40)
    gives the same gradients (1e-6) and logged loss whether it is one micro-batch, grad_accum=2, or 2 DDP ranks
    on gloo (x1 and x2 micro-steps): the loss is the mean over every target token (pair) of the global batch."""
    ns = {"ROOT": str(ROOT), "__name__": "lw"}
    exec(LOSS_WEIGHTING, ns)
    with tempfile.TemporaryDirectory() as tmp:
        worker, out = Path(tmp) / "lw.py", Path(tmp) / "grads.pt"
        worker.write_text(f"ROOT = {str(ROOT)!r}\n" + LOSS_WEIGHTING)
        p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, **RUN_ENV})
        assert p.returncode == 0, p.stderr[-3000:]
        ddp = torch.load(out, weights_only=True)
    for kind in ("sft", "dpo"):
        ref_loss, ref = ns["lw_step"](1, 0, False, 1, kind)
        if kind == "sft":  # the token mean, worked out directly
            ex = ns["lw_sft_examples"]()
            x, y = __import__("chat_data").collate(ex, 0, "cpu")
            want = F.cross_entropy(ns["lw_model"]()(x)[0].view(-1, 64), y.view(-1), ignore_index=-1).item()
            assert abs(ref_loss - want) < 1e-6, (ref_loss, want)
        runs = {"grad_accum=2": ns["lw_step"](1, 0, False, 2, kind), "2 ranks": ddp[f"{kind}1"],
                "2 ranks x grad_accum=2": ddp[f"{kind}2"]}
        for name, (loss, grads) in runs.items():
            assert abs(loss - ref_loss) < 1e-6, (kind, name, loss, ref_loss)
            err = max(float((a - b).abs().max()) for a, b in zip(grads, ref))
            assert err < 1e-6, (kind, name, err)


def test_step_inf_gradient_changes_no_weight_and_is_reported():
    """An inf in one gradient: float16's GradScaler skips the step (weights and optimizer state unchanged, the
    scale halved) and counts it; in float32 the fused AdamW gets found_inf (the same: nothing changes) and
    StepChecks stops the run at its next check with the step's number. A finite step moves the weights."""
    from common import StepChecks, optimizer_step
    for fp16 in (True, False):
        model = tiny()
        opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if fp16 else None
        checks = StepChecks(fp16)
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        for step in range(3):
            loss = model(x, x)[1]
            (scaler.scale(loss) if fp16 else loss).backward()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            state = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
            if step == 1:  # injected: one gradient entry overflows
                next(model.parameters()).grad.view(-1)[3] = float("inf")
            norm, bad = optimizer_step(opt, model.parameters(), 1e-2, 1.0, scaler)
            checks.record(step, loss.detach(), norm, bad)
            changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert bool(bad) == (step == 1) and changed == (step != 1), (fp16, step)
            if step == 1:
                assert all(torch.equal(a[k], b[k]) for a, b in zip(state, opt.state.values()) for k in a)
                if fp16:
                    assert scaler.get_scale() == 2.0 ** 9
        if fp16:
            assert math.isfinite(checks.check("x")[0]) and checks.skipped == 1
        else:
            err = expect_die(checks.check, "the last good checkpoint is untouched")
            assert "inf or NaN first at step 1" in err and "untouched" in err, err


def test_dpo_ipo_is_length_normalised_hand_worked():
    """TRL's IPO: the log-probs are means over each reply's tokens, so the 1/(2 beta) target does not depend on
    the lengths. Hand-worked: chosen 2 tokens at log-probs (-1, -3) (mean -2; reference -2, -2), rejected 4 tokens
    at -0.5 each (reference -1 each): h = (-2 - -0.5) - (-2 - -1) = -0.5, beta 0.5: (h - 1)^2 = 2.25, rewards
    0.5 * (-2 - -2) = 0 and 0.5 * (-0.5 - -1) = 0.25. Summed log-probs would give h = -2, a loss of 9."""
    import chat_data as C

    def logits_for(logps, T=4):  # two-token vocabulary: log_softmax of [lp, log(1 - e^lp)] is lp at token 0
        lp = torch.tensor(logps + [-1.0] * (T - len(logps)))
        return torch.stack([lp, torch.log1p(-lp.exp())], -1)[None], torch.tensor([[0] * len(logps) + [-1] * (T - len(logps))])

    def seq(logps):
        logits, y = logits_for(logps)
        return C.sequence_logps(logits, y, average=True)

    pi_c, pi_r, ref_c, ref_r = seq([-1.0, -3.0]), seq([-0.5] * 4), seq([-2.0, -2.0]), seq([-1.0] * 4)
    losses, r_c, r_r = C.dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "ipo")
    assert abs(losses.item() - 2.25) < 1e-5 and abs(r_c.item()) < 1e-6 and abs(r_r.item() - 0.25) < 1e-6
    summed = [C.sequence_logps(*logits_for(v)) for v in ([-1.0, -3.0], [-0.5] * 4, [-2.0, -2.0], [-1.0] * 4)]
    assert abs(C.dpo_loss(*summed, 0.5, "ipo")[0].item() - 9.0) < 1e-5  # what the sum would have given


def test_precision_auto_picks_bf16_only_without_emulation():
    """dtype='auto' on CUDA: bfloat16 where the GPU has it natively; float16 (with GradScaler) where bf16 is only
    emulated, which is_bf16_supported() counts unless including_emulation=False (V100, T4); float32 on CPU."""
    from common import grad_scaler, precision
    native = lambda including_emulation=True: True  # noqa: E731  an A100/H100
    emulated = lambda including_emulation=True: including_emulation  # noqa: E731  a V100
    with mock.patch("torch.cuda.is_bf16_supported", side_effect=native), warnings_off():
        assert precision("cuda", "auto")[0] == "bfloat16"
    with mock.patch("torch.cuda.is_bf16_supported", side_effect=emulated), warnings_off():
        assert precision("cuda:1", "auto")[0] == "float16"
    assert precision("cpu", "auto")[0] == "float32"
    assert grad_scaler("float16", "cpu") is not None and grad_scaler("bfloat16", "cuda") is None
    assert grad_scaler("float32", "cpu") is None


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast on a machine without CUDA says it is disabled
        yield


def test_eval_bits_per_byte_hand_computed():
    """A model with zero weights predicts the uniform distribution over its V rows: every token costs
    log2(V) bits, so bpb = tokens * log2(V) / UTF-8 bytes exactly. GPT-2's tokenizer makes tokens and bytes
    differ ~4x (dividing by tokens would be 4x off), for a text file and for a prepared dataset's val split."""
    tok = T.get_tokenizer("gpt2", shared_file("gpt2.tiktoken"))
    V = 50304
    model = M.GPT(M.GPTConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    text = (SHARED / "tinyshakespeare.txt").read_text()[:3000] + " — naïve café"
    path = EVAL_TMP / "bpb_hand.txt"
    path.write_text(text, encoding="utf-8")
    r = E.language_model(model, tok, ("text", path), "val", 0, 8192, contextlib.nullcontext())
    n_tok, n_bytes = len(tok.encode(text)), len(text.encode("utf-8"))
    assert r["tokens"] == n_tok and r["bytes"] == n_bytes and n_bytes > 3 * n_tok
    assert abs(r["bpb"] - n_tok * math.log2(V) / n_bytes) < 1e-6 and abs(r["loss"] - math.log(V)) < 1e-5
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.prepare(dataset="local", data_root=str(EVAL_TMP / "data-gpt2"), tokenizer="gpt2", input=str(path),
                        chunk_chars=500, val_frac=0.3)
    d = EVAL_TMP / "data-gpt2" / "local"
    val = np.concatenate([prepare.read_bin(d / f) for f in prepare.load_meta(d)["val"]["shards"]])
    val_bytes = len(b"".join(tok.decode_bytes([int(t)]) for t in val if int(t) != tok.eot_id))
    r = E.language_model(model, tok, E.lm_source("local", str(EVAL_TMP / "data-gpt2"), "val"), "val", 0, 8192,
                         contextlib.nullcontext())
    assert r["tokens"] == len(val) - 1 and r["bytes"] == val_bytes
    assert abs(r["bpb"] - (len(val) - 1) * math.log2(V) / val_bytes) < 1e-6


def test_prepare_uint32_shard_roundtrip_above_65535():
    """Vocabularies over 65,535 ids are stored as uint32 (version 2): ids up to 2^32-1 come back exactly."""
    ids = np.array([0, 65535, 65536, 70000, 150000, 2**31 + 5, 2**32 - 1], dtype=np.uint32)
    with tempfile.TemporaryDirectory() as tmp:
        prepare.write_bin(Path(tmp) / "x.bin", ids)
        back = prepare.read_bin(Path(tmp) / "x.bin")
        assert back.dtype == np.uint32 and back.tolist() == ids.tolist()
        assert prepare.bin_header(Path(tmp) / "x.bin") == (np.uint32, len(ids))
        small = np.array([1, 65535], dtype=np.uint16)
        prepare.write_bin(Path(tmp) / "y.bin", small)
        assert prepare.read_bin(Path(tmp) / "y.bin").dtype == np.uint16
    # and write_shards stores a tokenizer of more than 65,535 ids as uint32: ids above 65,535 do not wrap
    class WideTok:  # every character a token id above 65,535
        n_vocab, eot_id = 200_000, 199_999

        def encode_batch(self, texts, num_threads=1):
            return [[70_000 + ord(c) for c in t] for t in texts]
    docs = {"train": [("a", "hello"), ("b", "wörld")], "val": [("c", "x")]}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        meta = prepare.write_shards(Path(tmp), docs, WideTok(), 4, 1)
        train = np.concatenate([prepare.read_bin(Path(tmp) / f) for f in meta["train"]["shards"]])
        assert meta["dtype"] == "uint32" and train.tolist() == [199_999] + [70_000 + ord(c) for c in "hello"] + \
            [199_999] + [70_000 + ord(c) for c in "wörld"]


def test_train_warns_when_the_steps_outrun_the_data():
    p = train(Path(_TMP) / "out-warn", "--max_iters=5000", "--eval_only=True")
    assert "warning: 5000 steps x 256 tokens = 1.3M tokens, but the train split has 1.0M: it will be repeated 1.3 times" \
        in p.stdout, p.stdout


def test_train_max_time_stops_on_time_with_the_schedule_spread_over_it():
    """--max_time=3: the run stops after 3 s of training (not its 100,000 steps), evaluates there (the record's
    time is training time, evaluation left out), and the learning rate has warmed up and decayed to min_lr
    over those 3 s; a negative max_time is one clear line."""
    out = Path(_TMP) / "out-max-time"
    train(out, "--max_iters=100000", "--warmup_iters=1000", "--eval_interval=100000", "--max_time=3")
    recs = read_metrics(out)
    evals, logs = [r for r in recs if "val_loss" in r], [r for r in recs if "lr" in r]
    assert [r["step"] for r in evals][0] == 0 and 10 < evals[-1]["step"] < 100000, evals
    assert 3 <= evals[-1]["time"] < 30, evals[-1]
    lrs = [r["lr"] for r in logs]
    assert lrs[0] < 1e-4 < 2e-3 < max(lrs) and lrs[-1] < 3e-4 + 2e-4, lrs  # min_lr 3e-4, peak 3e-3
    assert_clear_error(train(Path(_TMP) / "out-max-time-bad", "--max_time=-1", check=2), "max_time must be >= 0")


def test_config_pydocs_is_train_py_defaults():
    """config/pydocs.py says every value in it is train.py's default: each one equals the literal train.py assigns."""
    import ast
    defaults = {}
    for node in ast.parse((ROOT / "train.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    g = {}
    exec((ROOT / "config" / "pydocs.py").read_text(), {}, g)
    assert len(g) > 20 and all(defaults[k] == v for k, v in g.items()), {k: (v, defaults.get(k)) for k, v in g.items()
                                                                       if defaults.get(k) != v}


def test_configs_token_budgets_and_sizes_add_up():
    """The big recipes fetch at least the tokens their steps consume (each token seen about once), and their
    comments' parameter counts are the models they build."""
    for name, params in (("gpt2_124m", 124.5e6), ("llama_1gpu", 152.8e6)):
        g = {"tie_embeddings": True}  # train.py's default, where a config keeps it
        exec((ROOT / "config" / f"{name}.py").read_text(), {}, g)
        need, have = g["max_iters"] * g["total_batch_size"], g["num_shards"] * 100_000_000
        assert need <= have < need + 200_000_000, (name, need, have)
        cfg = M.GPTConfig(vocab_size=50304, block_size=g["block_size"], n_layer=g["n_layer"], n_head=g["n_head"],
                          n_kv_head=g["n_kv_head"], n_embd=g["n_embd"], bias=g["bias"], norm=g["norm"], pos=g["pos"],
                          mlp=g["mlp"], tie_embeddings=g["tie_embeddings"])
        with torch.device("meta"):
            n = M.GPT(cfg).num_params()
        assert abs(n - params) < 0.1e6, (name, n)
        assert f"{params / 1e6:.1f}M" in (ROOT / "config" / f"{name}.py").read_text() or name == "gpt2_124m"


def test_train_from_a_gpt2_directory_on_gpt2_tokens_learns_and_resumes():
    """nanoGPT's fine-tune-GPT-2 run, at toy size: a GPT2LMHeadModel directory (random init, 50257 rows) trains on
    tiny Shakespeare prepared with GPT-2's tokenizer (whose 50261 tokens include the 4 chat tokens that never
    occur in the data): the loss falls, the context is cropped to block_size, and the run resumes."""
    tr = need_transformers()
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=128))
    d, out = Path(_TMP) / "hf-gpt2-init", Path(_TMP) / "out-gpt2-init"
    hf.save_pretrained(d)
    common_args = [f"--data_root={Path(_TMP) / 'data-gpt2'}", f"--out_dir={out}", "--dataset=local",
                   f"--input={shared_file('tinyshakespeare.txt')}", "--tokenizer=gpt2", "--block_size=64",
                   "--batch_size=4", "--total_batch_size=256", "--eval_iters=2", "--log_interval=5",
                   "--sample_at_end=False", "--device=cpu", "--learning_rate=3e-3", "--warmup_iters=2",
                   "--lr_decay_iters=40"]
    run(["train.py", f"--init_from={d}", "--max_iters=30", "--eval_interval=15", *common_args], check=0, timeout=300)
    run(["train.py", "--init_from=resume", "--max_iters=40", "--eval_interval=10", *common_args], check=0, timeout=300)
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30, 30, 40], evals
    assert evals[0]["val_loss"] > 10.5 and evals[2]["val_loss"] < evals[0]["val_loss"] - 2, evals  # ln 50257 = 10.8
    assert evals[-1]["val_loss"] < evals[2]["val_loss"] + 0.2
    ck = _weights(out)
    assert ck["step"] == 40 and ck["model_args"]["vocab_size"] == 50257 and ck["model_args"]["block_size"] == 64


def test_ddp_resume_gives_each_rank_its_own_rng():
    """2 ranks with dropout (each rank its own masks): killed after the step-6 checkpoint and resumed, the run
    ends with exactly the weights of the uninterrupted one, because each rank gets its own RNG state back."""
    full, cut = Path(_TMP) / "out-ddp-full", Path(_TMP) / "out-ddp-cut"
    args = ["--eval_interval=6", "--total_batch_size=512", "--dropout=0.2", "--lr_decay_iters=12"]
    launch = lambda out, *a: subprocess.run(  # noqa: E731
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         f"--data_root={tiny_data()}", f"--out_dir={out}", *TINY, *args, *a],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **RUN_ENV})
    for p in (launch(full, "--max_iters=12"), launch(cut, "--max_iters=6"),
              launch(cut, "--max_iters=12", "--init_from=resume")):
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = _weights(full), _weights(cut)
    assert a["step"] == b["step"] == 12 and len(b["rng"]["torch"]) == 2
    assert not torch.equal(b["rng"]["torch"][0], b["rng"]["torch"][1])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"


def test_resume_from_a_checkpoint_written_on_a_gpu():
    """A checkpoint whose tensors were saved from CUDA (their storages tagged cuda:0) loads on the CPU:
    checkpoints are read with map_location='cpu' (RNG states must be CPU tensors, and the optimizer state
    need not go to the GPU twice); train.py resumes it and load_model (sample, eval, finetune) reads it."""
    out = Path(_TMP) / "out-gputag"
    train(out, "--max_iters=4", "--eval_interval=4")
    ck = _weights(out)
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(ck, out / "ckpt.pt")
    try:
        torch.load(out / "ckpt.pt", weights_only=True)
        tagged = False
    except RuntimeError:  # "Attempting to deserialize object on a CUDA device"
        tagged = True
    assert tagged, "the storages were not tagged as CUDA ones: the test proves nothing"
    train(out, "--max_iters=8", "--eval_interval=4", "--init_from=resume")
    m, ckpt, _ = H.load_model("resume", out, "cpu")
    assert ckpt["step"] == 8 and next(m.parameters()).device.type == "cpu"


def test_gpu_smoke_script_runs_on_cpu():
    """bench.py gpu's smoke run, on the CPU with a tiny model (no compile, float32), so that the first GPU
    session does not meet its bugs: kill and resume continue the run, sample, eval, SFT and DPO all complete."""
    import bench
    with tempfile.TemporaryDirectory() as tmp:
        data = ["--dataset=local", f"--input={shared_file('tinyshakespeare.txt')}", "--tokenizer=byte"]
        chat = [f"--data={shared_file('instruction-data.json')}",
                f"--data={shared_file('instruction-data-with-preference.json')}"]
        tiny_model = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4",
                      "--total_batch_size=256", "--device=cpu", "--dtype=float32"]
        with redirect_stdout(io.StringIO()) as out, mock.patch.dict(os.environ, RUN_ENV):
            recs, first = bench.smoke(Path(tmp), data, chat, tiny_model, run_script=run)
            # its throughput table: one process, FSDP on one torchrun rank, the Llama config file's path
            shape = ["--n_layer=2", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--block_size=64"]
            rates = bench.throughput([f"--data_root={tmp}/data", *data, "--batch_size=4", "--total_batch_size=256",
                                      "--dtype=float32", *shape], [], ["config/llama_1gpu.py", "--num_shards=0"],
                                     "cpu", steps=6)
    assert len(rates) == 3 and all(r > 0 for r in rates.values()), rates
    assert [r["step"] for r in first if "val_loss" in r] == [0, 10, 20]  # killed after the step-20 checkpoint
    resumed = [r["step"] for r in recs[len(first):] if "loss" in r or "val_loss" in r]
    assert resumed[0] == 20 and resumed[-1] == 30, resumed
    text = out.getvalue()
    for what in ("train:", "sample (", "eval (", "sft (", "dpo (", "smoke run done"):
        assert what in text, text


def test_train_bad_inputs_exit_2_and_keep_checkpoint():
    out = Path(_TMP) / "out-bad"
    train(out, "--max_iters=4", "--eval_interval=4")
    before = (out / "ckpt.pt").read_bytes()
    # in this process (no interpreter start-up per case): each stops with its one line
    here = lambda o, *extra: run_here("train.py", [f"--data_root={tiny_data()}", f"--out_dir={o}", *TINY, *extra])
    # training from scratch into a run that exists would overwrite it
    assert_clear_error(here(out, "--max_iters=4"), "already exists", "--init_from=resume")
    # data too short for the context
    assert_clear_error(here(out / "x", "--block_size=2000000"), "block_size")
    # a dataset that is not there and cannot be made
    assert_clear_error(run_here("train.py", [f"--data_root={_TMP}/nothing", "--dataset=local", "--input=/no/such/file.txt",
                                             f"--out_dir={out}/y", "--device=cpu"]), "/no/such/file.txt")
    # a checkpoint whose vocabulary does not match the data
    other = Path(_TMP) / "data-bpe"
    p = run_here("train.py", [f"--data_root={other}", f"--out_dir={out}", "--init_from=resume", *TINY,
                              "--tokenizer=bpe", "--vocab_size=300", "--max_iters=8"])
    assert_clear_error(p, "tokenizer", "--out_dir")
    # a loss that blows up stops the run and leaves the last good checkpoint as it was
    assert_clear_error(here(out, "--init_from=resume", "--max_iters=12", "--eval_interval=100", "--learning_rate=1e30",
                            "--warmup_iters=0", "--grad_clip=0"), "inf or NaN first at step", "untouched")
    assert (out / "ckpt.pt").read_bytes() == before


# ----- parallel: FSDP2 (dp_shard), activation checkpointing, sharded DCP checkpoints (-k fsdp, -k parallel) -----

import parallel

PAR_TMP = Path(tempfile.mkdtemp(prefix="fromscratch-parallel-tests-", dir=RUN_TMP))
PAR_ARGS = ["--max_iters=12", "--eval_interval=4", "--total_batch_size=512", "--eval_iters=3"]  # 3: uneven over 2 ranks


def torchrun(script, *args, timeout=240):
    return subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **RUN_ENV})


def train2(out, *extra):
    p = torchrun("train.py", f"--data_root={tiny_data()}", f"--out_dir={out}", *TINY, *PAR_ARGS, *extra)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def losses(out):
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(out) if "loss" in r or "val_loss" in r]


def sharded_weights(out):
    return parallel.full_state_dict(Path(out) / "ckpt")


def _runs():
    """The runs several tests compare, made once: one plain process, and 2 FSDP ranks (dp_shard=2) of the
    same global batch and seed."""
    one, fsdp = PAR_TMP / "one", PAR_TMP / "fsdp"
    if not (one / "ckpt.pt").exists():
        train(one, *PAR_ARGS)
    if not (fsdp / "ckpt").exists():
        p = train2(fsdp, "--dp_shard=2")
        assert "FSDP: 2 shards x 1 replica(s)" in p.stdout, p.stdout
    return one, fsdp


def test_fsdp_two_ranks_match_one_process():
    one, fsdp = _runs()
    a, b = losses(one), losses(fsdp)
    assert len(a) == len(b) == 16 and [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-5, (a, b)
    na, nb = [r["grad_norm"] for r in read_metrics(one) if "loss" in r], [r["grad_norm"] for r in read_metrics(fsdp) if "loss" in r]
    assert len(na) == 12 and all(abs(x - y) < 1e-5 for x, y in zip(na, nb)), (na, nb)  # the norm over all shards
    wa, wb = _weights(one)["model"], sharded_weights(fsdp)
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k
    assert not (fsdp / "ckpt.pt").exists() and (fsdp / "ckpt" / "extra.pt").exists()


def test_tensor_parallel_two_ranks_match_one_process():
    """tp=2 (each block's q, k, v, MLP and output projections split over 2 ranks, whole heads each) logs the
    losses and grad norms of one plain process (1e-5) and ends with its weights (1e-4), read back fused from
    the sharded checkpoint; the end sample runs on a gathered plain copy."""
    one, _ = _runs()
    tp = PAR_TMP / "tp"
    p = train2(tp, "--tp=2", "--sample_at_end=True")
    assert "tensor parallel 2" in p.stdout and p.stdout.count("-" * 40) == 2, p.stdout
    a, b = losses(one), losses(tp)
    assert len(a) == len(b) == 16 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    na, nb = [r["grad_norm"] for r in read_metrics(one) if "loss" in r], [r["grad_norm"] for r in read_metrics(tp) if "loss" in r]
    assert all(abs(x - y) < 1e-5 for x, y in zip(na, nb)), (na, nb)
    wa, wb = _weights(one)["model"], sharded_weights(tp)
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k


def test_pipeline_two_stages_match_one_process():
    """pp=2 (the layers split over 2 ranks, torch.distributed.pipelining), with 1F1B and with GPipe over the
    4 micro-steps of a step: the losses and grad norms of one plain process (1e-5), its weights (1e-4) in a
    checkpoint whose keys are the whole model's; the end sample (the stages' parts put together on rank 0)
    is the plain run's text. (A sharded checkpoint continuing in one process: the FSDP test below.)"""
    untied = ["--tie_embeddings=False", "--sample_at_end=True"]  # pp needs untied embeddings
    one = PAR_TMP / "one-untied"
    p1 = train(one, *PAR_ARGS, *untied)
    sample = lambda p: p.stdout.split("-" * 40)[1]
    for schedule in ("1f1b", "gpipe"):
        out = PAR_TMP / f"pp-{schedule}"
        p = train2(out, "--pp=2", f"--pp_schedule={schedule}", *untied)
        assert "pipeline stages 2, 2 rank(s) x 4 micro-steps" in p.stdout, p.stdout
        a, b = losses(one), losses(out)
        assert len(a) == len(b) == 16 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (schedule, a, b)
        na = [r["grad_norm"] for r in read_metrics(one) if "loss" in r]
        nb = [r["grad_norm"] for r in read_metrics(out) if "loss" in r]
        assert all(abs(x - y) < 1e-5 for x, y in zip(na, nb)), (na, nb)
        wa, wb = _weights(one)["model"], sharded_weights(out)
        assert set(wa) == set(wb) and all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa), schedule
        assert sample(p) == sample(p1), (sample(p), sample(p1))


def test_pipeline_refusals_one_clear_line():
    """A pipeline of tied embeddings, and 1F1B with fewer micro-steps than stages, stop with one line naming
    the fix (in one process, over a fake 2-rank group: no torchrun needed)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    torch.distributed.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (2, 1, 1, 1), mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))
        cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
        err = expect_die(parallel.parallelize, M.GPT(M.GPTConfig(**cfg)), mesh, True, "cpu")
        assert "pp=2 needs untied embeddings" in err and "--tie_embeddings=False" in err, err
        m = parallel.parallelize(M.GPT(M.GPTConfig(**cfg, tie_embeddings=False)), mesh, True, "cpu")
        assert list(m.transformer.h) == ["0"] and m.lm_head is None and "ln_f" not in m.transformer
        err = expect_die(parallel.pipeline, m, mesh, "cpu", 1, "1f1b", None)
        assert "needs at least pp=2 micro-steps per step, got 1" in err and err.count("\n") == 1, err
        assert "not one of gpipe, 1f1b" in expect_die(parallel.pipeline, m, mesh, "cpu", 2, "zb", None)
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_on_one_rank_only_when_asked():
    """dp_shard=-1 under torchrun is FSDP even with one rank (bench.py gpu measures FSDP's own overhead so);
    dp_shard=1, or no process group at all, is the plain path (no mesh)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    assert parallel.make_mesh(1, -1, "cpu") is None  # one plain process: no group, nothing to shard over
    torch.distributed.init_process_group("fake", rank=0, world_size=1, store=FakeStore())
    try:
        assert parallel.make_mesh(1, 1, "cpu") is None
        assert dict(zip(parallel.make_mesh(1, -1, "cpu").mesh_dim_names, parallel.make_mesh(1, -1, "cpu").shape)) == \
            {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    finally:
        torch.distributed.destroy_process_group()


def test_parallel_layout_errors_name_the_fix():
    """Degrees that cannot be laid out stop with one line naming the problem (exit 2), checked before any
    process group exists."""
    cases = [(dict(world_size=4, tp=3), "tp=3 must be a positive divisor of the world size 4"),
             (dict(world_size=4, dp_shard=3), "dp_shard=3 must be -1"),
             (dict(world_size=2, tp=2, n_head=4, n_kv_head=1), "tp=2 must divide n_head=4 and n_kv_head=1"),
             (dict(world_size=2, tp=2, n_head=6, n_kv_head=3), "tp=2 must divide n_head=6 and n_kv_head=3"),
             (dict(world_size=4, pp=4, n_layer=2), "pp=4 is more pipeline stages than n_layer=2"),
             (dict(world_size=2, cpu_offload=True), "cpu_offload=True needs FSDP"),
             (dict(world_size=4, tp=2, n_head=4, n_kv_head=2), "add --dp_shard=-1")]
    for kw, msg in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parallel.layout(**kw)
                raise AssertionError(f"{kw} was accepted")
            except SystemExit as e:
                assert e.code == 2, kw
        assert msg in err.getvalue() and err.getvalue().count("\n") == 1, (kw, err.getvalue())
    assert parallel.layout(world_size=8, dp_shard=-1, tp=2, n_head=4, n_kv_head=2) == \
        {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2}
    assert parallel.layout(world_size=8, dp_shard=2, tp=2, n_head=4, n_kv_head=2)["dp_replicate"] == 2


def test_fsdp_sigkill_resume_is_exact_and_continues_in_one_process():
    """2 FSDP ranks with activation checkpointing, SIGKILLed after the step-8 checkpoint and resumed, end with
    bitwise the weights and losses of the uninterrupted run without it (so activation checkpointing changes
    nothing either); the step-8 sharded checkpoint also continues in one plain process (1e-5)."""
    _, full = _runs()
    cut, solo = PAR_TMP / "ac-cut", PAR_TMP / "ac-solo"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data_root={tiny_data()}", f"--out_dir={cut}", *TINY, *PAR_ARGS, "--dp_shard=2",
           "--activation_checkpointing=True"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **RUN_ENV}, start_new_session=True)
    for line in proc.stdout:  # after the checkpoint of step 8, before the end
        if line.startswith("step 10/"):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert parallel.load_extra(cut / "ckpt")["step"] == 8
    shutil.copytree(cut, solo)
    train2(cut, "--dp_shard=2", "--activation_checkpointing=True", "--init_from=resume")
    a, b = sharded_weights(full), sharded_weights(cut)
    assert parallel.load_extra(cut / "ckpt")["step"] == 12
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert dict(losses(full)) == dict(losses(cut))  # (the killed run's lines of steps 9-10 are logged again)
    p = train(solo, *PAR_ARGS, "--init_from=resume")  # 2 ranks' shards into one plain process
    assert "resuming from" in p.stdout and "at step 8" in p.stdout
    la, lb = dict(losses(full)), dict(losses(solo))
    for s in range(9, 13):
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])


def test_sharded_checkpoint_loads_and_exports_for_sampling():
    """hf.load_model (sample.py, eval.py, finetune.py) reads the sharded out_dir/ckpt/ into one plain process,
    and `python parallel.py OUT_DIR` exports it to a ckpt.pt: both greedy-sample the text of the model at
    that step (the plain process's run of the same batches)."""
    one, fsdp = _runs()
    exported = PAR_TMP / "exported"
    shutil.copytree(fsdp, exported)

    def greedy(m):
        return [int(t[0]) for t in m.generate(torch.tensor([[0]]), 40, temperature=0)]
    m, ck, tok = H.load_model("resume", fsdp, "cpu")
    assert ck["step"] == 12 and tok.kind == "byte"
    ref = M.GPT(M.GPTConfig(**_weights(one)["model_args"]))
    ref.load_state_dict(_weights(one)["model"])
    text = greedy(m)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    assert text == greedy(ref) and (m(x)[0] - ref(x)[0]).abs().max() < 1e-4
    run(["parallel.py", str(exported)], check=0)
    e = _weights(exported)
    assert e["step"] == 12 and len(e["rng"]["torch"]) == 2 and e["optimizer"]["state"]
    m2, _, _ = H.load_model("resume", exported, "cpu")  # ckpt.pt, the newer of the two
    assert greedy(m2) == text
    p = run(["sample.py", f"--out_dir={fsdp}", "--start=ROMEO:", "--max_new_tokens=20", "--temperature=0",
             "--num_samples=1", "--device=cpu"], check=0)
    assert "ROMEO:" in p.stdout


def test_activation_checkpointing_changes_nothing():
    """In one process, with dropout (its masks must be replayed in the recompute): the same losses and
    gradients, bitwise, with and without activation checkpointing."""
    torch.manual_seed(0)
    cfg = M.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for ac in (False, True):
        torch.manual_seed(0)
        m = M.GPT(cfg)
        calls, mlp = [], m.transformer.h[0].mlp
        mlp.forward = lambda h, f=mlp.forward: (calls.append(1), f(h))[1]  # (hooks do not see the recompute)
        net = parallel.parallelize(m, None, False, "cpu", activation_checkpointing=ac)
        torch.manual_seed(5)
        loss = net(x, x)[1]
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters()]))
        assert len(calls) == 1 + ac  # with it, the backward runs the block's forward again
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def _bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _held_bytes(cfg, world, dp_shard, tp=1):
    """Rank 0's bytes of {params, grads, optimizer} (AdamW's exp_avg and exp_avg_sq; the 0-dim step counters
    are not sharded and left out) after a real forward, backward and optimizer step of a GPT laid out over
    `world` fake ranks in this one process (world=0: one plain process, no group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    torch.manual_seed(0)
    m = M.GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    mesh = None
    if world:
        torch.distributed.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        shape, names = (world // dp_shard // tp, dp_shard), ("dp_replicate", "dp_shard")
        if tp > 1:
            shape, names = shape + (tp,), names + ("tp",)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    try:
        net = parallel.parallelize(m, mesh, False, "cpu")
        opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        net(x, x)[1].backward()
        opt.step()
        ps = list(m.parameters())
        assert all(hasattr(p, "to_local") for p in ps) == bool(world)
        state = [v for p in ps for k, v in opt.state[p].items() if k != "step"]
        return {"params": _bytes(ps), "grads": _bytes([p.grad for p in ps]), "optimizer": _bytes(state)}
    finally:
        if world:
            torch.distributed.destroy_process_group()


def test_fsdp_memory_per_rank_is_one_nth():
    """N fake ranks in one process: after a real sharded optimizer step, one rank holds exactly 1/N of the
    bytes of the parameters, gradients and AdamW state that DDP keeps on every rank. Every dimension 0
    divides by 8: no padding. HSDP (8 ranks, dp_shard=4: 2 replicas) holds 1/4."""
    cfg = M.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    ddp = list(_held_bytes(cfg, 0, 0).values())
    assert ddp[0] == ddp[1] and ddp[2] == 2 * ddp[0]
    for n in (1, 2, 4, 8):
        assert [b * n for b in _held_bytes(cfg, n, n).values()] == ddp, n
    assert [b * 4 for b in _held_bytes(cfg, 8, 4).values()] == ddp


def test_finetune_and_dpo_with_fsdp_match_one_process():
    """finetune.py and dpo.py with dp_shard=2 on 2 ranks (x2 micro-steps, so gradient sync is skipped on the
    first) log the losses of one process with the same global batch; uneven held-out shares (9 examples, 5
    pairs) exercise the spare forwards; the SFT checkpoint (gathered to rank 0) matches the plain one."""
    base = tiny_base(FT_TMP / "base")
    sft = ["finetune.py", f"--init_from={base}", f"--data={shared_file('instruction-data.json')}", "--max_iters=6",
           "--eval_interval=3", "--learning_rate=3e-3", "--warmup_iters=2", "--device=cpu", "--log_interval=1",
           "--max_examples=64", "--eval_examples=9", "--block_size=128"]
    s1, s2 = PAR_TMP / "sft1", PAR_TMP / "sft2"
    run([*sft, f"--out_dir={s1}", "--batch_size=8"], check=0)
    p = torchrun(*sft, f"--out_dir={s2}", "--batch_size=2", "--grad_accum=2", "--dp_shard=2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    dpo = ["dpo.py", f"--init_from={s1}", f"--data={shared_file('instruction-data-with-preference.json')}",
           "--max_iters=4", "--eval_interval=2", "--device=cpu", "--log_interval=1", "--max_pairs=32",
           "--eval_pairs=5", "--learning_rate=1e-3", "--block_size=128"]
    d1, d2 = PAR_TMP / "dpo1", PAR_TMP / "dpo2"
    run([*dpo, f"--out_dir={d1}", "--batch_size=4"], check=0)
    p = torchrun(*dpo, f"--out_dir={d2}", "--batch_size=1", "--grad_accum=2", "--dp_shard=2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for a, b, keys in ((s1, s2, ("loss", "val_loss")), (d1, d2, ("loss", "val/loss", "train/loss"))):
        ra, rb = read_metrics(a), read_metrics(b)
        assert len(ra) == len(rb) and [r["step"] for r in ra] == [r["step"] for r in rb]
        got = [(k, r[k], q[k]) for r, q in zip(ra, rb) for k in keys if k in r]
        assert len(got) >= 6 and all(abs(x - y) < 1e-5 for _, x, y in got), got
    wa, wb = _weights(s1)["model"], _weights(s2)["model"]
    assert set(wa) == set(wb) and all((wa[k] - wb[k]).abs().max() < 1e-4 for k in wa)
    m, _, _ = H.load_model("resume", d2, "cpu")  # the DPO result is a plain checkpoint like any other


def test_parallel_bad_input_is_one_clear_line():
    tiny = [f"--data_root={tiny_data()}", f"--out_dir={PAR_TMP / 'bad'}", *TINY, "--max_iters=1"]
    assert_clear_error(run_here("train.py", [*tiny, "--dp_shard=3"]), "dp_shard=3", "divisor of the world size 1")
    assert_clear_error(run_here("train.py", [*tiny, "--cpu_offload=True"]), "cpu_offload", "FSDP")
    assert_clear_error(run_here("finetune.py", [f"--init_from={tiny_base(FT_TMP / 'base')}", "--dp_shard=0",
                                                f"--out_dir={PAR_TMP / 'bad-sft'}"]), "dp_shard=0")
    assert_clear_error(run_here("dpo.py", ["--dp_shard=-2", f"--out_dir={PAR_TMP / 'bad-dpo'}"]), "dp_shard=-2")
    # a sharded checkpoint into a model of another shape
    _, fsdp = _runs()
    cfg = M.GPTConfig(**{**parallel.load_extra(fsdp / "ckpt")["model_args"], "n_embd": 32})
    other = M.GPT(cfg)
    err = expect_die(parallel.load_sharded, fsdp / "ckpt", other, other.configure_optimizers(0, 1e-3, (0.9, 0.95), "cpu"))
    assert "does not fit this model" in err and "(320, 64) there, (320, 32) here" in err, err
    assert len(err.strip().splitlines()) == 1, err
    # resuming with another shape: the checkpoint's own record of the shape disagrees with its tensors
    broken = PAR_TMP / "broken"
    shutil.copytree(fsdp, broken)
    extra = parallel.load_extra(broken / "ckpt")
    torch.save({**extra, "model_args": {**extra["model_args"], "n_layer": 3}}, broken / "ckpt" / "extra.pt")
    assert_clear_error(train(broken, *PAR_ARGS[1:], "--max_iters=14", "--init_from=resume", check=None),
                       "does not fit this model", "transformer.h.2")


# ----- plan: plan.py (-k plan) -----

import plan as P


def _state(m):
    return sum(v for k, v in m.items() if k != "activations")


def run_here(script, args, cwd=None):
    """python SCRIPT ARGS in this process (runpy: a fresh module, torch already imported, ~20x quicker than a
    subprocess), in cwd if given: a CompletedProcess-like (returncode, stdout, stderr); an exception becomes
    exit 1 and its traceback."""
    import runpy
    from types import SimpleNamespace
    out, err, code, here = io.StringIO(), io.StringIO(), 0, os.getcwd()
    with mock.patch.object(sys, "argv", [script, *args]), redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:
            code = 1
            err.write(traceback.format_exc())
        finally:
            os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def plan_run(args):
    return run_here("plan.py", args)


def test_plan_hand_worked_numbers():
    """Bytes per parameter (ZeRO paper), the exact parameter counts, Chinchilla tokens, wall time and the
    activation formulas on cases worked by hand."""
    gpt2 = P.model_config("gpt2", block_size=1024)[0]
    assert P.count_params(gpt2) == 124_439_808  # GPT-2 small, tied embeddings
    assert P.count_params(P.model_config("124M", block_size=1024)[0]) == 124_439_808
    assert P.count_params(P.model_config("7B")[0]) == 6_738_415_616  # Llama-2-7B's published count
    assert P.count_params(P.model_config("70B")[0]) == 68_976_648_192  # Llama-2-70B's
    assert P.count_params(P.model_config("1B")[0]) == 1_235_814_400  # Llama-3.2-1B's (tied)
    assert P.chinchilla_tokens(124_439_808) == 2_488_796_160
    cfg = P.model_config("7B")[0]
    n = P.count_params(cfg)
    one = P.memory(cfg, 1, zero=0)  # one GPU, no DDP wrapper: 4 + 4 + 8
    assert (one["params"], one["grads"], one["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert _state(P.memory(cfg, 8, zero=0)) == 20 * n  # DDP on 8: + its gradient buckets
    assert _state(P.memory(cfg, 8, dp_shard=-1, zero=3)) == 16 * n / 8  # every 7B dim 0 divides by 8: no padding
    z1, z2 = P.memory(cfg, 8, zero=1), P.memory(cfg, 8, zero=2)
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (2 * n, 2 * n, 12 * n / 8)
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (2 * n, 2 * n / 8, 12 * n / 8)
    z1f = P.memory(cfg, 8, zero=1, dtype="float32")
    assert (z1f["params"], z1f["grads"], z1f["optimizer"]) == (4 * n, 4 * n, 8 * n / 8)
    # tensor parallel 8 without FSDP: block Linears / 8 (7B has no biases), embeddings, lm_head, norms whole
    h, L, f, V = 4096, 32, 11008, 32000
    linears = L * (4 * h * h + 3 * h * f)
    assert n == linears + L * 2 * h + h + 2 * V * h
    t8 = P.memory(cfg, 8, dp_shard=1, tp=8, zero=3)
    assert t8["params"] == 4 * (linears // 8 + L * 2 * h + h + 2 * V * h)
    # pipeline: layers 27/27/26 (earlier stages take the extra); stage 0 wte + 40 layers = the last's ln_f + lm_head
    assert parallel.stage_layers(80, 3) == [27, 27, 26] and parallel.stage_layers(32, 2) == [16, 16]
    st = P.stage_numels(P.model_config("70B")[0], pp=2)
    assert st[0][0] + st[1][0] == 68_976_648_192 and st[0][0] == st[1][0] - 8192  # ln_f on the last stage
    # activations, 16-bit: 34*s*b*h per layer (flash), logits s*b*V*(2+4); tp: (10 + 24/t); AC: 2sbh/layer + 1 block
    s, b = 2048, 1
    assert P.memory(cfg, 1, seq_len=s, batch_size=b)["activations"] == 34 * s * b * h * L + s * b * V * 6
    assert P.memory(cfg, 1, seq_len=s, batch_size=b, dtype="float32")["activations"] == 68 * s * b * h * L + s * b * V * 8
    assert P.memory(cfg, 8, dp_shard=1, tp=4, seq_len=s, batch_size=b)["activations"] == 16 * s * b * h * L + s * b * V * 6
    ac = P.memory(cfg, 1, seq_len=s, batch_size=b, activation_checkpointing=True)["activations"]
    assert ac == 2 * s * b * h * L + 34 * s * b * h + s * b * V * 6
    # 1F1B: stage 0 of 4 holds 4 microbatches of its 8 layers, the last stage 1 plus the logits
    a4 = P.memory(cfg, 8, dp_shard=2, pp=4, seq_len=s, batch_size=b)["activations"]
    assert a4 == max(34 * s * b * h * 8 * 4, 34 * s * b * h * 8 + s * b * V * 6)
    # the order of preference: DDP, FSDP, DDP + AC, FSDP + AC, then TP (smallest first), then PP
    rows = P.evaluate(cfg, 8, float("inf"), 2048, 1, want_pp=0)
    order = []
    while P.choose(rows):
        best = P.choose(rows)
        order.append(best[0])
        rows = [r for r in rows if r is not best]
    assert order[:6] == ["DDP", "FSDP", "DDP + AC", "FSDP + AC", "FSDP x TP2", "FSDP x TP2 + AC"], order
    assert "ZeRO-1" not in order and order[-2:] == ["TP8", "TP8 + AC"], order  # ZeRO-1/2: not in train.py
    # wall time: gpt2 at 1024, flops/token = 6 x (124,439,808 - 786,432 wpe) + 12 x 12 x 768 x 1024 = 855,166,464
    secs = P.wall_seconds(gpt2, 2_488_796_160, 8, 989e12, 0.4, 1024)
    assert abs(secs - 855_166_464 * 2_488_796_160 / (8 * 989e12 * 0.4)) < 1e-6 and 672 < secs < 673


def test_plan_matches_measured_fsdp_tp_ddp_bytes():
    """N fake ranks in one process, a real forward/backward and AdamW step (float32): rank 0's bytes of
    parameters, gradients and optimizer state are what plan.memory says for FSDP on 1, 2, 4, 8 ranks (vocab 70
    and mlp_hidden 180 do not divide by 8: FSDP's rank 0 takes the ceiling of rows), FSDP x TP2 (row-parallel
    biases whole), and one process (DDP without a group). Exact, byte for byte (the issue allows 5%)."""
    cfg = M.GPTConfig(vocab_size=70, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp="swiglu",
                      mlp_hidden=180, bias=True, norm="rmsnorm", pos="rope", tie_embeddings=False)

    def same(got, want, what):
        for k in ("params", "grads", "optimizer"):
            assert got[k] == want[k], (what, k, got[k], want[k])

    same(_held_bytes(cfg, 0, 0), P.memory(cfg, 1, zero=0, dtype="float32"), "one process")
    for n in (1, 2, 4, 8):
        same(_held_bytes(cfg, n, n), P.memory(cfg, n, dp_shard=n, zero=3, dtype="float32"), f"FSDP {n}")
    same(_held_bytes(cfg, 4, 2, tp=2), P.memory(cfg, 4, dp_shard=2, tp=2, zero=3, dtype="float32"), "FSDP 2 x TP 2")


def _train_defaults():
    """train.py's config defaults, from its module-level assignments before configure (train.py is not run)."""
    import ast
    g = {}
    for node in ast.parse((ROOT / "train.py").read_text()).body:
        if isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "config" for t in node.targets):
                break
            exec(compile(ast.Module([node], []), "train.py", "exec"), {}, g)
    return g


def test_plan_cli_layouts_commands_and_config():
    """7B on 8xH100 fits (FSDP + AC) and prints the one-node torchrun line; --write_config writes a file that
    train.py's configure takes (its keys and types); 70B on 8xH100 fits in
    no layout and names the GPU count that does, which plan.py itself confirms; 64 GPUs give the multi-node line."""
    out = Path(tempfile.mkdtemp(prefix="plan-tests-", dir=RUN_TMP))
    p = plan_run(["--gpus=8xH100", "--model=7B", f"--write_config={out / 'c.py'}"])
    assert "simplest layout that fits: FSDP + AC (dp_shard=8, tp=1, pp=1, activation_checkpointing=True)" in p.stdout
    assert "6,738,415,616 parameters" in p.stdout
    ddp = next(l for l in p.stdout.splitlines() if l.strip().startswith("DDP "))
    assert ddp.split()[-1] == "no", ddp
    assert f"torchrun --standalone --nproc_per_node=8 train.py {out / 'c.py'}" in p.stdout
    written = {}
    exec((out / "c.py").read_text(), {}, written)
    defaults = _train_defaults()
    assert set(written) <= set(defaults), set(written) - set(defaults)
    cfg = common.configure(dict(defaults), [str(out / "c.py")])  # dies on an unknown key or a wrong type
    assert (cfg["n_layer"], cfg["n_embd"], cfg["dp_shard"], cfg["activation_checkpointing"]) == (32, 4096, 8, True)
    assert cfg["total_batch_size"] % (cfg["batch_size"] * cfg["block_size"] * 8) == 0
    assert cfg["max_iters"] * cfg["total_batch_size"] >= 20 * 6_738_415_616
    p = plan_run(["--gpus=8xH100", "--model=70B"])
    assert "does not fit on 8 x H100" in p.stdout and "torchrun" not in p.stdout
    need = re.search(r"it needs (\d+) x H100 \(([^)]*)\)", p.stdout)
    assert need, p.stdout[-500:]
    p = plan_run([f"--gpus={need[1]}xH100", "--model=70B"])
    assert f"simplest layout that fits: {need[2]} (" in p.stdout
    half = plan_run([f"--gpus={int(need[1]) // 2}xH100", "--model=70B"])
    assert "does not fit" in half.stdout  # the smallest such count
    p = plan_run(["--gpus=64xH100", "--model=70B"])
    assert ("torchrun --nnodes=8 --nproc_per_node=8 --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 "
            "train.py --n_layer=80") in p.stdout


def test_plan_bad_inputs_one_line():
    """Mistakes stop with one line, exit 2, no traceback."""
    for args, needle in ((["--gpus=8xFOO"], "known kinds: H100"), (["--gpus=8H100"], "COUNTxKIND"),
                         (["--gpus=0xH100"], "positive"), (["--model=nope"], "unknown model"),
                         (["--model=", "--n_layer=4", "--n_embd=384", "--n_head=6", "--tp=4"], "tp=4 must divide n_head=6"),
                         (["--model=7B", "--n_head=30"], "n_head (30)"), (["--batch_size=0"], "batch_size"),
                         (["--model=", "--params=1e5"], "too small"), (["--model=1B", "--pp=2"], "untied"),
                         (["--tp=16"], "inside a node"), (["--mfu=1.5"], "mfu"), (["--seq_len=-1"], "seq_len"),
                         (["--gpus=12xH100"], "whole number"), (["--model=", "--n_layer=4"], "n_embd")):
        assert_clear_error(plan_run(args), needle)
    for args in (["--gpus=8xFOO"], ["--model=7B", "--n_head=30"]):  # and in a real process
        assert_clear_error(run(["plan.py", *args]), "error")


def test_plan_params_picks_a_near_shape():
    """--params=7e9 picks a Llama-style shape within 5% and prints its exact count; tp=8 divides its heads."""
    for target in (7e9, 1.3e9, 30e9):
        cfg, _ = P.model_config(n_params=target)
        n = P.count_params(cfg)
        assert abs(n / target - 1) < 0.05 and cfg.n_head % 8 == 0, (target, n, cfg)
    p = plan_run(["--gpus=8xH100", "--params=7e9"])
    cfg, _ = P.model_config(n_params=7e9)
    assert f"{P.count_params(cfg):,} parameters" in p.stdout


# ----- model: model.py and sample.py (python test_all.py -k model ; -k sample) -----


def scramble(model, seed=0, gain=1.5):
    """Weights large enough that attention is sharp and logits are well apart: with GPT-2's small init,
    attention is nearly uniform and a wrong position or head mapping could go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if 'norm' in name or 'ln' in name else 0.0))
    return model.eval()


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, block_size=24)
    args.update(kw)
    return scramble(M.GPT(M.GPTConfig(**args)), seed)


LLAMA = dict(norm='rmsnorm', pos='rope', mlp='swiglu', bias=False, tie_embeddings=False, n_kv_head=2)


def greedy_reference(model, idx, n):
    """nanoGPT's sampling loop, greedy: recompute the cropped context for every token."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            idx = torch.cat([idx, nxt], dim=1)
    return torch.cat(out, dim=1)


def generated(model, idx, n, **kw):
    return torch.stack(list(model.generate(idx, n, **kw)), dim=1)


# ----- model: Hugging Face parity -----


def check_hf_parity(hf_model, tmp):
    hf_model.eval()
    hf_model.save_pretrained(tmp / 'hf')
    ours = H.load_hf(tmp / 'hf')
    x = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf_model(x).logits, ours(x)[0]
    assert (ref - got).abs().max() < 1e-4, (ref - got).abs().max()
    assert ref.std() > 0.5  # logits that differ: the comparison means something
    hf_greedy = hf_model.generate(x[:1, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[:, 6:]
    assert generated(ours, x[:1, :6], 12, temperature=0).tolist() == hf_greedy.tolist()
    return ours, x, ref


def check_save_hf(ours, hf_class, tmp):
    H.save_hf(ours, tmp / 'ours')
    back = hf_class.from_pretrained(tmp / 'ours').eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (back(x).logits - ours(x)[0]).abs().max()
    assert diff < 1e-4, diff
    again = H.load_hf(tmp / 'ours').state_dict()  # and our own round trip is exact (GPT-2 adds zero biases)
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


@one_thread
def test_model_hf_gpt2_parity():
    tr = need_transformers()
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=24,
                                          bos_token_id=None, eos_token_id=None))
    scramble(hf)
    with tempfile.TemporaryDirectory() as tmp:
        ours, _, _ = check_hf_parity(hf, Path(tmp))
        assert (ours.config.mlp, ours.config.tie_embeddings) == ('gelu_tanh', True)
        check_save_hf(ours, tr.GPT2LMHeadModel, Path(tmp))
        # our nanoGPT-style variant (exact GELU, no biases, untied) is a GPT2LMHeadModel too
        check_save_hf(tiny(mlp='gelu', bias=False, tie_embeddings=False), tr.GPT2LMHeadModel, Path(tmp))


@one_thread
def test_model_hf_llama_gqa_parity():
    tr = need_transformers()
    torch.manual_seed(0)
    hf = tr.LlamaForCausalLM(tr.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            hidden_size=32, intermediate_size=48, vocab_size=97,
                                            max_position_embeddings=24, rope_theta=500.0,
                                            bos_token_id=None, eos_token_id=None))
    scramble(hf)
    with tempfile.TemporaryDirectory() as tmp:
        ours, _, _ = check_hf_parity(hf, Path(tmp))
        assert (ours.config.n_kv_head, ours.config.rope_theta, ours.config.mlp_hidden) == (2, 500.0, 48)
        check_save_hf(ours, tr.LlamaForCausalLM, Path(tmp))
        # multi-query attention, tied embeddings and biases
        check_save_hf(tiny(**dict(LLAMA, n_kv_head=1, tie_embeddings=True, bias=True)), tr.LlamaForCausalLM, Path(tmp))


def test_model_hf_pytorch_bin_and_bad_dirs():
    tr = need_transformers()
    hf = scramble(tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / 'bin'
        d.mkdir()
        (d / 'config.json').write_text(hf.config.to_json_string())
        torch.save(hf.state_dict(), d / 'pytorch_model.bin')  # the older layout
        x = torch.randint(0, 50, (1, 10))
        with torch.no_grad():
            assert (hf(x).logits - H.load_hf(d)(x)[0]).abs().max() < 1e-4
        script = ("import sys, hf; hf.load_hf(sys.argv[1])")
        (Path(tmp) / 'empty').mkdir()
        bad = Path(tmp) / 'bad'
        bad.mkdir()
        (bad / 'config.json').write_text(hf.config.to_json_string())
        (bad / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2')
        for path, words in ((Path(tmp) / 'empty', 'config.json'), (bad, 'not a valid safetensors')):
            r = subprocess.run([sys.executable, '-c', script, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_model_safetensors_roundtrip():
    tensors = {'f32': torch.randn(3, 5), 'f16': torch.randn(7).half(), 'bf16': torch.randn(2, 3).bfloat16(),
               'i64': torch.arange(5), 'bool': torch.tensor([True, False, True]), 'scalar': torch.tensor(2.5),
               'empty': torch.zeros(0, 4), 'i8': torch.tensor([-1, 2, 3], dtype=torch.int8),
               'after_odd': torch.randn(4, dtype=torch.float64)}  # lands at an offset not a multiple of 8
    with tempfile.TemporaryDirectory() as tmp:
        H.save_safetensors(tensors, Path(tmp) / 'x.safetensors')
        back = H.load_safetensors(Path(tmp) / 'x.safetensors')
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        return
    with tempfile.TemporaryDirectory() as tmp:  # and the reference implementation agrees both ways
        H.save_safetensors(tensors, Path(tmp) / 'ours.safetensors')
        assert all(torch.equal(load_file(Path(tmp) / 'ours.safetensors')[k], t) for k, t in tensors.items())
        save_file(tensors, Path(tmp) / 'ref.safetensors')
        assert all(torch.equal(H.load_safetensors(Path(tmp) / 'ref.safetensors')[k], t) for k, t in tensors.items())


def test_model_from_pretrained_cache_and_offline():
    ours = tiny(mlp='gelu_tanh')
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / 'cache'
        H.save_hf(ours, cache / 'openai-community--gpt2')  # already downloaded: nothing to fetch
        got = H.from_pretrained('gpt2', cache_dir=cache)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ours.state_dict().values()))
        # nothing cached and no network (a closed local port stands in for an offline machine)
        env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9', HF_HUB_CACHE=str(Path(tmp) / 'hub'))
        r = subprocess.run([sys.executable, '-c', "import time; time.sleep = lambda s: None; "  # the retries' backoff, not waited out
                            f"import hf; hf.from_pretrained('gpt2-xl', cache_dir={str(cache)!r})"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert 'could not download' in r.stderr and '--init_from=' in r.stderr, r.stderr
        assert not any((cache / 'openai-community--gpt2-xl').glob('*')), "no half-written files left behind"


# ----- model: generation -----


@one_thread
def test_model_kv_cache_equals_recompute():
    # float64 so that "equal" means the algorithm, not rounding luck
    for style in (dict(), LLAMA, dict(LLAMA, n_kv_head=1)):
        model = tiny(**style).double()
        for prompt_len in (5, 24, 30):  # short prompt crossing block_size 24 while generating, exactly full, longer than it
            idx = torch.randint(0, 97, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
            ref = greedy_reference(model, idx, 30)
            assert generated(model, idx, 30, temperature=0).tolist() == ref.tolist(), (style, prompt_len)
            assert generated(model, idx, 30, temperature=0, use_cache=False).tolist() == ref.tolist(), (style, prompt_len)
        # samples of one prompt share its prefill: greedy, every sample is the single-sample continuation
        idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
        many = generated(model, idx, 10, temperature=0, num_samples=3)
        assert many.tolist() == greedy_reference(model, idx.repeat_interleave(3, 0), 10).tolist()


@one_thread
def test_model_kv_cache_logits_match():
    """The cached decode computes the same logits as the full forward (fp32 tolerance)."""
    for style in (dict(), LLAMA):
        model = tiny(**style)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
        c = model.config
        cache = [(torch.zeros(2, c.n_kv_head, 20, c.n_embd // c.n_head), torch.zeros(2, c.n_kv_head, 20, c.n_embd // c.n_head))
                 for _ in range(c.n_layer)]
        with torch.no_grad():
            full = model(idx)[0]
            steps = [model._run(idx[:, :8], cache, pos=0)]
            steps += [model._run(idx[:, t:t + 1], cache, pos=t) for t in range(8, 20)]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_model_decode_weights_same_logits_and_dropped_after_generate():
    """CPU decoding's transposed weight copies give the nn.Linear logits, never reach training, and are
    gone when a generator is closed early."""
    for style in (dict(bias=True), LLAMA):
        model = tiny(**style)
        idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            plain = model(idx)[0]
            model.decode_weights(True)
            assert model.lm_head.weight_t is not None and model.lm_head.weight_t.is_contiguous()
            fast = model(idx)[0]
        assert (fast - plain).abs().max() < 1e-5
        # with grad on, the copies are ignored: gradients still reach the weights
        model(idx, idx)[1].backward()
        assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
        model.decode_weights(False)
        model.train()
        gen = model.generate(idx, 10, temperature=0)
        next(gen)
        assert model.lm_head.weight_t is not None  # in use while generating
        gen.close()
        assert all(getattr(m, 'weight_t', None) is None for m in model.modules())
        assert model.training  # and the mode is restored
        # the copies' memory is reused, but they are refilled: a fused AdamW step (which does not bump
        # the weights' version counters) is seen by the next generate()
        opt = model.configure_optimizers(0.0, 0.5, (0.9, 0.95), 'cpu')
        model(idx, idx)[1].backward()
        opt.step()
        with torch.no_grad():
            want = model.eval()(idx)[0][:, -1].argmax(-1)
        assert next(model.generate(idx, 1, temperature=0)).tolist() == want.tolist()
        assert (model.lm_head.weight.t() == model.decode_buffers['lm_head']).all()


@one_thread
def test_model_sampling_options():
    model = tiny(**LLAMA)
    idx = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = generated(model, idx, 15, temperature=0)
    a = generated(model, idx, 15, temperature=1.0, seed=7, num_samples=4)
    assert a.tolist() == generated(model, idx, 15, temperature=1.0, seed=7, num_samples=4).tolist()  # seeded
    assert len({tuple(r) for r in a.tolist()}) > 1  # the samples differ from one another
    assert generated(model, idx, 15, top_k=1, seed=1).tolist() == greedy.tolist()
    assert generated(model, idx, 15, top_p=1e-6, seed=1).tolist() == greedy.tolist()
    assert generated(model, idx, 15, top_k=5, top_p=1e-6, seed=1).tolist() == greedy.tolist()
    # top_k / top_p only ever pick tokens inside their set
    logits = torch.randn(64, 97, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        picks = M.sample_next(logits, 1.0, top_k=3, generator=g)
        assert all(p in row.topk(3).indices for p, row in zip(picks, logits))
        probs = logits.softmax(-1)
        picks = M.sample_next(logits, 1.0, top_p=0.5, generator=g)
        for p, row in zip(picks, probs):  # the mass of tokens more likely than the pick is below top_p
            assert row[row > row[p]].sum() <= 0.5
    # stop tokens: a row yields its stop token, then -1; generation ends when every row has stopped
    idx2 = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    free = generated(model, idx2, 12, temperature=0)
    stop = free[0, 3].item()
    steps = generated(model, idx2, 12, temperature=0, stop_tokens=(stop,))
    first = [row.tolist().index(stop) if stop in row.tolist() else None for row in free]
    for r, row in enumerate(steps.tolist()):
        end = first[r] if first[r] is not None else len(row) - 1
        assert row[:end + 1] == free[r, :end + 1].tolist() and all(t == -1 for t in row[end + 1:])
    if all(f is not None for f in first):
        assert steps.size(1) == max(first) + 1
    # streaming: tokens come one step at a time, each an ordinary tensor
    gen = model.generate(idx, 3, temperature=0)
    step = next(gen)
    assert step.shape == (1,) and not step.is_inference() and step.item() == greedy[0, 0].item()
    assert model.training is False


@one_thread
def test_model_forward_loss_and_params():
    model = tiny(vocab_size=50)
    x = torch.randint(0, 50, (2, 10))
    y = torch.randint(0, 50, (2, 10))
    y[0, :4] = -1
    logits, loss = model(x, y)
    assert logits.shape == (2, 10, 50) and model(x)[1] is None
    keep = y.view(-1) != -1
    ref = F.cross_entropy(logits.view(-1, 50)[keep], y.view(-1)[keep])
    assert torch.allclose(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.device('meta'):  # no memory, no init time
        gpt2 = M.GPT(M.GPTConfig(**M.PRESETS['gpt2']))
        for name in M.PRESETS:
            M.GPT(M.GPTConfig(**M.PRESETS[name]))
    assert gpt2.num_params() == 124_439_808
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    # PaLM's estimate: 6N + 12 L H Q T
    assert gpt2.flops_per_token() == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert model.estimate_mfu(1000.0) is None  # CPU: no peak to compare with
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


@one_thread
def test_model_resize_vocab_and_crop():
    for tie in (True, False):
        model = tiny(vocab_size=50, tie_embeddings=tie)
        x = torch.randint(0, 50, (2, 10))
        with torch.no_grad():
            before = model(x)[0]
            model.resize_vocab(55)
            after = model(x)[0]
        assert after.shape[-1] == 55 and torch.equal(after[..., :50], before)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie
        assert model.num_params() == tiny(vocab_size=55, tie_embeddings=tie).num_params()
    for style in (dict(), LLAMA):
        model = tiny(**style)
        x = torch.randint(0, 97, (2, 12))
        with torch.no_grad():
            before = model(x)[0]
            model.crop_block_size(12)
            assert torch.equal(model(x)[0], before) and model.config.block_size == 12


@one_thread
def test_model_training_gqa_and_dropout():
    """Loss goes down on a fixed batch, for both styles, with dropout on (the training path)."""
    for style in (dict(dropout=0.1), dict(LLAMA, dropout=0.1)):
        torch.manual_seed(0)
        model = M.GPT(M.GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16, **style))
        opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
        x = torch.randint(0, 50, (4, 16))
        losses = []
        for _ in range(30):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], losses


# ----- model: ragged batched generation -----


RAGGED = [1, 7, 23, 40]  # prompt lengths of one batch


def ragged_prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in RAGGED]


@one_thread
def test_model_generate_ragged_batch_equals_alone():
    """Left-padded prompts of different lengths give, greedily, exactly the tokens each gives alone: GPT-2 style
    (learned positions) and Llama style (RoPE, GQA), with and without the KV cache, and when the window slides."""
    prompts = ragged_prompts()
    for style in (dict(), LLAMA):
        for block_size in (64, 32):  # 64: everything fits; 32: the 40-token prompt starts beyond it, 23 + 20 slides mid-way
            model = tiny(block_size=block_size, **style).double()  # float64: "equal" means the algorithm
            alone = [greedy_reference(model, torch.tensor([p]), 20)[0].tolist() for p in prompts]
            for use_cache in (True, False):
                got = generated(model, prompts, 20, temperature=0, use_cache=use_cache).tolist()
                for r in range(len(prompts)):
                    assert got[r] == alone[r], (style, block_size, use_cache, RAGGED[r], got[r], alone[r])
        assert len({tuple(a) for a in alone}) == len(alone)  # the rows differ: a mixed-up row would show
        # samples share their prompt's padded prefill; greedy, each sample is the prompt's own continuation
        many = generated(model, prompts, 8, temperature=0, num_samples=2).tolist()
        assert many == [a[:8] for a in alone for _ in range(2)]
        # equal lengths as a list take the mask-free path: the same as the (B, T) tensor
        same, real, masks = [p[:7] for p in prompts[1:]], F.scaled_dot_product_attention, []
        with mock.patch.object(M.F, 'scaled_dot_product_attention', lambda *a, **kw: masks.append(kw.get('attn_mask')) or real(*a, **kw)):
            as_list = generated(model, same, 10, temperature=0).tolist()
        assert as_list == generated(model, torch.tensor(same), 10, temperature=0).tolist()
        assert len(masks) == 10 * model.config.n_layer and all(m is None for m in masks)
        # per-row stopping still works in a ragged batch: row 2 stops at its own first stop token
        stop = alone[2][4]
        steps = generated(model, prompts, 20, temperature=0, stop_tokens=(stop,)).tolist()
        end = alone[2].index(stop)
        assert steps[2][:end + 1] == alone[2][:end + 1] and all(t == -1 for t in steps[2][end + 1:])
    for bad in ([], [[1, 2], []]):
        try:
            next(tiny().generate(bad, 3))
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for prompts {bad}")


@one_thread
def test_model_padded_forward_logits_match_unpadded():
    """_run with left padding: every real position's logits equal the row's own unpadded forward (fp32 tolerance),
    in prefill and through cached decode steps."""
    prompts = ragged_prompts(1)
    for style in (dict(), LLAMA):
        model = tiny(block_size=64, **style)
        c, T = model.config, max(RAGGED)
        idx = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            idx[b, T - len(p):] = torch.tensor(p)
        pad = torch.tensor([T - len(p) for p in prompts])
        cache = [(torch.zeros(4, c.n_kv_head, T, c.n_embd // c.n_head), torch.zeros(4, c.n_kv_head, T, c.n_embd // c.n_head))
                 for _ in range(c.n_layer)]
        real, masks = F.scaled_dot_product_attention, []

        def spy(q, k, v, attn_mask=None, **kw):
            masks.append(attn_mask)
            return real(q, k, v, attn_mask=attn_mask, **kw)
        with torch.no_grad(), mock.patch.object(M.F, 'scaled_dot_product_attention', spy):
            pre = model._run(idx[:, :30], cache, pos=0, pad=pad)
            steps = torch.cat([pre] + [model._run(idx[:, t:t + 1], cache, pos=t, pad=pad) for t in range(30, T)], dim=1)
            full = model._run(idx, pad=pad)
        # no query row is all masked (CPU's SDPA returns 0 for one, but some backends NaN, which would leak)
        assert len(masks) == c.n_layer * (2 + T - 30) and all(m is not None and m.any(-1).all() for m in masks)
        with torch.no_grad():
            for b, p in enumerate(prompts):
                ref = model(torch.tensor([p]))[0][0]
                assert (full[b, T - len(p):] - ref).abs().max() < 1e-4, (style, b)
                assert (steps[b, T - len(p):] - ref).abs().max() < 1e-4, (style, b)


# ----- model: sampler -----


PROBS = [0.125, 0.5, 0.03125, 0.25, 0.09375]  # exact in float: softmax(log(PROBS)) gives them back bit for bit
# top_p -> the tokens HF keeps: the smallest set (most likely first) whose mass reaches top_p; 0.5, 0.75, 0.875
# are the boundary cases where a prefix's mass equals top_p exactly
TOP_P_KEPT = {0.5: {1}, 0.6: {1, 3}, 0.75: {1, 3}, 0.875: {1, 3, 0}, 0.9: {1, 3, 0, 4}}


def draws(logits, n=20000, seed=0, **kw):
    """n draws of sample_next from one row of logits, as a (V,) frequency vector."""
    g = torch.Generator().manual_seed(seed)
    picks = M.sample_next(logits.expand(n, -1), kw.pop('temperature', 1.0), generator=g, **kw)
    return torch.bincount(picks, minlength=logits.numel()).double() / n


def hf_warped(logits, temperature=1.0, top_k=None, top_p=None):
    """transformers' own warpers in generate()'s order (temperature, top_k, top_p) -> the probabilities it samples."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    scores = logits[None].clone()
    for w in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
              + ([TopPLogitsWarper(top_p)] if top_p else [])):
        scores = w(None, scores)
    return scores[0].softmax(-1).double()


@one_thread
def test_model_sample_top_p_keeps_hf_set():
    logits = torch.tensor(PROBS).log()
    assert torch.equal(logits.softmax(-1), torch.tensor(PROBS))
    have_hf = True
    try:
        need_transformers()
    except unittest.SkipTest:
        have_hf = False
    for top_p, kept in TOP_P_KEPT.items():
        freq = draws(logits, top_p=top_p)
        assert set(freq.nonzero().flatten().tolist()) == kept, (top_p, freq)  # every kept token drawn, no other
        want = torch.tensor([PROBS[i] if i in kept else 0.0 for i in range(len(PROBS))], dtype=torch.float64)
        assert (freq - want / want.sum()).abs().max() < 0.015, (top_p, freq)
        if have_hf:
            hf = hf_warped(logits, top_p=top_p)
            assert set(hf.nonzero().flatten().tolist()) == kept, (top_p, hf)
    if have_hf:  # the whole pipeline on a random row: our draws follow the distribution HF samples from
        logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 2
        for kw in (dict(temperature=0.7, top_k=8, top_p=0.8), dict(temperature=1.5, top_k=12, top_p=0.7),
                   dict(temperature=2.0, top_p=0.6)):
            hf, freq = hf_warped(logits, **kw), draws(logits, **kw)
            assert set(freq.nonzero().flatten().tolist()) == set(hf.nonzero().flatten().tolist()), kw
            assert (freq - hf).abs().max() < 0.015, (kw, (freq - hf).abs().max())


@one_thread
def test_model_sample_temperature_statistics():
    """Frequencies over 20k draws follow softmax(logits / T), and top_p cuts the tempered distribution (at T=2
    it keeps 3 tokens, at T=1 only 2): dropping the temperature, or choosing the top-p set before it, fails."""
    logits = torch.tensor(PROBS).log()
    for T in (0.5, 2.0):
        want = (logits.double() / T).softmax(-1)
        assert (draws(logits, temperature=T) - want).abs().max() < 0.012, T
        # the top-p set of the tempered probabilities, by hand: most likely first, keep while the mass before < 0.75
        order = want.argsort(descending=True)
        before = want[order].cumsum(0) - want[order]
        cut = torch.zeros_like(want)
        cut[order[before < 0.75]] = want[order[before < 0.75]]
        assert (cut > 0).sum() == (3 if T == 2.0 else 2)
        freq = draws(logits, temperature=T, top_p=0.75, seed=1)
        assert (freq - cut / cut.sum()).abs().max() < 0.012, (T, freq, cut / cut.sum())


# ----- model: dtypes on GPUs (checked on CPU) -----


@one_thread
def test_model_rope_keeps_autocast_dtype():
    """Under bf16 autocast q and k reach attention in bf16: the fp32 RoPE tables are cast, not q and k upcast."""
    model = tiny(**LLAMA)
    real, seen = F.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *a, **kw)
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(M.F, 'scaled_dot_product_attention', spy), torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            model(idx)
        generated(model, idx, 3, temperature=0)  # prefill and cached decode steps
    assert len(seen) == 2 * 3 + 2 and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    assert model.rope_cos.dtype == torch.float32  # the tables themselves stay fp32


@one_thread
def test_model_sdpa_gqa_choice_and_both_paths_agree():
    """enable_gqa only where a fast kernel serves it (not fp32 on CUDA); repeated K/V gives the same result."""
    if M._SDPA_GQA:
        assert not M.sdpa_gqa('cuda', torch.float32)
        assert M.sdpa_gqa('cuda', torch.bfloat16) and M.sdpa_gqa('cuda', torch.float16) and M.sdpa_gqa('cpu', torch.float32)
    model = tiny(**LLAMA)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    real, out = F.scaled_dot_product_attention, {}
    for native in (True, False):
        calls = []

        def spy(q, k, v, *a, **kw):
            calls.append((k.size(1), kw.get('enable_gqa', False)))
            return real(q, k, v, *a, **kw)
        with mock.patch.object(M, 'sdpa_gqa', lambda device_type, dtype: native), \
                mock.patch.object(M.F, 'scaled_dot_product_attention', spy):
            model.zero_grad()
            logits, loss = model(idx, idx)
            loss.backward()
        out[native] = logits.detach(), model.transformer.h[0].attn.c_attn.weight.grad.clone()
        heads = model.config.n_kv_head if native else model.config.n_head
        assert calls == [(heads, native)] * model.config.n_layer, calls
    assert (out[True][0] - out[False][0]).abs().max() < 1e-5 and (out[True][1] - out[False][1]).abs().max() < 1e-5


# ----- model: RoPE and init properties -----


def rope_at(x, m, cos, sin):
    """x (D,) rotated to position m."""
    return M.apply_rope(x.view(1, 1, 1, -1), cos[m:m + 1], sin[m:m + 1]).flatten()


def test_model_rope_relative_positions_and_rotation():
    cos, sin = M.rope_tables(8, 16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    dot = lambda m, n: (rope_at(q, m, cos, sin) @ rope_at(k, n, cos, sin)).item()
    assert abs(dot(3, 1) - dot(10, 8)) < 1e-5 and abs(dot(0, 5) - dot(7, 12)) < 1e-5  # only m - n matters
    assert abs(dot(3, 1) - dot(1, 3)) > 1e-2  # and its sign does
    assert abs(dot(4, 4) - q @ k) < 1e-5  # same position: the rotation cancels
    # by hand, head_dim 4: pairs (0, 2) at frequency 1 and (1, 3) at theta^-1/2; [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]
    cos, sin = M.rope_tables(4, 8, 100.0)
    m = 3
    for i, f in ((0, 1.0), (1, 0.1)):
        c, s = math.cos(m * f), math.sin(m * f)
        e = torch.zeros(4)
        e[i] = 1.0
        assert torch.allclose(rope_at(e, m, cos, sin), torch.tensor([c, 0, s, 0]).roll(i), atol=1e-6), i
        e = torch.zeros(4)
        e[i + 2] = 1.0
        assert torch.allclose(rope_at(e, m, cos, sin), torch.tensor([-s, 0, c, 0]).roll(i), atol=1e-6), i


@one_thread
def test_model_init_statistics_per_group():
    """GPT-2 init: N(0, 0.02), residual projections (c_proj) N(0, 0.02/sqrt(2 n_layer)), zero biases, unit norms."""
    for style in (dict(), LLAMA):
        torch.manual_seed(0)
        model = M.GPT(M.GPTConfig(n_layer=8, n_head=8, n_embd=256, vocab_size=512, block_size=128, **style))
        groups = Counter()
        for name, p in model.named_parameters():
            p = p.detach()
            if name.endswith('c_proj.weight'):
                groups['c_proj'] += 1
                assert abs(p.std().item() / (0.02 / math.sqrt(2 * 8)) - 1) < 0.03, (name, p.std())
            elif p.dim() >= 2:
                groups['matrix'] += 1
                assert abs(p.std().item() / 0.02 - 1) < 0.03, (name, p.std())
            elif name.endswith('bias'):
                groups['bias'] += 1
                assert (p == 0).all(), name
            else:
                groups['norm'] += 1
                assert name.endswith('weight') and (p == 1).all(), name
            if p.dim() >= 2:
                assert abs(p.mean().item()) < 0.05 * p.std().item(), name
        llama = style is LLAMA
        assert groups == Counter(c_proj=16, matrix=18, norm=17, **({} if llama else dict(bias=8 * 6 + 1))), groups


def test_model_mfu_names_and_trained_context():
    """The peak table takes the most specific name (an H200 NVL is not an SXM H200, a GB200 not a B200), and MFU
    counts attention at the context trained on, not the model's longest."""
    for name, want in (("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA B200", 2250e12),
                       ("NVIDIA GB200", 2500e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA L4", 121e12), ("Tesla V100-SXM2-16GB", 125e12), ("Some GPU", None)):
        assert M.peak_flops(name) == want, name
    with torch.device("meta"):
        m = M.GPT(M.GPTConfig(**M.PRESETS["gpt2"]))
    n = m.num_params(non_embedding=True)
    assert m.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    assert m.flops_per_token(256) == 6 * n + 12 * 12 * 768 * 256  # 11% less than at 1024
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H200 NVL"):
        assert abs(m.estimate_mfu(1e5, "cuda", 256) - m.flops_per_token(256) * 1e5 / 835e12) < 1e-12


# ----- model: modded-nanogpt's architecture switches (issue 17; -k switch) -----


def test_switches_change_the_forward_and_keep_decoding_exact():
    """qk_norm, mlp='relu2', logit_softcap, zero_init, value_embeds and unet each change the logits of the same
    seed's model (on the Llama and the GPT-2 layouts, with and without RoPE); softcapped logits stay inside the
    cap; zero_init starts every c_proj at 0, so each block is the identity; KV-cache decoding equals recomputing
    the context with all of them on, and a left-padded row of a ragged batch decodes as it does alone;
    resize_vocab keeps the value embeddings' rows."""
    h = torch.randn(4, 7, 33, dtype=torch.float64, requires_grad=True)  # ReLU^2's hand-written backward
    g = torch.randn(4, 7, 33, dtype=torch.float64)
    ours = torch.autograd.grad(M.ReLUSquared.apply(h), h, g)[0]
    assert torch.allclose(ours, torch.autograd.grad(F.relu(h).square(), h, g)[0], rtol=0, atol=1e-12)
    x = torch.randint(0, 64, (2, 12))
    for style in (dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False), dict(norm="layernorm", pos="learned", mlp="gelu")):
        base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **style)

        def logits(**switch):
            torch.manual_seed(0)
            m = M.GPT(M.GPTConfig(**{**base, **switch})).eval()
            with torch.no_grad():
                return m, m(x)[0]
        _, plain = logits()
        cap = plain.abs().max().item() / 2  # (random logits are small: a cap below them bites)
        for switch in (dict(qk_norm=True), dict(mlp="relu2"), dict(logit_softcap=cap), dict(zero_init=True),
                       dict(value_embeds=True), dict(unet=True)):
            m, out = logits(**switch)
            assert (out - plain).abs().max() > 1e-4, (style, switch)
        for switch, table in ((dict(value_embeds=True), "value_embeds"), (dict(unet=True), "skip_weights")):
            m, out = logits(**switch)  # the new weights are read (not only a different init order)
            with torch.no_grad():
                for p in getattr(m, table).parameters() if table == "value_embeds" else [m.skip_weights]:
                    p.mul_(3.0)
                assert (m(x)[0] - out).abs().max() > 1e-4, switch
        _, capped = logits(logit_softcap=cap)
        assert capped.abs().max() < cap
        m, _ = logits(zero_init=True)
        assert all(p.abs().max() == 0 for n, p in m.named_parameters() if n.endswith("c_proj.weight"))
        h = torch.randn(2, 12, 32)
        with torch.no_grad():
            blk = m.transformer.h[0]
            rope = (m.rope_cos[:12], m.rope_sin[:12]) if style["pos"] == "rope" else None
            assert torch.equal(blk(h, rope), h)  # each block adds 0 at the start
        torch.manual_seed(1)
        m = M.GPT(M.GPTConfig(**{**base, "n_layer": 3, "qk_norm": True, "mlp": "relu2", "logit_softcap": 3.0,
                                 "value_embeds": True, "unet": True})).eval()
        cached = torch.stack(list(m.generate(x, 10, temperature=0)), 1)
        recomputed = torch.stack(list(m.generate(x, 10, temperature=0, use_cache=False)), 1)
        assert torch.equal(cached, recomputed)
        ragged = torch.stack(list(m.generate([x[0, 5:].tolist(), x[1].tolist()], 10, temperature=0)), 1)
        alone = torch.stack(list(m.generate(x[:1, 5:], 10, temperature=0)), 1)
        assert torch.equal(ragged[:1], alone) and torch.equal(ragged[1:], cached[1:])
        before = [ve.weight.detach().clone() for ve in m.value_embeds]
        m.resize_vocab(80)
        assert all(ve.weight.shape == (80, b.size(1)) and torch.equal(ve.weight[:64], b) for ve, b in zip(m.value_embeds, before))


def test_switches_train_and_hf_refuses_what_it_cannot_export():
    """train.py with all six switches on learns (the loss falls); hf.py refuses to export qk_norm,
    logit_softcap, relu2, value_embeds or unet with one clear line, and exports zero_init (only an
    initialisation) as it is; value_embeds and unet under tensor or pipeline parallel are one clear line."""
    out = Path(_TMP) / "out-switches"
    train(out, "--max_iters=30", "--eval_interval=30", "--qk_norm=True", "--mlp=relu2", "--logit_softcap=15",
          "--zero_init=True", "--value_embeds=True", "--unet=True")
    recs = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert recs[-1] < recs[0] - 0.5, recs
    m, _, _ = H.load_model("resume", out, "cpu")
    assert (m.config.qk_norm, m.config.mlp, m.config.logit_softcap) == (True, "relu2", 15.0)
    with tempfile.TemporaryDirectory() as tmp:
        err = expect_die(H.save_hf, m, tmp)
        assert "qk_norm, logit_softcap, mlp='relu2', value_embeds, unet cannot be exported" in err, err
        assert len(err.strip().splitlines()) == 1, err
        torch.manual_seed(0)
        z = M.GPT(M.GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16, zero_init=True))
        H.save_hf(z, tmp)
        assert (Path(tmp) / "config.json").exists()
    for flags in (("--value_embeds=True", "--tp=2"), ("--unet=True", "--pp=2")):
        assert_clear_error(train(Path(_TMP) / "out-switches-tp", *flags, check=2), "value_embeds and unet run in one process")


def test_muon_update_is_newton_schulz_orthogonalisation():
    """optimizer='muon': on a 96 x 32 matrix, the first step of train.py's Muon moves the weight by lr *
    sqrt(96/32) times the quintic Newton-Schulz orthogonalisation of the gradient (5 steps of modded-nanogpt's
    coefficients, worked here in float64), and by what torch.optim.Muon moves it (its bfloat16 within 3%); the
    update's singular values lie near 1 where the gradient's spread over a factor > 10; the blocks' matrices go
    to Muon, everything else (embeddings, head, norms) to AdamW."""
    from common import muon_with_adamw
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=False, norm="rmsnorm",
                          pos="rope", mlp="relu2"))
    opt = muon_with_adamw(m, 10.0, 0.0, (0.9, 0.95), "cpu")
    muon_ids = {id(p) for p in opt.muon.param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon_ids}
    assert names == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}, names
    assert not muon_ids & {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    w = m.transformer.h[0].attn.c_attn.weight  # (96, 32): tall
    g = torch.randn(96, 32, dtype=torch.float64) @ torch.diag(torch.logspace(0, 1.5, 32, dtype=torch.float64))
    before = w.detach().clone()
    theirs = torch.nn.Parameter(before.clone())
    theirs.grad = g.float()
    torch.optim.Muon([theirs], lr=0.1, weight_decay=0.0, adjust_lr_fn="original").step()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = g.float()
    common.optimizer_step(opt, m.parameters(), 0.01, 0.0)
    a, b, c = 3.4445, -4.775, 2.0315
    x = (g / g.norm()).T  # tall: iterate on the transpose
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    want = -0.01 * 10.0 * math.sqrt(96 / 32) * x.T
    got = (w.detach() - before).double()
    assert (got - want).norm() / want.norm() < 1e-4, (got - want).norm() / want.norm()
    torch_step = (theirs.detach() - before).double()
    assert (got - torch_step).norm() / torch_step.norm() < 0.03, (got - torch_step).norm() / torch_step.norm()
    sv, sg = torch.linalg.svdvals(got / (0.1 * math.sqrt(3))), torch.linalg.svdvals(g)
    assert sv.min() > 0.5 and sv.max() < 1.3 and sg.max() / sg.min() > 10, (sv, sg.max() / sg.min())


def test_muon_resume_after_sigkill_is_exact_and_ddp_matches_one_process():
    """optimizer='muon' (with its momentum warm-up): a run SIGKILLed after its step-8 checkpoint and resumed
    ends with the uninterrupted run's weights bit for bit; 2 DDP ranks log the losses of one process with the
    same global batch; resuming with the other optimizer, or an unknown one, is one clear line."""
    full, killed, two = Path(_TMP) / "muon-full", Path(_TMP) / "muon-killed", Path(_TMP) / "muon-2rank"
    args = ["--max_iters=16", "--eval_interval=8", "--optimizer=muon", "--muon_momentum_warmup=10",
            "--total_batch_size=512"]
    train(full, *args)
    cmd = [PY, "train.py", f"--data_root={tiny_data()}", f"--out_dir={killed}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **RUN_ENV})
    for line in proc.stdout:
        if line.startswith("step 11/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert _weights(killed)["step"] == 8
    train(killed, *args, "--init_from=resume")
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert set(a["optimizer"]) == {"adamw", "muon"}
    p = torchrun("train.py", f"--data_root={tiny_data()}", f"--out_dir={two}", *TINY, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    la = [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(full) if "loss" in r or "val_loss" in r]
    lb = [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(two) if "loss" in r or "val_loss" in r]
    assert len(la) == len(lb) and all(x[0] == y[0] and abs(x[1] - y[1]) < 1e-3 for x, y in zip(la, lb)), (la, lb)
    assert_clear_error(train(full, "--max_iters=20", "--init_from=resume", check=None), "optimizer=muon")
    assert_clear_error(run_here("train.py", [f"--data_root={tiny_data()}", f"--out_dir={_TMP}/m", *TINY, "--optimizer=sgd"]),
                       "'adamw' or 'muon'")
    assert_clear_error(run_here("train.py", [f"--data_root={tiny_data()}", f"--out_dir={_TMP}/m", *TINY, "--optimizer=muon",
                                             "--dtype=float16"]), "float16", "--dtype=bfloat16")


# ----- model: sample.py -----


def write_checkpoint(path, model, tokenizer=None):
    import common
    common.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                                tokenizer=tokenizer or {'kind': 'byte', 'path': None}), path)


def chain_model(chain, eot=256):
    """A byte-level model whose greedy continuation of chain[0] is chain[1:] then <|endoftext|>:
    each token's embedding is one-hot and the lm_head row of the next token points at it."""
    model = M.GPT(M.GPTConfig(n_layer=1, n_head=1, n_embd=264, vocab_size=261, block_size=16, bias=False,
                              tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f:
            n.weight.fill_(1.0)
        model.transformer.wte.weight[:, :261] = torch.eye(261)
        for prev, nxt in zip(chain, chain[1:] + [eot]):
            model.lm_head.weight[nxt, prev] = 1.0
    return model


def run_sample(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / 'sample.py'), *args], cwd=cwd, capture_output=True,
                          text=True, encoding='utf-8', timeout=120)


def test_sample_streams_utf8():
    # 'é' and '☃' are 2 and 3 bytes: every byte a token, so characters arrive split across tokens
    text = 'é☃b'
    chain = [ord('a')] + list(text.encode('utf-8'))
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / 'out' / 'ckpt.pt', chain_model(chain))
        r = run_sample(tmp, '--start=a', '--temperature=0', '--num_samples=2', '--max_new_tokens=10', '--device=cpu')
        assert r.returncode == 0, r.stderr
        assert r.stdout == ('a' + text + '\n---------------\n') * 2, repr(r.stdout)
        assert 'tokens/s' in r.stderr
        # a prompt longer than the context is cropped, with a warning
        (Path(tmp) / 'p.txt').write_text('z' * 40 + 'a')
        r = run_sample(tmp, '--start=FILE:p.txt', '--temperature=0', '--num_samples=1', '--device=cpu')
        assert r.returncode == 0 and 'warning' in r.stderr and 'keeping the last 16' in r.stderr, r.stderr
        assert r.stdout == 'z' * 15 + 'a' + text + '\n---------------\n', repr(r.stdout)


def test_sample_bad_input():
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / 'out' / 'ckpt.pt', tiny(vocab_size=261, block_size=16))
        write_checkpoint(Path(tmp) / 'small' / 'ckpt.pt', tiny(vocab_size=64))  # byte tokenizer needs 261
        cases = [(['--out_dir=missing'], 'no checkpoint'),
                 (['--out_dir=small'], "end-of-text id is 256 but the model has only 64"),
                 (['--start='], 'prompt is empty'),
                 (['--start=FILE:nope.txt'], 'not found'),
                 (['--temperature=-1'], 'temperature')]
        for args, words in cases:
            r = run_here('sample.py', [*args, '--device=cpu', '--max_new_tokens=3'], cwd=tmp)
            assert r.returncode == 2, (args, r.returncode, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], (args, r.stderr)
            assert r.stdout == ''


# ----- tokenizer: tokenizer.py (-k tokeniz) -----


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


@functools.lru_cache(maxsize=None)
def small_bpe(vocab_size=600):
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000] + " ".join(HARD_STRINGS)
    return T.get_tokenizer("bpe", vocab_size=vocab_size, text=text, verbose=False)


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
    assert "261" in expect_die(T.train_bpe, "some text", 260, verbose=False)


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
        assert "tokenizer.json" in expect_die(T.load, d / "nothing")
        T.get_tokenizer("byte").save(d / "tok")
        ranks = (d / "tok" / "tokenizer.tiktoken").read_text()
        (d / "tok" / "tokenizer.tiktoken").write_text(ranks.replace("AA== 0", "AA==x 0"))
        msg = expect_die(T.load, d / "tok")
        assert "line 1" in msg and msg.startswith("error: ") and msg.count("\n") == 1
        (d / "tok" / "tokenizer.tiktoken").unlink()
        assert "not found" in expect_die(T.load, d / "tok")
        (d / "tok" / "tokenizer.json").write_text('{"kind": "bpe", "pattern"')
        assert "corrupt" in expect_die(T.load, d / "tok")
        assert "not found" in expect_die(T.get_tokenizer, "gpt2", path=d / "missing.tiktoken")
        assert "unknown tokenizer kind" in expect_die(T.get_tokenizer, "sentencepiece")


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


# ----- tokenizer: Hugging Face tokenizers in (tokenizer.from_hf) and out (tokenizer.to_hf, hf.save_hf, python hf.py) -----

import chat_data as C

LLAMA3_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there, what's 2+2?"},
        {"role": "assistant", "content": "4.  Anything else?\n"},
        {"role": "user", "content": "Naïve café 👋🏽 — no."}]


def need_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise unittest.SkipTest("tokenizers is not installed (pip install -r requirements-test.txt)")
    return tokenizers


def shakespeare():
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


def hf_trained(d, style, vocab_size=1000):
    """A byte-level BPE tokenizer.json trained with HF tokenizers on tiny Shakespeare, written to d:
    'gpt2'   GPT-2's own layout: ByteLevel with its built-in regex, <|endoftext|> special
    'llama3' Llama 3's: Split(its regex) then ByteLevel(use_regex=False), ignore_merges, bos/eos/... specials
    'qwen2'  Qwen2's: NFC normalizer, Split(one digit per chunk regex), ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    if style != "gpt2":
        regex_ = LLAMA3_REGEX if style == "llama3" else QWEN2_REGEX
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex_), behavior="isolated"), byte_level])
    tk.pre_tokenizer = byte_level
    if style == "qwen2":
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    # (the trainer puts them in the vocabulary too: '<｜tool▁sep｜>', as DeepSeek's, is not byte-level text)
    specials = {"gpt2": ["<|endoftext|>"], "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<｜tool▁sep｜>"],
                "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[style]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([shakespeare()[:300_000]], trainer)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    eos = {"gpt2": "<|endoftext|>", "llama3": "<|end_of_text|>", "qwen2": "<|im_end|>"}[style]
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos, "__type": "AddedToken"}
                                                         if style == "llama3" else eos}))
    return tk, eos


def test_tokenizer_hf_byte_level_bpe_matches_tokenizers():
    """A tokenizer.json trained by HF tokenizers (GPT-2, Llama 3 and Qwen2 layouts) loads as our tiktoken
    Tokenizer and gives tokenizers' ids on tiny Shakespeare and the hard strings, and decodes them back."""
    tokenizers = need_tokenizers()
    text = shakespeare()
    with tempfile.TemporaryDirectory() as tmp:
        for style in ("gpt2", "llama3", "qwen2"):
            d = Path(tmp) / style
            ref, eos = hf_trained(d, style)
            ref.encode_special_tokens = True  # special-token text is plain text, as in our encode()
            tok = T.from_hf(d)
            assert (tok.kind, tok.nfc, tok.eot_id) == ("hf", style == "qwen2", ref.token_to_id(eos)), style
            assert tok.n_vocab == ref.get_vocab_size() + 4  # our 4 chat tokens after its own ids
            assert [tok.special[f"<|{r}|>"] for r in ("system", "user", "assistant", "end")] == \
                list(range(ref.get_vocab_size(), ref.get_vocab_size() + 4))
            want = ref.encode(text, add_special_tokens=False).ids
            assert tok.encode(text) == want, style
            assert tok.decode(want) == text
            for s in HARD_STRINGS + [unicodedata.normalize("NFD", "Crème brûlée, naïve Ångström")]:
                want = ref.encode(s, add_special_tokens=False).ids
                assert tok.encode(s) == want, (style, s)
                assert tok.encode_slow(s) == want, (style, s)
                assert tok.decode(want) == (unicodedata.normalize("NFC", s) if tok.nfc else s), (style, s)
            # allowed, the special tokens are HF's special ids
            ref.encode_special_tokens = False
            s = f"a{eos}b {eos}\n"
            assert tok.encode(s, allowed_special="all") == ref.encode(s, add_special_tokens=False).ids
            assert tok.special[eos] in tok.encode(s, allowed_special="all")
            assert T.from_spec(tok.spec).ranks == tok.ranks and tok.spec == {"kind": "hf", "path": str(d.resolve())}
            # written back out (to_hf), HF tokenizers reads it and gives the same ids again
            T.to_hf(tok, Path(tmp) / f"{style}-out")
            again = tokenizers.Tokenizer.from_file(str(Path(tmp) / f"{style}-out" / "tokenizer.json"))
            again.encode_special_tokens = True
            for s in [text[:50_000]] + HARD_STRINGS:
                assert again.encode(s).ids == tok.encode(s), (style, s)


def hf_dir(d, vocab_size, **kw):
    """A tiny Llama-style model saved as a Hugging Face directory (no tokenizer)."""
    d = Path(d)
    H.save_hf(tiny(vocab_size=vocab_size, block_size=64, **dict(LLAMA, **kw)), d)
    return d


def test_tokenizer_hf_directory_pairs_its_own_tokenizer():
    """hf.load_model gives a Hugging Face directory its own tokenizer: a smaller vocabulary than GPT-2's is
    no longer refused, a larger one no longer tokenized with GPT-2's ids; GPT-2's is kept only for a
    directory without tokenizer.json whose model has GPT-2's vocabulary."""
    need_tokenizers()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref, _ = hf_trained(tmp / "tok", "llama3")
        files = [tmp / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json")]
        for rows in (1000, 50304 + 64):  # smaller than GPT-2's, and larger
            d = hf_dir(tmp / f"m{rows}", rows)
            for f in files:
                (d / f.name).write_bytes(f.read_bytes())
            model, ckpt, tok = H.load_model(str(d), None)
            assert tok.kind == "hf" and tok.eot_id == ref.token_to_id("<|end_of_text|>") and ckpt is None
            assert tok.encode("To be, or not to be") == ref.encode("To be, or not to be").ids
            if rows == 1000:  # fine-tuning gives the chat tokens rows, as for GPT-2
                with redirect_stdout(io.StringIO()):
                    model, _, _ = H.load_model(str(d), None, grow_vocab=True)
                assert model.config.vocab_size == 1024 and tok.special["<|end|>"] < 1024
        # a tokenizer with more tokens than the model has rows does not belong to it
        d = hf_dir(tmp / "m500", 500)
        for f in files:
            (d / f.name).write_bytes(f.read_bytes())
        assert "text tokens have ids up to 999 but the model has only 500" in expect_die(H.load_model, str(d), None)
        # no tokenizer.json: GPT-2's only for GPT-2's vocabulary
        if (SHARED / "gpt2.tiktoken").exists():
            assert H.load_model(str(hf_dir(tmp / "g", 50304)), None)[2].kind == "gpt2"
        msg = expect_die(H.load_model, str(hf_dir(tmp / "n", 1000)), None)
        assert "no tokenizer.json" in msg and "vocab_size 1000" in msg and msg.count("\n") == 1, msg


def test_tokenizer_hf_finetune_checkpoint_spec_reloads():
    """A fine-tune that starts from a Hugging Face directory records the tokenizer spec of that directory
    (tok.spec), which rebuilds the same tokenizer for sample.py, eval.py and the next stage (a spec of
    {'kind': tok.kind, 'path': None} would not)."""
    need_tokenizers()
    with tempfile.TemporaryDirectory() as tmp:
        d = hf_dir(Path(tmp) / "m", 1000)
        hf_trained(d, "llama3")
        with redirect_stdout(io.StringIO()):
            model, _, tok = H.load_model(str(d), None, grow_vocab=True)
        state = {"model": model.state_dict(), "optimizer": {}}
        spec = C.finetune_checkpoint(model, state, {}, 0, 0.0, tok, None, "sft", {})["tokenizer"]
        assert spec == tok.spec == {"kind": "hf", "path": str(d.resolve())}, spec
        back = T.from_spec(spec)
        assert (back.ranks, back.special, back.eot_id) == (tok.ranks, tok.special, tok.eot_id)
        # our own kinds record what they did before
        assert T.get_tokenizer("byte").spec == {"kind": "byte", "path": None}


def test_tokenizer_hf_unsupported_kinds_exit_2():
    """SentencePiece, WordPiece, Unigram and other tokenizers stop with one line saying what they are."""
    need_tokenizers()
    from tokenizers import Tokenizer, models, pre_tokenizers
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        byte_bpe = tmp / "ok"
        hf_trained(byte_bpe, "llama3")
        good = json.loads((byte_bpe / "tokenizer.json").read_text())

        def variant(name, change=None, tk=None, config=None):
            d = tmp / name
            d.mkdir()
            if tk is not None:
                tk.save(str(d / "tokenizer.json"))
            else:
                info = json.loads(json.dumps(good))
                change(info)
                (d / "tokenizer.json").write_text(json.dumps(info))
            (d / "tokenizer_config.json").write_text(json.dumps(config) if config else
                                                     (byte_bpe / "tokenizer_config.json").read_text())
            return d

        wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
        wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
        unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))
        sp_bpe = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2}, [], byte_fallback=True, unk_token="<unk>"))
        sp_bpe.pre_tokenizer = pre_tokenizers.Metaspace()

        def swap_ids(info):  # two merged tokens swap ids: no longer in merge order
            v = info["model"]["vocab"]
            a, b = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in info["model"]["merges"][10:12])
            v[a], v[b] = v[b], v[a]

        cases = [
            (variant("wordpiece", tk=wordpiece), "it is a WordPiece tokenizer"),
            (variant("unigram", tk=unigram), "it is a Unigram tokenizer"),
            (variant("sp_bpe", tk=sp_bpe), "SentencePiece-style BPE"),
            (variant("digits", lambda i: i["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True})),
             "pre-tokenizer is Digits + Split + ByteLevel"),
            (variant("prefix", lambda i: i["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True)),
             "add_prefix_space"),
            (variant("no_regex", lambda i: i.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False,
                                                                   "use_regex": False})), "no regex"),
            (variant("nfkc", lambda i: i.update(normalizer={"type": "NFKC"})), "normalizer is NFKC"),
            (variant("order", swap_ids), "merge order"),
            (variant("eos", lambda i: None, config={"eos_token": "</s>"}), "no end-of-text token"),
            (variant("corrupt", lambda i: i.pop("model")), "is corrupt"),
        ]
        for d, words in cases:
            msg = expect_die(T.from_hf, d)
            assert msg.startswith("error: ") and msg.count("\n") == 1 and words in msg, (d.name, msg)
        # through a script: a model directory with a SentencePiece tokenizer.model, and one with a WordPiece
        # tokenizer.json: exit 2, one line, no traceback
        sp = hf_dir(tmp / "sp", 1000)
        (sp / "tokenizer.model").write_bytes(b"\x0a\x05hello")
        wp = hf_dir(tmp / "wp", 1000)
        (wp / "tokenizer.json").write_bytes((tmp / "wordpiece" / "tokenizer.json").read_bytes())
        for d, words in ((sp, "SentencePiece (tokenizer.model)"), (wp, "WordPiece")):
            assert_clear_error(run(["sample.py", f"--init_from={d}", "--device=cpu", "--max_new_tokens=2"]), words)


# numbers, so that our BPE has merges of digits: chunks of at most 3 digits must stay so in HF's regex;
# and texts that end in whitespace after a newline, one chunk in GPT-4's pattern (tokens such as ' \n  ')
NUMBERS = " ".join(str(i * 7919 % 100_003) for i in range(3000))
ENDINGS = ["Exeunt.\n  \n ", "FINIS \r\n\t ", "end\n\n    "]


def bpe_text():
    return [shakespeare()[:100_000] + " ".join(HARD_STRINGS) + NUMBERS] + ENDINGS * 50


@functools.lru_cache(maxsize=None)
def our_tokenizers():
    """Our 'bpe' (trained here) and 'gpt2' tokenizers, and a model vocabulary size for each."""
    out = [(T.get_tokenizer("bpe", vocab_size=600, text=bpe_text(), verbose=False), 600)]
    if (SHARED / "gpt2.tiktoken").exists():
        out.append((T.get_tokenizer("gpt2"), 50304))  # padded as nanoGPT, rows for the chat tokens
    return out


@one_thread
def test_hf_export_tokenizer_gives_our_ids():
    """save_hf(model, dir, tok, chat=True) writes a tokenizer that AutoTokenizer loads and that gives our
    ids on tiny Shakespeare and the hard strings, decodes them back, and whose apply_chat_template gives
    exactly our chat template's ids; the model loads with AutoModelForCausalLM."""
    tr = need_transformers()
    text = shakespeare()
    with tempfile.TemporaryDirectory() as tmp:
        for tok, rows in our_tokenizers():
            if tok.kind == "gpt2":  # and all 50,000 of GPT-2's: every token is made by one merge
                assert len(T.merges_from_ranks(tok.ranks)) == 50_000
                # GPT-2's own 50257 rows: the chat tokens, which have none, are left out
                T.to_hf(tok, Path(tmp) / "rows", n_rows=50257)
                added = json.loads((Path(tmp) / "rows" / "tokenizer.json").read_text())["added_tokens"]
                assert [(t["id"], t["content"]) for t in added] == [(50256, "<|endoftext|>")]
            if tok.kind == "bpe":  # every merge of our trainer is recovered from the ranks alone
                vocab = {i: b for b, i in tok.ranks.items()}
                merges = T.train_bpe(bpe_text(), 600, verbose=False)
                assert T.merges_from_ranks(tok.ranks) == [(vocab[a], vocab[b]) for a, b in merges]
            d = Path(tmp) / tok.kind
            H.save_hf(tiny(vocab_size=rows, block_size=64, **LLAMA), d, tok, chat=True)
            hf_tok = tr.AutoTokenizer.from_pretrained(d)
            assert hf_tok(text)["input_ids"] == tok.encode(text), tok.kind
            assert hf_tok.decode(tok.encode(text)) == text
            for s in HARD_STRINGS + ENDINGS + [NUMBERS[:2000], "1234567 12345678 123456789"]:
                if "<|" in s:  # transformers reads special-token text as the special token (we do when allowed)
                    assert hf_tok(s)["input_ids"] == tok.encode(s, allowed_special="all"), s
                    continue
                assert hf_tok(s)["input_ids"] == tok.encode(s), (tok.kind, s)
                assert hf_tok.decode(tok.encode(s)) == s, (tok.kind, s)
            want = C.chat_ids(tok, CHAT, add_generation_prompt=True)[0]
            got = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert got["input_ids"] == want, tok.kind
            assert hf_tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True)["input_ids"] == \
                C.chat_ids(tok, CHAT[:3])[0]
            assert (hf_tok.eos_token_id, hf_tok.bos_token_id) == (tok.eot_id, tok.eot_id)
            gen = json.loads((d / "generation_config.json").read_text())
            assert gen["eos_token_id"] == [tok.special["<|end|>"], tok.eot_id]
            tr.AutoModelForCausalLM.from_pretrained(d)
            # and our own loader reads the export back as the same tokenizer
            back = T.from_hf(d)
            assert (back.ranks, back.special, back.eot_id) == (tok.ranks, tok.special, tok.eot_id)
        # a token that no merge makes is only ever a whole chunk in tiktoken; in HF too (ignore_merges)
        odd = T.Tokenizer("bpe", {**{bytes([b]): b for b in range(256)}, b"abc": 256}, T.GPT4_PATTERN,
                          T.specials_after(257))
        T.to_hf(odd, Path(tmp) / "odd")
        hf_odd = tr.AutoTokenizer.from_pretrained(Path(tmp) / "odd")
        for s in ("abc", " abc abcd xabc"):
            assert hf_odd(s)["input_ids"] == odd.encode(s), s
        assert odd.encode("abc") == [256]


def sample_text(out_dir, start, n):
    r = run(["sample.py", f"--out_dir={out_dir}", "--temperature=0", "--num_samples=1", f"--start={start}",
             f"--max_new_tokens={n}", "--device=cpu"], check=0)
    assert r.stdout.endswith("\n---------------\n"), r.stdout
    return r.stdout[:-len("\n---------------\n")]


@one_thread
def test_hf_export_generate_matches_sample():
    """python hf.py --out_dir --save_dir exports a checkpoint (GPT-2 style and Llama style) whose greedy
    transformers generate() writes exactly the text of python sample.py --temperature=0, stopping at end of
    text as it does (generation_config.json)."""
    tr = need_transformers()
    tok = our_tokenizers()[0][0]
    start = "ROMEO: But soft, what light"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok.save(tmp / "tok")
        for name, style, stop in (("gpt2", dict(mlp="gelu_tanh", tie_embeddings=False), True), ("llama", LLAMA, False)):
            model = tiny(seed=3, vocab_size=tok.n_vocab, block_size=64, n_embd=64, **style)
            if stop:  # end of text takes over from the first new token after 8: generation stops there
                ours = generated(model, torch.tensor([tok.encode(start)]), 20, temperature=0)[0].tolist()
                k = next(k for k in range(8, 20) if ours[k] not in ours[:k])
                with torch.no_grad():
                    model.lm_head.weight[tok.eot_id] = model.lm_head.weight[ours[k]] * 1.001
            common.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                                        tokenizer={"kind": "bpe", "path": str(tmp / "tok")}), tmp / name / "ckpt.pt")
            save = tmp / f"{name}-hf"
            r = run(["hf.py", f"--out_dir={tmp / name}", f"--save_dir={save}"], check=0)
            assert "Hugging Face layout" in r.stdout
            assert sorted(p.name for p in (tmp / name).iterdir()) == ["ckpt.pt"]
            hf_tok = tr.AutoTokenizer.from_pretrained(save)
            hf_model = tr.AutoModelForCausalLM.from_pretrained(save).eval()
            ids = hf_tok(start, return_tensors="pt")["input_ids"]
            assert ids[0].tolist() == tok.encode(start)
            with torch.no_grad():
                out = hf_model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
            if stop:  # transformers ends with the end-of-text token, which sample.py does not print
                assert len(out) < 20 and out[-1] == tok.eot_id, out
                out = out[:-1]
            assert len(out) >= 5 and len(set(out)) >= 2, out  # a continuation worth comparing
            assert sample_text(tmp / name, start, 20) == start + hf_tok.decode(out), name


def test_hf_export_cli_bad_inputs_exit_2():
    """python hf.py: a missing checkpoint, no or a non-empty save_dir, save_dir = out_dir: exit 2, one line,
    and the checkpoint is never touched; --overwrite=True writes into a non-empty save_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        model = tiny(vocab_size=261, block_size=16, **LLAMA)  # a chat checkpoint, as finetune.py writes
        common.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), chat=C.CHAT_TEMPLATE,
                                    tokenizer={"kind": "byte", "path": None}), out / "ckpt.pt")
        ckpt = (out / "ckpt.pt").read_bytes()
        (tmp / "full").mkdir()
        (tmp / "full" / "notes.txt").write_text("mine")
        # through the command line (no traceback), then the same function in-process (cheaper)
        assert_clear_error(run(["hf.py", f"--out_dir={tmp / 'missing'}", f"--save_dir={tmp / 'x'}"]), "no checkpoint")
        assert_clear_error(run(["hf.py", "--save=x"]), "unknown config key")
        cases = [(dict(save_dir=""), "--save_dir"),
                 (dict(save_dir=tmp / "full"), "--overwrite=True"),
                 (dict(save_dir=out, overwrite=True), "is out_dir itself"),
                 (dict(save_dir=tmp / "full" / "notes.txt", overwrite=True), "not a directory")]
        for kw, words in cases:
            msg = expect_die(H.export, **dict(dict(out_dir=out, overwrite=False), **kw))
            assert msg.startswith("error: ") and msg.count("\n") == 1 and words in msg, (kw, msg)
        assert (out / "ckpt.pt").read_bytes() == ckpt and not (tmp / "x").exists()
        assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]
        with redirect_stdout(io.StringIO()):
            H.export(out, tmp / "full", overwrite=True)
        assert (tmp / "full" / "notes.txt").read_text() == "mine" and (tmp / "full" / "tokenizer.json").exists()
        assert T.from_hf(tmp / "full").ranks == T.get_tokenizer("byte").ranks
        # a fine-tuned checkpoint carries our chat template, and generate() stops at <|end|> too
        assert "chat_template" in json.loads((tmp / "full" / "tokenizer_config.json").read_text())
        assert json.loads((tmp / "full" / "generation_config.json").read_text())["eos_token_id"] == [260, 256]
        assert (out / "ckpt.pt").read_bytes() == ckpt


# ----- prepare: prepare.py (-k prepare) -----
# the download helper against a real local http.server, exact round trips from shards back to the cleaned
# text, bad input (exit 2, one line, nothing left behind), idempotence.


@contextlib.contextmanager
def _server(data, plan=()):
    """A threaded http.server on 127.0.0.1 (free port) serving `data` (bytes) at any path, or a dict
    {file name: bytes} by the last part of the path (404 for others), with Range support.
    `plan` scripts the first requests: 'cut' sends half the body then closes, '500' and '404' fail.
    Yields (base URL, list of the request headers received)."""
    plan, log = list(plan), []

    class Handler(BaseHTTPRequestHandler):
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

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", log
    finally:
        srv.shutdown()
        srv.server_close()


def _prepare_cli(*args, cwd=ROOT):
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
    meta = prepare.load_meta(data_dir)
    tok = T.from_spec(meta["tokenizer"])
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


# ----- prepare: the download helper against a local server -----


def test_prepare_download_verified():
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        dest = Path(d) / "raw" / "input.txt"
        assert common.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, size=len(data)) == dest
        assert dest.read_bytes() == data and len(log) == 1
        assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]  # no temp file left
        common.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256)  # there and verified
        assert len(log) == 1


def test_prepare_download_resumes_after_cut():
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["cut"]) as (url, log):
        dest = Path(d) / "input.txt"
        common.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, backoff=0.01)
        assert len(log) == 2 and "Range" not in log[0], log
        start = int(log[1]["Range"].removeprefix("bytes=").removesuffix("-"))
        assert 0 < start <= len(data) // 2, log[1]  # it asked only for what it did not have
        assert dest.read_bytes() == data
        assert sorted(p.name for p in Path(d).iterdir()) == ["input.txt"]


def test_prepare_download_resumes_on_next_run():
    """A cut with no retries left stops with a clear error and keeps the .part; the next call resumes it."""
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["cut", "500"]) as (url, log):
        dest = Path(d) / "input.txt"
        err = expect_die(common.download, url + "/input.txt", dest, size=len(data), retries=0)
        assert "HTTP 500" in err and "resumed on the next run" in err and not dest.exists(), err
        common.download(url + "/input.txt", dest, size=len(data), sha256=prepare.SHAKESPEARE_SHA256)
        assert log[-1]["Range"].startswith("bytes=") and dest.read_bytes() == data


def test_prepare_download_bad_checksum_leaves_nothing():
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        dest = Path(d) / "input.txt"
        err = expect_die(common.download, url + "/input.txt", dest, sha256="0" * 64)
        assert "sha256" in err and url in err, err
        assert list(Path(d).iterdir()) == []
        err = expect_die(common.download, url + "/input.txt", dest, size=len(data) + 1)
        assert "expected" in err and list(Path(d).iterdir()) == []


def test_prepare_download_retries_500_and_stops_on_404():
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["500", "500"]) as (url, log):
        dest = Path(d) / "input.txt"
        common.download(url + "/input.txt", dest, sha256=prepare.SHAKESPEARE_SHA256, backoff=0.01)
        assert len(log) == 3 and dest.read_bytes() == data
    with tempfile.TemporaryDirectory() as d, _server(data, plan=["404"]) as (url, log):
        err = expect_die(common.download, url + "/missing.txt", Path(d) / "x.txt", backoff=0.01)
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
            r = _prepare_cli("--dataset=shakespeare", f"--data_root={d}", f"--mirror={mirror}", "--retries=1")
            line = _one_error_line(r)
            assert f"{mirror}/input.txt" in line and str(dest) in line, line
            assert list(Path(d).iterdir()) == []  # not even an empty folder


# ----- prepare: the whole step: round trips, idempotence -----


def test_prepare_pydocs_extract_leaks_no_environment_and_ignores_venv():
    """Signatures such as cgi.parse(environ=os.environ) print their defaults: the extract must not carry this
    shell's variables into the corpus, and a virtual environment must extract the same bytes as its Python."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        probe = "probe-" + os.urandom(6).hex()
        with mock.patch.dict(os.environ, LLM_SECRET_PROBE=probe), contextlib.redirect_stdout(io.StringIO()):
            prepare.pydocs_records(d / "here", 0.1)
        text = (d / "here" / "pydocs.jsonl").read_text(encoding="utf-8")
        assert "cgi.parse(" in text and probe not in text and "LLM_SECRET_PROBE" not in text
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(d / "venv")], check=True)
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import prepare, pathlib; " \
               f"prepare.pydocs_records(pathlib.Path({str(d / 'venv-out')!r}), 0.1)"
        subprocess.run([str(d / "venv" / "bin" / "python"), "-c", code], check=True, capture_output=True)
        assert (d / "venv-out" / "pydocs.jsonl").read_bytes() == text.encode("utf-8")


def test_prepare_pydocs_roundtrip_and_idempotent():
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
        r = _prepare_cli(*args)
        assert r.returncode == 0 and "is ready" in r.stdout, r.stdout + r.stderr
        r = _prepare_cli(*args, "--tokenizer=byte")
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
        r = _prepare_cli(*args, "--tokenizer=byte", "--force=True")
        assert r.returncode == 0, r.stderr
        meta = prepare.load_meta(data_dir)
        assert meta["tokenizer"]["kind"] == "byte"
        assert sorted(p.name for p in data_dir.glob("*.bin")) == sorted(meta["train"]["shards"] + meta["val"]["shards"])
        assert _decode_splits(data_dir)[1] == decoded


def test_prepare_shakespeare_local_roundtrip():
    """tiny Shakespeare as a local .txt: the documents (paragraph groups) joined with blank lines give back
    the file exactly, and val is its last ~10% as in nanoGPT."""
    path = shared_file("tinyshakespeare.txt")
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
    data = shared_file("tinyshakespeare.txt").read_bytes()
    with tempfile.TemporaryDirectory() as d, _server(data) as (url, log):
        data_dir = prepare.prepare(dataset="shakespeare", data_root=d, tokenizer="byte", mirror=url)
        assert (data_dir / "raw" / "input.txt").read_bytes() == data and log[0]
        meta, decoded = _decode_splits(data_dir)
        assert "\n\n".join(decoded["train"] + decoded["val"]) == data.decode()
        assert meta["vocab_size"] == 261 and meta["train"]["tokens"] == meta["train"]["bytes"] + meta["train"]["docs"]


def test_prepare_tinystories_and_fineweb_via_mirror():
    """The two big remote datasets end to end, from small files of the same formats on a local server:
    TinyStories (stories separated by <|endoftext|>, val from its own file) and llm.c's fineweb shards."""
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
        table = out.getvalue()
        assert re.search(r"tiny +under 16 chars +1 ", table) and re.search(r"exact +duplicate +1 ", table), table
        assert prepare.load_meta(data_dir)["clean"]["kept"]["docs"] == 4
        _, decoded = _decode_splits(data_dir)
        assert decoded["train"] == ["The first document, long enough to stay.\n",
                                    "caf\ufffd and more text here\nsecond line of b\n",
                                    "caf\u00e9 decomposed, becomes NFC in cleaning"]
        assert decoded["val"] == ["the last one, held out for val"]
        names = json.loads((data_dir / "docs.json").read_text())
        assert names == {"train": ["a.txt#0", "b.txt#0", "sub/c.jsonl:1"], "val": ["sub/c.jsonl:4"]}


# ----- prepare: bad input: exit 2, one line, nothing written -----


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
            r = _prepare_cli("--dataset=local", f"--input={d / name}", f"--data_root={out}", "--tokenizer=byte")
            line = _one_error_line(r)
            assert expected in line and name in line, (name, line)
            assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))
        r = _prepare_cli("--dataset=shakespeare", f"--input={d / 'small.txt'}", f"--data_root={d / 'out'}")
        assert "--dataset=local" in _one_error_line(r)
        r = _prepare_cli("--dataset=nope", f"--data_root={d / 'out'}")
        assert "pydocs" in _one_error_line(r)


def test_prepare_failed_write_leaves_no_shards():
    """A crash while encoding (here an interrupt in the val split) removes the shards already written."""
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
        err = expect_die(prepare.read_bin, p)
        assert str(p) in err and "--dataset=x --force" in err, err
        p.write_bytes(b"\0" * 2048)  # no magic
        assert "not a token shard" in expect_die(prepare.read_bin, p)
        assert "not found" in expect_die(prepare.load_meta, Path(d) / "x")


# ----- eval: eval.py (-k eval) -----


def run_eval(*args, timeout=120):
    """eval.py through run(), on one OpenMP thread (tiny models on a busy 2-core machine)."""
    return run(["eval.py", *args], timeout=timeout, env={"OMP_NUM_THREADS": "1"})


# ----- eval: a model whose answers are known -----
# trained until it has learnt a fixed answer for each of KNOWN keys; the UNKNOWN keys it never saw.

BYTE = T.get_tokenizer("byte")
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
KNOWN, UNKNOWN = "abcdefghijklmnop", "qrstuvwxyz"


def color(key):
    return COLORS[(ord(key) * 5) % len(COLORS)]


def number(key):
    return f"{(ord(key) - 90) * 1237:,}"  # a -> 8,659: thousands separators to extract


def pairs():
    """(prompt, answer) the model learns for each known key: multiple choice and GSM8K style."""
    for k in KNOWN:
        yield f"Q: {k}\nA:", f" {color(k)}"
        yield f"Question: what is {k}?\nAnswer:", f" {k} is {number(k)} #### {number(k)}"


_MODEL = {}


def known_model():
    """2-layer Llama-style byte model trained on the answers of pairs() (each ending in <|endoftext|>)
    until it recites them: a few seconds."""
    if "m" in _MODEL:
        return _MODEL["m"]
    torch.manual_seed(0)
    cfg = M.GPTConfig(vocab_size=BYTE.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      bias=False, norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True)
    model = M.GPT(cfg)
    seqs = [(BYTE.encode(p), BYTE.encode(a) + [BYTE.eot_id]) for p, a in pairs()]
    L = max(len(p) + len(a) for p, a in seqs)
    x = torch.zeros(len(seqs), L - 1, dtype=torch.long)
    y = torch.full((len(seqs), L - 1), -1, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        x[i, :len(p) + len(a) - 1] = torch.tensor((p + a)[:-1])
        y[i, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)  # the loss on the answers only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.random.fork_rng():
        for _ in range(500):
            logits, loss = model(x, y)
            if loss.item() < 0.01 and bool((logits.argmax(-1) == y)[y != -1].all()):  # every answer token
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert bool((logits.argmax(-1) == y)[y != -1].all()), "the known-answer model did not learn its answers"
    _MODEL["m"] = model.eval()
    return _MODEL["m"]


def save_ckpt(model, out, **extra):
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "step": 1, "config": {},
                "tokenizer": {"kind": "byte", "path": None}, **extra}, out / "ckpt.pt")
    return out


def hellaswag_file(path, keys, seed=0):
    """One question per key: ctx 'Q: k\nA:' and four colours. The answer is the key's colour for a known key,
    and a colour drawn at random for an unknown one (nothing the model could know)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for k in keys:
            gold = color(k) if k in KNOWN else rng.choice(COLORS)
            endings = rng.sample([c for c in COLORS if c != gold], 3) + [gold]
            rng.shuffle(endings)
            f.write(json.dumps({"ctx": f"Q: {k}\nA:", "endings": endings, "label": endings.index(gold)}) + "\n")
    return path


@one_thread
def test_eval_known_model_mc_100_percent_and_chance():
    """Where the model knows the answer acc is 1; where it cannot know, acc is what chance gives. The chance
    file asks each unknown key 24 times with fresh options and gold positions."""
    model = known_model()
    known = E.read_hellaswag(hellaswag_file(EVAL_TMP / "hs_known.jsonl", KNOWN))
    r = E.multiple_choice(model, BYTE, known, known, True, 0, 0, 256, contextlib.nullcontext(), "known")
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0 and r["n"] == len(KNOWN), r
    unknown = E.read_hellaswag(hellaswag_file(EVAL_TMP / "hs_unknown.jsonl", UNKNOWN * 24, seed=1))
    r = E.multiple_choice(model, BYTE, unknown, unknown, True, 0, 0, 4096, contextlib.nullcontext(), "unknown")
    assert r["n"] == 240 and r["chance"] == 0.25
    assert abs(r["acc"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 240), r  # within 4 standard errors of chance


def test_eval_fewshot_prompts():
    """k examples before the question, drawn per question with the seed, never the question itself; MMLU's
    from the same subject, with the subject line once at the top."""
    items = E.read_hellaswag(hellaswag_file(EVAL_TMP / "hs_shots.jsonl", KNOWN))
    for i, it in enumerate(items):
        shots = E.fewshot(items, range(len(items)), i, 3, 7, True)
        assert len(shots) == 3 and it not in shots and len({s["context"] for s in shots}) == 3
        assert shots == E.fewshot(items, range(len(items)), i, 3, 7, True)
        prompt = E.mc_prompt(it, shots)
        assert prompt.endswith("\n\n" + it["context"]) and prompt.count("\nA: ") == 3
        assert prompt.startswith(shots[0]["context"] + shots[0].get("delimiter", "") + shots[0]["choices"][shots[0]["gold"]]
                                 + "\n\n")
    assert E.fewshot(items, range(len(items)), 0, 3, 7, True) != E.fewshot(items, range(len(items)), 0, 3, 8, True)
    mmlu = EVAL_TMP / "mm"
    mmlu.mkdir(exist_ok=True)
    (mmlu / "anatomy_test.csv").write_text("".join(f"a{i}?,w,x,y,z,A\n" for i in range(5)))
    (mmlu / "virology_test.csv").write_text("".join(f"v{i}?,w,x,y,z,B\n" for i in range(5)))
    items = E.read_mmlu(mmlu)
    groups = {}
    for j, it in enumerate(items):
        groups.setdefault(it["group"], []).append(j)
    for i, it in enumerate(items):
        shots = E.fewshot(items, groups[it["group"]], i, 4, 0, True)
        assert len(shots) == 4 and all(s["group"] == it["group"] for s in shots) and it not in shots
        prompt = E.mc_prompt(it, shots)
        assert prompt.count("The following are") == 1 and prompt.count("Answer:") == 5


@one_thread
def test_eval_batched_scores_equal_one_at_a_time():
    """Padding, sorting by length and the token budget change nothing: every option's log-likelihood equals
    a plain forward of that one sequence, also when it is longer than the context and gets cut."""
    model = known_model()
    rng = random.Random(0)
    reqs = []
    for n in range(30):
        ctx = BYTE.encode("".join(rng.choice("Q: abc\nA") for _ in range(rng.randrange(1, 70))))
        cont = BYTE.encode(rng.choice(COLORS) * rng.randrange(1, 3))
        reqs.append((ctx, cont))
    got = E.loglikelihoods(model, reqs, batch_tokens=200)
    for (ctx, cont), (s, n, greedy) in zip(reqs, got):
        full = (ctx + cont)[-(model.config.block_size + 1):]
        k = min(len(cont), len(full) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0][0], -1)
        ref = logp[torch.arange(len(full) - 1 - k, len(full) - 1), torch.tensor(full[-k:])]
        assert n == k and abs(s - ref.sum().item()) < 1e-4, (s, ref.sum().item())
        assert greedy == bool((logp[len(full) - 1 - k:].argmax(-1) == torch.tensor(full[-k:])).all())


def test_eval_acc_norm_differs_exactly_where_lengths_differ():
    """Options of equal byte length: acc and acc_norm choose alike. Options of different lengths where the
    short one has the higher sum but the lower per-byte log-prob: they choose differently."""
    rng = random.Random(0)
    items, lls, owner = [], [], []
    for i in range(200):
        same = i % 2 == 0
        lens = [4] * 4 if same else rng.sample(range(1, 30), 4)
        items.append({"choices": ["x" * n for n in lens], "gold": 0})
        for n in lens:
            lls.append((-rng.uniform(0.1, 3.0) * n, n, False))
            owner.append(i)
    preds = E.mc_predictions(items, lls, owner)
    for i, (a, b) in enumerate(preds):
        if i % 2 == 0:
            assert a == b
    assert any(a != b for a, b in preds[1::2])
    # hand-worked from lm-evaluation-harness's definition: the options are scored as " ab" and " abcd" (its
    # target_delimiter), but acc_norm divides by len() of the option without it: -1.0/2 = -0.5 < -1.9/4 = -0.475,
    # so acc picks 0 and acc_norm 1 (dividing by 3 and 5 would pick 0 twice). len() counts characters:
    # 'éé' -2.2 is 2 characters (-1.1 each; 4 UTF-8 bytes would make it -0.55), 'abc' -3.15 (-1.05 each)
    items = [{"choices": ["ab", "abcd"], "gold": 1, "delimiter": " "}, {"choices": ["éé", "abc"], "gold": 1}]
    lls = [(-1.0, 1, False), (-1.9, 1, False), (-2.2, 1, False), (-3.15, 1, False)]
    assert E.mc_predictions(items, lls, [0, 0, 1, 1]) == [(0, 1), (0, 1)]
    m = E.mc_metrics(items, lls, [0, 0, 1, 1])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0 and m["chance"] == 0.5


def test_eval_encode_pair_like_harness():
    tok = BYTE
    assert E.encode_pair(tok, "Q: a\nA: ", "red") == (tok.encode("Q: a\nA:"), tok.encode(" red"))
    assert E.encode_pair(tok, "", "red") == ([tok.eot_id], tok.encode("red"))
    # the harness moves ALL trailing whitespace (rstrip()), newlines and tabs too, to the continuation
    assert E.encode_pair(tok, "Q: a\nA:\n \t", "red") == (tok.encode("Q: a\nA:"), tok.encode("\n \tred"))
    if (SHARED / "gpt2.tiktoken").exists():
        g = T.get_tokenizer("gpt2")
        ctx, cont = E.encode_pair(g, "The cat sat on the", " mat")
        assert ctx + cont == g.encode("The cat sat on the mat") and g.decode(cont) == " mat"


def test_eval_gsm8k_extractor():
    x = E.extract_number
    assert x("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert x("#### 1,234,567") == "1234567"
    assert x("so the answer is #### -5") == "-5"
    assert x("She lost $-3 today") == "-3" and x("a loss of -$3.50") == "-3.5"
    assert x("It costs $18.00.") == "18" and x("#### 18") == x("#### 18.0")
    assert x("The tank holds 12 cm of water and 50% more") == "50"
    assert x("The answer is 1,000 apples.") == "1000"
    assert x("Total: 3 boxes of 1,200 g each, i.e. 3,600 g") == "3600"
    assert x("#### 42 because 2 + 40") == "42"  # after '####' the first number, not the last
    assert x("temperature fell to \u22127 degrees") == "-7"
    assert x("between 5-10 apples") == "10" and x("10 - 3 = 7") == "7" and x("so 12-3=9.") == "9"
    assert x("no number here") is None and x("####") is None
    assert x("#### 0") == "0" and x("#### -0.0") == "0"


@one_thread
def test_eval_gsm8k_generation_known_and_unknown():
    """Greedy decoding stops at the stop token and the extracted number is compared: the known questions
    are all right, the unknown ones (whose numbers the model never saw) all wrong."""
    model = known_model()
    path = EVAL_TMP / "gsm.jsonl"
    with open(path, "w") as f:
        for k in KNOWN + UNKNOWN:
            f.write(json.dumps({"question": f"what is {k}?", "answer": f"It is.\n#### {number(k)}"}) + "\n")
    items = E.read_gsm8k(path)
    assert items[0]["target"] == number("a").replace(",", "")
    kn = E.gsm8k(model, BYTE, items[:len(KNOWN)], items, 0, 0, False, 24, contextlib.nullcontext())
    un = E.gsm8k(model, BYTE, items[len(KNOWN):], items, 0, 0, False, 24, contextlib.nullcontext())
    assert kn["exact_match"] == 1.0 and kn["n"] == len(KNOWN), kn
    assert un["exact_match"] == 0.0, un
    prompts = [BYTE.encode(q) for q in ("Question: what is b?\nAnswer:", "Q: what is a?\nAnswer:", "Question: c?\nA:")]
    replies = E.generate_replies(model, BYTE, prompts, 40, ("####",), [BYTE.eot_id], batch_size=2)
    assert replies[0] == f" b is {number('b')} ", replies  # cut before the stop string
    # prompts of different lengths decode together (left padding) into what each gives alone
    assert replies == [E.generate_replies(model, BYTE, [p], 40, ("####",), [BYTE.eot_id])[0] for p in prompts]


@one_thread
def test_eval_cli_known_model_table_and_json():
    """The whole script on a checkpoint: the table, eval.json (merged, other models' entries kept), progress."""
    out = save_ckpt(known_model(), EVAL_TMP / "out-known")
    (out / "eval.json").write_text(json.dumps({"gpt2": {"tasks": {"hellaswag": {"acc": 0.3}}}}))
    p = run_eval(f"--out_dir={out}", "--tasks=hellaswag", f"--task_file={hellaswag_file(EVAL_TMP / 'k.jsonl', KNOWN)}",
                 "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "acc (0-shot, chance 0.25)" in p.stdout and "1.0000" in p.stdout, p.stdout
    assert "ETA" in p.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["gpt2"]["tasks"]["hellaswag"]["acc"] == 0.3
    hs = res["ckpt.pt"]["tasks"]["hellaswag"]
    assert hs["acc"] == 1.0 and hs["n"] == len(KNOWN) and res["ckpt.pt"]["step"] == 1
    # a second task later adds to the same entry
    lm = EVAL_TMP / "lm.txt"
    lm.write_text("Q: a\nA: " + color("a") + "\n")
    p = run_eval(f"--out_dir={out}", "--tasks=lm", f"--lm_data={lm}", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert set(res["ckpt.pt"]["tasks"]) == {"hellaswag", "lm:lm.txt"}
    assert res["ckpt.pt"]["tasks"]["lm:lm.txt"]["bytes"] == len(lm.read_bytes())
    # a 2-shot run is filed beside the 0-shot one, not over it
    p = run_eval(f"--out_dir={out}", "--tasks=hellaswag", f"--task_file={EVAL_TMP / 'k.jsonl'}", "--num_fewshot=2",
                 "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())["ckpt.pt"]["tasks"]
    assert res["hellaswag"]["acc"] == 1.0 and res["hellaswag_2shot"]["num_fewshot"] == 2


@one_thread
def test_eval_bits_per_byte_exact():
    """bpb = summed loss in bits / UTF-8 bytes: equal to a direct forward on a short text; on a prepared
    dataset meta.json's byte count equals the bytes of the decoded tokens, and a capped run counts the
    bytes of exactly the tokens it scored."""
    model = known_model()
    text = "Q: c\nA: " + color("c") + " — é"
    path = EVAL_TMP / "bpb.txt"
    path.write_text(text, encoding="utf-8")
    r = E.language_model(model, BYTE, ("text", path), "val", 0, 8192, contextlib.nullcontext())
    ids = torch.tensor([[BYTE.eot_id] + BYTE.encode(text)])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    n_bytes = len(text.encode("utf-8"))
    assert r["tokens"] == ids.size(1) - 1 and r["bytes"] == n_bytes
    assert abs(r["bpb"] - loss.item() * r["tokens"] / math.log(2) / n_bytes) < 1e-5
    assert abs(r["ppl"] - math.exp(loss.item())) < 1e-3 * r["ppl"]
    # a prepared dataset (byte tokenizer, tiny Shakespeare cut short), its val split: several windows
    if not (SHARED / "tinyshakespeare.txt").exists():
        raise unittest.SkipTest("../shared/data/tinyshakespeare.txt not found")
    src = EVAL_TMP / "shakes.txt"
    src.write_text((SHARED / "tinyshakespeare.txt").read_text()[:20000])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.prepare(dataset="local", data_root=str(EVAL_TMP / "data"), tokenizer="byte", input=str(src),
                        chunk_chars=2000)
    meta = prepare.load_meta(EVAL_TMP / "data" / "local")
    val = prepare.read_bin(EVAL_TMP / "data" / "local" / "val_000000.bin")
    assert E.text_bytes(BYTE, val) == meta["val"]["bytes"]
    src_kind = E.lm_source("local", str(EVAL_TMP / "data"), "val")
    r = E.language_model(model, BYTE, src_kind, "val", 0, 512, contextlib.nullcontext())
    assert r["tokens"] == len(val) - 1 > 3 * model.config.block_size and r["bytes"] == meta["val"]["bytes"]
    with torch.no_grad():  # the same sum, window by window
        total = 0.0
        for s in range(0, len(val) - 1, 64):
            w = torch.tensor(val[s:s + 65].astype("int64"))[None]
            total += model(w[:, :-1], w[:, 1:])[1].item() * (w.size(1) - 1)
    assert abs(r["loss"] - total / r["tokens"]) < 1e-5
    capped = E.language_model(model, BYTE, src_kind, "val", 100, 512, contextlib.nullcontext())
    assert capped["tokens"] == 100 and capped["bytes"] == E.text_bytes(BYTE, val[1:101])


def pydocs_root():
    """A data_root holding only the pydocs extract (made once per test run, about a second)."""
    root = EVAL_TMP / "pydocs-root"
    if not (root / "pydocs" / "raw" / "pydocs.jsonl").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.pydocs_records(root / "pydocs" / "raw", 0.1)
    return root


def test_eval_pydocs_task_held_out_and_deterministic():
    """The embedded task: questions only about held-out (val) modules, four different options with the
    object's own summary at the gold position, the same questions every time; few-shot examples from train."""
    root = pydocs_root()
    with contextlib.redirect_stdout(io.StringIO()):
        items, shots = E.pydocs_items(str(root))
        again, _ = E.pydocs_items(str(root))
        objects = prepare.pydocs_objects(str(root))
    assert items == again and len(items) > 200
    val = {o["name"]: o for o in objects if o["split"] == "val"}
    train_names = {o["name"] for o in objects if o["split"] == "train"}
    for it in items:
        name = it["context"].rstrip("\n").split("(")[0]
        assert name in val and name not in train_names, name
        assert len(set(it["choices"])) == 4 and it["choices"][it["gold"]] == E.summary(val[name]["doc"])
    golds = [it["gold"] for it in items]
    assert all(golds.count(g) > len(items) / 8 for g in range(4)), "gold positions should be spread"
    assert shots and all(s["context"].rstrip("\n").split("(")[0] in train_names for s in shots[:50])
    assert any("(" in it["context"] for it in items), "headers should carry signatures as in the corpus"
    with contextlib.redirect_stdout(io.StringIO()):
        seen, none = E.pydocs_items(str(root), "train")
    assert none is None and len(seen) > len(items)
    assert all(it["context"].rstrip("\n").split("(")[0] in train_names for it in seen[:300])


def test_eval_task_readers_and_malformed_files():
    """Each reader takes the public format; a malformed file names file, line and field (exit 2)."""
    d = EVAL_TMP / "readers"
    d.mkdir(exist_ok=True)
    arc = d / "arc.jsonl"
    arc.write_text(json.dumps({"question": {"stem": "Which is a gas?", "choices": [
        {"text": "steam", "label": "A"}, {"text": "ice", "label": "B"}, {"text": "rock", "label": "C"}]},
        "answerKey": "A"}) + "\n\n" + json.dumps({"question": {"stem": "2+2?", "choices": [
            {"text": "4", "label": "1"}, {"text": "5", "label": "2"}]}, "answerKey": "1"}) + "\n")
    items = E.read_arc(arc)
    assert items[0] == {"context": "Question: Which is a gas?\nAnswer:", "choices": ["steam", "ice", "rock"], "gold": 0,
                        "delimiter": " "}
    assert items[1]["gold"] == 0 and len(items) == 2
    mmlu = d / "high_school_physics_test.csv"
    mmlu.write_text('"What is\nforce?",m*a,m/a,a/m,m+a,A\nUnit of charge?,volt,coulomb,ohm,watt,B\n')
    items = E.read_mmlu(mmlu)
    assert items[0]["context"] == "What is\nforce?\nA. m*a\nB. m/a\nC. a/m\nD. m+a\nAnswer:" and items[1]["gold"] == 1
    assert items[0]["prefix"].endswith("about high school physics.\n\n") and items[0]["choices"] == ["A", "B", "C", "D"]
    hs = d / "hs.jsonl"
    hs.write_text(json.dumps({"activity_label": "Baking", "ctx": "A man [title] mixes flour.", "endings":
                              ["He bakes.", "He [step] swims."], "label": "1"}) + "\n")
    assert E.read_hellaswag(hs) == [{"context": "Baking: A man. mixes flour.", "choices": ["He bakes.", "He swims."],
                                     "gold": 1, "delimiter": " "}]

    bad_hs = d / "bad_hs.jsonl"
    good = {"ctx": "x", "endings": ["a", "b"], "label": 0}
    bad_hs.write_text("\n".join(json.dumps(x) for x in [good, good, {"ctx": "x", "label": 0}]) + "\n")
    assert f"{bad_hs}:3: field 'endings' is missing" in expect_die(E.read_hellaswag, bad_hs)
    bad_hs.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 5}) + "\n")
    assert f"{bad_hs}:2: field 'label'" in expect_die(E.read_hellaswag, bad_hs)
    bad_hs.write_text(json.dumps(good) + "\n{not json\n")
    assert f"{bad_hs}:2: is not valid JSON" in expect_die(E.read_hellaswag, bad_hs)
    arc.write_text(json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"},
                                                                     {"text": "b", "label": "B"}]},
                               "answerKey": "E"}) + "\n")
    assert f"{arc}:1: field 'answerKey'" in expect_die(E.read_arc, arc)
    arc.write_text(json.dumps({"question": {"choices": []}, "answerKey": "A"}) + "\n")
    assert f"{arc}:1: field 'question.stem' is missing" in expect_die(E.read_arc, arc)
    mmlu.write_text("q,a,b,c,d,A\nq2,a,b,c,d,F\n")
    assert f"{mmlu}:2: field 'answer'" in expect_die(E.read_mmlu, mmlu)
    mmlu.write_text("q,a,b,c,d\n")
    assert f"{mmlu}:1: has 5 columns" in expect_die(E.read_mmlu, mmlu)
    gsm = d / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    assert f"{gsm}:1: field 'answer'" in expect_die(E.read_gsm8k, gsm)


def test_eval_downloads_through_prepare():
    """Task files come through common.download (here from a mirror on 127.0.0.1): HellaSwag as it is, MMLU's
    test CSVs out of its tar, ARC's JSONL out of its zip; once there, they are not fetched again."""
    site = EVAL_TMP / "mirror"
    site.mkdir(exist_ok=True)
    hellaswag_file(site / "hellaswag_val.jsonl", KNOWN[:3])
    (EVAL_TMP / "mm-src").mkdir(exist_ok=True)
    (EVAL_TMP / "mm-src" / "astronomy_test.csv").write_text("Which is a planet?,Mars,Sirius,Vega,Rigel,A\n")
    with tarfile.open(site / "data.tar", "w") as t:
        t.add(EVAL_TMP / "mm-src" / "astronomy_test.csv", "data/test/astronomy_test.csv")
        t.add(EVAL_TMP / "mm-src" / "astronomy_test.csv", "data/dev/astronomy_dev.csv")
    with zipfile.ZipFile(site / "ARC-V1-Feb2018.zip", "w") as z:
        z.writestr("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl", json.dumps(
            {"question": {"stem": "Hot?", "choices": [{"text": "sun", "label": "A"}, {"text": "ice", "label": "B"}]},
             "answerKey": "A"}) + "\n")

    server = static_server(site)
    old = (os.environ.get("PREPARE_MIRROR"), E.data_root, E.task_file)
    os.environ["PREPARE_MIRROR"] = f"http://127.0.0.1:{server.server_address[1]}"
    E.data_root, E.task_file = str(EVAL_TMP / "dl"), ""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            items, _ = E.load_task("hellaswag")
            assert len(items) == 3 and (EVAL_TMP / "dl" / "eval" / "hellaswag" / "hellaswag_val.jsonl").exists()
            items, _ = E.load_task("mmlu")
            assert [it["group"] for it in items] == ["astronomy"] and items[0]["gold"] == 0
            assert sorted(p.name for p in (EVAL_TMP / "dl" / "eval" / "mmlu" / "test").iterdir()) == ["astronomy_test.csv"]
            items, _ = E.load_task("arc_easy")
            assert items == [{"context": "Question: Hot?\nAnswer:", "choices": ["sun", "ice"], "gold": 0, "delimiter": " "}]
        assert "HTTP 404" in expect_die(E.load_task, "gsm8k")  # a file the mirror does not have
        server.shutdown()
        server.server_close()  # the files are here now: nothing is fetched again
        assert len(E.load_task("hellaswag")[0]) == 3 and len(E.load_task("mmlu")[0]) == 1
    finally:
        server.shutdown()
        server.server_close()
        E.data_root, E.task_file = old[1], old[2]
        if old[0] is None:
            os.environ.pop("PREPARE_MIRROR", None)
        else:
            os.environ["PREPARE_MIRROR"] = old[0]


def test_eval_malformed_task_file_exit_2():
    """Through the script: exit 2, one line naming file, line and field, before any model is loaded."""
    bad = EVAL_TMP / "bad_cli.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n"
                   + json.dumps({"ctx": "x", "endings": "ab", "label": 0}) + "\n")
    p = run_eval(f"--out_dir={EVAL_TMP}/no-model-here", "--tasks=hellaswag", f"--task_file={bad}")
    assert_clear_error(p, f"{bad}:2", "field 'endings'")
    assert_clear_error(run_eval("--tasks=hellaswag,bogus"), "bogus")
    assert_clear_error(run_eval("--tasks=hellaswag", f"--task_file={EVAL_TMP}/missing.jsonl"), "missing.jsonl")


# ----- eval: the judge: a fake OpenAI-compatible server on 127.0.0.1 -----


class FakeJudge:
    """Answers POST /v1/chat/completions by `mode`: 'good' (a score), 'words' (no score), 'malformed' (not a
    chat completion), 'slow' (too late), '503-then-good'. Records the requests it got."""

    def __init__(self):
        self.mode, self.requests, self.score = "good", [], "85"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                mode = outer.mode
                if mode == "503-then-good" and len(outer.requests) == 1:
                    return self.reply(503, b"busy")
                if mode == "slow":
                    time.sleep(1.0)
                if mode == "malformed":
                    return self.reply(200, b'{"id": "x", "object": "chat.completion"}')
                content = {"words": "The reply is quite good, I would say.", "slow": "50"}.get(mode, outer.score)
                data = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                self.reply(200, json.dumps(data).encode())

            def reply(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_eval_judge_parse_score():
    p = E.parse_score
    assert p("85") == 85 and p(" 85.\n") == 85 and p("Score: 70") == 70 and p("**Score:** 90/100") == 90
    assert p("100") == 100 and p("0") == 0 and p("72\n\nThe reply misses the unit.") == 72
    assert p("The reply is fine.\nScore: 60") == 60
    assert p("I'd give it 85 points") is None and p("") is None and p("150") is None
    assert p("1. The reply is wrong\n2. It is short") is None


def test_eval_judge_client_fake_server():
    with FakeJudge() as j:
        score, why, said = E.ask_judge(j.url, "judge-x", "grade this", timeout=5, retries=0)
        assert (score, why, said) == (85.0, None, "85")
        path, body = j.requests[-1]
        assert path == "/v1/chat/completions" and body["model"] == "judge-x"
        assert body["messages"] == [{"role": "user", "content": "grade this"}] and body["temperature"] == 0
        j.mode = "words"
        assert E.ask_judge(j.url + "/v1", "m", "p", timeout=5, retries=0)[:2] == (None, "no score in reply")
        j.mode = "malformed"
        assert E.ask_judge(j.url, "m", "p", timeout=5, retries=0)[:2] == (None, "malformed response")
        j.mode, n = "slow", len(j.requests)
        t0 = time.time()
        assert E.ask_judge(j.url, "m", "p", timeout=0.3, retries=1, backoff=0.05)[:2] == (None, "timeout")
        assert len(j.requests) - n == 2 and time.time() - t0 < 3  # tried twice, gave up
        j.mode, j.requests[:] = "503-then-good", []
        assert E.ask_judge(j.url + "/v1/chat/completions", "m", "p", timeout=5, retries=2, backoff=0.05)[0] == 85
        assert len(j.requests) == 2


@one_thread
def test_eval_judge_task_counts_unscored():
    """The judge task end to end in-process: replies without a score are counted and shown, not guessed."""
    model = known_model()
    convs = [[{"role": "user", "content": f"What is {k}?"}, {"role": "assistant", "content": color(k)}]
             for k in "abcd"]
    with FakeJudge() as j:
        E.judge_url, E.judge_timeout, E.judge_retries = j.url, 5.0, 0
        modes = iter(["good", "words", "good", "malformed"])
        orig = E.ask_judge

        def ask(*a, **kw):
            j.mode = next(modes)
            j.score = "40" if len(j.requests) else "80"
            return orig(*a, **kw)
        E.ask_judge = ask
        try:
            r = E.judge(model, BYTE, convs, False, "", 8, contextlib.nullcontext())
        finally:
            E.ask_judge = orig
        assert len(j.requests) == 4
        asked = j.requests[0][1]["messages"][0]["content"]
        assert "What is a?" in asked and f"Reference answer:\n{color('a')}" in asked
    assert r["score"] == 60.0 and r["scored"] == 2 and r["unscored"] == 2 and r["n"] == 4, r
    assert r["unscored_reasons"] == {"no score in reply": 1, "malformed response": 1}
    assert r["unscored_examples"][0]["judge_said"].startswith("The reply is quite good")


@one_thread
def test_eval_cli_judge_chat_checkpoint():
    """A chat checkpoint (as finetune.py writes: 'chat' and its config's data/val_frac): the script answers
    that data's held-out conversations in the chat template, the fake judge scores them, the table shows the
    unscored ones."""
    import chat_data as C
    data = EVAL_TMP / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name colour {k}.", "input": "", "output": color(k)}) + "\n"
                            for k in KNOWN))
    _, val = C.load_split(str(data), "data", 0.25, "sft")
    out = save_ckpt(known_model(), EVAL_TMP / "out-chat", chat=C.CHAT_TEMPLATE,
                    config={"data": str(data), "val_frac": 0.25, "system_prompt": ""})
    with FakeJudge() as j:
        j.mode = "words"
        p = run_eval(f"--out_dir={out}", "--tasks=judge", f"--judge_url={j.url}", "--judge_timeout=5",
                     "--max_new_tokens=4", "--device=cpu")
        asked = [body["messages"][0]["content"] for _, body in j.requests]
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(asked) == len(val) == 4
    assert {a.split("Instruction:\n")[1].split("\n")[0] for a in asked} == {c[0]["content"] for c in val}
    assert "chat template" in p.stdout and "unscored (4 no score in reply)" in p.stdout, p.stdout
    assert "The reply is quite good" in p.stdout  # shown, not guessed
    r = json.loads((out / "eval.json").read_text())["ckpt.pt"]["tasks"]["judge"]
    assert r["score"] is None and r["unscored"] == 4 and r["data"] == str(data)


@one_thread
def test_eval_cli_default_pydocs_tasks():
    """`python eval.py`'s tasks (pydocs multiple choice, pydocs bits per byte) on a model whose tokenizer is
    not the prepared data's: the val documents are made from the text and encoded with the model's own."""
    out = save_ckpt(known_model(), EVAL_TMP / "out-default")
    root = pydocs_root()
    p = run_eval(f"--out_dir={out}", f"--data_root={root}", "--limit=40", "--lm_max_tokens=3000", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "eval.json").read_text())["ckpt.pt"]["tasks"]
    assert r["pydocs"]["n"] == 40 and 0 <= r["pydocs"]["acc"] <= 1 and r["pydocs"]["chance"] == 0.25
    assert r["lm:pydocs"]["tokens"] == 3000 and r["lm:pydocs"]["data"] == "pydocs val (text)" and r["lm:pydocs"]["bpb"] > 0
    assert "pydocs" in p.stdout and "bpb" in p.stdout


def test_eval_unreachable_judge_exit_2():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    p = run_eval("--tasks=judge", f"--judge_url=http://127.0.0.1:{port}", f"--out_dir={EVAL_TMP}/no-model-here")
    assert_clear_error(p, "unreachable", f"127.0.0.1:{port}")
    assert_clear_error(run_eval("--tasks=judge"), "--judge_url")


# ----- eval: parity with transformers -----


@one_thread
def test_eval_loglikelihood_parity_with_transformers():
    """A random-init GPT2LMHeadModel imported through hf.load_hf: our per-option log-likelihoods (batched,
    padded) equal those computed directly with transformers, option by option."""
    tr = need_transformers()
    tok = T.get_tokenizer("gpt2") if (SHARED / "gpt2.tiktoken").exists() else BYTE
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=tok.eot_id + 1, n_positions=48,
                                          bos_token_id=None, eos_token_id=None))  # GPT-2's 50257: no chat tokens
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights big enough that a wrong mapping would show (as scramble() does)
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
    hf.eval()
    d = EVAL_TMP / "hf-gpt2"
    hf.save_pretrained(d)
    ours = H.load_hf(d).eval()
    items = [{"context": "The capital of France is", "choices": [" Paris", " a city in Europe", " 42"], "gold": 0},
             {"context": "def add(a, b):\n    return", "choices": [" a + b", " None"], "gold": 0},
             {"context": "Once upon a time " * 12, "choices": [" there was a cat.", " the end"], "gold": 1}]
    reqs = [E.encode_pair(tok, it["context"], it.get("delimiter", "") + c) for it in items for c in it["choices"]]
    assert any(len(c) + len(x) > 49 for c, x in reqs), "one request should need cutting to the context"
    got = E.loglikelihoods(ours, reqs, batch_tokens=100)
    for (ctx, cont), (s, n, _) in zip(reqs, got):
        full = (ctx + cont)[-49:]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([full[:-1]])).logits[0].float(), -1)
        k = min(len(cont), len(full) - 1)
        ref = sum(logp[len(full) - 1 - k + j, full[len(full) - k + j]].item() for j in range(k))
        assert n == k and abs(s - ref) < 1e-4, (s, ref)


def test_eval_cli_hf_gpt2_import():
    """--init_from=a Hugging Face GPT-2 directory (GPT-2's 50257 tokens, no chat tokens) scores plain-text
    tasks, and eval.json files it under that name."""
    tr = need_transformers()
    if not (SHARED / "gpt2.tiktoken").exists():
        raise unittest.SkipTest("../shared/data/gpt2.tiktoken not found")
    torch.manual_seed(0)
    d = EVAL_TMP / "hf-cli"
    tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)).save_pretrained(d)
    out = EVAL_TMP / "out-hf"
    p = run_eval(f"--init_from={d}", f"--out_dir={out}", "--tasks=hellaswag",
                 f"--task_file={hellaswag_file(EVAL_TMP / 'hs_hf.jsonl', KNOWN)}", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "eval.json").read_text())[str(d)]
    assert r["tasks"]["hellaswag"]["n"] == len(KNOWN) and r["step"] is None
    gsm = EVAL_TMP / "gsm_hf.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert_clear_error(run_eval(f"--init_from={d}", f"--out_dir={out}", "--tasks=gsm8k", "--chat=True",
                                f"--task_file={gsm}"), "chat tokens")


# ----- eval: code generation (humaneval, mbpp) and sandbox.py (-k code) -----

import sandbox as S

CODE_TMP = Path(tempfile.mkdtemp(prefix="fromscratch-code-tests-", dir=RUN_TMP))


def humaneval_items():
    return E.read_humaneval(shared_file("eval/HumanEval.jsonl.gz"))


def he0():
    """HumanEval/0 (has_close_elements), and its reference solution."""
    return next(it for it in humaneval_items() if it["task_id"] == "HumanEval/0")


def sandboxed(program, **kw):
    """run_python, and the temporary directory is gone afterwards, whatever happened."""
    kw.setdefault("timeout", 5)
    r = S.run_python(program, **kw)
    assert r.workdir and not os.path.exists(r.workdir), r.workdir
    return r


def live_processes(needle):
    """Processes whose command line holds needle (the sandbox's temporary directory)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if needle.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


# ----- code: pass@k -----


def test_code_pass_at_k_exact():
    """The Codex paper's unbiased estimator: 1 - C(n-c, k) / C(n, k)."""
    assert round(E.pass_at_k(10, 3, 5), 4) == 0.9167
    assert abs(E.pass_at_k(10, 3, 5) - (1 - math.comb(7, 5) / math.comb(10, 5))) < 1e-12  # 1 - 21/252
    assert E.pass_at_k(10, 10, 5) == 1.0 and E.pass_at_k(1, 1, 1) == 1.0  # c = n
    assert E.pass_at_k(10, 0, 5) == 0.0 and E.pass_at_k(100, 0, 100) == 0.0  # c = 0
    assert E.pass_at_k(10, 6, 5) == 1.0  # n - c < k: every draw of k holds a correct one
    for n in (1, 7, 20, 100):
        for c in range(n + 1):
            for k in (1, 5, 10, 100):
                if k <= n:
                    assert abs(E.pass_at_k(n, c, k) - (1 - math.comb(n - c, k) / math.comb(n, k))) < 1e-9
    assert E.pass_at_k(20, 5, 1) == 0.25  # pass@1 is c / n
    try:
        E.pass_at_k(3, 1, 5)
    except ValueError as e:
        assert "n=3" in str(e)
    else:
        raise AssertionError("n < k gave a value")


# ----- code: the real data -----


def test_code_humaneval_canonical_all_pass_stubs_none():
    """164 reference solutions pass, 164 `pass` stubs fail, all through the sandbox in parallel."""
    items = humaneval_items()
    assert len(items) == 164 and len({it["task_id"] for it in items}) == 164
    progs = [E.code_program("humaneval", it, it["canonical_solution"]) for it in items]
    progs += [E.code_program("humaneval", it, "    pass\n") for it in items]
    t0 = time.time()
    rs = E.run_programs(progs, workers=4, timeout=20)
    print(f"  humaneval: 328 programs in {time.time() - t0:.1f}s")
    good, stub = rs[:164], rs[164:]
    failed = [(it["task_id"], r.reason) for it, r in zip(items, good) if r.status != "pass"]
    assert failed == [], failed
    assert [it["task_id"] for it, r in zip(items, stub) if r.status == "pass"] == []


def test_code_mbpp_canonical_all_pass_stubs_none():
    """500 of the 500 test-split reference solutions pass (test_setup_code runs after the solution: task 367's
    builds trees of the class Node the solution defines; before it, 367 fails with a NameError) and no
    `pass` stub does. The file is the test split alone, so the prompt is zero-shot."""
    items, shots = E.read_mbpp(shared_file("eval/mbpp_test.jsonl"))
    assert len(items) == 500 and shots == []
    progs = [E.code_program("mbpp", it, it["code"]) for it in items]
    progs += [E.code_program("mbpp", it, "pass") for it in items]
    rs = E.run_programs(progs, workers=4, timeout=20)
    good, stub = rs[:500], rs[500:]
    failed = [(it["task_id"], r.reason) for it, r in zip(items, good) if r.status != "pass"]
    assert len(failed) == 0, failed
    assert [it["task_id"] for it, r in zip(items, stub) if r.status == "pass"] == []
    # the setup-before-solution order fails exactly the one task that has setup code
    t367 = next(it for it in items if it["task_id"] == 367)
    r = sandboxed(t367["test_setup_code"] + "\n" + t367["code"] + "\n" + "\n".join(t367["test_list"]))
    assert r.status == "fail" and "NameError" in r.reason and "Node" in r.reason, r


def test_code_mbpp_fewshot_from_the_prompt_split():
    """A file holding the prompt split (tasks 1-10) gives the standard 3-shot prompt with tasks 2, 3, 4 and
    asks only the test split (11-510)."""
    rows = [json.loads(l) for l in shared_file("eval/mbpp_test.jsonl").read_text().splitlines()[:3]]
    full = CODE_TMP / "mbpp_full.jsonl"
    fake = [dict(r, task_id=i) for i, r in zip((2, 3, 4), rows)] + [dict(rows[0], task_id=1)]
    fake += [rows[0], dict(rows[1], task_id=700)]
    full.write_text("".join(json.dumps(r) + "\n" for r in fake))
    asked, shots = E.read_mbpp(full)
    assert [s["task_id"] for s in shots] == [2, 3, 4] and [a["task_id"] for a in asked] == [11]
    p = E.code_prompt("mbpp", asked[0], shots)
    assert p.count("You are an expert Python programmer, and here is your task: ") == 4
    assert p.count("[DONE]") == 3 and p.endswith(rows[0]["test_list"][-1] + "\n[BEGIN]\n")
    assert p.startswith(f"You are an expert Python programmer, and here is your task: {rows[0]['text']} Your code "
                        f"should pass these tests:\n\n{rows[0]['test_list'][0]}\n")
    assert E.read_mbpp(shared_file("eval/mbpp_test.jsonl"))[1] == []  # the test split alone: zero-shot


def test_code_scoring_164_completions_cli_no_model():
    """`eval.py --tasks=humaneval --completions=FILE` with no checkpoint at all: the reference solutions as
    completions give pass@1 = 1, half of them broken give 0.5 (and pass@k per task with its own n)."""
    items = humaneval_items()
    good = CODE_TMP / "he_canonical.jsonl"
    good.write_text("".join(json.dumps({"task_id": it["task_id"], "completion": it["canonical_solution"]}) + "\n"
                            for it in items))
    out = CODE_TMP / "no-model"  # no ckpt.pt anywhere
    t0 = time.time()
    p = run_eval("--tasks=humaneval", f"--completions={good}", f"--task_file={shared_file('eval/HumanEval.jsonl.gz')}",
                 f"--out_dir={out}", "--code_workers=2")
    print(f"  164 completions scored by the CLI in {time.time() - t0:.1f}s")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "eval.json").read_text())["completions:he_canonical.jsonl"]["tasks"]["humaneval"]
    assert r["pass@1"] == 1.0 and r["n"] == 164 and r["samples"] == 1 and r["statuses"] == {"pass": 164}
    assert "pass@1 (n=1)" in p.stdout and "1.0000" in p.stdout
    # two samples per task: the reference and a wrong one (returns None): pass@1 = 0.5, pass@2 = 1
    two = CODE_TMP / "he_two.jsonl"
    two.write_text("".join(json.dumps({"task_id": it["task_id"], "completion": c}) + "\n"
                           for it in items[:20] for c in (it["canonical_solution"], "    return None\n")))
    p = run_eval("--tasks=humaneval", f"--completions={two}", f"--task_file={shared_file('eval/HumanEval.jsonl.gz')}",
                 f"--out_dir={out}", "--code_pass_k=1,2")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "eval.json").read_text())["completions:he_two.jsonl"]["tasks"]["humaneval"]
    assert r["pass@1"] == 0.5 and r["pass@2"] == 1.0 and r["n"] == 20 and r["samples"] == 2
    assert "144 of the 164 problems have no completion" in p.stdout
    recs = [json.loads(l) for l in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(recs) == 40 and [x["passed"] for x in recs[:4]] == [True, False, True, False]


def test_code_bad_input_one_line_exit_2():
    """A malformed task file (file:line:field), a completions file naming an unknown task id, n < k, and
    sampling options that cannot work: one line, exit code 2, no traceback, before any model loads."""
    rows = [json.loads(l) for l in gzip_lines(shared_file("eval/HumanEval.jsonl.gz"))[:3]]
    broken = CODE_TMP / "he_broken.jsonl"
    del rows[1]["test"]
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comp = CODE_TMP / "he_one.jsonl"
    comp.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"}) + "\n")
    assert_clear_error(run_eval("--tasks=humaneval", f"--task_file={broken}", f"--completions={comp}"),
                       f"{broken}:2: field 'test' is missing")
    unknown = CODE_TMP / "he_unknown.jsonl"
    unknown.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n"
                       + json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    he = f"--task_file={shared_file('eval/HumanEval.jsonl.gz')}"
    assert_clear_error(run_eval("--tasks=humaneval", he, f"--completions={unknown}"),
                       f"{unknown}:2: field 'task_id' 'HumanEval/999' is not a task of humaneval")
    assert_clear_error(run_eval("--tasks=humaneval", he, f"--completions={comp}", "--code_pass_k=1,10"),
                       "pass@10", "n = 1 (n < k)")
    # with a model to sample from (none here: these stop before it loads), in-process
    where = dict(tasks="humaneval", task_file=str(shared_file("eval/HumanEval.jsonl.gz")),
                 out_dir=str(CODE_TMP / "nothing-here"), code_samples=5, code_temperature=0.8, code_pass_k=10)
    with mock.patch.multiple(E, **where):
        assert "pass@10 needs at least 10 samples per problem, but n = 5 (n < k)" in expect_die(E.main)
    with mock.patch.multiple(E, **dict(where, code_temperature=0.0, code_pass_k=None)):
        assert "code_temperature" in expect_die(E.main)
    # in-process, the readers: bad JSON and a wrong type name the line and the field
    bad_json = CODE_TMP / "mbpp_bad.jsonl"
    bad_json.write_text('{"task_id": 1, "text": "t", "code": "c", "test_list": ["assert 1"]}\n{"task_id": 2,\n')
    assert f"{bad_json}:2: is not valid JSON" in expect_die(E.read_mbpp, bad_json)
    bad_json.write_text('{"task_id": 1, "text": "t", "code": "c", "test_list": "assert 1"}\n')
    assert f"{bad_json}:1: field 'test_list' should be a list" in expect_die(E.read_mbpp, bad_json)


def gzip_lines(path):
    import gzip
    return gzip.decompress(Path(path).read_bytes()).decode().splitlines()


def test_code_downloads_through_the_helper():
    """HumanEval and MBPP come through common.download (here from a mirror on 127.0.0.1) into
    data_root/eval/<task>/, as the other tasks' files; the .gz is read as it is."""
    site = CODE_TMP / "mirror"
    site.mkdir(exist_ok=True)
    (site / "HumanEval.jsonl.gz").write_bytes(shared_file("eval/HumanEval.jsonl.gz").read_bytes())
    (site / "mbpp.jsonl").write_text("".join(shared_file("eval/mbpp_test.jsonl").read_text().splitlines(True)[:5]))

    server = static_server(site)
    dl = CODE_TMP / "dl"
    try:
        with mock.patch.dict(os.environ, {"PREPARE_MIRROR": f"http://127.0.0.1:{server.server_address[1]}"}), \
                mock.patch.multiple(E, data_root=str(dl), task_file=""), contextlib.redirect_stderr(io.StringIO()):
            items, _ = E.load_task("humaneval")
            assert len(items) == 164 and (dl / "eval" / "humaneval" / "HumanEval.jsonl.gz").exists()
            items, shots = E.load_task("mbpp")
            assert len(items) == 5 and shots == [] and (dl / "eval" / "mbpp" / "mbpp.jsonl").exists()
    finally:
        server.shutdown()
        server.server_close()


# ----- code: generation end to end, with a model that knows two answers -----

ADD = ("def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "    return a + b\n")
SUB = ("def sub(a, b):\n    \"\"\"a minus b.\"\"\"\n", "    return a - b\n")
MUL = ("def mul(a, b):\n    \"\"\"a times b.\"\"\"\n", None)  # never taught


def coder_model():
    """A 2-layer byte model trained to complete ADD's and SUB's prompts, then <|endoftext|>: a few seconds."""
    torch.manual_seed(0)
    cfg = M.GPTConfig(vocab_size=BYTE.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48,
                      bias=False, norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=True)
    model = M.GPT(cfg)
    seqs = [(BYTE.encode(p), BYTE.encode(c) + [BYTE.eot_id]) for p, c in (ADD, SUB)]
    L = max(len(p) + len(c) for p, c in seqs)
    x = torch.zeros(len(seqs), L - 1, dtype=torch.long)
    y = torch.full((len(seqs), L - 1), -1, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        x[i, :len(p) + len(c) - 1] = torch.tensor((p + c)[:-1])
        y[i, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.random.fork_rng():
        for _ in range(400):
            logits, loss = model(x, y)
            # < 0.005: every taught token above 0.95, so top_p=0.95 sampling keeps only it (at 0.02 the '+'/'-'
            # token was 0.83-0.87 likely, and whether sampling picked the wrong one depended on the CPU)
            if bool((logits.argmax(-1) == y)[y != -1].all()) and loss.item() < 0.005:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert bool((logits.argmax(-1) == y)[y != -1].all()), "the coder model did not learn its answers"
    return model.eval()


@one_thread
def test_code_generate_sandbox_pass_at_k_end_to_end():
    """eval.py --tasks=humaneval on a checkpoint: greedy completions of the two taught problems pass, the
    untaught one fails (pass@1 = 2/3); sampled, 4 samples per problem are reproducible with the seed."""
    probs = CODE_TMP / "he_mini.jsonl"
    probs.write_text("".join(json.dumps({"task_id": f"Mini/{i}", "prompt": p, "entry_point": p[4:7],
                                         "canonical_solution": c or "    return a * b\n",
                                         "test": f"def check(f):\n    assert f(7, 3) == {v}\n"}) + "\n"
                             for i, ((p, c), v) in enumerate(zip((ADD, SUB, MUL), (10, 4, 21)))))
    out = save_ckpt(coder_model(), CODE_TMP / "coder")
    p = run_eval(f"--out_dir={out}", "--tasks=humaneval", f"--task_file={probs}", "--code_max_new_tokens=40",
                 "--device=cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "eval.json").read_text())["ckpt.pt"]["tasks"]["humaneval"]
    recs = [json.loads(l) for l in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in recs[:2]] == [ADD[1], SUB[1]], recs
    assert [x["passed"] for x in recs] == [True, True, False], recs
    assert abs(r["pass@1"] - 2 / 3) < 1e-9 and r["n"] == 3 and r["temperature"] == 0.0
    assert "pass@1 (n=1, T=0)" in p.stdout
    # sampling: 4 per problem, pass@1 and pass@4 from each problem's count, the same twice with the seed
    model = coder_model()
    items = E.read_humaneval(probs)
    a = E.code_generate(model, BYTE, "humaneval", items, [], 4, 1.0, 0.95, 40, contextlib.nullcontext())
    b = E.code_generate(model, BYTE, "humaneval", items, [], 4, 1.0, 0.95, 40, contextlib.nullcontext())
    assert a == b and all(len(v) == 4 for v in a.values()) and len(set(a["Mini/2"])) > 1, a
    # sample s of problem i is row i*4+s: each problem's samples come from its own prompt
    assert ADD[1] in a["Mini/0"] and SUB[1] not in a["Mini/0"], a
    assert SUB[1] in a["Mini/1"] and ADD[1] not in a["Mini/1"], a
    res, recs = E.score_code("humaneval", items, a, [1, 4], workers=2)
    c = [sum(x["passed"] for x in recs if x["task_id"] == it["task_id"]) for it in items]
    assert c[2] == 0 and len(recs) == 12  # mul was never taught
    assert abs(res["pass@1"] - np.mean([E.pass_at_k(4, x, 1) for x in c])) < 1e-12
    assert abs(res["pass@4"] - np.mean([E.pass_at_k(4, x, 4) for x in c])) < 1e-12


# ----- code: the sandbox contains what a completion may do -----


def test_code_sandbox_infinite_loop_killed_in_time():
    t0 = time.time()
    r = sandboxed("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and "1.5 s" in r.reason, r
    assert time.time() - t0 < 1.5 + 1.0, time.time() - t0
    # a loop that ignores SIGTERM and sleeps in a child that left the process group is killed as well
    r = sandboxed("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "if os.fork() == 0:\n    os.setsid()\n    print('child', flush=True)\n    time.sleep(60)\n"
                  "time.sleep(60)\n", timeout=1.5)
    assert r.status == "timeout" and "child" in r.stdout, r
    time.sleep(0.2)
    assert live_processes(r.workdir) == [], "a sandboxed process outlived its run"


def test_code_sandbox_fork_bomb_contained():
    """Every process forks until the process limit stops it; at the timeout all of them are gone."""
    r = sandboxed("import os, time\nfor _ in range(1000):\n    try:\n        if os.fork() == 0:\n"
                  "            print('forked', flush=True)\n    except OSError:\n        pass\ntime.sleep(60)\n",
                  timeout=2, max_procs=16)
    assert r.status == "timeout", r
    assert 1 <= r.stdout.count("forked") < 16, r.stdout.count("forked")  # the limit held
    time.sleep(0.2)
    assert live_processes(r.workdir) == []
    assert sandboxed("print('after')").stdout == "after\n"  # the machine can still start processes


def test_code_sandbox_memory_and_file_size_bombs():
    t0 = time.time()
    r = sandboxed("a = []\nfor _ in range(24):\n    a.append(bytearray(64 << 20))\n", memory_mb=512)  # 1.5 GB
    assert r.status == "fail" and "MemoryError" in r.reason and time.time() - t0 < 5, r
    r = sandboxed("open('big', 'wb').write(b'x' * (64 << 20))\n", max_file_mb=8)
    assert r.status == "fail" and "File too large" in r.reason, r  # Python ignores SIGXFSZ: the write fails
    t0 = time.time()
    r = sandboxed("while True:\n    pass\n", timeout=10, cpu_seconds=1)
    assert r.status == "fail" and "SIGXCPU (CPU time limit)" in r.reason and time.time() - t0 < 5, r


def test_code_sandbox_files_outside_the_workdir():
    """With a uid of its own (this process is root) the program cannot write into the test's folders nor
    delete or change the test's canary; without one (not root) it could, and the test says so."""
    caps = S.capabilities()
    d = CODE_TMP / "outside"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)  # readable by all, writable by its owner only
    canary = d / "canary.txt"
    canary.write_text("alive")
    os.chmod(canary, 0o644)
    r = sandboxed(f"import os\nopen({str(d / 'escaped.txt')!r}, 'w').write('x')\n")
    r2 = sandboxed(f"import os\nos.remove({str(canary)!r})\n")
    r3 = sandboxed(f"open({str(canary)!r}, 'w').write('dead')\n")
    r4 = sandboxed(f"open({str(CODE_TMP / 'escaped.txt')!r}, 'w').write('x')\n")  # a 0700 folder of root's
    r5 = sandboxed("open('inside.txt', 'w').write('ok')\nimport os\nassert os.listdir('.') == ['inside.txt']\n")
    assert r5.status == "pass", r5  # its own working directory: empty at the start, writable
    if caps["drop_uid"]:
        for x in (r, r2, r3, r4):
            assert x.status == "fail" and "PermissionError" in x.reason, x
        assert not (d / "escaped.txt").exists() and not (CODE_TMP / "escaped.txt").exists()
        assert canary.read_text() == "alive"
        assert "uid 0" not in sandboxed("import os\nprint('uid', os.getuid())").stdout
    else:
        print("  note: not root, no uid of its own: the program can write where this user can")
        assert r.status == "pass" and (d / "escaped.txt").exists()


def test_code_sandbox_environment_and_secrets():
    """A secret in the parent's environment is in neither os.environ nor /proc of the sandbox, and the
    parent's /proc/PID/environ cannot be read (another uid)."""
    secret = "sk-fake-" + os.urandom(8).hex()
    os.environ["FAKE_API_KEY_FOR_TEST"] = secret
    try:
        r = sandboxed("import os\nprint(dict(os.environ))\n"
                      "for p in ('/proc/self/environ', '/proc/%d/environ'):\n    try:\n"
                      "        print(open(p, 'rb').read())\n    except OSError as e:\n"
                      "        print(p, type(e).__name__)\n" % os.getpid())
    finally:
        del os.environ["FAKE_API_KEY_FOR_TEST"]
    assert r.status == "pass", r
    assert secret not in r.stdout and "FAKE_API_KEY" not in r.stdout
    env = ast_literal(r.stdout.splitlines()[0])
    assert set(env) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"} and env["PATH"] == "/usr/bin:/bin", env
    if S.capabilities()["drop_uid"]:
        assert f"/proc/{os.getpid()}/environ PermissionError" in r.stdout, r.stdout
    r = sandboxed("import sys\nx = sys.stdin.read()\nassert x == '', x\n")  # stdin is /dev/null
    assert r.status == "pass", r


def ast_literal(s):
    import ast
    return ast.literal_eval(s)


def test_code_sandbox_network():
    """A server listens on 127.0.0.1: from the sandbox the connection fails when a network namespace could be
    made (detected at run time); otherwise it connects, and the test says so."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        r = sandboxed(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                      "s.sendall(b'leak')\n")
        try:
            conn, _ = srv.accept()
            conn.close()
            accepted = True
        except socket.timeout:
            accepted = False
    finally:
        srv.close()
    if S.capabilities()["net_isolated"]:
        assert r.status == "fail" and ("unreachable" in r.reason or "OSError" in r.reason), r
        assert not accepted
    else:
        print("  note: no network namespace here: the sandbox can reach 127.0.0.1")
        assert r.status == "pass" and accepted


def test_code_sandbox_exit_tricks_do_not_pass():
    """Exit code 0 alone is never a pass: sys.exit(0) (in the completion or inside check), os._exit(0),
    a fork whose child runs to the end while the parent exits 0, a printed or guessed token."""
    it = he0()
    good = it["canonical_solution"]
    assert sandboxed(E.code_program("humaneval", it, good)).status == "pass"
    tricks = {
        "sys.exit in the function": "    import sys\n    sys.exit(0)\n",
        "sys.exit at module level": good + "import sys\nsys.exit(0)\n",
        "os._exit before the check": "    return True\nimport os\nos._exit(0)\n",
        "os._exit in the function": "    import os\n    os._exit(0)\n",
        "os._exit(0) in an atexit": "    return True\nimport atexit, os\natexit.register(os._exit, 0)\n",
        "fork: the child exits 0 first": "    return True\nimport os, time\nif os.fork() == 0:\n    os._exit(0)\n"
                                         "time.sleep(0.1)\n",
        "print a token": "    return True\nimport os\nprint('PASS ' + 'a' * 32)\nos._exit(0)\n",
        "write guessed tokens": "    return True\nimport os\nfor fd in range(3, 64):\n    try:\n"
                                "        os.write(fd, b'PASS ' + b'0' * 32)\n    except OSError:\n        pass\n"
                                "os._exit(0)\n",
    }
    for name, comp in tricks.items():
        r = sandboxed(E.code_program("humaneval", it, comp))
        assert r.status == "fail", (name, r)


def test_code_sandbox_monkey_patching_does_not_pass():
    """Replacing builtins, AssertionError, print, sys.stdout, os.write or os._exit does not turn a wrong
    answer into a pass, nor a right one into a failure (the launcher keeps its own references)."""
    it = he0()
    patch = ("import builtins, io, os, sys\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
             "builtins.print = lambda *a, **k: None\nsys.stdout = io.StringIO()\nsys.stderr = io.StringIO()\n"
             "os.write = lambda fd, b: len(b)\nos._exit = lambda code: None\nsys.exit = lambda *a: None\n"
             "builtins.BaseException = type('B', (Exception,), {})\nbuiltins.type = lambda *a: int\n")
    wrong = "    return True\n" + patch
    r = sandboxed(E.code_program("humaneval", it, wrong))
    assert r.status == "fail" and "AssertionError" in r.reason, r
    right = it["canonical_solution"] + patch
    assert sandboxed(E.code_program("humaneval", it, right)).status == "pass"
    # assert statements stay on (no -O, PYTHONOPTIMIZE never reaches the child)
    os.environ["PYTHONOPTIMIZE"] = "2"
    try:
        assert sandboxed("assert False, 'checked'").status == "fail"
    finally:
        del os.environ["PYTHONOPTIMIZE"]
    # the known limit (not a security sandbox): an object that equals everything satisfies `==` checks
    always = "    class A:\n        __eq__ = lambda s, o: True\n    return A()\n"
    assert sandboxed(E.code_program("humaneval", it, always)).status == "pass"


def test_code_sandbox_output_flood():
    """100 MB on stdout (and on stderr): the run is killed at the cap, the parent keeps only the cap."""
    for stream in ("stdout", "stderr"):
        t0 = time.time()
        r = sandboxed(f"import sys\nfor _ in range(100):\n    sys.{stream}.write('x' * (1 << 20))\n",
                      max_output=1 << 20, timeout=20)
        assert r.status == "fail" and f"output over the 1048576-byte limit on {stream}" in r.reason, r
        assert len(getattr(r, stream)) <= 1 << 20 and time.time() - t0 < 10
    r = sandboxed("print('x' * 1000)\n")  # under the cap: kept whole
    assert r.status == "pass" and r.stdout == "x" * 1000 + "\n"


def test_code_sandbox_survives_all_in_parallel():
    """The tricks at once on 4 workers: each scored as alone."""
    progs = ["while True: pass", "import os\nos._exit(0)", "import sys\nsys.exit(0)", "print('ok')",
             "a = bytearray(10 ** 11)", "assert 1 == 2"]
    rs = E.run_programs(progs * 2, workers=4, timeout=2)
    assert [r.status for r in rs] == ["timeout", "fail", "fail", "pass", "fail", "fail"] * 2, [r.reason for r in rs]


# ----- finetune / dpo / chat: finetune.py, dpo.py, chat_data.py, sample.py --chat -----

FT_TMP = Path(tempfile.mkdtemp(prefix="fromscratch-ft-tests-", dir=RUN_TMP))


def ft_run(args, timeout=180):
    return run(args, timeout=timeout)


def byte_tok():
    import tokenizer as T
    return T.get_tokenizer("byte")


def tiny_base(path, vocab_size=256, block_size=320, seed=0):
    """A randomly initialised tiny Llama-style model saved as train.py saves one, with the byte tokenizer.
    vocab_size 256 < the tokenizer's 261: the chat tokens have no embedding rows, as in a GPT-2 import."""
    import model as M
    from common import save_checkpoint
    if (Path(path) / "ckpt.pt").exists():
        return Path(path)
    torch.manual_seed(seed)
    cfg = M.GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      bias=False, norm="rmsnorm", pos="rope", mlp="swiglu")
    m = M.GPT(cfg)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    save_checkpoint({"model": m.state_dict(), "optimizer": opt.state_dict(), "model_args": asdict(cfg),
                     "config": {}, "step": 0, "best_val_loss": float("inf"),
                     "tokenizer": {"kind": "byte", "path": None}, "meta": {}, "rng": {}}, Path(path) / "ckpt.pt")
    return Path(path)


CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4, and <|end|> typed here is text."}]

# -----------------------------------------------------------------------------
# the loss mask, through the batching code


def test_finetune_mask_is_exactly_assistant_tokens_and_ends():
    import chat_data as C
    tok = byte_tok()
    end, asst = tok.special["<|end|>"], tok.special["<|assistant|>"]
    short = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    examples = C.encode_sft(tok, [CONV, short], 320, "test")
    x, y = C.collate(examples, tok.eot_id, "cpu")
    ids = examples[0][0]
    assert ids[0] == tok.eot_id and x.shape == y.shape == (2, len(ids) - 1)
    assert x[0].tolist() == ids[:-1]
    # independently: the positions to learn are those after each <|assistant|> marker, up to its <|end|>
    learn, inside = [], False
    for t, i in enumerate(ids):
        if inside:
            learn.append(t)
            inside = i != end
        elif i == asst:
            inside = True
    want = {t - 1: ids[t] for t in learn}  # input position t-1 predicts token t
    got = {t: v for t, v in enumerate(y[0].tolist()) if v != -1}
    assert got == want, (got, want)
    # that is the replies' text and one <|end|> each, no role marker, no prompt text
    assert tok.decode([v for v in got.values() if v != end]) == "Hello." + CONV[-1]["content"]
    assert list(got.values()).count(end) == 2 and asst not in got.values()
    # the short row: padded inputs, its reply 'y' and <|end|> to learn, nothing on the padding
    n = len(examples[1][0]) - 1
    assert [v for v in y[1].tolist() if v != -1] == tok.encode("y") + [end]
    assert (y[1, n:] == -1).all() and (x[1, n:] == tok.eot_id).all()


def test_finetune_padding_does_not_leak():
    """A padded row's logits equal the same example's logits alone: no attention to the padding."""
    import chat_data as C
    import model as M
    tok = byte_tok()
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(vocab_size=320, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    short = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ex = C.encode_sft(tok, [CONV, short], 127, "test")
    x, _ = C.collate(ex, tok.eot_id, "cpu")
    xs, _ = C.collate(ex[1:], tok.eot_id, "cpu")
    with torch.no_grad():
        both, alone = m(x)[0], m(xs)[0]
    assert torch.allclose(both[1, :xs.size(1)], alone[0], atol=1e-5)


def test_finetune_truncation_is_counted_and_mask_cut_with_it():
    import chat_data as C
    tok = byte_tok()
    long = [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 100}]
    no_room = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a"}]
    out = io.StringIO()
    with redirect_stdout(out):
        ex = C.encode_sft(tok, [long, no_room, CONV[:3]], 40, "test")
    assert "truncated 2 of 3 examples" in out.getvalue() and "dropped 1" in out.getvalue(), out.getvalue()
    assert len(ex) == 2 and all(len(ids) <= 41 and len(ids) == len(mask) for ids, mask in ex)
    ids, mask = ex[0]
    assert sum(mask) == 41 - 1 - 1 - 10 - 1 - 1  # eot, <|user|>, 10 q, <|end|>, <|assistant|>: the rest is reply


# -----------------------------------------------------------------------------
# readers


def test_finetune_readers_formats():
    import chat_data as C
    d = FT_TMP / "formats"
    d.mkdir(exist_ok=True)
    (d / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"},
                                               {"instruction": "Say hi", "output": "hi"}] * 5))
    (d / "chat.jsonl").write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(4)) + "\n\n")
    tr, va = C.load_split(str(d / "alpaca.json"), str(d), 0.2, "sft")
    assert len(tr) == 8 and len(va) == 2
    assert {"role": "user", "content": "Add\n\n1 2"} in [c[0] for c in tr + va]
    assert {"role": "user", "content": "Say hi"} in [c[0] for c in tr + va]
    tr, va = C.load_split(str(d / "chat.jsonl"), str(d), 0.25, "sft")
    assert tr[0] == CONV and len(tr) == 3 and len(va) == 1
    hh_c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water."
    hh_r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: No."
    pair = C.preference_pair({"chosen": hh_c, "rejected": hh_r}, "x")
    assert pair == {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "How do I bake bread?"}],
                    "chosen": "Mix flour and water.", "rejected": "No."}
    assert C.preference_pair({"chosen": hh_c, "rejected": "\n\nHuman: other\n\nAssistant: No."}, "x") is None
    assert C.preference_pair({"instruction": "I", "input": "", "chosen": "c", "rejected": "r"}, "x")["prompt"] == \
        [{"role": "user", "content": "I"}]
    assert C.preference_pair({"prompt": CONV[:2], "chosen": "c", "rejected": "r"}, "x")["prompt"] == CONV[:2]
    # the split depends only on the number of records: same-length files split alike
    a, b = C.split_records(list(range(50)), 0.1), C.split_records([str(i) for i in range(50)], 0.1)
    assert [str(i) for i in a[1]] == b[1] and len(a[1]) == 5


def test_finetune_pydocs_qa_and_pref_builders():
    import chat_data as C
    import prepare
    root = FT_TMP / "pydocs-root"
    raw = root / "pydocs" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    recs = []
    for g in range(12):
        objs = [[f"mod{g}.f{k}", f"Does thing {g}.{k}\nacross two lines.\n\nMore detail."] for k in range(3)]
        objs.append([f"mod{g}.same", "Shared docstring."])
        recs.append({"name": f"mod{g}", "group": f"mod{g}", "text": "...", "objects": objs})
    (raw / "pydocs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    qa = C.pydocs_qa(root, 0.5)
    split_of = {d["name"]: d["split"] for d in prepare.pydocs_records(raw, 0.5)}
    assert {"train", "val"} == set(split_of.values())  # both splits exist with these 12 modules
    assert len(qa) == 48
    q = next(q for q in qa if q["name"] == "mod3.f1")
    assert q["prompt"] == "What does `mod3.f1` do?" and q["answer"] == "Does thing 3.1 across two lines."
    assert all(q["split"] == split_of[q["name"].split(".")[0]] for q in qa)  # split by module, as pretraining
    pref = C.pydocs_pref(root, 0.5)
    assert pref == C.pydocs_pref(root, 0.5)  # deterministic
    answers = {(q["prompt"], q["split"]): q["answer"] for q in qa}
    for p in pref:
        assert p["chosen"] == answers[(p["prompt"], p["split"])] and p["rejected"] != p["chosen"]
        assert p["rejected"] in {a for (_, s), a in answers.items() if s == p["split"]}  # another object's, same split
    train, val = C.load_split("pydocs-pref", root, 0.5, "pref")
    assert len(train) + len(val) == len(pref) == 48 and val[0]["prompt"][0]["role"] == "user"


# -----------------------------------------------------------------------------
# DPO losses


def test_dpo_losses_equal_their_formulas():
    import chat_data as C
    pi_c, pi_r = torch.tensor([-10.0, -3.0, -50.0, -7.5]), torch.tensor([-12.0, -2.0, -40.0, -7.5])
    ref_c, ref_r = torch.tensor([-11.0, -3.5, -45.0, -8.0]), torch.tensor([-11.5, -2.5, -44.0, -6.0])
    sig = lambda z: 1 / (1 + math.exp(-z))
    for beta in (0.1, 0.5):
        hs = [(a - b) - (c - d) for a, b, c, d in zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist())]
        want = {"sigmoid": [-math.log(sig(beta * h)) for h in hs],
                "ipo": [(h - 1 / (2 * beta)) ** 2 for h in hs],
                "hinge": [max(0.0, 1 - beta * h) for h in hs]}
        for kind, w in want.items():
            losses, r_c, r_r = C.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, kind)
            assert torch.allclose(losses, torch.tensor(w), atol=1e-5), (kind, losses, w)
            assert torch.allclose(r_c, beta * (pi_c - ref_c)) and torch.allclose(r_r, beta * (pi_r - ref_r))
        eps = 0.2
        smooth = [-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)) for h in hs]
        losses, _, _ = C.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "sigmoid", eps)
        assert torch.allclose(losses, torch.tensor(smooth), atol=1e-5)


def test_dpo_policy_equal_reference_is_ln2_and_gradients_reach_policy_only():
    import chat_data as C
    import model as M
    tok = byte_tok()
    torch.manual_seed(0)
    policy = M.GPT(M.GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "good" * (i + 1), "rejected": "bad"}
             for i in range(3)]
    enc = C.encode_pairs(tok, pairs, 63, "test")
    x, y = C.pair_batch(enc, tok.eot_id, "cpu")
    with torch.no_grad():  # the reference: the same weights, scored once, no graph
        ref = C.sequence_logps(policy(x)[0], y)
    lp = C.sequence_logps(policy(x)[0], y)
    n = len(enc)
    # the sum over each reply's tokens and its <|end|>: compare with a per-token loop
    logits = policy(x)[0].detach()
    by_hand = sum(torch.log_softmax(logits[0, t], -1)[y[0, t]].item() for t in range(y.size(1)) if y[0, t] != -1)
    assert abs(lp[0].item() - by_hand) < 1e-3
    losses, r_c, r_r = C.dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta=0.1)
    assert torch.allclose(losses, torch.full((n,), math.log(2)), atol=1e-6) and (r_c == 0).all()
    losses.mean().backward()
    assert not ref.requires_grad and ref.grad is None
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# -----------------------------------------------------------------------------
# end to end on CPU: tiny model from random init, the shared instruction data


def _sft_args(base, out):
    return ["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={shared_file('instruction-data.json')}",
            "--max_iters=40", "--eval_interval=20", "--batch_size=8", "--learning_rate=3e-3", "--warmup_iters=5",
            "--device=cpu", "--log_interval=20"]


def _sft_model():
    """The SFT checkpoint of the tiny model, made once per test run."""
    base, out = tiny_base(FT_TMP / "base"), FT_TMP / "sft"
    if not (out / "ckpt.pt").exists():
        p = ft_run(_sft_args(base, out))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        (out / "stdout.txt").write_text(p.stdout)
    return base, out


def test_finetune_e2e_lowers_held_out_masked_loss():
    base, out = _sft_model()
    before = (base / "ckpt.pt").read_bytes()
    metrics = [json.loads(l) for l in open(out / "metrics.jsonl")]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 20, 40]
    assert min(vals[1:]) < vals[0] - 1.0, vals  # from ~ln(261) towards byte-level English
    stdout = (out / "stdout.txt").read_text()
    assert "growing the embeddings to 320 rows" in stdout  # the chat tokens got rows
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["chat"]["stop"] == "<|end|>" and ck["model_args"]["vocab_size"] == 320
    assert ck["finetune"][-1]["stage"] == "sft" and ck["finetune"][-1]["val_loss"] == min(vals[1:])
    assert (base / "ckpt.pt").read_bytes() == before  # the base is untouched
    # the checkpoint loads like any other
    m, _, tok = H.load_model("resume", out, "cpu")
    assert m.config.vocab_size == 320 and tok.n_vocab == 261


def test_finetune_with_muon_lowers_held_out_masked_loss():
    """finetune.py --optimizer=muon (Muon on the blocks' matrices, AdamW on the rest) learns as AdamW does:
    held-out masked loss down by > 1 nat in 20 steps; its checkpoint keeps both optimizers' states; an unknown
    optimizer is one clear line."""
    base = tiny_base(FT_TMP / "base")
    out = FT_TMP / "sft-muon"
    args = [a for a in _sft_args(base, out) if not a.startswith(("--max_iters", "--eval_interval"))]
    p = run([*args, "--max_iters=20", "--eval_interval=20", "--optimizer=muon", "--muon_lr=0.01"])
    assert p.returncode == 0, p.stderr[-2000:]
    vals = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert vals[-1] < vals[0] - 1.0, vals
    assert set(torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]) == {"adamw", "muon"}
    assert_clear_error(run([*args, "--optimizer=lion", f"--out_dir={FT_TMP / 'sft-lion'}"]), "'adamw' or 'muon'")


def test_dpo_e2e_raises_held_out_preference_accuracy():
    _, sft = _sft_model()
    out = FT_TMP / "dpo"
    p = ft_run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}",
             f"--data={shared_file('instruction-data-with-preference.json')}", "--max_pairs=400",
             "--max_iters=100", "--eval_interval=50", "--batch_size=8", "--learning_rate=3e-3", "--beta=0.5",
             "--device=cpu", "--log_interval=50"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    evals = [json.loads(l) for l in open(out / "metrics.jsonl")]
    evals = [m for m in evals if "val/loss" in m]
    first, last = evals[0], evals[-1]
    # at step 0 the policy is the reference: every reward is 0, the loss is ln 2
    assert first["step"] == 0 and abs(first["val/loss"] - math.log(2)) < 1e-6 and first["val/rewards/margins"] == 0
    # after DPO on held-out pairs: the implicit reward ranks chosen above rejected far more often than
    # the reference (0: it ties everywhere) and than chance, with a positive margin and a lower loss
    # (measured: val reward accuracy 0.80, margin +1.83, loss 0.556; train accuracy 0.85. The bounds sit about
    # halfway between that and no learning at all, so a real regression crosses them and a changed
    # summation order does not)
    assert last["val/rewards/accuracy"] > 0.7, last
    assert last["val/rewards/margins"] > 1.0 and last["val/loss"] < 0.62, last
    assert last["train/rewards/accuracy"] > 0.75 and last["train/rewards/margins"] > 1.2, last
    # the model's own preference (log p(chosen) > log p(rejected)) moves by a pair or so at this size (0.391 ->
    # 0.400 of 110): it must not fall by more than noise
    assert last["val/pref_accuracy"] >= first["val/pref_accuracy"] - 0.02, (first, last)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert [f["stage"] for f in ck["finetune"]] == ["sft", "dpo"]
    assert ck["finetune"][-1]["val"]["rewards/accuracy"] > ck["finetune"][-1]["val_before"]["rewards/accuracy"]


def test_dpo_scores_with_dropout_off():
    """DPO compares the policy's log-probs with the reference's, so both are taken with dropout off, also
    for the training forward: from an SFT model with dropout 0.5 and learning rate 0, the policy equals the
    reference, so the first train step's loss is exactly ln 2 and its margin 0 (dropout on would move both)."""
    _, sft = _sft_model()
    src = FT_TMP / "sft-dropout"
    if not (src / "ckpt.pt").exists():
        ck = torch.load(sft / "ckpt.pt", weights_only=True)
        ck["model_args"]["dropout"] = 0.5
        from common import save_checkpoint
        save_checkpoint(ck, src / "ckpt.pt")
    out = FT_TMP / "dpo-dropout"
    p = ft_run(["dpo.py", f"--init_from={src}", f"--out_dir={out}", "--overwrite=True",
                f"--data={shared_file('instruction-data-with-preference.json')}", "--max_pairs=16", "--eval_pairs=8",
                "--max_iters=2", "--eval_interval=2", "--batch_size=4", "--grad_accum=2", "--learning_rate=0",
                "--min_lr=0", "--warmup_iters=0", "--device=cpu", "--log_interval=1"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [r for r in m if "loss" in r]
    assert len(steps) == 2 and all(abs(r["loss"] - math.log(2)) < 1e-5 and abs(r["rewards/margins"]) < 1e-4 for r in steps), \
        steps  # (not bit-exact: the reference was scored in other batches, with other padding)
    evals = [r for r in m if "val/loss" in r]
    assert all(abs(r["val/loss"] - math.log(2)) < 1e-5 for r in evals), evals


def test_dpo_ipo_rewards_are_per_token_means_end_to_end():
    """dpo.py --loss_type=ipo scores replies by their per-token mean log-prob (as TRL): the held-out rewards it
    logs equal beta * (mean log pi - mean log ref) recomputed here from its checkpoint and the SFT model's."""
    import chat_data as C
    _, sft = _sft_model()
    out, beta, data = FT_TMP / "dpo-ipo", 0.5, str(shared_file("instruction-data-with-preference.json"))
    p = ft_run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}", "--overwrite=True", f"--data={data}",
                "--loss_type=ipo", f"--beta={beta}", "--max_pairs=16", "--eval_pairs=8", "--max_iters=2",
                "--eval_interval=2", "--batch_size=4", "--learning_rate=1e-3", "--warmup_iters=0", "--device=cpu"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    logged = [json.loads(l) for l in open(out / "metrics.jsonl") if "val/loss" in l][-1]
    policy, _, tok = H.load_model("resume", out, "cpu")
    ref, _, _ = H.load_model("resume", sft, "cpu")
    _, val = C.load_split(data, "data", 0.1, "pref")
    pairs = C.encode_pairs(tok, C.spread(val, 8), policy.config.block_size, "val")
    x, y = C.pair_batch(pairs, tok.eot_id, "cpu")
    with torch.no_grad():
        lp, lr_ = (C.sequence_logps(m.eval()(x)[0], y, average=True) for m in (policy, ref))
    n = len(pairs)
    want = beta * (lp[:n] - lr_[:n]).mean().item(), beta * (lp[n:] - lr_[n:]).mean().item()
    got = logged["val/rewards/chosen"], logged["val/rewards/rejected"]
    assert abs(got[0] - want[0]) < 1e-4 and abs(got[1] - want[1]) < 1e-4 and abs(want[0]) > 1e-3, (got, want)


# -----------------------------------------------------------------------------
# bad input: clear errors, exit 2, nothing overwritten


def test_finetune_bad_records_name_file_record_field():
    base = tiny_base(FT_TMP / "base")
    bad = FT_TMP / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "c", "input": "d"}]))
    out = FT_TMP / "sft-bad"
    assert_clear_error(run_here("finetune.py", [f"--init_from={base}", f"--out_dir={out}", f"--data={bad}", "--device=cpu"]),
                       str(bad), "record 3", "'output'")
    assert not (out / "ckpt.pt").exists()
    # a checkpoint already there survives a failed run even with overwrite=True
    out.mkdir(exist_ok=True)
    (out / "ckpt.pt").write_bytes(b"precious")
    assert_clear_error(run_here("finetune.py", [f"--init_from={base}", f"--out_dir={out}", f"--data={bad}",
                            "--overwrite=True", "--device=cpu"]), "record 3")
    assert_clear_error(run_here("finetune.py", [f"--init_from={base}", f"--out_dir={out}", f"--data={bad}",
                            "--device=cpu"]), "already exists")
    assert (out / "ckpt.pt").read_bytes() == b"precious"
    jl = FT_TMP / "bad.jsonl"
    jl.write_text(json.dumps({"messages": CONV}) + "\n" + "{not json\n")
    assert_clear_error(run_here("finetune.py", [f"--init_from={base}", f"--out_dir={out}-2", f"--data={jl}",
                            "--device=cpu"]), str(jl), "record 2")
    assert_clear_error(run_here("finetune.py", [f"--init_from={base}", f"--out_dir={base}", "--device=cpu"]), "base")
    assert_clear_error(run_here("finetune.py", [f"--init_from={FT_TMP / 'nothing'}", f"--out_dir={out}-3", "--device=cpu"]),
                       "no checkpoint", "train.py")


def test_dpo_bad_input_and_without_sft():
    base = tiny_base(FT_TMP / "base")
    pref = FT_TMP / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    out = FT_TMP / "dpo-bad"
    # the pretrained base has no chat template (and no chat-token rows): run SFT first
    assert_clear_error(run_here("dpo.py", [f"--init_from={base}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       "run SFT first", "finetune.py")
    _, sft = _sft_model()
    assert_clear_error(run_here("dpo.py", [f"--init_from={sft}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       str(pref), "record 2", "'rejected'")
    pref.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    assert_clear_error(run_here("dpo.py", [f"--init_from={sft}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       "record 1", "'prompt'")
    assert_clear_error(run_here("dpo.py", [f"--init_from={sft}", f"--out_dir={out}", "--loss_type=kto", "--device=cpu"]),
                       "loss_type")
    assert not (out / "ckpt.pt").exists()
    before = (sft / "ckpt.pt").read_bytes()  # the SFT model's own directory is never the output
    assert_clear_error(run_here("dpo.py", [f"--init_from={sft}", f"--out_dir={sft}", "--device=cpu"]), "SFT model")
    assert (sft / "ckpt.pt").read_bytes() == before


# -----------------------------------------------------------------------------
# sample.py --chat


def test_chat_sample_multi_turn_streams_and_stops_at_end():
    """A tiny model fine-tuned on a few memorable conversations: a scripted reply ends at <|end|> (nothing
    after it, though max_new_tokens allows 200), and piped turns carry the conversation (the second answer
    depends on the first question; /reset forgets it)."""
    base, out = tiny_base(FT_TMP / "base"), FT_TMP / "chat-sft"
    data = FT_TMP / "chat.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"I am {n}."}, {"role": "assistant", "content": f"Hi {n}!"},
                           {"role": "user", "content": "Who am I?"}, {"role": "assistant", "content": f"You are {n}."}]}
             for n in ("Ann", "Bob")] + [{"messages": [{"role": "user", "content": "ping"},
                                                      {"role": "assistant", "content": "pong"}]}]
    data.write_text("".join(json.dumps(c) + "\n" for c in convs * 10))
    p = ft_run(["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={data}", "--max_iters=60",
             "--eval_interval=60", "--batch_size=8", "--learning_rate=1e-2", "--warmup_iters=5", "--device=cpu"])
    assert p.returncode == 0, p.stderr[-2000:]
    p = ft_run(["sample.py", f"--out_dir={out}", "--chat=True", "--start=ping", "--temperature=0", "--device=cpu"])
    assert p.returncode == 0 and p.stdout == "pong\n", (p.stdout, p.stderr[-2000:])
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--chat=True", "--temperature=0",
                        "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       input="I am Bob.\nWho am I?\n/reset\nI am Ann.\nWho am I?\n",
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout == "Hi Bob!\nYou are Bob.\nHi Ann!\nYou are Ann.\n", (p.stdout, p.stderr)


def test_finetune_hh_rlhf_and_alpaca_sets_from_their_download_paths():
    """The named downloads, read offline from where common.download puts them: hh-rlhf's train files give
    the train pairs and its test files the held-out ones; odd transcripts are skipped with a count."""
    import gzip
    import chat_data as C
    root = FT_TMP / "dl-root"
    good = lambda i: {"chosen": f"\n\nHuman: q{i}\n\nAssistant: good{i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad{i}"}
    odd = {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}
    for s in C.HH_SUBSETS:
        for split, n in (("train", 3), ("test", 1)):
            path = root / "hh-rlhf" / "raw" / s / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in [good(i) for i in range(n)] + [odd]).encode()))
    out = io.StringIO()
    with redirect_stdout(out):
        train, val = C.load_split("hh-rlhf", root, 0.1, "pref")
        sft_train, _ = C.load_split("hh-rlhf", root, 0.1, "sft")
    assert len(train) == 3 * len(C.HH_SUBSETS) and len(val) == len(C.HH_SUBSETS)
    assert "skipped 8 of 24 records" in out.getvalue(), out.getvalue()
    assert train[1] == {"prompt": [{"role": "user", "content": "q1"}], "chosen": "good1", "rejected": "bad1"}
    assert sft_train[1] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "good1"}]
    (root / "alpaca" / "raw").mkdir(parents=True)
    (root / "alpaca" / "raw" / "alpaca_data.json").write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 20))
    train, val = C.load_split("alpaca", root, 0.1, "sft")
    assert len(train) == 18 and len(val) == 2 and train[0][1] == {"role": "assistant", "content": "o"}


def test_finetune_gpt2_layout_import_gets_chat_token_rows():
    """A Hugging Face GPT-2 directory (here a tiny random one with GPT-2's 50257 tokens): the chat tokens
    50257..50260 get rows (the table padded to 50304) and the checkpoint records the gpt2 tokenizer."""
    import model as M
    shared_file("gpt2.tiktoken")
    hf = FT_TMP / "hf-gpt2"
    torch.manual_seed(0)
    H.save_hf(M.GPT(M.GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=32)), hf)
    data = FT_TMP / "tiny-chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(10)))
    out = FT_TMP / "sft-gpt2"
    p = ft_run(["finetune.py", f"--init_from={hf}", f"--out_dir={out}", f"--data={data}", "--max_iters=3",
             "--eval_interval=3", "--batch_size=2", "--device=cpu"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "growing the embeddings to 50304 rows" in p.stdout
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["vocab_size"] == 50304 and ck["tokenizer"]["kind"] == "gpt2" and ck["chat"]
    new_rows = ck["model"]["transformer.wte.weight"][50257:50261]
    assert new_rows.abs().sum() > 0 and torch.isfinite(new_rows).all()


# ----- clean: clean.py, quality rules, MinHash near-duplicates, the classifier (-k clean) -----

import bench
import clean as CL


def need(module, package):
    try:
        return __import__(module)
    except ImportError:
        raise unittest.SkipTest(f"{package} is not installed (pip install -r requirements-test.txt)")


@functools.cache
def copyright_texts():
    """Debian's /usr/share/doc/*/copyright: ~700 real licence texts, many of them near copies of each other."""
    paths = sorted(Path("/usr/share/doc").glob("*/copyright"))
    if len(paths) < 100:
        raise unittest.SkipTest(f"only {len(paths)} files /usr/share/doc/*/copyright on this machine (a Debian one has ~700)")
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


@functools.cache
def wiki_pages():
    import bz2
    import xml.etree.ElementTree as ET
    root = ET.fromstring(bz2.open(shared_file("quality/enwiki-shortened.xml.bz2")).read())
    ns = root.tag.split("}")[0] + "}"
    return [(p.find(f"{ns}title").text, p.find(f"{ns}revision/{ns}text").text or "") for p in root.findall(f"{ns}page")]


@functools.cache
def quality_corpus(max_chars=100_000):
    """The real documents the parity tests use, normalized: the copyright files, the Wikipedia excerpt's pages
    (redirects included), the Usenet posts and the ABC news articles; documents over max_chars left out (the
    four 2 MB ones would take most of the time and add nothing)."""
    docs = copyright_texts() + [t for _, t in wiki_pages()]
    docs += [json.loads(l)["text"] for l in open(shared_file("quality/newsgroups.jsonl"), encoding="utf-8")]
    docs += [l.strip() for l in open(shared_file("quality/abc_news.txt"), encoding="utf-8") if l.strip()]
    return [CL.normalize(d) for d in docs if d.strip() and len(d) <= max_chars]


def test_clean_rules_decide_as_datatrove():
    """Every quality rule's keep/drop decision and the rule named, and the text c4 keeps, equal datatrove's
    filters (GopherQuality, GopherRepetition, C4Quality, FineWebQuality, their default thresholds) on ~1,300
    real documents (those under 30,000 characters)."""
    need("datatrove", "datatrove")
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    words = bench.datatrove_words()
    ref = {"gopher": GopherQualityFilter(language=words), "repetition": GopherRepetitionFilter(language=words),
           "c4": C4QualityFilter(language=words), "fineweb": FineWebQualityFilter(language=words)}
    docs = quality_corpus(30_000)
    assert len(docs) > 1200
    for name, f in ref.items():
        seen = Counter()
        for i, text in enumerate(docs):
            d = Document(text=text, id=str(i))
            r = f.filter(d)
            want = None if r is True else r[1]
            got, kept = CL.FILTERS[name](text)
            assert got == want, (name, i, got, want, text[:200])
            assert got is not None or kept == d.text, (name, i)
            seen[want] += 1
        assert len(seen) >= 3 and seen[None] > 100, (name, seen)  # the corpus exercises several rules each way
    assert set(CL.PUNCTUATION) == set(__import__("datatrove.utils.text").utils.text.PUNCTUATION)


def test_clean_simplify_equals_datatrove_on_real_and_tricky_text():
    """simplify (byte-level steps for ASCII words, Unicode ones word by word for the rest) gives the words of
    datatrove's simplify_text on the quality corpus (copyright files included), and on 20,000 random strings of
    the characters where the two paths could part: digits and separators of any script, Greek's final sigma,
    combining marks, Unicode spaces, control characters, ligatures, mixed into ASCII words."""
    need("datatrove", "datatrove")
    from datatrove.utils.text import simplify_text
    docs = quality_corpus()
    rng = random.Random(0)
    alpha = [*"aZ09 .,\t\n\x0b\x0c\x1c\x85\xa0\u2003", "00", "0.0", "1,2", "Σ", "ΑΣ", "é", "É", "١", "٫", "⎖", "İ", "ß",
             "ﬁ", "\u0301", "'", "©", "—", "«", "K", "Å", "\ufffd", "日本", "²"]
    docs += ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 14))) for _ in range(20_000)]
    bad = [d for d in docs if CL.simplify(d).split() != simplify_text(d).split()]
    assert not bad, (len(bad), bad[:3])


def test_clean_minhash_signatures_and_pairs_as_datatrove_and_datasketch():
    """hash_mode='compat': signatures bit-identical to datatrove's MinhashDedupSignature (HashConfig(precision=32,
    hash_fc='sha1')) and to datasketch's MinHash(scheme='legacy') with the same permutations; LSH candidate
    pairs identical to datasketch's MinHashLSH(params=(14, 8)). Documents under 5 words have no shingle in any."""
    need("datatrove", "datatrove")
    need("datasketch", "datasketch")
    from datasketch import MinHash, MinHashLSH
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig
    docs = [d for d in quality_corpus() if len(d) <= 30_000] + ["four words only here", "", "5 words: a b c"]
    with tempfile.TemporaryDirectory() as tmp:
        ref = MinhashDedupSignature(tmp, config=MinhashConfig(hash_config=HashConfig(precision=32, hash_fc="sha1")),
                                    language=bench.datatrove_words())
    perms = CL.permutations()
    assert all(np.array_equal(x, y.ravel()) for x, y in zip(perms, ref.parameters))
    sets = [CL.shingles(d, "compat") for d in docs]
    sigs = CL.signatures(sets, perms)
    with_sig, lsh, mhs = [], MinHashLSH(num_perm=112, params=(14, 8)), {}
    for i, d in enumerate(docs):
        sh = ref.get_shingles(d)
        assert sh.size == len(sets[i]) and (sh.size == 0) == (len(CL.simplify(d).split()) < 5)
        if not sh.size:
            continue
        with_sig.append(i)
        assert np.array_equal(np.array(ref.get_signature(sh), dtype=np.uint32).ravel(), sigs[i]), i
        w = CL.simplify(d).split()
        m = MinHash(num_perm=112, permutations=perms, scheme="legacy")
        m.update_batch([" ".join(w[k:k + 5]).encode() for k in range(len(w) - 4)])
        assert np.array_equal(m.hashvalues, sigs[i].astype(np.uint64)), i
        lsh.insert(i, m)
        mhs[i] = m
    assert with_sig[-1] == len(docs) - 1 and len(docs) - 2 not in with_sig  # "5 words: a b c" is 5 words: 1 shingle
    theirs = {(min(i, j), max(i, j)) for i, m in mhs.items() for j in lsh.query(m) if j != i}
    ix = np.array(with_sig)
    ours = {(int(ix[a]), int(ix[b])) for a, b in CL.candidate_pairs(sigs[ix])}
    assert ours == theirs and len(ours) > 500, (len(ours), len(theirs))


def test_clean_signature_arithmetic_is_exact():
    """The shift-and-add remainder by 2^61 - 1 and the blocks of signatures() give, for every document, the
    minimum over its shingles of ((h*a + b) mod 2^64 mod (2^61 - 1)) & 0xFFFFFFFF computed with Python integers:
    random values, sets split across blocks, empty sets, and the rare sums that reach the prime (the
    subtraction the shortcut needs, which real documents almost never exercise)."""
    rng = np.random.default_rng(0)
    p, m64 = (1 << 61) - 1, (1 << 64) - 1
    a = rng.integers(1, p, size=16, dtype=np.uint64)
    b = rng.integers(0, p, size=16, dtype=np.uint64)
    h0 = 12345
    a[0], b[0] = 1, m64 - h0  # h*a + b = 2^64 - 1: (x & p) + (x >> 61) = p + 7, so 7 after the subtraction
    a[1], b[1] = 1, p - h0  # exactly p: 0
    sets = [rng.integers(0, 1 << 32, size=n, dtype=np.uint64) for n in (3, 0, 40, 1, 17, 0, 64)]
    sets[3][0] = h0
    for rows in (1, 7, 2048):
        sigs = CL.signatures(sets, (a, b), rows=rows)
        for s, sig in zip(sets, sigs):
            want = [min(((int(h) * int(x) + int(y)) & m64) % p & 0xFFFFFFFF for h in s) if len(s) else 0xFFFFFFFF
                    for x, y in zip(a, b)]
            assert sig.tolist() == want, rows
    assert CL.signatures([np.array([h0], np.uint64)], (a[:2], b[:2])).tolist() == [[7, 0]]


def test_clean_near_dedup_recall_precision_and_s_curve():
    """On the copyright files (exact copies removed first, as the pipeline does), against exact Jaccard of word
    5-gram sets computed here: recall >= 0.95 of the pairs with Jaccard >= 0.85 and precision >= 0.95 (a removed
    document's Jaccard with the one it is marked a duplicate of >= 0.8) with the Jaccard check on, in both hash
    modes; without the check, false-positive chains remove more. Prints the S-curve: the share of pairs LSH
    proposes per true-Jaccard bin against 1 - (1 - s^8)^14."""
    texts = list(dict.fromkeys(CL.normalize(t) for t in copyright_texts()))  # exact copies out
    grams = {}
    for i, t in enumerate(texts):
        w = CL.simplify(t).split()
        g = {" ".join(w[k:k + 5]) for k in range(len(w) - 4)}
        if g:
            grams[i] = g
    ids = sorted(grams)
    truth = {}
    for x, a in enumerate(ids):
        for b in ids[x + 1:]:
            A, B = grams[a], grams[b]
            if min(len(A), len(B)) / max(len(A), len(B)) >= 0.3:  # Jaccard <= that ratio: below it, < 0.3
                inter = len(A & B)
                if inter / (len(A) + len(B) - inter) >= 0.3:
                    truth[(a, b)] = inter / (len(A) + len(B) - inter)
    positives = [p for p, j in truth.items() if j >= 0.85]
    assert len(positives) >= 10, len(positives)
    rows = [f"{'true Jaccard':<14}{'pairs':>7}" + "".join(f"{m + ' found':>14}" for m in ("fast", "compat"))
            + f"{'1-(1-s^8)^14':>15}"]
    found = {}
    for mode in ("fast", "compat"):
        sets = [CL.shingles(texts[i], mode) for i in ids]
        sigs = CL.signatures(sets, CL.permutations())
        found[mode] = {(ids[a], ids[b]) for a, b in CL.candidate_pairs(sigs)}
        uniq = {k: np.unique(s) for k, s in enumerate(sets)}
        for threshold in (0.8, 0.0):
            parent = CL.clusters(sigs, lambda k: uniq[k], threshold)
            root = {ids[k]: ids[CL.find(parent, k)] for k in range(len(ids))}
            recall = sum(root[a] == root[b] for a, b in positives) / len(positives)
            removed = [(i, root[i]) for i in ids if root[i] != i]
            precision = sum(truth.get((r, i), 0) >= 0.8 for i, r in removed) / max(1, len(removed))
            print(f"  {mode}, jaccard={threshold}: recall {recall:.3f} of {len(positives)} pairs >= 0.85, "
                  f"{len(removed)} removed, precision {precision:.3f}")
            assert recall >= 0.95, (mode, threshold, recall)
            if threshold:
                assert precision >= 0.95, (mode, precision)
            else:
                assert precision < 0.95  # the chains the check stops: this corpus has them
    for lo in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        pairs = [p for p, j in truth.items() if lo <= j < lo + 0.1 or lo == 0.9 and j == 1.0]
        s = lo + 0.05
        rows.append(f"{lo:.1f}-{lo + 0.1:.1f}{'':<7}{len(pairs):>7}" + "".join(
            f"{sum(p in found[m] for p in pairs) / max(1, len(pairs)):>14.3f}" for m in ("fast", "compat"))
            + f"{1 - (1 - s ** 8) ** 14:>15.3f}")
    print("\n".join("  " + r for r in rows))
    for m in ("fast", "compat"):  # the S-curve's ends: no pair under 0.4 proposed often, every pair over 0.8 found
        assert all(p in found[m] for p, j in truth.items() if j >= 0.8), m
        low = [p for p, j in truth.items() if j < 0.4]
        assert sum(p in found[m] for p in low) / len(low) < 0.02, m


def _corpus_files(d):
    """A small corpus in three files: .jsonl (with ids and an extra field), .jsonl.gz and .txt."""
    d = Path(d)
    texts = [t for t in quality_corpus() if 200 < len(t) < 5000][:120]
    rows = [{"id": f"doc{i}", "text": t, "source": "test"} for i, t in enumerate(texts[:80])]
    rows.insert(5, dict(rows[3], id="copy-of-3"))  # an exact copy
    news = [l.strip() for l in open(shared_file("quality/abc_news.txt"), encoding="utf-8") if l.strip()][0]
    rows.insert(7, {"id": "news", "text": news})
    rows.insert(9, {"id": "near-news", "text": news.replace(" the ", " a ", 1) + " One more sentence."})  # a near copy
    rows.append({"id": "short", "text": "Four words stay here."})
    rows.append({"id": "short-copy", "text": "Four words stay  here!"})  # under 5 words: never a near copy
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[80:]))
    (d / "c.txt").write_text(texts[0] + "\n\ntiny\n")
    return [d / "a.jsonl", d / "b.jsonl.gz", d / "c.txt"]


def test_clean_cli_outputs_in_order_same_for_workers_and_resumable():
    """python clean.py: docs.jsonl in input order with every input field, removed.jsonl naming each stage and
    rule or the document duplicated, summary.json; --workers=2 writes the same bytes as 1; a re-run skips the
    stages that are done and writes the same; the exact and near copies planted in the input are found, and
    a document under 5 words is no near copy of another."""
    with tempfile.TemporaryDirectory() as d:
        files = _corpus_files(d)
        args = [f"--input={','.join(map(str, files))}", "--filters=gopher,repetition,c4,fineweb"]
        one = run(["clean.py", *args, f"--output={d}/one"], check=0)
        run(["clean.py", *args, f"--output={d}/two", "--workers=2"], check=0)
        for name in ("docs.jsonl", "removed.jsonl", "summary.json"):
            assert (Path(d) / "one" / name).read_bytes() == (Path(d) / "two" / name).read_bytes(), name
        before = {p.name: p.read_bytes() for p in (Path(d) / "one").rglob("*") if p.is_file()}
        again = run(["clean.py", *args, f"--output={d}/one"], check=0)
        assert "already done" in again.stdout and "duplicates already found" in again.stdout, again.stdout
        assert {p.name: p.read_bytes() for p in (Path(d) / "one").rglob("*") if p.is_file()} == before
        kept = [json.loads(l) for l in (Path(d) / "one" / "docs.jsonl").read_text().splitlines()]
        removed = [json.loads(l) for l in (Path(d) / "one" / "removed.jsonl").read_text().splitlines()]
        summary = json.loads((Path(d) / "one" / "summary.json").read_text())
        order = [r["id"] for r in CL.read_documents([(f, f.name) for f in files])]
        got = [x["id"] for x in kept] + [x["id"] for x in removed]
        assert sorted(got, key=order.index) == order and len(got) == len(order)  # each once
        assert [x["id"] for x in kept] == sorted([x["id"] for x in kept], key=order.index)  # in input order
        assert [x["id"] for x in removed] == sorted([x["id"] for x in removed], key=order.index)
        assert all(x.get("source") == "test" for x in kept if x["id"].startswith("doc"))
        why = {x["id"]: x for x in removed}
        assert why["copy-of-3"] == {"id": "copy-of-3", "stage": "exact", "duplicate_of": "doc3"} or \
            why.get("doc3", {}).get("stage") == "filters", why.get("copy-of-3")
        rules = {x["rule"] for x in removed if x["stage"] == "filters"}
        assert {r.split(":")[0] for r in rules} >= {"gopher", "repetition", "c4"}, rules
        assert summary["input"]["docs"] == len(order) and summary["kept"]["docs"] == len(kept)
        assert sum(r["docs"] for r in summary["removed"] if "document kept" not in r["rule"]) == len(removed)
        assert "% bytes" in one.stdout and "kept" in one.stdout
        # without filters: the planted near copy goes, the short document's look-alike does not
        run(["clean.py", f"--input={files[0]}", f"--output={d}/dedup"], check=0)
        why = {json.loads(l)["id"]: json.loads(l) for l in (Path(d) / "dedup" / "removed.jsonl").read_text().splitlines()}
        assert why["near-news"] == {"id": "near-news", "stage": "minhash", "duplicate_of": "news"}, why.get("near-news")
        assert why["copy-of-3"]["stage"] == "exact" and "short-copy" not in why and "short" not in why


def test_clean_bad_input_one_line_nothing_written():
    """Each mistake: one line naming it, exit 2, no docs.jsonl (nothing half-written)."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "empty.jsonl").write_text("")
        (d / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
        (d / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
        (d / "ok.jsonl").write_text('{"text": "a perfectly fine document of some words"}\n')
        (d / "junk.bin").write_bytes(b"\x00junk, not a classifier" * 10)
        cases = [([f"--input={d / 'empty.jsonl'}"], "no documents"),
                 ([f"--input={d / 'broken.jsonl'}"], "broken.jsonl:2: invalid JSON"),
                 ([f"--input={d / 'notext.jsonl'}"], "notext.jsonl:2: no string 'text'"),
                 ([f"--input={d / 'ok.jsonl'}", "--filters=gopher,nope"], "unknown filter or dedup 'nope'"),
                 ([f"--input={d / 'ok.jsonl'}", f"--quality_model={d / 'junk.bin'}"], "is not a quality classifier"),
                 ([f"--input={d / 'ok.jsonl'}", f"--quality_model={d / 'none.bin'}"], "not found"),
                 ([f"--input={d / 'ok.jsonl'}", "--quality_keep=0.0"], "quality_keep must be in (0, 1]"),
                 ([f"--input={d / 'ok.jsonl'}", "--quality_keep=1.5"], "quality_keep must be in (0, 1]"),
                 ([f"--input={d / 'missing.jsonl'}"], "not found"),
                 ([f"--input={d / 'junk.bin'}"], "is not .txt, .jsonl or .jsonl.gz")]
        for args, needle in cases:
            out = d / "out"
            assert_clear_error(run_here("clean.py", [*args, f"--output={out}"]), needle)
            assert not (out / "docs.jsonl").exists() and not (out / "removed.jsonl").exists(), args
        assert_clear_error(run_here("clean.py", ["--train_classifier", f"--labeled={d / 'ok.jsonl'}"]), "no __label__")
        assert_clear_error(run(["clean.py", "--train_classifier", f"--positive={d / 'ok.jsonl'}"]), "--negative")


def test_clean_prepare_integration():
    """python prepare.py --dataset=local --filters=... --dedup=exact,minhash: the shards hold exactly the text
    clean.py keeps (train and val together, in order), and meta.json records every stage's counts; the
    default (dedup=exact, no filters) gives what it gave before clean.py existed: NFC, tiny and exact copies out."""
    with tempfile.TemporaryDirectory() as d:
        files = _corpus_files(d)
        run(["prepare.py", "--dataset=local", f"--input={files[0]}", f"--data_root={d}/data", "--tokenizer=byte",
             "--filters=gopher,repetition", "--dedup=exact,minhash"], check=0)
        run(["clean.py", f"--input={files[0]}", f"--output={d}/cl", "--filters=gopher,repetition"], check=0)
        meta, decoded = _decode_splits(Path(d) / "data" / "local")
        want = [json.loads(l)["text"] for l in (Path(d) / "cl" / "docs.jsonl").read_text().splitlines()]
        assert decoded["train"] + decoded["val"] == want
        assert meta["clean"] == json.loads((Path(d) / "cl" / "summary.json").read_text())
        assert meta["settings"]["filters"] == ["gopher", "repetition"] and meta["settings"]["dedup"] == ["exact", "minhash"]
        assert {r["stage"] for r in meta["clean"]["removed"]} >= {"filters", "exact", "minhash"}


def test_clean_quality_classifier_cli_keeps_the_top_share():
    """--train_classifier on the recipe's data (Wikipedia articles and news articles against Usenet posts and
    licence texts) holds out 10% and reports its accuracy; --quality_model with --quality_keep=0.5 keeps the
    better-scoring half of what dedup leaves (ties to the earlier document), and names the rest with their score."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        wiki = [{"id": t, "text": x} for t, x in wiki_pages() if not x.startswith("#REDIRECT")]
        news = [{"text": l.strip()} for l in open(shared_file("quality/abc_news.txt"), encoding="utf-8") if l.strip()]
        (d / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wiki + news[:150]))
        (d / "neg.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in copyright_texts()[:150]
                                             if len(t) < 50_000))
        p = run(["clean.py", "--train_classifier", f"--positive={d / 'pos.jsonl'}",
                 f"--negative={d / 'neg.jsonl'},{shared_file('quality/newsgroups.jsonl')}", f"--out={d / 'q.bin'}",
                 "--epoch=10", "--lr=0.5", "--buckets=65536"], check=0)
        acc = float(re.search(r"held-out accuracy ([\d.]+)", p.stdout)[1])
        assert acc >= 0.9, p.stdout
        test = [{"id": f"n{i}", "text": r["text"]} for i, r in enumerate(news[150:190])]
        test += [{"id": f"u{i}", "text": json.loads(l)["text"]}
                 for i, l in enumerate(open(shared_file("quality/newsgroups.jsonl"), encoding="utf-8")) if i % 5 == 0]
        (d / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        run(["clean.py", f"--input={d / 'mix.jsonl'}", f"--output={d / 'out'}", f"--quality_model={d / 'q.bin'}",
             "--quality_keep=0.5", "--dedup="], check=0)
        kept = [json.loads(l)["id"] for l in (d / "out" / "docs.jsonl").read_text().splitlines()]
        low = [json.loads(l) for l in (d / "out" / "removed.jsonl").read_text().splitlines()]
        assert len(kept) == 40 and len(low) == 40 and all(r["stage"] == "quality" for r in low)
        assert sum(k.startswith("n") for k in kept) >= 36, kept  # the news articles score above Usenet posts
        model = CL.load_classifier(d / "q.bin")
        p_hq = CL.predict_proba(model, [r["text"] for r in test])[:, CL.labels_of(model).index("hq")]
        assert kept == [test[i]["id"] for i in CL.quantile_keep(p_hq, 0.5)]
        assert max(r["score"] for r in low) <= min(p_hq[CL.quantile_keep(p_hq, 0.5)]) + 1e-6


# ----- rl: reward.py and rl.py, the algorithm's pieces (-k rl) -----

import reward as RW
import rl as RL


def _digit_gpt(seed=0, head=False):
    """A 2-layer GPT over 16 tokens (digits, a separator 10, an end 11): the toy task's model."""
    torch.manual_seed(seed)
    m = M.GPT(M.GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=4, n_embd=64, bias=False, norm="rmsnorm",
                          pos="learned", mlp="swiglu", tie_embeddings=False))
    return RW.with_value_head(m) if head else m


def test_rl_bradley_terry_is_ln2_at_equal_rewards_and_centers():
    r = torch.tensor([0.0, 1.5, -3.0])
    assert torch.allclose(RW.bt_loss(r, r), torch.full((3,), math.log(2)))
    a, b = torch.tensor([2.0]), torch.tensor([-1.0])
    assert torch.allclose(RW.bt_loss(a, b, 0.01), -F.logsigmoid(a - b) + 0.01 * (a + b) ** 2)
    m = _digit_gpt(head=True)  # the head reads each row at its last real token, whatever the padding
    seqs = [[1, 2, 3, 10, 2, 3, 4, 11], [5, 10, 6, 11]]
    x, last = RW.sequences_batch(seqs, 0, "cpu")
    with torch.no_grad():
        both = RW.sequence_rewards(m, x, last)
        alone = [RW.sequence_rewards(m, *RW.sequences_batch([s], 0, "cpu")) for s in seqs]
    assert torch.allclose(both, torch.cat(alone), atol=1e-6) and m(x)[0].shape[-1] == 1


def test_rl_gae_hand_computed():
    """Three steps, gamma 0.9, lambda 0.8: deltas 0.68, -0.11, 1.9 (the value after the end is 0), advantages
    1.58576, 1.258, 1.9; a second, 2-token reply ignores what lies past its end."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = RL.gae(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv[0], torch.tensor([1.58576, 1.258, 1.9]))
    assert torch.allclose(ret[0], torch.tensor([2.08576, 1.458, 2.0]))
    d1, d0 = 1.0 - 0.4, 0.5 + 0.9 * 0.4 - 0.3  # row 2: the value after its last token is 0
    assert torch.allclose(adv[1], torch.tensor([d0 + 0.72 * d1, d1, 0.0])) and ret[1, 2] == 0


def test_rl_group_advantages_have_mean_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, -1.0, 0.5, 0.5])
    a = RL.group_advantages(r, 4).view(3, 4)
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[0], (r[:4] - 0.5) / (r[:4].std() + 1e-4)) and torch.equal(a[1], torch.zeros(4))


def test_rl_kl_and_score_sit_on_the_reply_tokens():
    """Reply-aligned tensors hold exactly the reply tokens' log-probs (each row as it is alone, prompts of
    different lengths); PPO's rewards are -kl_coef * KL on each reply token and the score on its last one,
    nothing on padding; and with policy = reference, the first pass has KL 0, ratio 1, clipfrac 0."""
    m = _digit_gpt()
    prompts, replies = [[1, 2, 3, 10], [7, 10]], [[2, 3, 4, 11], [8, 11]]
    logp, mask = RL.token_logps(m, prompts, replies, "cpu")
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    for b, (p, r) in enumerate(zip(prompts, replies)):
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([p + r]))[0][0], -1)
        want = torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(r)])
        assert torch.allclose(logp[b, :len(r)], want, atol=1e-5) and (logp[b, len(r):] == 0).all()
    ref = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 5.0, 5.0]])
    pi = torch.tensor([[-0.5, -1.0, -2.0, -1.0], [-1.0, -2.0, 9.0, 9.0]])
    rewards, kl = RL.ppo_rewards(pi, ref, mask, torch.tensor([10.0, 20.0]), 0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1, 10.0], [-0.1, 20.0, 0.0, 0.0]]))
    ref_model = _digit_gpt()  # the same weights: policy = reference
    with torch.no_grad():
        old, _ = RL.token_logps(m, prompts, replies, "cpu")
        ref_logp, _ = RL.token_logps(ref_model, prompts, replies, "cpu")
    _, kl = RL.ppo_rewards(old, ref_logp, mask, torch.zeros(2), 0.05)
    assert kl.abs().max() == 0
    adv = torch.randn(2, 4) * mask
    value = torch.zeros(2, 4)
    _, st = RL.ppo_loss(logp, old, adv, value, value, value, mask, 0.2, 0.2, 0.1)
    assert st["val/ratio"] == 1 and st["policy/clipfrac"] == 0 and st["policy/approxkl"] == 0
    _, st = RL.grpo_loss(logp, old, ref_logp, torch.tensor([1.0, -1.0]), mask, 0.2, 0.04)
    assert st["val/ratio"] == 1 and st["objective/kl"] == 0 and st["policy/clipfrac"] == 0
    # a PPO step whose minibatches hold replies of other lengths than the batch's longest (random stops)
    cfg = dict(max_new_tokens=12, temperature=1.0, stop_ids=(0, 1, 2, 11), cliprange=0.2, grad_clip=1.0, ppo_epochs=1,
               num_minibatches=4, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, kl_coef=0.05,
               missing_eos_penalty=1.0)
    value = _digit_gpt(head=True)
    opt = torch.optim.AdamW(list(m.parameters()) + list(value.parameters()), lr=1e-3)
    st = RL.ppo_step(m, ref_model, value, lambda p, r: torch.ones(len(r)), [[d, 10] for d in range(10)] * 2, opt, cfg, 3)
    assert all(math.isfinite(v) for v in st.values()) and 0 < st["val/num_eos_tokens"] < 20 and st["reply_length"] < 8, st




SEP, END = 10, 11  # the toy task's separator after a prompt, and its end-of-reply token


def _toy_prompts(n, g):
    return [torch.randint(0, 10, (3,), generator=g).tolist() + [SEP] for _ in range(n)]


def _toy_truth(prompts, replies):
    """The hidden scorer: the share of the 3 reply digits that are the prompt's digit + 1 (mod 10)."""
    return torch.tensor([sum(j < len(r) and r[j] == (p[j] + 1) % 10 for j in range(3)) / 3 for p, r in zip(prompts, replies)])


def _toy_pairs(n, g):
    """Pairs ranked by the scorer: two replies each right in a random share of digits, the better one chosen."""
    out = []
    while len(out) < n:
        p = _toy_prompts(1, g)[0]
        reps = [[(p[j] + 1) % 10 if bool(torch.rand(1, generator=g) < q) else int(torch.randint(0, 10, (1,), generator=g))
                 for j in range(3)] + [END] for q in torch.rand(2, generator=g).tolist()]
        a, b = _toy_truth([p, p], reps).tolist()
        if a != b:
            out.append((p + reps[0], p + reps[1]) if a > b else (p + reps[1], p + reps[0]))
    return out


def test_rl_toy_task_reward_model_ppo_grpo_and_controls():
    """A task with a hidden true scorer (2-layer x 64 GPT, 16 tokens): prompts of 3 digits, the right reply each
    digit + 1 mod 10. A reward model trained on pairs the scorer ranked reaches held-out pair accuracy >= 0.9;
    PPO against it (the policy never sees the scorer) raises the held-out true reward of greedy replies from
    <= 0.15 to >= 0.8; GRPO with the scorer as a verifiable reward does the same; each in under 60 s. Controls:
    GRPO with the rewards shuffled among the samples, or with their sign flipped, does not improve."""
    g = torch.Generator().manual_seed(1)
    val = _toy_prompts(100, g)
    held = lambda policy: _toy_truth(val, RL.rollout(policy, val, 4, 0.0, (END,))).mean().item()
    cfg = dict(max_new_tokens=4, temperature=1.0, stop_ids=(END,), cliprange=0.2, grad_clip=1.0, ppo_epochs=2,
               num_minibatches=2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, kl_coef=0.05,
               missing_eos_penalty=1.0, num_generations=8, beta=0.0)
    # the reward model
    t0 = time.time()
    train_pairs, val_pairs = _toy_pairs(3000, g), _toy_pairs(300, g)
    rm = _digit_gpt(seed=0, head=True)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for _ in range(400):
        b = [train_pairs[i] for i in torch.randint(0, len(train_pairs), (64,), generator=g).tolist()]
        s = RW.sequence_rewards(rm, *RW.sequences_batch([c for c, _ in b] + [r for _, r in b], 0, "cpu"))
        loss = RW.bt_loss(s[:64], s[64:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval().requires_grad_(False)

    def rm_scores(prompts, replies):
        with torch.no_grad():
            return RW.sequence_rewards(rm, *RW.sequences_batch([p + r for p, r in zip(prompts, replies)], 0, "cpu"))
    with torch.no_grad():
        s = rm_scores([c for c, _ in val_pairs], [[] for _ in val_pairs]) - rm_scores([r for _, r in val_pairs], [[] for _ in val_pairs])
    rm_acc, rm_s = (s > 0).float().mean().item(), time.time() - t0
    print(f"  reward model: held-out pair accuracy {rm_acc:.3f} ({rm_s:.1f}s)")
    assert rm_acc >= 0.9 and rm_s < 60, (rm_acc, rm_s)

    def train(algo, score, iters, lr, seed=0):
        policy = _digit_gpt(seed)
        ref = _digit_gpt(seed).requires_grad_(False)
        value = copy.deepcopy(rm).train().requires_grad_(True) if algo == "ppo" else None
        params = list(policy.parameters()) + (list(value.parameters()) if value is not None else [])
        opt = torch.optim.AdamW(params, lr=lr)
        before, t0, curve = held(policy), time.time(), []
        for it in range(1, iters + 1):
            if algo == "ppo":
                RL.ppo_step(policy, ref, value, score, _toy_prompts(64, g), opt, cfg, it)
            else:
                RL.grpo_step(policy, ref, score, _toy_prompts(16, g), opt, cfg, it)
            if it % 25 == 0:
                curve.append(round(held(policy), 3))
                if curve[-1] >= 0.9:
                    break
        return before, curve, time.time() - t0
    for algo, score, lr in (("ppo", rm_scores, 1e-3), ("grpo", _toy_truth, 3e-3)):
        before, curve, secs = train(algo, score, 200, lr)
        print(f"  {algo}: held-out true reward {before:.3f} -> {curve} ({secs:.1f}s)")
        assert before <= 0.15 and curve[-1] >= 0.8 and secs < 60, (algo, before, curve, secs)
    shuffled = lambda p, r: _toy_truth(p, r)[torch.randperm(len(r), generator=g)]
    flipped = lambda p, r: -_toy_truth(p, r)
    for name, score in (("shuffled", shuffled), ("sign-flipped", flipped)):
        before, curve, _ = train("grpo", score, 75, 3e-3)
        print(f"  grpo, {name} reward: {before:.3f} -> {curve}")
        assert max(curve) <= before + 0.1, (name, before, curve)


def test_rl_reward_model_and_rl_command_lines():
    """reward.py on preference data from an SFT model, then rl.py --algo=ppo against it and --algo=grpo with a
    function of your own: each writes a checkpoint, and metrics.jsonl with TRL's names; and each mistake is one
    clear line (exit 2): no chat tokens (run SFT first), a reward model of another tokenizer, a --reward that
    cannot be imported or returns a non-number, fewer than 2 generations, PPO without a reward model."""
    d = Path(tempfile.mkdtemp(prefix="rl-tests-", dir=RUN_TMP))
    base = tiny_base(d / "base")
    ft_run(["finetune.py", f"--init_from={base}", f"--out_dir={d / 'sft'}", f"--data={shared_file('instruction-data.json')}",
            "--max_iters=2", "--eval_interval=2", "--device=cpu", "--max_examples=32", "--eval_examples=4",
            "--block_size=256"])
    prefs = shared_file("instruction-data-with-preference.json")
    rm = ["reward.py", f"--data={prefs}", "--max_iters=4", "--eval_interval=2", "--device=cpu", "--max_pairs=32",
          "--eval_pairs=8", "--block_size=256", "--learning_rate=1e-3"]
    p = run_here(rm[0], [*rm[1:], f"--init_from={d / 'sft'}", f"--out_dir={d / 'rm'}"])
    assert p.returncode == 0 and "held-out pair accuracy" in p.stdout, p.stderr[-2000:]
    recs = read_metrics(d / "rm")
    assert {"val/accuracy", "val/margin", "val/reward_mean", "val/reward_min", "val/reward_max", "train/accuracy"} <= set(recs[0])
    assert_clear_error(run_here(rm[0], [*rm[1:], f"--init_from={base}", f"--out_dir={d / 'rm2'}"]), "run SFT first")
    (d / "myreward.py").write_text("def score(prompt, reply):\n    return float(len(reply) > 10)\n"
                                   "def length(prompt, reply):\n    return float(len(reply))\n"
                                   "def bad(prompt, reply):\n    return 'yes'\n")
    common_args = [f"--init_from={d / 'sft'}", f"--data={shared_file('instruction-data.json')}", "--max_iters=2",
                   "--eval_interval=2", "--eval_prompts=4", "--max_new_tokens=12", "--device=cpu"]
    rl_run = lambda *a: run_here("rl.py", [*common_args, *a], cwd=d)  # cwd: --reward imports myreward.py
    p = rl_run("--algo=ppo", f"--reward_model={d / 'rm'}", f"--out_dir={d / 'ppo'}", "--batch_prompts=4")
    assert p.returncode == 0, p.stderr[-2000:]
    keys = set().union(*(r.keys() for r in read_metrics(d / "ppo")))
    assert {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg",
            "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio_avg", "reply_length",
            "eval/reward"} <= keys, keys
    assert H.load_model("resume", d / "ppo", "cpu")[1]["finetune"][-1]["stage"] == "ppo"
    p = rl_run("--algo=grpo", "--reward=myreward:length", f"--out_dir={d / 'grpo'}", "--batch_prompts=2",
               "--num_generations=4")
    assert p.returncode == 0 and "pass rate" in p.stdout, p.stderr[-2000:]
    # under torchrun, DDP on 2 ranks of 1 prompt each: the held-out prompts are shared out between the ranks and
    # their rewards summed (the step-0 figure is the one process's), and the run trains and saves
    p = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "rl.py"), *common_args,
             "--algo=grpo", "--reward=myreward:length", f"--out_dir={d / 'grpo2'}", "--batch_prompts=1",
             "--num_generations=4"], cwd=d)
    assert p.returncode == 0 and "1 prompts x 2 ranks" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = read_metrics(d / "grpo"), read_metrics(d / "grpo2")
    assert two[0]["eval/prompts"] == one[0]["eval/prompts"] == 4 and two[0]["eval/reward"] == one[0]["eval/reward"], (one, two)
    assert [r["step"] for r in two if "objective/scores" in r] == [1, 2]
    assert H.load_model("resume", d / "grpo2", "cpu")[1]["finetune"][-1]["world_size"] == 2
    other = d / "rm-other"
    other.mkdir()
    ck = torch.load(d / "rm" / "ckpt.pt", weights_only=True)
    torch.save({**ck, "tokenizer": {"kind": "gpt2", "path": None}}, other / "ckpt.pt")
    cases = [(("--algo=grpo", "--reward=myreward:score", "--num_generations=1"), "at least 2"),
             (("--algo=grpo", "--reward=nomodule:score"), "cannot be imported"),
             (("--algo=grpo", "--reward=myreward:missing"), "cannot be imported"),
             (("--algo=grpo", "--reward=myreward:bad", "--batch_prompts=2", "--num_generations=2"), "must return a finite number"),
             (("--algo=ppo", "--reward=myreward:score"), "reward model"),
             (("--algo=ppo", f"--reward_model={other}"), "another tokenizer"),
             (("--algo=ppo", f"--reward_model={d / 'sft'}"), "is not a reward model")]
    for args, needle in cases:
        assert_clear_error(rl_run(*args, f"--out_dir={d / 'x'}"), needle)
    assert_clear_error(rl_run(f"--init_from={base}", f"--out_dir={d / 'y'}", "--algo=grpo", "--reward=myreward:score"),
                       "run SFT first")
    # the code reward: prompts without unit tests are refused; on MBPP a run logs the held-out pass rate
    assert_clear_error(rl_run("--algo=grpo", "--reward=code", f"--out_dir={d / 'x'}"), "MBPP or HumanEval")
    p = rl_run("--algo=grpo", "--reward=code", f"--data={shared_file('eval/mbpp_test.jsonl')}", "--max_iters=1",
               "--eval_interval=1", "--batch_prompts=2", "--num_generations=2", f"--out_dir={d / 'code'}")
    assert p.returncode == 0 and "pass rate 0.000" in p.stdout, p.stderr[-2000:]


def test_rl_code_reward_runs_the_unit_tests_in_the_sandbox():
    """--reward=code on real MBPP and HumanEval tasks: each task's reference solution, as a chat reply (in a
    fenced block after some prose, or bare), passes its tests through sandbox.py (reward 1); a wrong one, one
    that never ends, and one that exits early with status 0 get 0."""
    mbpp = RL.load_prompts(shared_file("eval/mbpp_test.jsonl"), "data", 0.5)
    humaneval = RL.load_prompts(shared_file("eval/HumanEval.jsonl.gz"), "data", 0.5)
    items = mbpp[0][:12] + humaneval[0][:12]
    assert "Your code should pass these tests" in items[0]["messages"][0]["content"]
    assert "```python" in items[-1]["messages"][0]["content"]
    # HumanEval's reference is the function's body: the reply gives the whole function, as a chat model would
    whole = lambda it: it["answer"] if it in items[:12] else it["tests"][0] + it["answer"]
    replies = [f"Here is my solution.\n```python\n{whole(it)}\n```\nIt loops once." if i % 2 else whole(it)
               for i, it in enumerate(items)]
    fn = RL.verifiable("code", timeout=5.0)
    assert fn(items, replies) == [1.0] * len(items)
    it = items[0]
    bad = ["```python\ndef remove_Occ(s, ch):\n    return s\n```", "```python\nwhile True:\n    pass\n```",
           "```python\nimport os\nos._exit(0)\n```", "I cannot write code."]
    assert RL.verifiable("code", timeout=1.0)([it] * len(bad), bad) == [0.0] * len(bad)



# ----- serve: serve.py, the OpenAI-compatible server, its page and the arena (-k serve) -----


def _serve_base():
    """A random tiny base model (vocab 320 > the byte tokenizer's 261, context 320): it never ends a reply on
    its own, and its greedy text differs from prompt to prompt."""
    return tiny_base(FT_TMP / "serve-base", vocab_size=320, seed=3)


def _serve_chat():
    """A random chat model (the chat template recorded, context 1024) whose weights are scaled up 6x and whose
    head is untied, so that its greedy replies differ from prompt to prompt (at the usual init a tiny model
    repeats its last input token, whatever the prompt). Its bytes are noise, invalid UTF-8 included."""
    import chat_data
    from common import save_checkpoint
    path = FT_TMP / "serve-chat"
    if not (path / "ckpt.pt").exists():
        torch.manual_seed(0)
        cfg = M.GPTConfig(vocab_size=320, block_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                          norm="rmsnorm", pos="rope", mlp="swiglu", tie_embeddings=False)
        m = M.GPT(cfg)
        with torch.no_grad():
            for w in m.parameters():
                if w.dim() == 2:
                    w.mul_(6.0)
        save_checkpoint({"model": m.state_dict(), "model_args": asdict(cfg), "config": {}, "step": 0,
                         "best_val_loss": float("inf"), "tokenizer": {"kind": "byte", "path": None}, "meta": {},
                         "rng": {}, "chat": chat_data.CHAT_TEMPLATE}, path / "ckpt.pt")
    return path


@contextlib.contextmanager
def serving(*dirs, prefs=None, key="", max_queue=64):
    """serve.py's server over these checkpoint directories, in this process on a free port: (url, engines)."""
    import serve as SV
    engines = {}
    for d in dirs:
        e = SV.load_engine("resume", d, "cpu")
        e.name = e.name if e.name not in engines else e.name + "-b"
        e.max_queue = max_queue
        engines[e.name] = e
    srv = SV.make_server(engines, "127.0.0.1", 0, key, prefs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", engines
    finally:
        srv.shutdown()
        srv.server_close()


def http(url, path, body=None, raw=None, headers=None, timeout=60):
    """(status, parsed JSON or text) of a GET (body None) or POST to the server."""
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request("POST" if data is not None else "GET", path, body=data,
              headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


def sse_events(text):
    """The events of an SSE body, each checked to be exactly 'data: ...' followed by a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    return [e[6:] for e in events]


def _greedy(model_dir, ids, max_new, stop_ids):
    """The text model.generate gives alone (batch 1) at temperature 0: the reference for the server's."""
    m, _, tok = H.load_model("resume", model_dir, "cpu")
    out = []
    for step in m.generate(torch.tensor([ids]), max_new, temperature=0, stop_tokens=tuple(stop_ids)):
        t = int(step[0])
        if t == -1 or t in stop_ids:
            break
        out.append(t)
    return tok.decode(out)


def test_serve_engine_sends_whole_characters_and_cuts_at_stop_strings():
    """The engine's token -> text step on forced tokens (one-hot logits, greedy): a character split across
    byte tokens is sent once whole; a tail that may begin a stop string is held back, then dropped with it;
    max_tokens ends with 'length'; a stop token with 'stop'."""
    import serve as SV
    with serving(_serve_base()) as (url, engines):
        eng = next(iter(engines.values()))

        def run_tokens(text, stops=(), max_new=100, extra=()):
            out = queue.Queue()
            s = SV.Seq([1], max_new, 0.0, 1.0, list(stops), 0, out, 0)
            for t in [*text.encode(), *extra]:
                if s.done:
                    break
                eng.take(s, F.one_hot(torch.tensor(t), 320).float())
            events = []
            while not out.empty():
                events.append(out.get()[1:])
            return events
        ev = run_tokens("héllo ✓ wörld")
        pieces = [v for k, v in ev if k == "text"]
        assert "".join(pieces) == "héllo ✓ wörld" and "\ufffd" not in "".join(pieces)
        assert len(pieces) == len("héllo ✓ wörld"), pieces  # one event per whole character
        ev = run_tokens("say STOP now", stops=["STOP"])
        assert "".join(v for k, v in ev if k == "text") == "say " and ev[-1] == ("done", {"finish_reason": "stop", "completion_tokens": 8})
        ev = run_tokens("say ST", stops=["STOP"], max_new=6)  # held back "ST" comes out when the reply ends
        assert "".join(v for k, v in ev if k == "text") == "say ST" and ev[-1][1]["finish_reason"] == "length"
        ev = run_tokens("ab", extra=[256])  # <|endoftext|>, a stop token of a base model
        assert "".join(v for k, v in ev if k == "text") == "ab" and ev[-1][1] == {"finish_reason": "stop", "completion_tokens": 3}


def test_serve_openai_client_stream_equals_text_and_sample_py():
    """Through the openai package: a chat completion at temperature 0, streamed and not, is byte-identical to
    the other and to `sample.py --chat=True --temperature=0`; a completion equals `sample.py --temperature=0`;
    usage counts tokens; 4 concurrent streams each get the text they get alone; /v1/models lists the model."""
    need("openai", "openai")
    import openai
    sft = _serve_chat()
    with serving(sft) as (url, engines):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["serve-chat"]
        ask = [{"role": "user", "content": "Name a color."}]
        r = client.chat.completions.create(model="serve-chat", messages=ask, temperature=0, max_tokens=40)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(client.chat.completions.create(model="serve-chat", messages=ask, temperature=0, max_tokens=40, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        p = run_here("sample.py", [f"--out_dir={sft}", "--chat=True", "--start=Name a color.", "--temperature=0",
                                   "--max_new_tokens=40", "--device=cpu"])
        assert p.returncode == 0 and p.stdout == text + "\n", (p.stdout, text)
        c = client.completions.create(model="serve-chat", prompt="The color", temperature=0, max_tokens=30)
        p = run_here("sample.py", [f"--out_dir={sft}", "--start=The color", "--temperature=0", "--max_new_tokens=30",
                                   "--num_samples=1", "--device=cpu"])
        assert p.stdout.startswith("The color" + c.choices[0].text), (p.stdout, c.choices[0].text)
        # 4 concurrent streams of different prompts: each its own text (the one it gets alone)
        prompts = ["Name a color.", "What is 2+2?", "Say hi.", "Name an animal please."]
        alone = {q: client.chat.completions.create(model="serve-chat", messages=[{"role": "user", "content": q}], temperature=0,
                                                   max_tokens=30).choices[0].message.content for q in prompts}
        got = {}

        def stream(q):
            got[q] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="serve-chat", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=30, stream=True))
        threads = [threading.Thread(target=stream, args=(q,)) for q in prompts]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert got == alone and len(set(alone.values())) > 1, (got, alone)


def test_serve_sse_framing_and_order():
    """The raw event stream of a chat request with n=2 and include_usage: every event 'data: {json}' and a
    blank line; each choice's role delta first, then content, then exactly one chunk with its finish_reason;
    then the usage chunk (no choices); then [DONE]. A completion stream likewise, with text chunks."""
    with serving(_serve_base()) as (url, engines):
        status, body = http(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "n": 2,
                                                          "max_tokens": 6, "stream": True, "temperature": 0.7, "seed": 1,
                                                          "stream_options": {"include_usage": True}})
        assert status == 200
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
        for i in (0, 1):
            mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["length"]
            assert all("content" in m["delta"] for m in mine[1:-1]) and mine[-1]["delta"] == {}
        status, body = http(url, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "stream": True, "temperature": 0})
        events = sse_events(body)
        chunks = [json.loads(e) for e in events[:-1]]
        assert events[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        status, whole = http(url, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def _rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_serve_faults_and_load():
    """200 requests from 8 concurrent clients all answered right; 25 kinds of malformed request each a 4xx
    with OpenAI's error object; clients that disconnect mid-stream or before a non-streamed reply stop their
    generation at once; a slow reader gets its whole stream while others are served; a full queue is 429; an
    API key is enforced. Afterwards the server answers as before and this process has grown < 64 MB."""
    base = _serve_base()
    with serving(base, max_queue=64) as (url, engines):
        eng = engines["serve-base"]
        ref = http(url, "/v1/completions", {"prompt": "ref", "max_tokens": 12, "temperature": 0})[1]["choices"][0]["text"]
        assert ref == _greedy(base, T.get_tokenizer("byte").encode("ref"), 12, {256})
        for _ in range(8):  # warm-up: thread stacks and allocator pools
            http(url, "/v1/completions", {"prompt": "warm", "max_tokens": 3})
        gc_rss = _rss_mb()
        expect = {i: _greedy(base, T.get_tokenizer("byte").encode(f"p{i % 10}"), 4, {256}) for i in range(10)}
        bad = []

        def client(k):
            for i in range(k, 200, 8):
                st, r = http(url, "/v1/completions", {"prompt": f"p{i % 10}", "max_tokens": 4, "temperature": 0})
                if st != 200 or r["choices"][0]["text"] != expect[i % 10]:
                    bad.append((i, st, r))
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert not bad, bad[:3]
        msgs = [{"role": "user", "content": "x"}]
        cases = [  # (path, body or raw bytes, status, param named)
            ("/v1/chat/completions", b"{not json", 400, None),
            ("/v1/chat/completions", [1, 2], 400, None),
            ("/v1/chat/completions", {"model": "serve-base"}, 400, "messages"),
            ("/v1/chat/completions", {"messages": []}, 400, "messages"),
            ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
            ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0]"),
            ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
            ("/v1/chat/completions", {"messages": msgs, "model": "gpt-9"}, 404, "model"),
            ("/v1/chat/completions", {"messages": msgs, "max_tokens": 10**9}, 400, "max_tokens"),
            ("/v1/chat/completions", {"messages": msgs, "max_tokens": 0}, 400, "max_tokens"),
            ("/v1/chat/completions", {"messages": msgs, "max_tokens": "10"}, 400, "max_tokens"),
            ("/v1/chat/completions", {"messages": msgs, "temperature": -1}, 400, "temperature"),
            ("/v1/chat/completions", {"messages": msgs, "temperature": "hot"}, 400, "temperature"),
            ("/v1/chat/completions", {"messages": msgs, "top_p": 0}, 400, "top_p"),
            ("/v1/chat/completions", {"messages": msgs, "n": 100}, 400, "n"),
            ("/v1/chat/completions", {"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
            ("/v1/chat/completions", {"messages": msgs, "stream": "yes"}, 400, "stream"),
            ("/v1/chat/completions", {"messages": msgs, "seed": "x"}, 400, "seed"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200_000}]}, 400, "messages"),
            ("/v1/chat/completions", {"messages": msgs * 1000}, 400, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "messages"),  # > context
            ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
            ("/v1/embeddings", {"input": "x"}, 404, None),
        ]
        for path, body, status, param in cases:
            st, r = http(url, path, **({"raw": body} if isinstance(body, bytes) else {"body": body}))
            assert st == status and set(r["error"]) == {"message", "type", "param", "code"}, (path, body, st, r)
            assert r["error"]["param"] == param and r["error"]["message"], (body, r)
        assert "context" in http(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]})[1]["error"]["message"]
        # an oversized body is refused from its Content-Length, unread
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1000)
        got = b""
        while chunk := s.recv(65536):  # the server closes the connection after the answer
            got += chunk
        s.close()
        head, _, body = got.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 413") and json.loads(body)["error"]["message"].startswith("the body is 2000000 bytes")
        # disconnects: mid-stream after the first event, and before a non-streamed reply (greedy: left alone,
        # each reply would run its 300 tokens)
        m, _, _ = H.load_model("resume", base, "cpu")
        steps = list(m.generate(torch.tensor([T.get_tokenizer("byte").encode("go")]), 300, temperature=0, stop_tokens=(256,)))
        assert len(steps) == 300 and int(steps[-1][0]) >= 0
        for stream in (True, False):
            before = eng.generated
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            body = json.dumps({"prompt": "go", "max_tokens": 300, "stream": stream, "temperature": 0}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            if stream:
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            else:
                time.sleep(0.05)
            s.close()
            t0 = time.time()
            while (eng.active or eng.waiting.qsize()) and time.time() - t0 < 10:
                time.sleep(0.02)
            assert not eng.active and eng.generated - before < 150, (stream, eng.generated - before)
        # a slow reader: a tiny receive buffer, read a few bytes at a time; a fast request completes meanwhile
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        body = json.dumps({"prompt": "slow", "max_tokens": 120, "stream": True, "temperature": 0}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        got = s.recv(64)
        assert http(url, "/v1/completions", {"prompt": "ref", "max_tokens": 12, "temperature": 0})[1]["choices"][0]["text"] == ref
        while True:
            time.sleep(0.002)
            chunk = s.recv(256)
            if not chunk:
                break
            got += chunk
        s.close()
        events = sse_events(got.decode().split("\r\n\r\n", 1)[1])
        slow = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert slow == _greedy(base, T.get_tokenizer("byte").encode("slow"), 120, {256})
        # a full queue: 429 with the error object
        eng.max_queue = 0
        st, r = http(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert st == 429 and r["error"]["code"] == "rate_limit_exceeded", r
        eng.max_queue = 64
        assert http(url, "/v1/completions", {"prompt": "ref", "max_tokens": 12, "temperature": 0})[1]["choices"][0]["text"] == ref
        assert _rss_mb() - gc_rss < 64, (gc_rss, _rss_mb())
        assert http(url, "/health")[1]["models"]["serve-base"]["running"] == 0
    with serving(base, key="sekrit") as (url, engines):
        st, r = http(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert st == 401 and r["error"]["code"] == "invalid_api_key"
        assert http(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer sekrit"})[0] == 200


def test_serve_arena_votes_train_dpo_and_the_reward_model():
    """POST /arena/vote: a pick of A or B is appended to the prefs file as {prompt, chosen, rejected} with both
    model names, a tie only to the votes log; dpo.py and reward.py train on the file as it is."""
    sft = _sft_model()[1]
    with tempfile.TemporaryDirectory() as tmp:
        prefs = Path(tmp) / "prefs.jsonl"
        with serving(sft, sft, prefs=prefs) as (url, engines):
            assert list(engines) == ["sft", "sft-b"]
            for i in range(12):
                msgs = [{"role": "user", "content": f"Question {i}?"}]
                a, b = {"model": "sft", "text": f"good answer {i}"}, {"model": "sft-b", "text": f"bad {i}"}
                st, r = http(url, "/arena/vote", {"messages": msgs, "a": a, "b": b, "winner": "a" if i % 2 else "b"})
                assert st == 200 and r == {"ok": True}
            assert http(url, "/arena/vote", {"messages": msgs, "a": a, "b": b, "winner": "tie"})[0] == 200
            st, r = http(url, "/arena/vote", {"messages": msgs, "a": a, "winner": "a"})
            assert st == 400 and "error" in r
        lines = [json.loads(l) for l in prefs.read_text().splitlines()]
        votes = [json.loads(l) for l in (Path(tmp) / "prefs.jsonl.votes.jsonl").read_text().splitlines()]
        assert len(lines) == 12 and len(votes) == 13 and votes[-1]["winner"] == "tie"
        assert lines[1] == {"prompt": [{"role": "user", "content": "Question 1?"}], "chosen": "good answer 1",
                            "rejected": "bad 1", "chosen_model": "sft", "rejected_model": "sft-b"}
        assert lines[0]["chosen"] == "bad 0" and lines[0]["chosen_model"] == "sft-b"
        p = run_here("dpo.py", [f"--init_from={sft}", f"--out_dir={tmp}/dpo", f"--data={prefs}", "--max_iters=2",
                                "--eval_interval=2", "--device=cpu", "--batch_size=2"])
        assert p.returncode == 0, p.stderr[-2000:]
        p = run_here("reward.py", [f"--init_from={sft}", f"--out_dir={tmp}/rm", f"--data={prefs}", "--max_iters=2",
                                   "--eval_interval=2", "--device=cpu", "--batch_size=2"])
        assert p.returncode == 0 and "held-out pair accuracy" in p.stdout, p.stderr[-2000:]


def test_serve_judge_for_eval_py():
    """eval.py --tasks=judge with --judge_url pointing at our own server (the SFT model judging its own
    replies): every held-out reply is sent to the judge and counted, scored or not."""
    sft = _sft_model()[1]
    with serving(_serve_chat()) as (url, engines), tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sft / "ckpt.pt", Path(tmp) / "ckpt.pt")
        before = engines["serve-chat"].generated
        p = run_eval(f"--out_dir={tmp}", "--tasks=judge", f"--judge_url={url}", "--judge_model=serve-chat", "--limit=3",
                     "--max_new_tokens=16", "--device=cpu", f"--judge_data={shared_file('instruction-data.json')}")
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        res = json.loads((Path(tmp) / "eval.json").read_text())["ckpt.pt"]["tasks"]["judge"]
        assert res["n"] == 3 and engines["serve-chat"].generated > before, res


def test_serve_page_in_a_browser():
    """The page in headless Chromium (selenium): a message typed and sent streams a reply equal to the API's;
    regenerate gives it again; the arena shows two answers, a pick of A lands in the prefs file as A's text
    chosen. A screenshot is saved (SERVE_SCREENSHOT=path keeps it)."""
    need("selenium", "selenium")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        raise unittest.SkipTest("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    sft = _serve_chat()
    with tempfile.TemporaryDirectory() as tmp, serving(sft, prefs=Path(tmp) / "prefs.jsonl") as (url, engines):
        opts = webdriver.ChromeOptions()
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=opts)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(url + "/")
            wait.until(lambda d: "1 model" in d.find_element(By.ID, "status").text)
            for field, value in (("temperature", "0"), ("max_tokens", "24")):
                el = driver.find_element(By.ID, field)
                el.clear()
                el.send_keys(value)
            driver.find_element(By.ID, "input").send_keys("Name a color.")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .regenerate"))
            want = http(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a color."}],
                                                      "temperature": 0, "max_tokens": 24})[1]["choices"][0]["message"]["content"]
            reply = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].get_attribute("textContent")
            assert reply(driver) == want, (reply(driver), want)
            driver.find_element(By.CSS_SELECTOR, ".regenerate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .regenerate"))
            assert reply(driver) == want and len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
            driver.save_screenshot(os.environ.get("SERVE_SCREENSHOT") or str(Path(tmp) / "chat.png"))
            driver.find_element(By.CSS_SELECTOR, "#mode option[value=arena]").click()
            for field, value in (("temperature", "0.9"),):
                el = driver.find_element(By.ID, field)
                el.clear()
                el.send_keys(value)
            driver.find_element(By.ID, "input").send_keys("Say something.")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "vote-a").is_enabled())
            a_text = driver.find_element(By.ID, "arena-a").get_attribute("textContent")
            driver.find_element(By.ID, "vote-a").click()
            wait.until(lambda d: "recorded" in d.find_element(By.ID, "status").text)
            shot = os.environ.get("SERVE_SCREENSHOT")
            driver.save_screenshot(shot.replace(".png", "-arena.png") if shot else str(Path(tmp) / "arena.png"))
        finally:
            driver.quit()
        rec = json.loads((Path(tmp) / "prefs.jsonl").read_text())
        assert rec["prompt"] == [{"role": "user", "content": "Say something."}] and rec["chosen"] == a_text
        assert rec["chosen_model"] == rec["rejected_model"] == "serve-chat"  # one model: two samples of it


def test_serve_cli_bad_input_one_line():
    """python serve.py: a port in use, a missing checkpoint, a bad setting: one line, exit 2 (a busy port before
    any model loads); two arena models of different tokenizers are allowed, with a note saying so."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert_clear_error(run_here("serve.py", [f"--out_dir={_sft_model()[1]}", f"--port={port}"]), f"{port}", "--port")
    finally:
        busy.close()
    assert_clear_error(run_here("serve.py", ["--out_dir=/no/such/dir", "--port=0"]), "/no/such/dir")
    assert_clear_error(run_here("serve.py", ["--out_dir=x", "--max_batch=0"]), "max_batch")
    # two arena models of different tokenizers (byte, GPT-2's): allowed, and said (serve_forever returns at once)
    other = FT_TMP / "serve-gpt2-tokens"
    if not (other / "ckpt.pt").exists():
        from common import save_checkpoint
        cfg = M.GPTConfig(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=32)
        save_checkpoint({"model": M.GPT(cfg).state_dict(), "model_args": asdict(cfg), "config": {}, "step": 0,
                         "best_val_loss": 0.0, "tokenizer": {"kind": "gpt2", "path": str(shared_file("gpt2.tiktoken"))},
                         "meta": {}, "rng": {}}, other / "ckpt.pt")
    with mock.patch.object(ThreadingHTTPServer, "serve_forever", lambda self, *a: None):
        p = run_here("serve.py", [f"--out_dir={_serve_chat()}", f"--out_dir_b={other}", "--port=0", "--device=cpu"])
    assert p.returncode == 0 and "serving serve-chat (chat), serve-gpt2-tokens (base)" in p.stdout, p.stdout + p.stderr
    assert "different tokenizers" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_quant_int8_int4_perplexity_and_greedy_agreement():
    """quant.py on the tiny SFT model: held-out perplexity within 2% of float32 (int8) and 10% (int4), greedy
    decoding agreeing on >= 90% of 64 tokens (int8), and the head and every block's Linear replaced."""
    import quant as Q
    m, _, tok = H.load_model("resume", _sft_model()[1], "cpu")
    recs = json.loads(Path(shared_file("instruction-data.json")).read_text())
    ids = torch.tensor([tok.encode("\n\n".join(r["instruction"] + "\n" + r["output"] for r in recs[-60:]))[:3000]])

    def nll(model):
        with torch.no_grad():
            return sum(model(ids[:, i:i + 300], ids[:, i + 1:i + 301])[1].item() * 300 for i in range(0, 2700, 300)) / 2700
    f = nll(m)
    prompts = [torch.tensor([tok.encode(r["instruction"])[:100]]) for r in recs[:4]]
    greedy = lambda model, p: torch.stack(list(model.generate(p, 64, temperature=0)), 1)
    want = [greedy(m, p) for p in prompts]
    for mode, bound in (("int8", 1.02), ("int4", 1.10)):
        q = Q.quantize(copy.deepcopy(m), mode)
        assert sum(isinstance(x, Q.QuantLinear) for x in q.modules()) == 1 + 4 * len(q.transformer.h)
        ratio = math.exp(nll(q) - f)
        agree = sum((w == greedy(q, p)).float().mean().item() for w, p in zip(want, prompts)) / len(prompts)
        print(f"  {mode}: perplexity {ratio:.4f}x float32's, greedy agreement {agree:.3f} over 64 tokens")
        assert ratio < bound and (mode != "int8" or agree >= 0.9), (mode, ratio, agree)


def test_quant_compiled_decoding_one_graph_same_tokens():
    """model.compile_decoding() on the int8 tiny SFT model: the one-token step is a single graph (fbgemm's packed
    weights reached through quant.py's op, not a graph break per Linear), generate() runs every decode step
    through it, batch 1 and a ragged batch give eager int8's greedy tokens, and sample.py --compile=True prints
    what the eager run prints."""
    import quant as Q
    from common import cpp_compiler
    if not cpp_compiler():
        raise unittest.SkipTest("torch.compile on a CPU needs a C++ compiler (apt-get install g++)")
    m, _, tok = H.load_model("resume", _sft_model()[1], "cpu")
    q = Q.quantize(m, "int8")
    prompts = [tok.encode("Rewrite the sentence"), tok.encode("Name three colors.")]
    cache = q.kv_cache(1, 40, "cpu")
    with torch.inference_mode():
        q._run(torch.tensor([prompts[0]]), cache, pos=0)
        e = torch._dynamo.explain(q._run)(torch.tensor([[5]]), cache, pos=len(prompts[0]))
    assert e.graph_count == 1 and e.graph_break_count == 0, (e.graph_count, [str(b.reason)[:200] for b in e.break_reasons])
    greedy = lambda p: torch.stack(list(q.generate(p, 24, temperature=0)), 1).tolist()
    want = [greedy(torch.tensor([prompts[0]])), greedy(prompts)]
    compiled, calls = q.compile_decoding().decode_step, []
    q.decode_step = lambda *a, **k: calls.append(1) or compiled(*a, **k)
    assert [greedy(torch.tensor([prompts[0]])), greedy(prompts)] == want and len(calls) == 2 * 23, len(calls)
    args = [f"--out_dir={_sft_model()[1]}", "--quantize=int8", "--start=Name three colors.", "--max_new_tokens=24",
            "--num_samples=1", "--temperature=0", "--device=cpu"]
    eager, comp = run_here("sample.py", args), run_here("sample.py", args + ["--compile=True"])
    assert comp.returncode == 0 and "compiled the decode step" in comp.stderr, comp.stderr[-2000:]
    assert comp.stdout == eager.stdout and len(eager.stdout) > 20, (eager.stdout, comp.stdout)


def test_compile_without_a_cpp_compiler_is_one_line():
    """--compile=True on a CPU with no C++ compiler on PATH (torch.compile would fail deep inside inductor):
    sample.py and train.py each say so in one line, exit 2, before any work (train.py writes nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": tmp, "CXX": ""}
        p = run(["sample.py", f"--out_dir={_sft_model()[1]}", "--compile=True", "--device=cpu"], env=env)
        assert_clear_error(p, "--compile=True", "C++ compiler")
        p = run(["train.py", f"--out_dir={tmp}/out", "--compile=True", "--device=cpu"], env=env)
        assert_clear_error(p, "--compile=True", "C++ compiler")
        assert not Path(tmp, "out").exists()


def test_quant_command_lines():
    """--quantize for eval.py (its results kept apart as 'ckpt.pt (int8)'), sample.py and serve.py; a mode that
    does not exist is one clear line in each, before any model loads."""
    sft = _sft_model()[1]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sft / "ckpt.pt", Path(tmp) / "ckpt.pt")
        lm = [f"--out_dir={tmp}", "--tasks=lm", f"--lm_data={shared_file('tinyshakespeare.txt')}", "--lm_max_tokens=3000",
              "--device=cpu"]
        assert run_eval(*lm).returncode == 0 and run_eval(*lm, "--quantize=int8").returncode == 0
        res = json.loads((Path(tmp) / "eval.json").read_text())
        plain, q8 = (res[k]["tasks"]["lm:tinyshakespeare.txt"] for k in ("ckpt.pt", "ckpt.pt (int8)"))
        assert res["ckpt.pt (int8)"]["quantize"] == "int8" and abs(q8["bpb"] / plain["bpb"] - 1) < 0.01, (plain, q8)
        p = run_here("sample.py", [f"--out_dir={sft}", "--quantize=int4", "--start=The", "--max_new_tokens=8",
                                   "--num_samples=1", "--device=cpu"])
        assert p.returncode == 0 and p.stdout.startswith("The"), p.stderr[-1000:]
    for script, extra in (("sample.py", []), ("eval.py", ["--tasks=lm"]), ("serve.py", ["--port=0"])):
        assert_clear_error(run_here(script, [f"--out_dir={sft}", "--quantize=int3", "--device=cpu", *extra]), "int3", "int8")


# ----- clean: the fastText-style classifier, against fastText itself (last: fastText's test pins malloc) -----

# Same for ours and fastText. lr and epoch are far above fastText's defaults (0.1, 5), which on 150 training
# docs learn nothing (both stay at ~50% on newsgroups); buckets is small to keep 40 trainings light.
FT_PARITY = dict(dim=16, epoch=25, lr=1.0, word_ngrams=2, buckets=2**16, min_count=1)
FT_SPLITS, FT_TRAIN = 20, 150  # 20 seeded 150/50 splits of each 200-doc set


def _write_lines(path, texts):
    Path(path).write_bytes(b"".join(t.encode("utf-8", "surrogateescape") + b"\n" for t in texts))


@functools.cache
def _labelled_sets():
    """{name: (texts, labels, positive label)}; a newsgroups post becomes one lowercased, single-spaced line."""
    pang_lee = CL.read_fasttext(shared_file("quality/pang_lee_polarity.txt"))
    with open(shared_file("quality/newsgroups.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    news = ([" ".join(r["text"].lower().split()) for r in rows], [r["label"] for r in rows])
    return {"pang_lee": (*pang_lee, "pos"), "newsgroups": (*news, "sci.space")}


def _spearman(a, b):
    def rank(x):  # 1-based ranks, ties get the average rank of their group
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def test_clean_classifier_features_match_fasttext():
    """Our feature rows, mapped to fastText's word ids, average fastText's own input matrix exactly as fastText
    does for the same line: same tokens, "</s>", FNV-1a with signed bytes, sign-extended bigram hashes."""
    texts, labels, _ = _labelled_sets()["pang_lee"]
    extra = ["naïve café — ünïcödé", "", "word", "a  b\tc"]  # bytes >= 0x80; empty; one word; spaces
    # not a power of two: modulo 2**k the hashes' sign extension (a multiple of 2**32) would vanish
    buckets = 250_007
    model = CL.fit_classifier(texts[:100] + extra, labels[:100] + ["pos"] * len(extra), dim=4, epoch=1, buckets=buckets)
    probe = texts + extra + ["unseen words: zyx wvu"]
    with tempfile.TemporaryDirectory() as tmp:
        CL.write_fasttext(f"{tmp}/train.txt", texts[:100] + extra, labels[:100] + ["pos"] * len(extra))
        _write_lines(f"{tmp}/lines.txt", probe)
        res, = bench.fasttext_runs([{"train": f"{tmp}/train.txt", "lines": f"{tmp}/lines.txt", "what": "vectors",
                               "words": model["vocab"], "params": dict(dim=4, epoch=1, wordNgrams=2, bucket=buckets,
                                                                       minCount=1)}])
        W = np.load(f"{tmp}/train.txt.W.npy")
    vocab = {w: i for i, w in enumerate(model["vocab"])}
    to_ft = np.array(res["ids"])
    assert len(vocab) == len(W) - buckets and (to_ft >= 0).all()
    for text, ref in zip(probe, res["vectors"]):
        ids = CL.ft_features(CL.ft_tokens(text), vocab, buckets, 2)
        rows = np.where(ids < len(vocab), to_ft[np.minimum(ids, len(vocab) - 1)], ids)
        assert np.allclose(W[rows].mean(axis=0), np.array(ref), atol=1e-6), text


def test_clean_classifier_parity_with_fasttext():
    """Same data, splits and hyperparameters as fastText itself: mean test accuracy within 2 points, and the two
    models' P(positive) on the test docs rank alike (Spearman over each split's 50 docs, averaged over the 20
    splits, >= 0.9) and are close (mean |difference| <= 0.03: ranks alone miss a missing lr decay)."""
    from concurrent.futures import ThreadPoolExecutor
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as pool:
        jobs, splits, ours = [], [], []
        for name, (texts, labels, pos) in _labelled_sets().items():
            for split in range(FT_SPLITS):
                perm = np.random.default_rng(split).permutation(len(texts))
                tr, te = perm[:FT_TRAIN], perm[FT_TRAIN:]
                splits.append((name, pos, texts, labels, tr, te, split))
                path = f"{tmp}/{name}{split}"
                CL.write_fasttext(path + ".train", [texts[i] for i in tr], [labels[i] for i in tr])
                _write_lines(path + ".test", [texts[i] for i in te])
                jobs.append({"train": path + ".train", "lines": path + ".test", "what": "predict", "params": dict(
                    dim=FT_PARITY["dim"], epoch=FT_PARITY["epoch"], lr=FT_PARITY["lr"], wordNgrams=FT_PARITY["word_ngrams"],
                    bucket=FT_PARITY["buckets"], minCount=FT_PARITY["min_count"], loss="softmax", seed=split)})
        theirs = pool.submit(bench.fasttext_runs, jobs)  # fastText's process on one core, ours on the other
        for name, pos, texts, labels, tr, te, split in splits:
            model = CL.fit_classifier([texts[i] for i in tr], [labels[i] for i in tr], seed=split, **FT_PARITY)
            probs = CL.predict_proba(model, [texts[i] for i in te])
            ours.append((name, pos, [labels[i] for i in te], probs, CL.labels_of(model)))
        results = theirs.result()
    for name in _labelled_sets():
        acc, ft_acc, rho, gap = [], [], [], []
        for (n, pos, gold, probs, names), res in zip(ours, results):
            if n != name:
                continue
            mine = probs[:, names.index(pos)]
            theirs = np.array([p[CL.LABEL_PREFIX + pos] for p in res["probs"]])
            acc.append(np.mean([names[k] == y for k, y in zip(probs.argmax(1), gold)]))
            ft_acc.append(np.mean([max(p, key=p.get) == CL.LABEL_PREFIX + y for p, y in zip(res["probs"], gold)]))
            rho.append(_spearman(mine, theirs))
            gap.append(np.abs(mine - theirs).mean())
        acc, ft_acc, rho, gap = np.mean(acc), np.mean(ft_acc), np.mean(rho), np.mean(gap)
        print(f"  {name}: accuracy ours {acc:.3f} fastText {ft_acc:.3f}; Spearman {rho:.3f}; mean |P ours - P fastText| {gap:.4f}")
        assert abs(acc - ft_acc) <= 0.02, (name, acc, ft_acc)
        assert rho >= 0.9, (name, rho)
        assert gap <= 0.03, (name, gap)
        if name == "newsgroups":  # both must really learn here, or agreeing would prove little
            assert min(acc, ft_acc) >= 0.8, (acc, ft_acc)


def test_clean_classifier_update_rule_written_out():
    # three epochs over two examples against fastText's update as its source spells it, per label and per
    # feature occurrence, from the same initial weights (training with lr=0 returns them untouched)
    texts, labels, lr, epoch = ["good good film", "bad film"], ["pos", "neg"], 1.0, 3
    kw = dict(dim=4, epoch=epoch, buckets=8, seed=3)
    init = CL.fit_classifier(texts, labels, lr=0.0, **kw)
    wi, wo = init["input"].astype(np.float64), init["output"].astype(np.float64)
    vocab = {w: i for i, w in enumerate(init["vocab"])}
    total, seen = epoch * sum(len(CL.ft_tokens(t)) for t in texts), 0  # 3 x (4 + 3) tokens, "</s>" included
    for _ in range(epoch):
        for text, label in zip(texts, labels):
            ids = CL.ft_features(CL.ft_tokens(text), vocab, 8, 2)  # "good" twice: its row is in the mean twice
            lr_t = lr * (1 - seen / total)
            seen += len(CL.ft_tokens(text))
            hidden = wi[ids].mean(axis=0)
            p = np.exp(wo @ hidden) / np.exp(wo @ hidden).sum()
            grad = np.zeros(4)
            for i in range(len(wo)):
                alpha = lr_t * ((i == CL.labels_of(init).index(label)) - p[i])
                grad += alpha * wo[i]
                wo[i] += alpha * hidden
            grad /= len(ids)
            for row in ids:
                wi[row] += grad
    model = CL.fit_classifier(texts, labels, lr=lr, **kw)
    assert np.abs(wi - init["input"]).max() > 1e-2  # the input rows did move
    assert np.allclose(model["input"], wi, atol=1e-6) and np.allclose(model["output"], wo, atol=1e-6)


def test_clean_classifier_learns_a_separable_task():
    # needs no fastText: a few epochs separate two vocabularies, unseen mixes fall between
    texts = ["good great fine", "great good nice", "bad awful poor", "awful bad nasty"] * 10
    labels = ["hq", "hq", "lq", "lq"] * 10
    model = CL.fit_classifier(texts, labels, epoch=20, lr=0.5, buckets=1 << 10)
    p = CL.predict_proba(model, ["good nice", "poor nasty"])
    assert CL.labels_of(model) == ["hq", "lq"] and p.shape == (2, 2) and np.allclose(p.sum(1), 1)
    assert p[0, 0] > 0.9 and p[1, 1] > 0.9, p


def test_clean_classifier_read_write_fasttext():
    texts = ["a first text", "multi\nline  text\twith tabs", "ünïcödé — ok", ""]
    labels = ["pos", "neg", "pos", "neg"]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/data.txt"
        CL.write_fasttext(path, texts, labels)
        assert CL.read_fasttext(path) == (["a first text", "multi line text with tabs", "ünïcödé — ok", ""], labels)
        Path(path).write_text("__label__a __label__b two labels\n\n   \n__label__c\tx  y\r\n", encoding="utf-8")
        assert CL.read_fasttext(path) == (["two labels", "x y"], ["a", "c"])
        Path(path).write_text("__label__a fine\n\nno label here\n", encoding="utf-8")
        try:
            CL.read_fasttext(path)
            raise AssertionError("a line without a label was accepted")
        except ValueError as e:
            assert f"{path}:3:" in str(e), e
        for bad_label in ["two words", ""]:
            try:
                CL.write_fasttext(path, ["text"], [bad_label])
                raise AssertionError(f"label {bad_label!r} was accepted")
            except ValueError:
                pass


def test_clean_classifier_save_load():
    texts, labels, _ = _labelled_sets()["pang_lee"]
    model = CL.fit_classifier(texts[:50], labels[:50], epoch=2, buckets=1 << 10)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.npz"
        CL.save_classifier(model, path)
        loaded = CL.load_classifier(path)
        assert CL.labels_of(loaded) == CL.labels_of(model) and loaded["vocab"] == model["vocab"]
        assert np.array_equal(CL.predict_proba(loaded, texts[50:]), CL.predict_proba(model, texts[50:]))
        good = Path(path).read_bytes()
        junk = {
            "random bytes": np.random.default_rng(0).bytes(4096),
            "a text file": b"__label__pos not a model at all\n",
            "a truncated model": good[: len(good) // 2],
            "an empty file": b"",
        }
        for what, data in junk.items():
            Path(f"{tmp}/{what}").write_bytes(data)
        with open(f"{tmp}/an npz without our magic", "wb") as f:
            np.savez(f, input=model["input"], output=model["output"])
        with open(f"{tmp}/an npz with pickled objects", "wb") as f:
            np.savez(f, magic=np.array(CL.MAGIC), meta=np.array([{"a": 1}], dtype=object))
        with open(f"{tmp}/a bare npy", "wb") as f:
            np.save(f, model["output"])
        for what in list(junk) + ["an npz without our magic", "an npz with pickled objects", "a bare npy"]:
            try:
                CL.load_classifier(f"{tmp}/{what}")
                raise AssertionError(f"load accepted {what}")
            except ValueError as e:
                assert str(e).startswith(f"{tmp}/{what} is not a quality classifier written by clean.py: "), e


def test_clean_classifier_quantile_keep():
    assert CL.quantile_keep([0.1, 0.9, 0.5, 0.9], 0.5).tolist() == [1, 3]
    assert CL.quantile_keep([1, 1, 1, 1], 0.5).tolist() == [0, 1]  # ties: lower index first
    assert CL.quantile_keep([0.2, 0.8, 0.8, 0.1], 0.5).tolist() == [1, 2]
    assert CL.quantile_keep([3, 1, 2], 1).tolist() == [0, 1, 2]
    assert CL.quantile_keep([3, 1, 2], 0.5).tolist() == [0, 2]  # 1.5 rounds up to 2
    assert len(CL.quantile_keep(np.arange(10), 0.25)) == 3  # 2.5 rounds up
    assert len(CL.quantile_keep(np.arange(10), 0.24)) == 2  # 2.4 rounds down
    assert CL.quantile_keep([5.0], 0.01).tolist() == [0]  # at least one
    assert CL.quantile_keep([], 0.5).tolist() == []
    assert CL.quantile_keep([float("nan"), 0.1], 0.5).tolist() == [1]  # NaN ranks last
    for keep in [0, -0.1, 1.5]:
        try:
            CL.quantile_keep([1, 2], keep)
            raise AssertionError(f"keep={keep} was accepted")
        except ValueError:
            pass


def test_clean_classifier_deterministic():
    texts, labels, _ = _labelled_sets()["pang_lee"]
    a, b, c = (CL.fit_classifier(texts[:60], labels[:60], epoch=2, buckets=1 << 10, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a["input"], b["input"]) and np.array_equal(a["output"], b["output"])
    assert not np.array_equal(a["input"], c["input"])  # and the seed does matter


# ----- runner -----


def _collect():
    return [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]


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
        except (Exception, SystemExit):  # a die() inside a test fails that test alone
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
    try:
        code = main(sys.argv[1:])
    finally:  # (not in main(), which a test runs too)
        if os.environ.get("KEEP_TEST_TMP"):
            print(f"scratch files kept in {RUN_TMP}", file=sys.stderr)
        else:
            shutil.rmtree(RUN_TMP, ignore_errors=True)
    sys.exit(code)
