"""
Train a reward model on ranked pairs: the SFT model with a scalar head in place of its vocabulary head, read
at the last token of prompt + reply (InstructGPT; TRL's RewardTrainer). The loss is Bradley-Terry's,
-log sigmoid(r_chosen - r_rejected), plus TRL's optional centering term center_rewards_coefficient *
(r_chosen + r_rejected)^2, which keeps the rewards near zero (their offset is otherwise free). rl.py's PPO
scores rollouts with it (and starts its value model from it).

    python reward.py                                    # out-sft on pydocs-pref -> out-rm (offline)
    python reward.py --data=../shared/data/instruction-data-with-preference.json --init_from=out-sft-instr
    python reward.py --data=prefs.jsonl                 # any preference file dpo.py reads (the web arena's too)
    torchrun --standalone --nproc_per_node=8 reward.py --dp_shard=-1
Logged (train and held-out pairs): accuracy (how often the chosen reply scores higher), margin (the mean of
r_chosen - r_rejected), the mean, min and max reward, and the loss.
"""
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import chat_data as C
from common import die


# -----------------------------------------------------------------------------
# config (python reward.py --help lists these)
init_from = "out-sft"      # the SFT checkpoint directory: the reward model starts from it
out_dir = "out-rm"
overwrite = False
eval_interval = 100
log_interval = 10
data = "pydocs-pref"       # pydocs-pref | hh-rlhf | a .json / .jsonl(.gz) preference file (as dpo.py)
data_root = "data"
val_frac = 0.1
max_pairs = 0
eval_pairs = 500
system_prompt = ""
block_size = 0             # 0: the model's context
center_rewards_coefficient = 0.0   # TRL's reward centering (e.g. 0.01)
batch_size = 8
grad_accum = 1
epochs = 1
max_iters = 0
learning_rate = 1e-5
min_lr = 1e-6
lr_schedule = "cosine"
warmup_iters = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
device = "auto"
dtype = "auto"
dp_shard = 1
activation_checkpointing = False
cpu_offload = False
seed = 1337
# -----------------------------------------------------------------------------


def with_value_head(model):
    """The GPT with a scalar head in place of its vocabulary head, in place: its forward then gives (B, T, 1)
    scores, one per position. The head starts as TRL's (normal, std 1/sqrt(n_embd + 1)); tied embeddings are
    untied (the token table stays, the head is new)."""
    w = model.lm_head.weight
    model.lm_head = nn.Linear(model.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)
    nn.init.normal_(model.lm_head.weight, std=1 / math.sqrt(model.config.n_embd + 1))
    model.config.tie_embeddings = False
    return model


def sequences_batch(seqs, pad_id, device):
    """(x, last) of token lists of any lengths: the rows right-padded into x (B, T), and each row's last real
    position (causal attention: a row's real tokens never see the padding after them)."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, :len(s)] = torch.as_tensor(s)
    return x.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


def sequence_rewards(model, x, last):
    """(B,) the reward model's score of each row at its last real token."""
    scores = model(x)[0][..., 0].float()
    return scores[torch.arange(len(x), device=x.device), last]


def bt_loss(r_chosen, r_rejected, center=0.0):
    """Per-pair Bradley-Terry loss, -log sigmoid(r_c - r_r) (ln 2 when the two are equal), plus TRL's centering
    center * (r_c + r_r)^2."""
    loss = -F.logsigmoid(r_chosen - r_rejected)
    return loss + center * (r_chosen + r_rejected) ** 2 if center else loss


def load_reward_model(out_dir, device):
    """(model, checkpoint, tokenizer) of a reward model written by reward.py; one clear error otherwise."""
    import model as M
    import tokenizer as T
    from common import load_checkpoint
    ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt")
    if not ckpt.get("reward_head"):
        die(f"{Path(out_dir) / 'ckpt.pt'} is not a reward model: train one with python reward.py --init_from=... "
            f"--out_dir={out_dir}")
    model = with_value_head(M.GPT(M.GPTConfig(**ckpt["model_args"])))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt, T.from_spec(ckpt["tokenizer"])


def main():
    from common import (Progress, StepChecks, accumulate_gradients, end_ddp, fmt_time, get_lr, grad_scaler,
                        metrics_log, optimizer_step, precision, save_checkpoint, setup_ddp)
    import parallel
    g = globals()
    ckpt_path = C.output_checkpoint(config, "SFT model")
    if center_rewards_coefficient < 0:
        die(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
    ddp, rank, _, world_size, device = setup_ddp(g["device"], seed)
    master = rank == 0
    mesh = parallel.make_mesh(world_size, dp_shard, device.split(":")[0], cpu_offload)
    dtype, autocast = precision(device, g["dtype"])
    autocast = parallel.autocast_for(mesh, device, dtype, autocast)
    scaler = grad_scaler(dtype, device)

    model, base, tok = C.load_start(init_from, device, grow_vocab=True)
    if base is None or not base.get("chat"):
        die(f"{init_from} is not a chat model (it was never fine-tuned with the chat tokens): run SFT first "
            f"(python finetune.py --init_from={init_from} --out_dir=out-sft), then reward.py --init_from=out-sft")
    size = block_size or model.config.block_size
    if size > model.config.block_size:
        die(f"block_size={size} exceeds the model's context of {model.config.block_size}")
    with_value_head(model)
    model.to(device).eval()  # no dropout: a pair's two sides are scored alike
    train_pairs, val_pairs = C.load_split(data, data_root, val_frac, "pref")
    if max_pairs:
        train_pairs = train_pairs[:max_pairs]
    train_set = [(c, r) for c, _, r, _ in C.encode_pairs(tok, train_pairs, size - 1, f"{data} train", system_prompt)]
    val_set = [(c, r) for c, _, r, _ in C.encode_pairs(tok, C.spread(val_pairs, eval_pairs), size - 1, f"{data} val",
                                                        system_prompt)]
    rows_per_step = batch_size * grad_accum * world_size
    steps = max_iters or max(1, epochs * len(train_set) // rows_per_step)
    raw = model
    model = parallel.parallelize(model, mesh, ddp, device, activation_checkpointing, False, cpu_offload, dtype)
    optimizer = raw.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device.split(":")[0])

    def rewards(pairs, net=None):
        """(chosen, rejected) rewards of these pairs: one forward pass for both sides."""
        x, last = sequences_batch([c for c, _ in pairs] + [r for _, r in pairs], tok.eot_id, device)
        with (nullcontext() if net is not None else torch.no_grad()), autocast:
            r = sequence_rewards(net or raw, x, last)
        return r[:len(pairs)], r[len(pairs):]

    def evaluate(pairs):
        """The figures of these pairs, each rank scoring a share."""
        out = C.pair_scores(pairs, rewards, batch_size, rank, world_size, mesh is not None, ddp, device)
        rc, rr = out
        both = out.flatten()
        return {"loss": bt_loss(rc, rr, center_rewards_coefficient).mean().item(), "accuracy": (rc > rr).float().mean().item(),
                "margin": (rc - rr).mean().item(), "reward_mean": both.mean().item(), "reward_min": both.min().item(),
                "reward_max": both.max().item()}

    def report(step):
        ev = {"val": evaluate(val_set), "train": evaluate(train_set[:len(val_set)])}
        if master:
            for split, s in ev.items():
                print(f"step {step} {split:5s}: loss {s['loss']:.4f} | accuracy {s['accuracy']:.3f} | margin "
                      f"{s['margin']:+.3f} | reward mean {s['reward_mean']:+.3f} min {s['reward_min']:+.3f} max "
                      f"{s['reward_max']:+.3f}")
            log({"step": step, **{f"{k}/{m}": v for k, s in ev.items() for m, v in s.items()}})
        return ev

    def loss_sum(net, rows):
        rc, rr = rewards([train_set[i] for i in rows], net)
        return bt_loss(rc, rr, center_rewards_coefficient).sum()

    log = metrics_log(out_dir, master)
    if master:
        print(f"{data}: {len(train_set)} train pairs, {len(val_set)} held out; {steps} steps of {rows_per_step} pairs")
    first = best = report(0)
    order = C.batch_order(len(train_set), rows_per_step, torch.Generator().manual_seed(seed))
    checks, t0, step = StepChecks(fp16=scaler is not None), time.time(), 0
    prog = Progress(steps, "reward model", " steps") if master else None
    while step < steps:
        lr = get_lr(step, learning_rate, min_lr, warmup_iters, steps, lr_schedule)
        ix = next(order)
        micro = [ix[r:r + batch_size] for r in ((m * world_size + rank) * batch_size for m in range(grad_accum))]
        loss = accumulate_gradients(model, micro, batch_size * grad_accum, autocast, ddp, scaler, loss_sum)
        grad_norm, bad = optimizer_step(optimizer, model.parameters(), lr, grad_clip, scaler)
        checks.record(step, loss, grad_norm, bad)
        step += 1
        if step % log_interval == 0:
            lossf, normf = checks.check("nothing more was saved")
            if master:
                prog.update(log_interval)
                log({"step": step, "loss": lossf, "lr": lr, "grad_norm": normf})
        if step % eval_interval == 0 or step == steps:
            checks.check("nothing more was saved")
            ev = report(step)
            if ev["val"]["loss"] <= best["val"]["loss"] or step == steps and best is first:
                best = ev
                state = parallel.plain_state(raw, optimizer)  # every rank (FSDP gathers the shards)
                if master:
                    ck = C.finetune_checkpoint(raw, state, config, step, ev["val"]["loss"], tok, base, "reward",
                                               {"init_from": init_from, "data": data, "step": step, "val": ev["val"]})
                    save_checkpoint({**ck, "reward_head": True}, ckpt_path)
                    print(f"saved {ckpt_path} (best held-out loss so far)")
    if master:
        print(f"done in {fmt_time(time.time() - t0)}: held-out pair accuracy {first['val']['accuracy']:.3f} -> "
              f"{best['val']['accuracy']:.3f}, margin {best['val']['margin']:+.3f}; reward model {ckpt_path} "
              f"(PPO against it: python rl.py --algo=ppo --reward_model={out_dir})")
    del model, raw, optimizer
    end_ddp(ddp)


if __name__ == "__main__":
    from common import configure
    config = configure(globals())
    main()
