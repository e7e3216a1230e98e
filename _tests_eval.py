"""Tests of eval.py (merged into test_all.py later). Run: python test_all.py -k eval"""
import contextlib
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import eval as E
import model as M
import tokenizer as T

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
TMP = Path(tempfile.mkdtemp(prefix="fromscratch-eval-tests-"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def one_thread(fn):
    """Tiny models gain nothing from a second thread on a busy 2-core machine (see _tests_model.py)."""
    def wrapper():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(n)
    wrapper.__name__ = fn.__name__
    return wrapper


def run_eval(*args, timeout=120):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def assert_clear_error(p, *needles):
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:{p.stdout[-2000:]}\nstderr:{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def dies(fn, *args):
    """The one 'error: ...' line of a function that must exit 2 (in-process: cheaper than a subprocess)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            fn(*args)
        except SystemExit as e:
            assert e.code == 2, e.code
            return err.getvalue().strip()
    raise AssertionError("did not exit")

# -----------------------------------------------------------------------------
# a model whose answers are known: trained until it has learnt a fixed answer for each of KNOWN keys;
# the UNKNOWN keys it never saw.

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
    known = E.read_hellaswag(hellaswag_file(TMP / "hs_known.jsonl", KNOWN))
    r = E.multiple_choice(model, BYTE, known, known, True, 0, 0, 256, contextlib.nullcontext(), "known")
    assert r["acc"] == 1.0 and r["acc_norm"] == 1.0 and r["n"] == len(KNOWN), r
    unknown = E.read_hellaswag(hellaswag_file(TMP / "hs_unknown.jsonl", UNKNOWN * 24, seed=1))
    r = E.multiple_choice(model, BYTE, unknown, unknown, True, 0, 0, 4096, contextlib.nullcontext(), "unknown")
    assert r["n"] == 240 and r["chance"] == 0.25
    assert abs(r["acc"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 240), r  # within 4 standard errors of chance


def test_eval_fewshot_prompts():
    """k examples before the question, drawn per question with the seed, never the question itself; MMLU's
    from the same subject, with the subject line once at the top."""
    items = E.read_hellaswag(hellaswag_file(TMP / "hs_shots.jsonl", KNOWN))
    for i, it in enumerate(items):
        shots = E.fewshot(items, range(len(items)), i, 3, 7, True)
        assert len(shots) == 3 and it not in shots and len({s["context"] for s in shots}) == 3
        assert shots == E.fewshot(items, range(len(items)), i, 3, 7, True)
        prompt = E.mc_prompt(it, shots)
        assert prompt.endswith("\n\n" + it["context"]) and prompt.count("\nA: ") == 3
        assert prompt.startswith(shots[0]["context"] + shots[0]["choices"][shots[0]["gold"]] + "\n\n")
    assert E.fewshot(items, range(len(items)), 0, 3, 7, True) != E.fewshot(items, range(len(items)), 0, 3, 8, True)
    mmlu = TMP / "mm"
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
    # crafted: 'ab' sums -2 (-1/byte), 'abcdefgh' -4 (-0.5/byte); 'é' -2 is 2 bytes (-1/byte), 'a' -1.5
    items = [{"choices": ["ab", "abcdefgh"], "gold": 0}, {"choices": ["é", "a"], "gold": 0}]
    lls = [(-2.0, 1, False), (-4.0, 1, False), (-2.0, 1, False), (-1.5, 1, False)]
    assert E.mc_predictions(items, lls, [0, 0, 1, 1]) == [(0, 1), (1, 0)]
    m = E.mc_metrics(items, lls, [0, 0, 1, 1])
    assert m["acc"] == 0.5 and m["acc_norm"] == 0.5 and m["chance"] == 0.5


def test_eval_encode_pair_like_harness():
    tok = BYTE
    assert E.encode_pair(tok, "Q: a\nA: ", "red") == (tok.encode("Q: a\nA:"), tok.encode(" red"))
    assert E.encode_pair(tok, "", "red") == ([tok.eot_id], tok.encode("red"))
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
    path = TMP / "gsm.jsonl"
    with open(path, "w") as f:
        for k in KNOWN + UNKNOWN:
            f.write(json.dumps({"question": f"what is {k}?", "answer": f"It is.\n#### {number(k)}"}) + "\n")
    items = E.read_gsm8k(path)
    assert items[0]["target"] == number("a").replace(",", "")
    kn = E.gsm8k(model, BYTE, items[:len(KNOWN)], items, 0, 0, False, 24, contextlib.nullcontext())
    un = E.gsm8k(model, BYTE, items[len(KNOWN):], items, 0, 0, False, 24, contextlib.nullcontext())
    assert kn["exact_match"] == 1.0 and kn["n"] == len(KNOWN), kn
    assert un["exact_match"] == 0.0, un
    reply = E.generate_reply(model, BYTE, BYTE.encode("Question: what is b?\nAnswer:"), 40, ("####",),
                             [BYTE.eot_id])
    assert reply == f" b is {number('b')} ", reply  # cut before the stop string


@one_thread
def test_eval_cli_known_model_table_and_json():
    """The whole script on a checkpoint: the table, eval.json (merged, other models' entries kept), progress."""
    out = save_ckpt(known_model(), TMP / "out-known")
    (out / "eval.json").write_text(json.dumps({"gpt2": {"tasks": {"hellaswag": {"acc": 0.3}}}}))
    p = run_eval(f"--out_dir={out}", "--tasks=hellaswag", f"--task_file={hellaswag_file(TMP / 'k.jsonl', KNOWN)}",
                 "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "acc (0-shot, chance 0.25)" in p.stdout and "1.0000" in p.stdout, p.stdout
    assert "ETA" in p.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["gpt2"]["tasks"]["hellaswag"]["acc"] == 0.3
    hs = res["ckpt.pt"]["tasks"]["hellaswag"]
    assert hs["acc"] == 1.0 and hs["n"] == len(KNOWN) and res["ckpt.pt"]["step"] == 1
    # a second task later adds to the same entry
    lm = TMP / "lm.txt"
    lm.write_text("Q: a\nA: " + color("a") + "\n")
    p = run_eval(f"--out_dir={out}", "--tasks=lm", f"--lm_data={lm}", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert set(res["ckpt.pt"]["tasks"]) == {"hellaswag", "lm:lm.txt"}
    assert res["ckpt.pt"]["tasks"]["lm:lm.txt"]["bytes"] == len(lm.read_bytes())
    # a 2-shot run is filed beside the 0-shot one, not over it
    p = run_eval(f"--out_dir={out}", "--tasks=hellaswag", f"--task_file={TMP / 'k.jsonl'}", "--num_fewshot=2",
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
    path = TMP / "bpb.txt"
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
    import prepare
    if not (SHARED / "tinyshakespeare.txt").exists():
        raise unittest.SkipTest("../shared/data/tinyshakespeare.txt not found")
    src = TMP / "shakes.txt"
    src.write_text((SHARED / "tinyshakespeare.txt").read_text()[:20000])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.prepare(dataset="local", data_root=str(TMP / "data"), tokenizer="byte", input=str(src),
                        chunk_chars=2000)
    meta = prepare.load_meta(TMP / "data" / "local")
    val = prepare.read_bin(TMP / "data" / "local" / "val_000000.bin")
    assert E.text_bytes(BYTE, val) == meta["val"]["bytes"]
    src_kind = E.lm_source("local", str(TMP / "data"), "val")
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
    import prepare
    root = TMP / "pydocs-root"
    if not (root / "pydocs" / "raw" / "pydocs.jsonl").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.pydocs_records(root / "pydocs" / "raw", 0.1)
    return root


def test_eval_pydocs_task_held_out_and_deterministic():
    """The embedded task: questions only about held-out (val) modules, four different options with the
    object's own summary at the gold position, the same questions every time; few-shot examples from train."""
    import prepare
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
    d = TMP / "readers"
    d.mkdir(exist_ok=True)
    arc = d / "arc.jsonl"
    arc.write_text(json.dumps({"question": {"stem": "Which is a gas?", "choices": [
        {"text": "steam", "label": "A"}, {"text": "ice", "label": "B"}, {"text": "rock", "label": "C"}]},
        "answerKey": "A"}) + "\n\n" + json.dumps({"question": {"stem": "2+2?", "choices": [
            {"text": "4", "label": "1"}, {"text": "5", "label": "2"}]}, "answerKey": "1"}) + "\n")
    items = E.read_arc(arc)
    assert items[0] == {"context": "Question: Which is a gas?\nAnswer:", "choices": [" steam", " ice", " rock"], "gold": 0}
    assert items[1]["gold"] == 0 and len(items) == 2
    mmlu = d / "high_school_physics_test.csv"
    mmlu.write_text('"What is\nforce?",m*a,m/a,a/m,m+a,A\nUnit of charge?,volt,coulomb,ohm,watt,B\n')
    items = E.read_mmlu(mmlu)
    assert items[0]["context"] == "What is\nforce?\nA. m*a\nB. m/a\nC. a/m\nD. m+a\nAnswer:" and items[1]["gold"] == 1
    assert items[0]["prefix"].endswith("about high school physics.\n\n") and items[0]["choices"] == [" A", " B", " C", " D"]
    hs = d / "hs.jsonl"
    hs.write_text(json.dumps({"activity_label": "Baking", "ctx": "A man [title] mixes flour.", "endings":
                              ["He bakes.", "He [step] swims."], "label": "1"}) + "\n")
    assert E.read_hellaswag(hs) == [{"context": "Baking: A man. mixes flour.", "choices": [" He bakes.", " He swims."],
                                     "gold": 1}]

    bad_hs = d / "bad_hs.jsonl"
    good = {"ctx": "x", "endings": ["a", "b"], "label": 0}
    bad_hs.write_text("\n".join(json.dumps(x) for x in [good, good, {"ctx": "x", "label": 0}]) + "\n")
    assert f"{bad_hs}:3: field 'endings' is missing" in dies(E.read_hellaswag, bad_hs)
    bad_hs.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 5}) + "\n")
    assert f"{bad_hs}:2: field 'label'" in dies(E.read_hellaswag, bad_hs)
    bad_hs.write_text(json.dumps(good) + "\n{not json\n")
    assert f"{bad_hs}:2: is not valid JSON" in dies(E.read_hellaswag, bad_hs)
    arc.write_text(json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"},
                                                                     {"text": "b", "label": "B"}]},
                               "answerKey": "E"}) + "\n")
    assert f"{arc}:1: field 'answerKey'" in dies(E.read_arc, arc)
    arc.write_text(json.dumps({"question": {"choices": []}, "answerKey": "A"}) + "\n")
    assert f"{arc}:1: field 'question.stem' is missing" in dies(E.read_arc, arc)
    mmlu.write_text("q,a,b,c,d,A\nq2,a,b,c,d,F\n")
    assert f"{mmlu}:2: field 'answer'" in dies(E.read_mmlu, mmlu)
    mmlu.write_text("q,a,b,c,d\n")
    assert f"{mmlu}:1: has 5 columns" in dies(E.read_mmlu, mmlu)
    gsm = d / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    assert f"{gsm}:1: field 'answer'" in dies(E.read_gsm8k, gsm)


def test_eval_downloads_through_prepare():
    """Task files come through prepare.download (here from a mirror on 127.0.0.1): HellaSwag as it is, MMLU's
    test CSVs out of its tar, ARC's JSONL out of its zip; once there, they are not fetched again."""
    import http.server
    import tarfile
    import zipfile
    site = TMP / "mirror"
    site.mkdir(exist_ok=True)
    hellaswag_file(site / "hellaswag_val.jsonl", KNOWN[:3])
    (TMP / "mm-src").mkdir(exist_ok=True)
    (TMP / "mm-src" / "astronomy_test.csv").write_text("Which is a planet?,Mars,Sirius,Vega,Rigel,A\n")
    with tarfile.open(site / "data.tar", "w") as t:
        t.add(TMP / "mm-src" / "astronomy_test.csv", "data/test/astronomy_test.csv")
        t.add(TMP / "mm-src" / "astronomy_test.csv", "data/dev/astronomy_dev.csv")
    with zipfile.ZipFile(site / "ARC-V1-Feb2018.zip", "w") as z:
        z.writestr("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl", json.dumps(
            {"question": {"stem": "Hot?", "choices": [{"text": "sun", "label": "A"}, {"text": "ice", "label": "B"}]},
             "answerKey": "A"}) + "\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(site), **kw)

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    old = (os.environ.get("PREPARE_MIRROR"), E.data_root, E.task_file)
    os.environ["PREPARE_MIRROR"] = f"http://127.0.0.1:{server.server_address[1]}"
    E.data_root, E.task_file = str(TMP / "dl"), ""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            items, _ = E.load_task("hellaswag")
            assert len(items) == 3 and (TMP / "dl" / "eval" / "hellaswag" / "hellaswag_val.jsonl").exists()
            items, _ = E.load_task("mmlu")
            assert [it["group"] for it in items] == ["astronomy"] and items[0]["gold"] == 0
            assert sorted(p.name for p in (TMP / "dl" / "eval" / "mmlu" / "test").iterdir()) == ["astronomy_test.csv"]
            items, _ = E.load_task("arc_easy")
            assert items == [{"context": "Question: Hot?\nAnswer:", "choices": [" sun", " ice"], "gold": 0}]
        assert "HTTP 404" in dies(E.load_task, "gsm8k")  # a file the mirror does not have
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
    bad = TMP / "bad_cli.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n"
                   + json.dumps({"ctx": "x", "endings": "ab", "label": 0}) + "\n")
    p = run_eval(f"--out_dir={TMP}/no-model-here", "--tasks=hellaswag", f"--task_file={bad}")
    assert_clear_error(p, f"{bad}:2", "field 'endings'")
    assert_clear_error(run_eval("--tasks=hellaswag,bogus"), "bogus")
    assert_clear_error(run_eval("--tasks=hellaswag", f"--task_file={TMP}/missing.jsonl"), "missing.jsonl")

# -----------------------------------------------------------------------------
# the judge: a fake OpenAI-compatible server on 127.0.0.1


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
    data = TMP / "chat.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Name colour {k}.", "input": "", "output": color(k)}) + "\n"
                            for k in KNOWN))
    _, val = C.load_split(str(data), "data", 0.25, "sft")
    out = save_ckpt(known_model(), TMP / "out-chat", chat=C.CHAT_TEMPLATE,
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
    out = save_ckpt(known_model(), TMP / "out-default")
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
    p = run_eval("--tasks=judge", f"--judge_url=http://127.0.0.1:{port}", f"--out_dir={TMP}/no-model-here")
    assert_clear_error(p, "unreachable", f"127.0.0.1:{port}")
    assert_clear_error(run_eval("--tasks=judge"), "--judge_url")

# -----------------------------------------------------------------------------
# parity with transformers


@one_thread
def test_eval_loglikelihood_parity_with_transformers():
    """A random-init GPT2LMHeadModel imported through model.load_hf: our per-option log-likelihoods (batched,
    padded) equal those computed directly with transformers, option by option."""
    try:
        import transformers as tr
    except ImportError:
        raise unittest.SkipTest("transformers is not installed (pip install -r requirements-test.txt)")
    tr.logging.set_verbosity_error()
    tr.utils.logging.disable_progress_bar()
    tok = T.get_tokenizer("gpt2") if (SHARED / "gpt2.tiktoken").exists() else BYTE
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=tok.eot_id + 1, n_positions=48,
                                          bos_token_id=None, eos_token_id=None))  # GPT-2's 50257: no chat tokens
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights big enough that a wrong mapping would show (as _tests_model.scramble)
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
    hf.eval()
    d = TMP / "hf-gpt2"
    hf.save_pretrained(d)
    ours = M.load_hf(d).eval()
    items = [{"context": "The capital of France is", "choices": [" Paris", " a city in Europe", " 42"], "gold": 0},
             {"context": "def add(a, b):\n    return", "choices": [" a + b", " None"], "gold": 0},
             {"context": "Once upon a time " * 12, "choices": [" there was a cat.", " the end"], "gold": 1}]
    reqs = [E.encode_pair(tok, it["context"], c) for it in items for c in it["choices"]]
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
    try:
        import transformers as tr
    except ImportError:
        raise unittest.SkipTest("transformers is not installed (pip install -r requirements-test.txt)")
    if not (SHARED / "gpt2.tiktoken").exists():
        raise unittest.SkipTest("../shared/data/gpt2.tiktoken not found")
    tr.logging.set_verbosity_error()
    tr.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    d = TMP / "hf-cli"
    tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=64)).save_pretrained(d)
    out = TMP / "out-hf"
    p = run_eval(f"--init_from={d}", f"--out_dir={out}", "--tasks=hellaswag",
                 f"--task_file={hellaswag_file(TMP / 'hs_hf.jsonl', KNOWN)}", "--device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "eval.json").read_text())[str(d)]
    assert r["tasks"]["hellaswag"]["n"] == len(KNOWN) and r["step"] is None
    gsm = TMP / "gsm_hf.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert_clear_error(run_eval(f"--init_from={d}", f"--out_dir={out}", "--tasks=gsm8k", "--chat=True",
                                f"--task_file={gsm}"), "chat tokens")
