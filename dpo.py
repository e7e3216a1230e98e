"""
Direct Preference Optimization: from pairs (prompt, chosen reply, rejected reply), make the SFT model prefer
the chosen replies more than it did, with no reward model and no sampling (Rafailov et al., 2023).
The policy starts from the SFT checkpoint; the reference is those same weights frozen, so its log-probs are
computed once, up front, and no second model sits in memory. A reply's log-prob is the SUM over its tokens
(including its <|end|>), as in the paper and TRL (a per-token mean lets DPO collapse); IPO takes the per-token
mean, as TRL does, so that its margin target 1/(2 beta) means the same for short and long replies.

    python dpo.py                                           # out-sft on pydocs-pref -> out-dpo (offline)
    python dpo.py --init_from=out-sft-instr --data=../shared/data/instruction-data-with-preference.json
    python dpo.py --loss_type=ipo --beta=0.5 ; python dpo.py --label_smoothing=0.1   # IPO ; conservative DPO
    torchrun --standalone --nproc_per_node=8 dpo.py --dp_shard=-1   # FSDP (see parallel.py)
Logged (train and held-out): rewards/chosen and rewards/rejected = beta * (log pi - log ref) of each side,
rewards/margins = their difference, rewards/accuracy = how often it is > 0, and pref_accuracy = how often
the model itself gives the chosen reply the higher log-prob (the reference's is printed at step 0).
"""
import time
from contextlib import nullcontext

import torch

from common import (StepChecks, accumulate_gradients, configure, die, end_ddp, fmt_time, get_lr, grad_scaler,
                    metrics_log, optimizer_step, precision, save_checkpoint, setup_ddp)
import chat_data as C
import parallel

# -----------------------------------------------------------------------------
# I/O
init_from = "out-sft"      # the SFT checkpoint directory (finetune.py's out_dir)
out_dir = "out-dpo"
overwrite = False          # True: replace a checkpoint already in out_dir
eval_interval = 100        # steps between evaluations on held-out and train pairs (the best held-out loss is saved)
log_interval = 10
# data
data = "pydocs-pref"       # pydocs-pref | hh-rlhf | a .json / .jsonl(.gz) file of preference records
data_root = "data"
val_frac = 0.1
max_pairs = 0              # train on the first N pairs only (0: all)
eval_pairs = 500           # held-out pairs per evaluation, evenly spread (0: all); as many train pairs are scored too
system_prompt = ""         # a system message before every prompt (use the one SFT used, if any)
block_size = 0             # 0: the model's context; longer pairs are cut
# DPO
loss_type = "sigmoid"      # 'sigmoid' (DPO) | 'ipo' | 'hinge' (SLiC)
beta = 0.1                 # strength of the pull towards the reference (higher: stay closer)
label_smoothing = 0.0      # sigmoid only: the share of labels assumed flipped (conservative DPO)
# optimization
batch_size = 8             # pairs per micro-step per rank
grad_accum = 1
epochs = 1
max_iters = 0              # 0: `epochs` passes over the train pairs
learning_rate = 5e-5
min_lr = 5e-6
lr_schedule = "cosine"
warmup_iters = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
device = "auto"
dtype = "auto"
dp_shard = 1               # FSDP degree: 1 = no sharding (DDP), -1 = all ranks (as train.py)
activation_checkpointing = False
cpu_offload = False        # FSDP only
seed = 1337
config = configure(globals())
# -----------------------------------------------------------------------------

ckpt_path = C.output_checkpoint(config, "SFT model")
if loss_type not in ("sigmoid", "ipo", "hinge"):
    die(f"loss_type must be sigmoid, ipo or hinge, got '{loss_type}'")
if beta <= 0:
    die(f"beta must be positive, got {beta}")
if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
    die(f"label_smoothing must be in [0, 0.5) and only with loss_type='sigmoid' (got {label_smoothing}, {loss_type})")

ddp, rank, local_rank, world_size, device = setup_ddp(device, seed)
master = rank == 0
device_type = device.split(":")[0]
mesh = parallel.make_mesh(world_size, dp_shard, device_type, cpu_offload)  # None: not sharded
dtype, autocast = precision(device, dtype)
autocast = parallel.autocast_for(mesh, device, dtype, autocast)
scaler = grad_scaler(dtype, device)

model, base, tok = C.load_start(init_from, device, grow_vocab=True)  # so that a model lacking them gets here:
if base is None or not base.get("chat"):
    die(f"{init_from} is not a chat model (it was never fine-tuned with the chat tokens): "
        f"run SFT first (python finetune.py --init_from={init_from} --out_dir=out-sft), then dpo.py --init_from=out-sft")
block_size = block_size or model.config.block_size
if block_size > model.config.block_size:
    die(f"block_size={block_size} exceeds the model's context of {model.config.block_size}")
# no dropout: the policy's log-probs must be comparable to the reference's (eval mode throughout)
model.eval()

train_pairs, val_pairs = C.load_split(data, data_root, val_frac, "pref")
if max_pairs:
    train_pairs = train_pairs[:max_pairs]
val_pairs = C.spread(val_pairs, eval_pairs)
train_set = C.encode_pairs(tok, train_pairs, block_size, f"{data} train", system_prompt)
val_set = C.encode_pairs(tok, val_pairs, block_size, f"{data} val", system_prompt)
rows_per_step = batch_size * grad_accum * world_size
max_iters = max_iters or max(1, epochs * len(train_set) // rows_per_step)
# the train pairs scored at each evaluation: the first ones, as many as held out (batched as the reference
# scores them, so at step 0 the policy's log-probs equal the reference's exactly and every reward is 0)
train_eval_ix = list(range(min(len(val_set), len(train_set))))


def logps(pairs, net=None):
    """(chosen, rejected) summed log-probs of the replies of these pairs: one forward pass for both sides.
    net: the (DDP) model to train through; None scores without gradients and without DDP (ranks score
    different numbers of batches)."""
    x, y = C.pair_batch(pairs, tok.eot_id, device)
    with (nullcontext() if net is not None else torch.no_grad()), autocast:
        logits, _ = (net or raw_model)(x)
    lp = C.sequence_logps(logits, y, average=loss_type == "ipo")
    return lp[:len(pairs)], lp[len(pairs):]


def all_logps(pairs, desc=None):
    """Log-probs of every pair, each rank scoring a share (then summed across ranks)."""
    return C.pair_scores(pairs, logps, batch_size, rank, world_size, mesh is not None, ddp, device,
                         desc if master else None)


raw_model = model
model = parallel.parallelize(model, mesh, ddp, device, activation_checkpointing, False, cpu_offload, dtype)
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)  # FSDP's params
t0 = time.time()
# the reference: the weights we start from, scored once; training never runs it again
ref_train = all_logps(train_set, "reference log-probs (train)")
ref_val = all_logps(val_set, "reference log-probs (val)")
if master:
    print(f"{data}: {len(train_set)} train pairs, {len(val_set)} held out; reference log-probs in "
          f"{time.time() - t0:.1f}s; {max_iters} steps of {rows_per_step} pairs, {loss_type} loss, beta {beta}")


def scores(pi, ref):
    """The logged figures of policy log-probs pi against the reference's ref (each 2 x N: chosen, rejected)."""
    losses, r_c, r_r = C.dpo_loss(pi[0], pi[1], ref[0], ref[1], beta, loss_type, label_smoothing)
    return {"loss": losses.mean().item(), "rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracy": (r_c > r_r).float().mean().item(),
            "pref_accuracy": (pi[0] > pi[1]).float().mean().item()}


def evaluate():
    return {"val": scores(all_logps(val_set), ref_val),
            "train": scores(all_logps([train_set[i] for i in train_eval_ix]), ref_train[:, train_eval_ix])}


def show(step, ev):
    for split in ("train", "val"):
        s = ev[split]
        print(f"step {step} {split:5s}: loss {s['loss']:.4f} | rewards chosen {s['rewards/chosen']:+.3f} "
              f"rejected {s['rewards/rejected']:+.3f} margin {s['rewards/margins']:+.3f} "
              f"accuracy {s['rewards/accuracy']:.3f} | pref accuracy {s['pref_accuracy']:.3f}")


log = metrics_log(out_dir, master)


def flat(ev):
    return {f"{split}/{k}": v for split, s in ev.items() for k, v in s.items()}

# -----------------------------------------------------------------------------
# training

ev_before = evaluate()
if master:
    show(0, ev_before)
    log({"step": 0, **flat(ev_before)})
gen = torch.Generator().manual_seed(seed)
order = C.batch_order(len(train_set), rows_per_step, gen)
best_ev = ev_before
stats = torch.zeros(2, device=device)  # summed reward margins and correct pairs of this step (this rank)


def dpo_loss_sum(net, rows):
    """Summed DPO loss of the pairs train_set[rows] (accumulate_gradients divides by the global pair count)."""
    pi_c, pi_r = logps([train_set[i] for i in rows], net)
    losses, r_c, r_r = C.dpo_loss(pi_c, pi_r, ref_train[0, rows], ref_train[1, rows], beta, loss_type,
                                  label_smoothing)
    stats.add_(torch.stack([(r_c - r_r).sum(), (r_c > r_r).float().sum()]))
    return losses.sum()


step, best_val, t_start, t_last = 0, float("inf"), time.time(), time.time()
checks = StepChecks(fp16=scaler is not None)
saved = "nothing more was saved"
while step < max_iters:
    lr = get_lr(step, learning_rate, min_lr, warmup_iters, max_iters, lr_schedule)
    ix = next(order)  # the global batch; this rank's rows of each micro-step
    micro = [ix[r:r + batch_size] for r in ((m * world_size + rank) * batch_size for m in range(grad_accum))]
    stats.zero_()
    loss = accumulate_gradients(model, micro, batch_size * grad_accum, autocast, ddp, scaler, dpo_loss_sum)
    grad_norm, bad = optimizer_step(optimizer, model.parameters(), lr, grad_clip, scaler)
    checks.record(step, loss, grad_norm, bad)
    step += 1
    if step % log_interval == 0:
        lossf, normf = checks.check(saved)
        if ddp:
            torch.distributed.all_reduce(stats)
        margin, acc = (stats / rows_per_step).tolist()  # this step's, as the loss
        if master:
            now = time.time()
            eta = (now - t_start) / step * (max_iters - step)
            print(f"step {step}/{max_iters} | loss {lossf:.4f} | margin {margin:+.3f} | accuracy {acc:.2f} | "
                  f"lr {lr:.2e} | grad norm {normf:.2f} | {(now - t_last) / log_interval * 1000:.0f} ms/step | "
                  f"ETA {fmt_time(eta)}")
            t_last = now
            log({"step": step, "loss": lossf, "rewards/margins": margin, "rewards/accuracy": acc, "lr": lr,
                 "grad_norm": normf})
    if step % eval_interval == 0 or step == max_iters:
        checks.check(saved)  # never save weights after an inf or NaN
        t_eval = time.time()
        ev = evaluate()
        t_last += time.time() - t_eval
        if master:
            show(step, ev)
            log({"step": step, **flat(ev)})
        if ev["val"]["loss"] < best_val:  # the same on every rank (all-reduced log-probs)
            best_val, best_ev = ev["val"]["loss"], ev
            state = parallel.plain_state(raw_model, optimizer)  # every rank: FSDP gathers the shards
            if master:
                summary = {"init_from": init_from, "data": data, "step": step, "loss_type": loss_type, "beta": beta,
                           "val_before": ev_before["val"], "val": ev["val"]}
                save_checkpoint(C.finetune_checkpoint(raw_model, state, config, step, best_val, tok, base, "dpo",
                                                      summary), ckpt_path)
                print(f"saved {ckpt_path} (best held-out DPO loss so far)")

if master:
    b, a = ev_before["val"], best_ev["val"]
    print(f"done in {fmt_time(time.time() - t_start)}. Held-out preference accuracy (chosen more likely than "
          f"rejected): reference {b['pref_accuracy']:.3f} -> DPO {a['pref_accuracy']:.3f}; reward margin "
          f"{a['rewards/margins']:+.3f}, reward accuracy {a['rewards/accuracy']:.3f}; checkpoint {ckpt_path} "
          f"(chat: python sample.py --out_dir={out_dir} --chat=True)")
del model, raw_model, optimizer  # what holds the process group goes before it (see common.end_ddp)
end_ddp(ddp)
