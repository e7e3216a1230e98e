"""
Reinforcement learning from a reward, starting from an SFT checkpoint: PPO against a reward model (InstructGPT;
TRL's PPOTrainer) or GRPO with a reward model or a verifiable reward (DeepSeekMath; TRL's GRPOTrainer).

    python rl.py --algo=ppo --reward_model=out-rm           # out-sft on pydocs-qa's prompts -> out-rl (offline)
    python rl.py --algo=grpo --reward=gsm8k --data=../shared/data/eval/gsm8k_test.jsonl
    python rl.py --algo=grpo --reward=code --data=../shared/data/eval/mbpp_test.jsonl  # unit tests in sandbox.py
    python rl.py --algo=grpo --reward=mymodule:score        # your own function (prompt, reply) -> float
    torchrun --standalone --nproc_per_node=8 rl.py ...      # DDP: each rank batch_prompts prompts of its own

PPO, per batch of prompts: sample a reply each (batched, ragged); score it with the reward model at its last
token (less missing_eos_penalty if it never ended); per token, a KL penalty -kl_coef * (log pi - log ref) (the
k1 estimator) with the score added on the last token; GAE (gamma, lam) against the value model's estimates;
advantages whitened; then ppo_epochs passes over the batch in minibatches with the clipped policy loss and the
clipped value loss. The value model is its own model, started from the reward model as TRL does.
GRPO, per batch of prompts: num_generations replies each; advantages (r - group mean) / (group std + eps); the
clipped ratio loss plus beta * KL to the reference (the k3 estimator), normalised over all reply tokens.
Under torchrun each rank rolls out its own prompts and the policy (and value model) train under DDP; the logged
figures are means over the ranks, and the held-out prompts are shared out among them. (FSDP is not offered:
its forward passes are collectives, and each rank's rollout decodes for as long as its own replies run.)
Models held: PPO 4 (policy and value trained; reference and reward model frozen, run under no_grad); GRPO 1 to
3 (the policy; the reference when beta > 0; the reward model when it scores).
Logged with TRL's names: objective/kl, objective/entropy, objective/scores, objective/rlhf_reward,
policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, loss/value_avg, val/ratio, the mean reply length,
and every eval_interval the mean reward of greedy replies to the held-out prompts (eval/reward).
"""
import copy
import importlib
import math
import re
import time
from pathlib import Path

import torch

import chat_data as C
import reward as R
from common import die, optimizer_step

# -----------------------------------------------------------------------------
# config (python rl.py --help lists these)
algo = "grpo"              # 'ppo' | 'grpo'
init_from = "out-sft"      # the SFT checkpoint: the policy, and the frozen reference
out_dir = "out-rl"
overwrite = False
reward_model = ""          # a reward.py out_dir: PPO's reward (and its value model's start); GRPO's unless --reward
reward = ""                # a verifiable reward instead: gsm8k | code | module:function, (prompt, reply) -> float
data = "pydocs-qa"         # prompts: pydocs-qa, or a .jsonl of {"prompt": ...} or {"messages": [...]} lines
data_root = "data"
val_frac = 0.1
eval_prompts = 64          # held-out prompts whose greedy replies are scored every eval_interval
system_prompt = ""
max_new_tokens = 64
temperature = 1.0          # sampling of the rollouts
batch_prompts = 16         # prompts per rollout batch
num_generations = 8        # GRPO: replies per prompt (a group)
ppo_epochs = 4             # PPO: passes over each rollout batch
num_minibatches = 4        # PPO: minibatches per pass
cliprange = 0.2
cliprange_value = 0.2
vf_coef = 0.1
gamma = 1.0
lam = 0.95
kl_coef = 0.05             # PPO: the per-token KL penalty
missing_eos_penalty = 1.0  # PPO: subtracted from the score of a reply that never ended
beta = 0.04                # GRPO: the KL term's weight (0: no reference model)
max_iters = 100            # rollout batches
eval_interval = 10
learning_rate = 1e-5
weight_decay = 0.0
grad_clip = 1.0
device = "auto"
seed = 1337
code_timeout = 5.0         # --reward=code: wall-clock seconds per program in the sandbox
# -----------------------------------------------------------------------------

# the algorithm, on token ids (the CLI below turns text into them): prompts and replies are lists of ids, and
# per-token tensors are reply-aligned, (B, R): column j is reply token j of each row, mask marking the real ones


def rollout(policy, prompts, max_new, temperature, stop_ids, num_samples=1, seed=None):
    """Sampled replies (lists of ids, each ending at its first stop token, which it keeps) of the prompts, in
    one ragged batch: reply b*num_samples + s is sample s of prompt b."""
    replies = [[] for _ in range(len(prompts) * num_samples)]
    policy = getattr(policy, "module", policy)  # under DDP: decoding is this rank's own, no gradient to sync
    for step in policy.generate([list(p) for p in prompts], max_new, temperature=temperature, stop_tokens=tuple(stop_ids),
                                seed=seed, num_samples=num_samples):
        for r, t in enumerate(step.tolist()):
            if t >= 0:
                replies[r].append(t)
    return replies


def reply_outputs(model, prompts, replies, device, width=None):
    """The model's outputs at the positions that predict each reply token, (B, R, V) with R = width or the
    longest reply: one forward pass over prompt + reply, right-padded (each row is what it is alone), and the
    (B, R) mask of real reply tokens."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies)]
    x, _ = R.sequences_batch(seqs, 0, device)
    out = model(x)[0]
    width = width or max(1, max(len(r) for r in replies))
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)  # the position predicting reply token 0
    pos = (start[:, None] + torch.arange(width, device=device)).clamp(max=x.size(1) - 1)
    mask = torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in replies], device=device)[:, None]
    return out[torch.arange(len(seqs), device=device)[:, None], pos], mask


def token_logps(model, prompts, replies, device, with_entropy=False, width=None):
    """(log p of each reply token (B, R), mask), and the entropy of each position's distribution if asked."""
    logits, mask = reply_outputs(model, prompts, replies, device, width)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.zeros(mask.shape, dtype=torch.long, device=device)
    for b, r in enumerate(replies):
        ids[b, :len(r)] = torch.as_tensor(r)
    taken = logp.gather(-1, ids[..., None])[..., 0] * mask
    if with_entropy:
        return taken, mask, -(logp.exp() * logp).sum(-1) * mask
    return taken, mask


def values_of(value_model, prompts, replies, device, width=None):
    """The value model's estimate (B, R) at each position that predicts a reply token, 0 past a reply's end."""
    v, mask = reply_outputs(value_model, prompts, replies, device, width)
    return v[..., 0].float() * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, shift_mean=True):
    """x normalised to mean 0 (unless shift_mean=False) and variance 1 over the masked entries (TRL's
    masked_whiten, unbiased variance); 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def ppo_rewards(logp, ref_logp, mask, scores, kl_coef):
    """(rewards, kl) per reply token: rewards = -kl_coef * (log pi - log ref) on every token, plus the score on
    each reply's last token; prompt and padding get nothing (they are not in the reply-aligned tensors, and
    the mask zeroes the padding)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last.clamp(min=0)] += torch.where(last >= 0, scores, torch.zeros_like(scores))
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over each reply (Schulman et al. 2016): delta_t = r_t + gamma v_{t+1}
    - v_t, A_t = delta_t + gamma lam A_{t+1}, the value after a reply's last token being 0; returns = A + v.
    Zero past a reply's end."""
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(len(rewards), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        nxt = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_loss(logp, old_logp, adv, vpred, old_values, returns, mask, cliprange, cliprange_value, vf_coef):
    """PPO's clipped policy loss and clipped value loss (masked means over reply tokens) and their figures."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    vclip = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((vpred - returns) ** 2, (vclip - returns) ** 2)
    pg_loss, vf_loss = masked_mean(pg, mask), masked_mean(vf, mask)
    with torch.no_grad():
        stats = {"policy/approxkl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
                 "policy/clipfrac": masked_mean((-adv * ratio.clamp(1 - cliprange, 1 + cliprange) > -adv * ratio).float(), mask),
                 "loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "val/ratio": masked_mean(ratio, mask),
                 "val/clipfrac": masked_mean(((vpred - returns) ** 2 < (vclip - returns) ** 2).float(), mask)}
    return pg_loss + vf_coef * vf_loss, stats


def group_advantages(rewards, group, eps=1e-4):
    """GRPO's advantages: each reward minus its group's mean, over the group's std (unbiased, as TRL) + eps."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def grpo_loss(logp, old_logp, ref_logp, adv, mask, cliprange, beta):
    """GRPO's per-token loss -min(ratio A, clip(ratio) A) + beta * KL(pi || ref) (k3: e^(ref - pi) - (ref - pi) - 1),
    summed over every reply token of the batch and divided by their number (token-level normalisation)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per = -torch.minimum(ratio * a, ratio.clamp(1 - cliprange, 1 + cliprange) * a)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta else torch.zeros_like(logp)
    loss = ((per + beta * kl) * mask).sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        stats = {"objective/kl": masked_mean(kl, mask), "policy/clipfrac": masked_mean(
            ((ratio < 1 - cliprange) | (ratio > 1 + cliprange)).float(), mask), "loss/policy": loss.detach(),
            "val/ratio": masked_mean(ratio, mask)}
    return loss, stats


def apply_gradients(loss, opt, grad_clip):
    """loss.backward() from cleared gradients (a model copied with some, as a value model from a reward model,
    starts clean), then the shared optimizer step at opt's own (constant) learning rate: clipped to grad_clip
    (0: never), skipped when a gradient holds an inf or NaN."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(opt, [q for g in opt.param_groups for q in g["params"]], opt.param_groups[0]["lr"], grad_clip)


def ppo_step(policy, ref, value_model, score_fn, prompts, opt, cfg, gen_seed):
    """One PPO iteration on a batch of prompts: rollouts, rewards, GAE, then cfg['ppo_epochs'] passes of
    minibatches. score_fn(prompts, replies) -> (B,) scores. Returns the logged figures."""
    dev = next(policy.parameters()).device
    replies = rollout(policy, prompts, cfg["max_new_tokens"], cfg["temperature"], cfg["stop_ids"], 1, gen_seed)
    with torch.no_grad():
        old_logp, mask, entropy = token_logps(policy, prompts, replies, dev, with_entropy=True)
        ref_logp, _ = token_logps(ref, prompts, replies, dev)
        values = values_of(value_model, prompts, replies, dev)
        scores = score_fn(prompts, replies).float().to(dev)
        ended = torch.tensor([bool(r) and r[-1] in cfg["stop_ids"] for r in replies], device=dev)
        scores = scores - cfg["missing_eos_penalty"] * (~ended)
        rewards, kl = ppo_rewards(old_logp, ref_logp, mask, scores, cfg["kl_coef"])
        adv, returns = gae(rewards, values, mask, cfg["gamma"], cfg["lam"])
        adv = whiten(adv, mask)
    stats, n = {}, len(prompts)
    order = torch.Generator().manual_seed(gen_seed or 0)
    size = max(1, n // cfg["num_minibatches"])
    for _ in range(cfg["ppo_epochs"]):
        perm = torch.randperm(n, generator=order).tolist()
        for i in range(0, n, size):
            mb = perm[i:i + size]
            p, r = [prompts[k] for k in mb], [replies[k] for k in mb]
            width = old_logp.size(1)  # the whole batch's: a minibatch's replies may all be shorter
            logp, m = token_logps(policy, p, r, dev, width=width)
            vpred = values_of(value_model, p, r, dev, width)
            loss, st = ppo_loss(logp, old_logp[mb], adv[mb], vpred, values[mb], returns[mb], m,
                                cfg["cliprange"], cfg["cliprange_value"], cfg["vf_coef"])
            apply_gradients(loss, opt, cfg["grad_clip"])
            for k, v in st.items():
                stats.setdefault(k, []).append(float(v))
    kl_sum = kl.sum(1)
    out = {f"{k}_avg": sum(v) / len(v) for k, v in stats.items()}
    out.update({"objective/kl": kl_sum.mean().item(), "objective/entropy": entropy.sum(1).mean().item(),
                "objective/scores": scores.mean().item(), "objective/non_score_reward": (-cfg["kl_coef"] * kl_sum).mean().item(),
                "objective/rlhf_reward": (scores - cfg["kl_coef"] * kl_sum).mean().item(),
                "val/num_eos_tokens": int(ended.sum()), "reply_length": mask.sum(1).float().mean().item()})
    return out


def grpo_step(policy, ref, reward_fn, prompts, opt, cfg, gen_seed):
    """One GRPO iteration: num_generations replies per prompt, group advantages, then num_iterations gradient
    steps on them (the first is on-policy: ratio 1, with a live gradient; later ones are clipped against the
    sampling policy's log-probs). reward_fn(prompts, replies) -> (B,)."""
    dev = next(policy.parameters()).device
    G = cfg["num_generations"]
    replies = rollout(policy, prompts, cfg["max_new_tokens"], cfg["temperature"], cfg["stop_ids"], G, gen_seed)
    rep_prompts = [p for p in prompts for _ in range(G)]
    rewards = reward_fn(rep_prompts, replies).float().to(dev)
    adv = group_advantages(rewards, G)
    with torch.no_grad():
        old_logp = token_logps(policy, rep_prompts, replies, dev)[0]
        ref_logp = token_logps(ref, rep_prompts, replies, dev)[0] if cfg["beta"] else old_logp
    stats = {}
    for _ in range(cfg.get("num_iterations", 1)):
        logp, mask, entropy = token_logps(policy, rep_prompts, replies, dev, with_entropy=True)
        loss, st = grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg["cliprange"], cfg["beta"])
        apply_gradients(loss, opt, cfg["grad_clip"])
        for k, v in st.items():
            stats.setdefault(k if k.startswith("objective") else f"{k}_avg", []).append(float(v.detach()))
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out.update({"objective/scores": rewards.mean().item(), "reward_std": rewards.view(-1, G).std(1).mean().item(),
                "objective/entropy": masked_mean(entropy.detach(), mask).item(), "reply_length": mask.sum(1).float().mean().item()})
    return out

# -----------------------------------------------------------------------------
# the command line: text in and out, the models, the loop


def load_prompts(data, data_root, val_frac):
    """(train, val) prompts as {"messages": the conversation so far, "answer": a reference answer or None,
    "tests": for code, the program around a reply's code, or None}: pydocs-qa's questions (its answers as
    references), a GSM8K file (question, '#### N' answer), an MBPP or HumanEval file (the task and its unit
    tests), or a .jsonl or .json of {"prompt": text}, {"messages": [...]}, Alpaca or preference records (a
    last assistant reply is dropped from the prompt and kept as its reference answer)."""
    if data == "pydocs-qa":
        train, val = C.load_split(data, data_root, val_frac, "sft")
        to = lambda conv: {"messages": conv[:-1], "answer": conv[-1]["content"]}
        return [to(c) for c in train], [to(c) for c in val]
    items = []
    user = lambda text, answer=None, tests=None: {"messages": [{"role": "user", "content": text}], "answer": answer,
                                                  "tests": tests}
    for where, rec in C.read_records(data):
        if "question" in rec and "answer" in rec:  # GSM8K
            items.append(user(C.field(rec, "question", where), C.field(rec, "answer", where)))
        elif {"prompt", "test", "entry_point"} <= rec.keys():  # HumanEval: the reply completes its function
            items.append(user("Complete this Python function:\n```python\n" + C.field(rec, "prompt", where) + "```",
                              rec.get("canonical_solution"), (rec["prompt"], f"{C.field(rec, 'test', where)}\n\n"
                                                                              f"check({C.field(rec, 'entry_point', where)})\n")))
        elif {"text", "test_list"} <= rec.keys():  # MBPP, its tests shown as lm-evaluation-harness shows them
            tests = "\n".join(rec["test_list"])
            items.append(user(f"{C.field(rec, 'text', where)} Your code should pass these tests:\n\n{tests}",
                              rec.get("code"), ("", f"{rec.get('test_setup_code', '')}\n{tests}\n")))
        elif "prompt" in rec:
            items.append(user(C.field(rec, "prompt", where), rec.get("answer")))
        elif "messages" in rec and C.check_messages(rec["messages"], where)[-1]["role"] != "assistant":
            items.append({"messages": C.check_messages(rec["messages"], where), "answer": None, "tests": None})
        else:  # a conversation, Alpaca or preference record: its last reply is the reference
            conv = C.conversation(rec, where)
            if conv:
                items.append({"messages": conv[:-1], "answer": conv[-1]["content"], "tests": None})
    train, val = C.split_records(items, val_frac)
    if not train or not val:
        die(f"{data} gives {len(train)} train and {len(val)} val prompts: it needs some of each")
    return train, val


FENCED = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.S)


def code_of(reply):
    """The program in a reply: its first fenced block (```python or ```), else the whole reply."""
    m = FENCED.search(reply)
    return m.group(1) if m else reply


def verifiable(spec, timeout=5.0):
    """--reward as a function ([prompt items], [reply texts]) -> [float]: gsm8k (1 when the reply's final
    number is the reference's), code (1 when the reply's code passes the prompt's unit tests, run in
    sandbox.py), or module:function, your own f(prompt, reply) -> number."""
    if spec == "code":
        from eval import run_programs

        def run_tests(items, replies):
            programs = [f"{it['tests'][0]}{code_of(r)}\n\n{it['tests'][1]}" for it, r in zip(items, replies)]
            return [float(r.status == "pass") for r in run_programs(programs, timeout=timeout, desc=None)]
        return run_tests
    if spec == "gsm8k":
        from eval import extract_number
        one = lambda it, reply: float(it["answer"] is not None and extract_number(reply) is not None
                                      and extract_number(reply) == extract_number(it["answer"]))
        return lambda items, replies: [one(it, r) for it, r in zip(items, replies)]
    if ":" not in spec:
        die(f"--reward={spec} is not gsm8k, code or module:function (a Python function (prompt, reply) -> number)")
    mod, _, name = spec.partition(":")
    import sys
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        die(f"--reward={spec} cannot be imported ({type(e).__name__}: {e}): give module:function of a .py file here")

    def call(it, reply):
        v = fn(it["messages"][-1]["content"], reply)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            die(f"--reward={spec} returned {v!r} for a reply: it must return a finite number")
        return float(v)
    return lambda items, replies: [call(it, r) for it, r in zip(items, replies)]


def main():
    from common import end_ddp, fmt_time, metrics_log, save_checkpoint, setup_ddp
    if algo not in ("ppo", "grpo"):
        die(f"algo must be 'ppo' or 'grpo', got {algo!r}")
    if algo == "grpo" and num_generations < 2:
        die(f"num_generations={num_generations}: GRPO compares replies within a group, it needs at least 2")
    if algo == "ppo" and not reward_model:
        die("PPO scores with a reward model: give --reward_model=DIR (train one with python reward.py)")
    if not reward_model and not reward:
        die("give --reward_model=DIR (a reward.py model) or --reward=gsm8k|code|module:function")
    ckpt_path = C.output_checkpoint({**config, "batch_size": batch_prompts, "grad_accum": 1, "epochs": 1, "log_interval": 1},
                                    "SFT model")  # (the checks finetune.py and dpo.py share: counts, no overwriting)
    ddp, rank, _, world, dev = setup_ddp(device, seed)
    torch.manual_seed(seed)  # every rank starts the same value head
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    policy, base, tok = C.load_start(init_from, dev, grow_vocab=True)
    if base is None or not base.get("chat"):
        die(f"{init_from} is not a chat model (it was never fine-tuned with the chat tokens): run SFT first "
            f"(python finetune.py --init_from={init_from} --out_dir=out-sft), then rl.py --init_from=out-sft")
    stop_ids = (tok.special["<|end|>"], tok.eot_id)
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if algo == "ppo" or beta else None
    fn = verifiable(reward, code_timeout) if reward else None
    rm = value = None
    if reward_model and (algo == "ppo" or fn is None):
        rm, rm_ckpt, _ = R.load_reward_model(reward_model, dev)
        rm.requires_grad_(False)
        if rm_ckpt["tokenizer"] != base["tokenizer"] or rm_ckpt["model_args"]["vocab_size"] != policy.config.vocab_size:
            die(f"the reward model {reward_model} uses another tokenizer than the policy {init_from}: train it from "
                f"the same SFT model (python reward.py --init_from={init_from})")
        if algo == "ppo":
            value = copy.deepcopy(rm).train().requires_grad_(True)  # TRL starts the value model from the reward model
    train, val = load_prompts(data, data_root, val_frac)
    if reward == "code" and not all(it.get("tests") for it in train + val):
        die(f"--reward=code runs each prompt's unit tests, and {data} has prompts without them: give an MBPP or "
            f"HumanEval file (--data=../shared/data/eval/mbpp_test.jsonl)")
    val = C.spread(val, eval_prompts)
    room = policy.config.block_size - max_new_tokens
    if room < 8:
        die(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of {policy.config.block_size}")
    encode = lambda items: [dict(it, ids=C.chat_ids(tok, C.with_system(it["messages"], system_prompt), True)[0]) for it in items]
    train, val = [p for p in encode(train) if len(p["ids"]) <= room], [p for p in encode(val) if len(p["ids"]) <= room]
    if not train or not val:
        die(f"no prompt fits in {room} tokens (the context less max_new_tokens): lower --max_new_tokens")

    def text(ids):
        return tok.decode([t for t in ids if t not in stop_ids and t < tok.n_vocab])

    def scores(items, replies):
        if fn is not None:
            return torch.tensor(fn(items, [text(r) for r in replies]))
        with torch.no_grad():
            x, last = R.sequences_batch([it["ids"] + r for it, r in zip(items, replies)], tok.eot_id, dev)
            return R.sequence_rewards(rm, x, last)

    def over_ranks(values):
        """The sums of these numbers over the ranks (themselves in one process)."""
        t = torch.tensor(values, dtype=torch.float64)
        if ddp:
            torch.distributed.all_reduce(t)
        return t.tolist()

    by_ids = {}
    score_fn = lambda prompts, replies: scores([by_ids[tuple(p)] for p in prompts], replies)
    params = list(policy.parameters()) + (list(value.parameters()) if value is not None else [])
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raw = policy
    if ddp:  # the gradients are averaged over the ranks; rollouts and no-grad passes need no sync
        from torch.nn.parallel import DistributedDataParallel as DDP
        policy = DDP(policy, device_ids=[dev] if dev.startswith("cuda") else None)
        value = DDP(value, device_ids=[dev] if dev.startswith("cuda") else None) if value is not None else None
    cfg = dict(config, stop_ids=stop_ids)
    log = metrics_log(out_dir, master)
    mine = val[rank::world]  # this rank's share of the held-out prompts

    def evaluate(step):
        s = scores(mine, rollout(raw, [p["ids"] for p in mine], max_new_tokens, 0.0, stop_ids)).float()
        total, passed, n = over_ranks([s.sum().item(), (s >= 1).sum().item(), len(s)])
        rec = {"step": step, "eval/reward": total / n, "eval/prompts": int(n)}
        if fn is not None:
            rec["eval/pass_rate"] = passed / n
        say(f"step {step}: held-out reward of greedy replies {rec['eval/reward']:.4f}"
            + (f", pass rate {rec['eval/pass_rate']:.3f}" if fn is not None else ""))
        log(rec)
        return rec["eval/reward"]

    say(f"{algo}: {len(train)} train prompts, {len(val)} held out; reward: {reward or 'the reward model ' + reward_model}; "
        f"{max_iters} iterations of {batch_prompts} prompts" + (f" x {world} ranks" if ddp else "")
        + (f" x {num_generations} replies" if algo == "grpo" else ""))
    first, best = evaluate(0), -math.inf
    gen = torch.Generator().manual_seed(seed)  # the same order on every rank: each takes its own slice
    order, t0, need = [], time.time(), batch_prompts * world
    for step in range(1, max_iters + 1):
        while len(order) < need:
            order += torch.randperm(len(train), generator=gen).tolist()
        batch, order = [train[i] for i in order[:need][rank::world]], order[need:]
        by_ids.update({tuple(p["ids"]): p for p in batch})
        prompts, gen_seed = [p["ids"] for p in batch], (seed + step) * world + rank
        st = (ppo_step(policy, ref, value, score_fn, prompts, opt, cfg, gen_seed) if algo == "ppo" else
              grpo_step(policy, ref, score_fn, prompts, opt, cfg, gen_seed))
        st = dict(zip(st, (v / world for v in over_ranks(list(st.values())))))
        log({"step": step, **st})
        eta = (time.time() - t0) / step * (max_iters - step)
        say(f"iter {step}/{max_iters} | scores {st['objective/scores']:+.4f} | kl {st.get('objective/kl', 0):.4f} | "
            f"reply length {st['reply_length']:.1f} | {(time.time() - t0) / step:.1f}s/iter | ETA {fmt_time(eta)}")
        if step % eval_interval == 0 or step == max_iters:
            r = evaluate(step)
            if r >= best:
                best = r
                if master:
                    state = {"model": raw.state_dict(), "optimizer": opt.state_dict()}
                    save_checkpoint(C.finetune_checkpoint(raw, state, config, step, -best, tok, base, algo, {
                        "init_from": init_from, "reward": reward or reward_model, "step": step,
                        "eval_reward_before": first, "eval_reward": best, "world_size": world}), ckpt_path)
                    print(f"saved {ckpt_path} (best held-out reward so far)")
    say(f"done in {fmt_time(time.time() - t0)}: held-out reward {first:.4f} -> {best:.4f}; checkpoint {ckpt_path}")
    del policy, value, opt
    end_ddp(ddp)


if __name__ == "__main__":
    from common import configure
    config = configure(globals())
    main()
