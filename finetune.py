"""
Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat template. The loss is on the
assistant's tokens only, including each reply's <|end|> (so the model learns to stop); prompts and padding
are ignored. The base checkpoint is only read; the result goes to its own out_dir.

    python finetune.py                                      # out/ckpt.pt on pydocs-qa -> out-sft (offline)
    python finetune.py --data=../shared/data/instruction-data.json --out_dir=out-sft-instr
    python finetune.py --init_from=gpt2 --data=alpaca --block_size=512 --out_dir=out-sft-gpt2
    torchrun --standalone --nproc_per_node=8 finetune.py --init_from=gpt2 --data=alpaca
    torchrun --standalone --nproc_per_node=8 finetune.py --dp_shard=-1   # FSDP (see parallel.py)
then chat with it (python sample.py --out_dir=out-sft --chat=True) or align it (python dpo.py).
"""
import time

import torch

from common import (StepChecks, accumulate_gradients, check_optimizer, configure, die, end_ddp, fmt_time, get_lr, grad_scaler,
                    make_optimizer, metrics_log, optimizer_step, precision, save_checkpoint, setup_ddp)
import chat_data as C
import parallel

# -----------------------------------------------------------------------------
# I/O
init_from = "out"          # a checkpoint directory (train.py's out_dir), 'gpt2'..., or a Hugging Face directory
out_dir = "out-sft"        # where the fine-tuned checkpoint goes (never the base's)
overwrite = False          # True: replace a checkpoint already in out_dir
eval_interval = 50         # steps between held-out evaluations (the best one is saved)
log_interval = 10
# data
data = "pydocs-qa"         # pydocs-qa | alpaca | hh-rlhf | a .json / .jsonl(.gz) file of Alpaca or chat records
data_root = "data"
val_frac = 0.1             # held out from a file without its own split
max_examples = 0           # train on the first N examples only (0: all), for quick runs
eval_examples = 1000       # held-out examples per evaluation, evenly spread over the split (0: all)
system_prompt = ""         # a system message put before every conversation (and used by sample.py --chat)
block_size = 0             # longest example in tokens (0: the model's context); longer ones are cut
# optimization
batch_size = 16            # examples per micro-step per rank
grad_accum = 1             # micro-steps per optimizer step
epochs = 2                 # passes over the train examples...
max_iters = 0              # ...or exactly this many steps when > 0
optimizer = "adamw"        # 'adamw' | 'muon' (as train.py: Muon on the blocks' matrices; one process or DDP)
learning_rate = 3e-4
muon_lr = 2e-3             # muon: the matrices' peak learning rate (scheduled as learning_rate)
min_lr = 3e-5
lr_schedule = "cosine"     # 'cosine' | 'wsd'
warmup_iters = 20
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # 0 disables
# system
device = "auto"
dtype = "auto"             # 'auto': bfloat16 on CUDA, float32 elsewhere
dp_shard = 1               # FSDP degree: 1 = no sharding (DDP), -1 = all ranks (as train.py)
activation_checkpointing = False
cpu_offload = False        # FSDP only
seed = 1337
config = configure(globals())
# -----------------------------------------------------------------------------

ckpt_path = C.output_checkpoint(config, "base model")
if max_iters < 0 or max_examples < 0 or eval_examples < 0 or block_size < 0:
    die("max_iters, max_examples, eval_examples and block_size must not be negative")

ddp, rank, local_rank, world_size, device = setup_ddp(device, seed)
master = rank == 0
device_type = device.split(":")[0]
mesh = parallel.make_mesh(world_size, dp_shard, device_type, cpu_offload)  # None: not sharded
dtype, autocast = precision(device, dtype)
autocast = parallel.autocast_for(mesh, device, dtype, autocast)
scaler = grad_scaler(dtype, device)
check_optimizer(optimizer, mesh is not None, scaler is not None)

# the model: the chat tokens get embedding rows if it has none (a GPT-2 import)
model, base, tok = C.load_start(init_from, device, grow_vocab=True)
block_size = block_size or model.config.block_size
if block_size > model.config.block_size:
    die(f"block_size={block_size} exceeds the model's context of {model.config.block_size}")

# data: conversations -> (ids, mask) with the template of chat_data.CHAT_TEMPLATE
train_convs, val_convs = C.load_split(data, data_root, val_frac, "sft")
if max_examples:
    train_convs = train_convs[:max_examples]
val_convs = C.spread(val_convs, eval_examples)
train_set = C.encode_sft(tok, train_convs, block_size, f"{data} train", system_prompt)
val_set = C.encode_sft(tok, val_convs, block_size, f"{data} val", system_prompt)
rows_per_step = batch_size * grad_accum * world_size
max_iters = max_iters or max(1, epochs * len(train_set) // rows_per_step)
if master:
    n_tok = sum(sum(m) for _, m in train_set)
    print(f"{data}: {len(train_set)} train examples ({n_tok} assistant tokens), {len(val_set)} held out; "
          f"{max_iters} steps of {rows_per_step} examples")

raw_model = model
model = parallel.parallelize(model, mesh, ddp, device, activation_checkpointing, False, cpu_offload, dtype)
# after parallelize: FSDP's sharded parameters are the ones to optimize
opt = make_optimizer(optimizer, raw_model, learning_rate, muon_lr, weight_decay, (beta1, beta2), device_type)
mine = val_set[rank::world_size]
if mesh is not None:  # FSDP's forwards are collective: equal shares, topped up with an example of no target
    mine += [(val_set[0][0], [0] * len(val_set[0][1]))] * (-(-len(val_set) // world_size) - len(mine))


def held_out_loss():
    """Mean cross-entropy per assistant token over the held-out examples (each rank a share, summed)."""
    model.eval()
    total, count = C.masked_loss_sums(raw_model, mine, batch_size, tok.eot_id, device, autocast)
    model.train()
    if ddp:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


log = metrics_log(out_dir, master)

# -----------------------------------------------------------------------------
# training: every rank draws the same global batch of example numbers and takes its rows

gen = torch.Generator().manual_seed(seed)
order = C.batch_order(len(train_set), rows_per_step, gen)
step, best_val, t0, t_last = 0, float("inf"), time.time(), time.time()
val_before = held_out_loss()
if master:
    print(f"step 0: held-out masked loss {val_before:.4f}")
    log({"step": 0, "val_loss": val_before})
t_last = time.time()
model.train()
checks = StepChecks(fp16=scaler is not None)
saved = "nothing more was saved"
while step < max_iters:
    lr = get_lr(step, learning_rate, min_lr, warmup_iters, max_iters, lr_schedule)
    ix = next(order)  # the global batch; this rank's rows of each micro-step
    micro = [[train_set[i] for i in ix[r:r + batch_size]] for r in ((m * world_size + rank) * batch_size
                                                                      for m in range(grad_accum))]
    n_targets = sum(sum(mask[1:]) for examples in micro for _, mask in examples)  # this rank's reply tokens
    batches = (C.collate(examples, tok.eot_id, device) for examples in micro)
    loss = accumulate_gradients(model, batches, n_targets, autocast, ddp, scaler)
    grad_norm, bad = optimizer_step(opt, model.parameters(), lr, grad_clip, scaler)
    checks.record(step, loss, grad_norm, bad)
    step += 1
    if step % log_interval == 0:
        lossf, normf = checks.check(saved)
        if master:
            now = time.time()
            eta = (now - t0) / step * (max_iters - step)
            print(f"step {step}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {normf:.2f} | "
                  f"{(now - t_last) / log_interval * 1000:.0f} ms/step | ETA {fmt_time(eta)}")
            t_last = now
            log({"step": step, "loss": lossf, "lr": lr, "grad_norm": normf})
    if step % eval_interval == 0 or step == max_iters:
        checks.check(saved)  # never save weights after an inf or NaN
        t_eval = time.time()
        val = held_out_loss()
        t_last += time.time() - t_eval
        improved = val < best_val  # the same on every rank (all-reduced)
        if master:
            print(f"step {step}: held-out masked loss {val:.4f}" + (" (best: saving)" if improved else ""))
            log({"step": step, "val_loss": val})
        if improved:
            best_val = val
            state = parallel.plain_state(raw_model, opt)  # every rank: FSDP gathers the shards
            if master:
                summary = {"init_from": init_from, "data": data, "step": step, "val_loss_before": val_before,
                           "val_loss": val}
                save_checkpoint(C.finetune_checkpoint(raw_model, state, config, step, best_val, tok, base, "sft",
                                                      summary), ckpt_path)

if master:
    print(f"done in {fmt_time(time.time() - t0)}: held-out masked loss {val_before:.4f} -> {best_val:.4f}; "
          f"checkpoint {ckpt_path} (chat: python sample.py --out_dir={out_dir} --chat=True; "
          f"align: python dpo.py --init_from={out_dir})")
del model, raw_model, opt  # what holds the process group goes before it (see common.end_ddp)
end_ddp(ddp)
