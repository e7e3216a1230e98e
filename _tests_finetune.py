"""Tests of finetune.py, dpo.py, chat_data.py and sample.py --chat (merged into test_all.py later).
Run: python test_all.py -k finetune   (or -k dpo, -k chat)"""
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
_TMP = Path(tempfile.mkdtemp(prefix="fromscratch-ft-tests-"))


def shared_file(name):
    p = SHARED / name
    if not p.exists():
        raise unittest.SkipTest(f"{p} not found (public test data lives in ../shared/data beside the checkout)")
    return p


def run(args, timeout=180):
    # one thread: these tiny models gain nothing from two, and on a busy 2-core machine two threads per
    # process run an order of magnitude slower (spinning OpenMP workers)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def assert_clear_error(p, *needles):
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:{p.stdout[-2000:]}\nstderr:{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


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
    d = _TMP / "formats"
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
    root = _TMP / "pydocs-root"
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
    base, out = tiny_base(_TMP / "base"), _TMP / "sft"
    if not (out / "ckpt.pt").exists():
        p = run(_sft_args(base, out))
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
    from common import load_model
    m, _, tok = load_model("resume", out, "cpu")
    assert m.config.vocab_size == 320 and tok.n_vocab == 261


def test_dpo_e2e_raises_held_out_preference_accuracy():
    _, sft = _sft_model()
    out = _TMP / "dpo"
    p = run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}",
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
    assert last["val/rewards/accuracy"] > 0.6, last
    assert last["val/rewards/margins"] > 0.2 and last["val/loss"] < math.log(2) - 0.05, last
    assert last["train/rewards/accuracy"] > 0.6, last
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert [f["stage"] for f in ck["finetune"]] == ["sft", "dpo"]
    assert ck["finetune"][-1]["val"]["rewards/accuracy"] > ck["finetune"][-1]["val_before"]["rewards/accuracy"]


# -----------------------------------------------------------------------------
# bad input: clear errors, exit 2, nothing overwritten


def test_finetune_bad_records_name_file_record_field():
    base = tiny_base(_TMP / "base")
    bad = _TMP / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "c", "input": "d"}]))
    out = _TMP / "sft-bad"
    assert_clear_error(run(["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={bad}", "--device=cpu"]),
                       str(bad), "record 3", "'output'")
    assert not (out / "ckpt.pt").exists()
    # a checkpoint already there survives a failed run even with overwrite=True
    out.mkdir(exist_ok=True)
    (out / "ckpt.pt").write_bytes(b"precious")
    assert_clear_error(run(["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={bad}",
                            "--overwrite=True", "--device=cpu"]), "record 3")
    assert_clear_error(run(["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={bad}",
                            "--device=cpu"]), "already exists")
    assert (out / "ckpt.pt").read_bytes() == b"precious"
    jl = _TMP / "bad.jsonl"
    jl.write_text(json.dumps({"messages": CONV}) + "\n" + "{not json\n")
    assert_clear_error(run(["finetune.py", f"--init_from={base}", f"--out_dir={out}-2", f"--data={jl}",
                            "--device=cpu"]), str(jl), "record 2")
    assert_clear_error(run(["finetune.py", f"--init_from={base}", f"--out_dir={base}", "--device=cpu"]), "base")
    assert_clear_error(run(["finetune.py", f"--init_from={_TMP / 'nothing'}", f"--out_dir={out}-3", "--device=cpu"]),
                       "no checkpoint", "train.py")


def test_dpo_bad_input_and_without_sft():
    base = tiny_base(_TMP / "base")
    pref = _TMP / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    out = _TMP / "dpo-bad"
    # the pretrained base has no chat template (and no chat-token rows): run SFT first
    assert_clear_error(run(["dpo.py", f"--init_from={base}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       "run SFT first", "finetune.py")
    _, sft = _sft_model()
    assert_clear_error(run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       str(pref), "record 2", "'rejected'")
    pref.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    assert_clear_error(run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}", f"--data={pref}", "--device=cpu"]),
                       "record 1", "'prompt'")
    assert_clear_error(run(["dpo.py", f"--init_from={sft}", f"--out_dir={out}", "--loss_type=kto", "--device=cpu"]),
                       "loss_type")
    assert not (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# sample.py --chat


def test_chat_sample_multi_turn_streams_and_stops_at_end():
    """A tiny model fine-tuned on a few memorable conversations: a scripted reply ends at <|end|> (nothing
    after it, though max_new_tokens allows 200), and piped turns carry the conversation (the second answer
    depends on the first question; /reset forgets it)."""
    base, out = tiny_base(_TMP / "base"), _TMP / "chat-sft"
    data = _TMP / "chat.jsonl"
    convs = [{"messages": [{"role": "user", "content": f"I am {n}."}, {"role": "assistant", "content": f"Hi {n}!"},
                           {"role": "user", "content": "Who am I?"}, {"role": "assistant", "content": f"You are {n}."}]}
             for n in ("Ann", "Bob")] + [{"messages": [{"role": "user", "content": "ping"},
                                                      {"role": "assistant", "content": "pong"}]}]
    data.write_text("".join(json.dumps(c) + "\n" for c in convs * 10))
    p = run(["finetune.py", f"--init_from={base}", f"--out_dir={out}", f"--data={data}", "--max_iters=60",
             "--eval_interval=60", "--batch_size=8", "--learning_rate=1e-2", "--warmup_iters=5", "--device=cpu"])
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(["sample.py", f"--out_dir={out}", "--chat=True", "--start=ping", "--temperature=0", "--device=cpu"])
    assert p.returncode == 0 and p.stdout == "pong\n", (p.stdout, p.stderr[-2000:])
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--chat=True", "--temperature=0",
                        "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       input="I am Bob.\nWho am I?\n/reset\nI am Ann.\nWho am I?\n",
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout == "Hi Bob!\nYou are Bob.\nHi Ann!\nYou are Ann.\n", (p.stdout, p.stderr)


def test_finetune_hh_rlhf_and_alpaca_sets_from_their_download_paths():
    """The named downloads, read offline from where prepare.download puts them: hh-rlhf's train files give
    the train pairs and its test files the held-out ones; odd transcripts are skipped with a count."""
    import gzip
    import chat_data as C
    root = _TMP / "dl-root"
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
    hf = _TMP / "hf-gpt2"
    torch.manual_seed(0)
    M.save_hf(M.GPT(M.GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=32)), hf)
    data = _TMP / "tiny-chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(10)))
    out = _TMP / "sft-gpt2"
    p = run(["finetune.py", f"--init_from={hf}", f"--out_dir={out}", f"--data={data}", "--max_iters=3",
             "--eval_interval=3", "--batch_size=2", "--device=cpu"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "growing the embeddings to 50304 rows" in p.stdout
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["vocab_size"] == 50304 and ck["tokenizer"]["kind"] == "gpt2" and ck["chat"]
    new_rows = ck["model"]["transformer.wte.weight"][50257:50261]
    assert new_rows.abs().sum() > 0 and torch.isfinite(new_rows).all()
