"""
What finetune.py, dpo.py and sample.py --chat share: instruction, chat and preference data, the chat
template with its loss mask, padded batches, sequence log-probs and the DPO losses.

Records (the kind is recognised per record; a record missing a field stops with file, record number, field):
  Alpaca      {"instruction", "input" (may be empty or absent), "output"}   user: instruction + input, assistant: output
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  preference  {"prompt" (a string or a list of messages) or "instruction"/"input", "chosen", "rejected"}
  HH-RLHF     {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  (Anthropic's transcripts)
Files: .json (a list of records), .jsonl or .jsonl.gz (one record a line). Named sets:
  pydocs-qa    "What does `module.name` do?" -> the first paragraph of its docstring, for every documented
               object of the pydocs corpus; train/val split by top-level package exactly as pretraining,
               so validation questions are about modules the model never saw
  pydocs-pref  the same prompts; chosen = the right answer, rejected = another object's (same split, fixed choice)
  alpaca       Stanford Alpaca's 52k instructions (downloaded to data_root/alpaca/raw)
  hh-rlhf      Anthropic's helpful/harmless pairs (downloaded to data_root/hh-rlhf/raw; val = their test files)
A file has no split of its own: val is val_frac of its records, picked by a fixed permutation of the record
numbers, so two files of the same length split alike (instruction-data.json and
instruction-data-with-preference.json: DPO's held-out pairs are prompts SFT never saw either).
"""
import gzip
import json
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from common import die

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLIT_SEED = 1234  # the permutation that picks a file's val records
# what a checkpoint records about its chat format (sample.py --chat renders prompts from it)
CHAT_TEMPLATE = {
    "format": "<|endoftext|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{assistant}<|end|>...",
    "bos": "<|endoftext|>",  # every conversation starts like a pretraining document
    "stop": "<|end|>",       # a reply ends here
    "renderer": "tokenizer.render_chat",
}

# -----------------------------------------------------------------------------
# reading records


def read_records(path):
    """[(where, record)] of a .json list or a .jsonl(.gz) file; where = 'FILE record N' (1-based; for
    .jsonl N is the line number)."""
    path = Path(path)
    if not path.is_file():
        die(f"data file '{path}' not found (give --data=a .json/.jsonl file, or pydocs-qa, pydocs-pref, alpaca, hh-rlhf)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        die(f"{path} is unreadable ({type(e).__name__}: {e}); expected UTF-8 JSON or JSON lines")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append((f"{path} record {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    die(f"{path} record {n} (line {n}) is not valid JSON ({e.msg} at column {e.colno})")
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            die(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
        if not isinstance(data, list):
            die(f"{path} must hold a JSON list of records, found a {type(data).__name__}")
        records = [(f"{path} record {n}", r) for n, r in enumerate(data, 1)]
    for where, r in records:
        if not isinstance(r, dict):
            die(f"{where} is a {type(r).__name__}, expected an object with named fields")
    if not records:
        die(f"{path} holds no records")
    return records


def field(rec, name, where, optional=False):
    value = rec.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        die(f"{where}: missing field '{name}'" if value is None else
            f"{where}: field '{name}' must be a string, found {type(value).__name__}")
    return value


def user_text(rec, where):
    """The user's turn of an Alpaca-style record: the instruction, then its input after a blank line."""
    instruction, inp = field(rec, "instruction", where), field(rec, "input", where, optional=True)
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def check_messages(messages, where, name="messages"):
    if not isinstance(messages, list) or not messages:
        die(f"{where}: field '{name}' must be a non-empty list of {{\"role\", \"content\"}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            die(f"{where}: {name}[{k}] needs a 'role' (system, user or assistant) and a string 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversation(rec, where):
    """The messages of an SFT record: chat, Alpaca, or the chosen side of a preference/HH record."""
    if "messages" in rec:
        msgs = check_messages(rec["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            die(f"{where}: 'messages' has no assistant message to learn from")
        return msgs
    if "chosen" in rec and "output" not in rec:
        pair = preference_pair(rec, where)
        return pair and pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]
    if "instruction" not in rec and "output" not in rec:
        die(f"{where}: missing field 'messages' (chat) or 'instruction'/'output' (Alpaca)")
    return [{"role": "user", "content": user_text(rec, where)},
            {"role": "assistant", "content": field(rec, "output", where)}]


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text):
    """Anthropic's '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript as messages, or None when it does not
    alternate cleanly from Human to a final Assistant turn (a few hundred records in the set)."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5:
        return None
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]
    if any(m["role"] != ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(msgs)) \
            or msgs[-1]["role"] != "assistant":
        return None
    return msgs


def preference_pair(rec, where):
    """{'prompt': messages ending with the user's turn, 'chosen': str, 'rejected': str}; None for an HH
    transcript that cannot be parsed or whose two sides differ before the last reply."""
    chosen = rec.get("chosen")
    if "prompt" not in rec and "instruction" not in rec and isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
        c, r = parse_hh(chosen), parse_hh(field(rec, "rejected", where))
        if c is None or r is None or c[:-1] != r[:-1]:
            return None
        return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}
    if "prompt" in rec:
        prompt = rec["prompt"]
        prompt = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                  else check_messages(prompt, where, "prompt"))
    elif "instruction" in rec:
        prompt = [{"role": "user", "content": user_text(rec, where)}]
    else:
        die(f"{where}: missing field 'prompt' (or 'instruction'/'input') of a preference record")
    return {"prompt": prompt, "chosen": field(rec, "chosen", where), "rejected": field(rec, "rejected", where)}


def split_records(items, val_frac):
    """(train, val): val is val_frac of the items, chosen by a permutation that depends only on len(items)."""
    n_val = max(1, round(val_frac * len(items))) if len(items) > 1 else 0
    order = list(range(len(items)))
    random.Random(SPLIT_SEED).shuffle(order)
    val_ix = set(order[:n_val])
    return ([x for i, x in enumerate(items) if i not in val_ix], [x for i, x in enumerate(items) if i in val_ix])

def spread(items, n):
    """At most n of the items, evenly spaced (a held-out subset that samples the whole split, not its start)."""
    return items[::-(-len(items) // n)] if n and len(items) > n else items

# -----------------------------------------------------------------------------
# named sets: the embedded pydocs ones and the downloads


def pydocs_qa(data_root="data", val_frac=0.1):
    """[{'prompt', 'answer', 'name', 'split'}]: "What does `name` do?" and the first paragraph of its
    docstring (its lines joined), for every documented object of the pydocs corpus."""
    import prepare
    out, seen = [], set()
    for o in prepare.pydocs_objects(data_root, val_frac):
        answer = " ".join(o["doc"].split("\n\n")[0].split())
        if answer and o["name"] not in seen:
            seen.add(o["name"])
            out.append({"prompt": f"What does `{o['name']}` do?", "answer": answer, "name": o["name"],
                        "split": o["split"]})
    return out


def pydocs_pref(data_root="data", val_frac=0.1):
    """pydocs-qa's prompts with chosen = the right answer and rejected = the answer of another object of the
    same split, drawn by a fixed generator (the same pairs on every run)."""
    qa = pydocs_qa(data_root, val_frac)
    pairs = []
    for split in ("train", "val"):
        items = [q for q in qa if q["split"] == split]
        rng = random.Random(SPLIT_SEED)
        for i, q in enumerate(items):
            for _ in range(100):  # another object whose answer differs (docstrings are sometimes shared)
                j = rng.randrange(len(items))
                if j != i and items[j]["answer"] != q["answer"]:
                    break
            else:
                continue
            pairs.append({"prompt": q["prompt"], "chosen": q["answer"], "rejected": items[j]["answer"],
                          "split": split})
    return pairs


def download_set(name, data_root):
    """The raw files of alpaca / hh-rlhf, fetched once into data_root/<name>/raw: [(path, split or None)]."""
    from common import download
    raw = Path(data_root) / name / "raw"
    if name == "alpaca":
        return [(download(ALPACA_URL, raw / "alpaca_data.json"), None)]
    return [(download(HH_URL.format(subset=s, split=split), raw / s / f"{split}.jsonl.gz"),
             "train" if split == "train" else "val")
            for s in HH_SUBSETS for split in ("train", "test")]


def load_split(data, data_root, val_frac, kind):
    """(train, val) of kind 'sft' (lists of messages) or 'pref' (prompt/chosen/rejected dicts) from a named
    set or a file. Unparseable HH transcripts are skipped with a count."""
    if data in ("pydocs-qa", "pydocs-pref"):
        if kind == "sft":
            items = [dict(split=q["split"], conv=[{"role": "user", "content": q["prompt"]},
                                                  {"role": "assistant", "content": q["answer"]}])
                     for q in pydocs_qa(data_root, val_frac)]
            return [x["conv"] for x in items if x["split"] == "train"], [x["conv"] for x in items if x["split"] == "val"]
        pairs = pydocs_pref(data_root, val_frac)
        strip = lambda p: {"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": p["chosen"],
                           "rejected": p["rejected"]}
        return [strip(p) for p in pairs if p["split"] == "train"], [strip(p) for p in pairs if p["split"] == "val"]
    files = download_set(data, data_root) if data in ("alpaca", "hh-rlhf") else [(Path(data), None)]
    train, val, skipped, total = [], [], 0, 0
    for path, split in files:
        items = []
        for where, rec in read_records(path):
            item = conversation(rec, where) if kind == "sft" else preference_pair(rec, where)
            skipped += item is None
            items.append(item)
        total += len(items)
        if split is None:
            t, v = split_records(items, val_frac)
        else:
            t, v = (items, []) if split == "train" else ([], items)
        train += [x for x in t if x is not None]
        val += [x for x in v if x is not None]
    if skipped:
        print(f"{data}: skipped {skipped} of {total} records whose transcript does not alternate Human/Assistant "
              f"or whose two sides differ before the last reply")
    if not train or not val:
        die(f"{data} gives {len(train)} train and {len(val)} val examples: it needs some of each "
            f"(more records, or another --val_frac)")
    return train, val

# -----------------------------------------------------------------------------
# the model to start from, and the checkpoint a fine-tune writes


def output_checkpoint(config, start):
    """out_dir/ckpt.pt of a fine-tuning run, once the settings finetune.py and dpo.py share are checked:
    counts are positive, and neither the starting model (`start` names it) nor an existing checkpoint is
    ever overwritten (the latter unless --overwrite=True)."""
    for k in ("eval_interval", "log_interval", "batch_size", "grad_accum", "epochs"):
        if config[k] <= 0:
            die(f"{k} must be positive, got {config[k]}")
    out_dir = Path(config["out_dir"])
    if out_dir.resolve() == Path(config["init_from"]).resolve():
        die(f"out_dir '{out_dir}' is the {start}'s directory: write into another --out_dir (the {start} is kept)")
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.exists() and not config["overwrite"]:
        die(f"{ckpt_path} already exists: choose another --out_dir, or pass --overwrite=True to replace it")
    return ckpt_path


def load_start(init_from, device, grow_vocab=False):
    """(model, checkpoint or None, tokenizer) from a directory holding a ckpt.pt of train.py, finetune.py or
    dpo.py, a GPT-2 name (gpt2, gpt2-medium, ...) or a directory in Hugging Face layout."""
    from hf import load_model
    if (Path(init_from) / "ckpt.pt").is_file():
        return load_model("resume", init_from, device, grow_vocab=grow_vocab)
    if not init_from.startswith("gpt2") and not Path(init_from).is_dir():
        die(f"no checkpoint at {Path(init_from) / 'ckpt.pt'}: pretrain one first (python train.py "
            f"--out_dir={init_from}), or give --init_from=a checkpoint directory, gpt2 or a Hugging Face directory")
    return load_model(init_from, None, device, grow_vocab=grow_vocab)


def finetune_checkpoint(model, state, config, step, best_val_loss, tok, base, stage, summary):
    """train.py's checkpoint keys (so load_model, sample.py and eval read it as any other), plus the chat
    template it was trained with and a record of the stage: {'stage', 'init_from', 'data', figures...}.
    state: the {'model', 'optimizer'} state dicts (parallel.plain_state: whole tensors, also under FSDP)."""
    from dataclasses import asdict
    return {**state, "model_args": asdict(model.config),
            "config": config, "step": step, "best_val_loss": best_val_loss,
            "tokenizer": base["tokenizer"] if base else tok.spec,
            "meta": base.get("meta", {}) if base else {}, "rng": {"torch": torch.get_rng_state()},
            "chat": CHAT_TEMPLATE, "finetune": [*(base or {}).get("finetune", []), {"stage": stage, **summary}]}

# -----------------------------------------------------------------------------
# tokens: the template, the mask, truncation and padded batches


def chat_ids(tok, messages, add_generation_prompt=False):
    """(ids, mask) of a conversation in CHAT_TEMPLATE: <|endoftext|> first, as every pretraining document."""
    import tokenizer as T
    ids, mask = T.render_chat(tok, messages, add_generation_prompt)
    return [tok.eot_id] + ids, [0] + mask


def with_system(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def encode_sft(tok, convs, block_size, name, system_prompt=""):
    """[(ids, mask)] of the conversations, cut to block_size + 1 tokens (block_size inputs, each with its
    next token as target). Prints how many were cut; drops those left without a token to learn."""
    out, cut, dropped = [], 0, 0
    for conv in convs:
        ids, mask = chat_ids(tok, with_system(conv, system_prompt))
        if len(ids) > block_size + 1:
            cut += 1
            ids, mask = ids[:block_size + 1], mask[:block_size + 1]
        if not any(mask[1:]):
            dropped += 1
            continue
        out.append((ids, mask))
    report_cut(name, cut, dropped, len(convs), block_size)
    return out


def encode_pairs(tok, pairs, block_size, name, system_prompt=""):
    """[(chosen ids, chosen mask, rejected ids, rejected mask)]: prompt + each response, cut like encode_sft.
    A pair either side of which has no response token left is dropped."""
    out, cut, dropped = [], 0, 0
    for p in pairs:
        prompt = with_system(p["prompt"], system_prompt)
        sides = []
        for resp in (p["chosen"], p["rejected"]):
            ids, mask = chat_ids(tok, prompt + [{"role": "assistant", "content": resp}])
            sides.append((ids[:block_size + 1], mask[:block_size + 1], len(ids) > block_size + 1))
        (ci, cm, c_cut), (ri, rm, r_cut) = sides
        cut += c_cut or r_cut
        if not any(cm[1:]) or not any(rm[1:]):
            dropped += 1
            continue
        out.append((ci, cm, ri, rm))
    report_cut(name, cut, dropped, len(pairs), block_size, what="pairs")
    return out


def report_cut(name, cut, dropped, total, block_size, what="examples"):
    if cut:
        print(f"{name}: truncated {cut} of {total} {what} longer than the context ({block_size + 1} tokens): "
              f"their ends are cut, the loss mask cut with them"
              + (f"; dropped {dropped} with no response token left" if dropped else ""))
    if dropped == total:
        die(f"{name}: no {what} fit in the context of {block_size} tokens; raise --block_size (up to the model's)")


def collate(examples, pad_id, device):
    """Inputs x and targets y (B, T) of [(ids, mask)], right-padded to the longest: y is the next token where
    the mask marks it as a token to learn and -1 (ignored) elsewhere. Attention is causal, so a real token
    never sees the padding after it and each row is exactly its example alone."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        x[b, :n] = ids_t[:-1]
        y[b, :n] = torch.where(mask_t[1:], ids_t[1:], -1)
    return x.to(device), y.to(device)


def pair_batch(pairs, pad_id, device):
    """One batch of the chosen rows then the rejected rows (one forward pass for both)."""
    return collate([(c, cm) for c, cm, _, _ in pairs] + [(r, rm) for _, _, r, rm in pairs], pad_id, device)


def pair_scores(pairs, score, batch_size, rank, world_size, collective, ddp, device, desc=None):
    """(2, N) float: score(some pairs) -> (chosen, rejected) of every pair, each rank scoring its share (then
    summed across ranks). collective (FSDP): the forwards are collective, so every rank runs as many batches,
    a short share scoring a spare one. desc: a progress line (give it on rank 0 only)."""
    from common import Progress
    out = torch.zeros(2, len(pairs), device=device)
    mine = list(range(rank, len(pairs), world_size))
    progress = Progress(len(mine), desc, " pairs") if desc else None
    for i in range(0, -(-len(pairs) // world_size) if collective else len(mine), batch_size):
        ix = mine[i:i + batch_size]
        if not ix:
            score(pairs[:1])
            continue
        c, r = score([pairs[j] for j in ix])
        out[0, ix], out[1, ix] = c.float(), r.float()
        if progress:
            progress.update(len(ix))
    if progress:
        progress.close()
    if ddp:
        torch.distributed.all_reduce(out)
    return out


def batch_order(n, batch, gen):
    """Endless index lists of `batch` items, epoch after epoch, each epoch a fresh permutation."""
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[i:i + batch] if n >= batch else (perm * (batch // n + 1))[:batch]

# -----------------------------------------------------------------------------
# losses


def sequence_logps(logits, y, average=False):
    """(B,) sum over the positions with y != -1 of log p(y): the log-probability of each response; average:
    the mean over those positions instead (IPO, as TRL: its 1/(2 beta) target then does not grow with length)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    taken = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    s = (taken * (y != -1)).sum(-1)
    return s / (y != -1).sum(-1) if average else s


def masked_loss_sums(model, examples, batch_size, pad_id, device, autocast):
    """(sum of cross-entropy, number of target tokens) over examples: the held-out masked loss is their ratio."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            x, y = collate(examples[i:i + batch_size], pad_id, device)
            with autocast:
                logits, _ = model(x)
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1,
                                     reduction="sum").item()
            count += int((y != -1).sum())
    return total, count


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses and the implicit rewards beta * (log pi - log ref) of each side.
    h = (pi_c - pi_r) - (ref_c - ref_r), the policy's log-ratio margin over the reference's;
      sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO; eps = label_smoothing, cDPO)
      ipo      (h - 1 / (2 beta))^2     (IPO: a margin target, no saturation; its log-probs are per-token means)
      hinge    max(0, 1 - beta h)                                          (SLiC)"""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: sigmoid, ipo or hinge")
    return losses, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()

# -----------------------------------------------------------------------------
# sample.py --chat


def chat_session(model, tok, ckpt, question, max_new_tokens, temperature, top_k, top_p, seed, device, ctx):
    """Chat in the model's template, replies streamed as they are generated and ended by <|end|>.
    question: one reply to it (for scripts); None: a conversation read from stdin line by line ('/reset'
    forgets it, an empty line or end of input ends it). The oldest exchanges are dropped when the
    conversation no longer leaves max_new_tokens of room in the context."""
    import codecs
    import sys
    import time
    if model.config.vocab_size < tok.n_vocab:
        die(f"the model has no embeddings for the chat tokens ({model.config.vocab_size} rows, the tokenizer "
            f"{tok.n_vocab} tokens): fine-tune it for chat first (python finetune.py --init_from=...)")
    if not (ckpt or {}).get("chat"):
        print("warning: this checkpoint was not fine-tuned for chat (no chat template recorded): its replies will "
              "be poor; run finetune.py on it first", file=sys.stderr)
    system = ((ckpt or {}).get("config") or {}).get("system_prompt") or ""  # the one it was fine-tuned with
    stop = (tok.special["<|end|>"], tok.eot_id)
    block_size = model.config.block_size
    interactive = question is None and sys.stdin.isatty()
    n_tokens, t_gen = 0, 0.0

    def reply(messages, turn):
        nonlocal n_tokens, t_gen
        while True:
            ids = chat_ids(tok, with_system(messages, system), add_generation_prompt=True)[0]
            if len(ids) + max_new_tokens <= block_size or len(messages) < 3:
                break
            messages[:] = messages[2:]  # forget the oldest question and its reply
        ids = ids[-block_size:]
        decoder, out, t0 = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], time.time()
        with ctx:
            for step in model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, stop_tokens=stop, seed=seed + turn):
                t = int(step[0])
                if t == -1 or t in stop:
                    break
                out.append(t)
                sys.stdout.write(decoder.decode(tok.decode_bytes([t]) if t < tok.n_vocab else b""))
                sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
        n_tokens, t_gen = n_tokens + len(out), t_gen + time.time() - t0
        return tok.decode([t for t in out if t < tok.n_vocab])  # (a padded vocab row has no text)

    if question is not None:
        reply([{"role": "user", "content": question}], 0)
    else:
        if interactive:
            print("chat: type a message and press enter; /reset forgets the conversation, an empty line or "
                  "Ctrl-D ends it", file=sys.stderr)
        messages, turn = [], 0
        while True:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                messages = []
                continue
            if interactive:
                sys.stdout.write("model> ")
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": reply(messages, turn)})
            turn += 1
    if n_tokens:
        print(f"{n_tokens} tokens in {t_gen:.2f}s: {n_tokens / t_gen:.1f} tokens/s on {device}", file=sys.stderr)
