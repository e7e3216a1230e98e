"""
Pretrain a GPT on token shards from prepare.py: one CPU or GPU, or many with torchrun.

    python train.py                                   # the default: a small Llama-style model on pydocs, CPU ok
    python train.py config/shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    torchrun --standalone --nproc_per_node=8 train.py --dp_shard=-1 --optimizer=adamw   # FSDP: weights sharded over the 8
    torchrun --standalone --nproc_per_node=8 train.py config/llama_1gpu.py --dp_shard=-1 --tp=2 --pp=2
"""
import math
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common import (StepChecks, accumulate_gradients, check_compiler, check_optimizer, configure, die, end_ddp, fmt_time, get_lr, grad_scaler,
                    load_checkpoint, make_optimizer, metrics_log, optimizer_step, precision, restore_rng, rng_states,
                    save_checkpoint, setup_ddp)
import parallel
import prepare

# -----------------------------------------------------------------------------
# default config: a small Llama-style model on the embedded pydocs corpus with Muon and modded-nanogpt's QK-norm,
# ReLU^2 and zero-init projections, 6-9 minutes on a 2-core CPU (config/pydocs_adamw.py: the recipe before them)
# I/O
out_dir = "out"
eval_interval = 100       # evaluate, log val loss and save a checkpoint every this many steps
log_interval = 10
eval_iters = 10            # batches per split for each evaluation
eval_only = False
always_save_checkpoint = True   # False: save only when val loss improves
init_from = "scratch"      # 'scratch' | 'resume' (out_dir/ckpt.pt) | 'gpt2'... | a Hugging Face directory
sample_at_end = True       # print a short sample when training finishes
# logging
wandb_log = False          # only when wandb is installed
wandb_project = "fromscratch"
wandb_run_name = "run"
# data
dataset = "pydocs"         # a name prepare.py knows; prepared automatically when missing
data_root = "data"
tokenizer = "bpe"          # 'bpe' (trained here) | 'gpt2' | 'byte'; used when the data is prepared
vocab_size = 4096          # for a bpe tokenizer trained by prepare.py
input = ""                 # for dataset='local': a file or folder
num_shards = 0             # for dataset='fineweb10B': train shards of 100M tokens to fetch (0: prepare.py's default, 8)
total_batch_size = 4096   # tokens per optimizer step, all ranks and micro-steps together (the default run: 8,192
                           # -> 4,096 at the same tokens, twice the steps, took val bpb 2.152 -> 2.136; 2,048: 2.164)
batch_size = 16            # sequences per micro-step per rank
block_size = 256
# model (Llama style by default, with modded-nanogpt's ReLU squared MLP: Llama's own is mlp='swiglu'; GPT-2 style
# is norm='layernorm', pos='learned', mlp='gelu', bias=True)
n_layer = 4
n_head = 3                 # 3 heads of 64 sharing one key/value head: against 6 of 32 over 2, the default run's val bpb
n_kv_head = 1              # 2.102 -> 2.069 (tied, seed 1337, the whole val split)
n_embd = 192
dropout = 0.0
bias = False
norm = "rmsnorm"
pos = "rope"
rope_theta = 10000.0
mlp = "relu2"
tie_embeddings = True      # the head is the embedding: the run is data-bound (4 epochs), and an untied head's 0.79M
                           # parameters fit the training modules: untied 2.127 -> tied 2.102 (seed 1337, whole val split)
qk_norm = True             # modded-nanogpt's switches (model.py); of these hf.py exports only zero_init
logit_softcap = 0.0        # > 0: logits = cap * tanh(logits / cap), e.g. 15 or 30
zero_init = True           # output projections start at zero
value_embeds = False       # a learned vector per token added to each layer's values (not under tp/pp)
unet = False               # U-net skips from the first half's layers to the second half's (not under tp/pp)
pad_vocab = 64             # round the embedding table up to a multiple of this (faster matmuls on GPU)
# optimizer and schedule
optimizer = "muon"         # 'adamw' | 'muon': Muon on the blocks' matrices, AdamW on the rest (one process or DDP;
                           # FSDP, tensor and pipeline parallel take adamw)
muon_lr = 0.015            # muon: the matrices' peak learning rate (the schedule scales it as learning_rate)
muon_momentum = 0.95
muon_momentum_warmup = 600 # steps over which Muon's momentum rises from 0.85
learning_rate = 3e-3
max_iters = 500
max_time = 0.0             # > 0: stop after this many seconds of training (evaluation excluded), the schedule running
                           # on the share of the time spent as if max_iters steps filled it (timed comparisons)
weight_decay = 1.0         # the default run is data-bound (4 epochs): 0.1 -> 1.0 took val bpb 2.193 -> 2.158 (seed 1337)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # 0 disables
lr_schedule = "cosine"     # 'cosine' | 'wsd' (warmup-stable-decay)
warmup_iters = 100         # a fifth of the run: 20 of 250 steps (8,192 tokens each) left it 0.19-0.27 bpb worse
lr_decay_iters = 0         # 0: same as max_iters
min_lr = 3e-5
cooldown_frac = 0.2        # wsd only: the share of steps spent decaying
# system
device = "auto"            # 'auto' picks cuda, then mps, then cpu
dtype = "auto"             # 'auto': bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are very slow on CPU)
compile = None             # None: on for CUDA, off elsewhere
dp_shard = 1               # FSDP degree: 1 = no sharding (DDP), -1 = all ranks; the rest of the ranks are replicas (HSDP)
tp = 1                     # tensor-parallel degree: each block's matrices split over this many ranks (keep it in a node)
pp = 1                     # pipeline stages: the layers split over this many ranks (needs tie_embeddings=False)
pp_schedule = "1f1b"       # 'gpipe' | '1f1b': the micro-steps of a step are the pipeline's microbatches
activation_checkpointing = False   # recompute each block's activations in the backward (less memory, ~1/3 more compute)
cpu_offload = False        # FSDP only: keep the sharded weights, gradients and optimizer state in CPU memory
seed = 1337
config = configure(globals())
# -----------------------------------------------------------------------------

for k in ("eval_interval", "log_interval", "eval_iters", "batch_size", "block_size", "total_batch_size",
          "n_layer", "n_head", "n_embd", "max_iters"):
    if config[k] <= 0 and not (k == "max_iters" and config[k] == 0):
        die(f"{k} must be positive, got {config[k]}")
if (value_embeds or unet) and (tp > 1 or pp > 1):  # a later pipeline stage has no token ids; TP would shard them
    die("value_embeds and unet run in one process, DDP or FSDP: turn them off for tensor or pipeline parallel")
if max_time < 0:
    die(f"max_time must be >= 0 seconds (0: run max_iters steps), got {max_time}")
if compile is not None and not isinstance(compile, bool):
    die(f"compile must be True, False or None (auto), got {compile!r}")
if lr_schedule not in ("cosine", "wsd"):
    die(f"lr_schedule must be 'cosine' or 'wsd', got '{lr_schedule}'")

ddp, rank, local_rank, world_size, device = setup_ddp(device, seed)
master = rank == 0
device_type = device.split(":")[0]
mesh = parallel.make_mesh(world_size, dp_shard, device_type, cpu_offload, tp, pp, cfg=SimpleNamespace(
    n_head=n_head, n_kv_head=n_kv_head or n_head, n_layer=n_layer))  # None: not sharded (one process, DDP)
on_mesh = mesh is not None  # FSDP and/or tensor parallel: a sharded checkpoint
dp_rank, dp_world = parallel.data_rank(mesh, rank, world_size)  # one tensor-parallel group reads the same rows
tokens_per_micro = batch_size * block_size * dp_world
if total_batch_size % tokens_per_micro:
    die(f"total_batch_size={total_batch_size} must be a multiple of batch_size*block_size*data-parallel ranks="
        f"{tokens_per_micro}")
grad_accum = total_batch_size // tokens_per_micro
lr_decay_iters = lr_decay_iters or max_iters
dtype, autocast = precision(device, dtype)
autocast = parallel.autocast_for(mesh, device, dtype, autocast)
scaler = grad_scaler(dtype, device)
check_optimizer(optimizer, on_mesh, scaler is not None)
if compile is None:
    compile = device_type == "cuda"
if compile:
    check_compiler(device_type)
out = Path(out_dir)
# one process and DDP write out/ckpt.pt; FSDP writes out/ckpt/, a sharded DCP directory (parallel.save_sharded)
ckpt_path = out / ("ckpt" if on_mesh else "ckpt.pt")
found = parallel.find_checkpoint(out)  # (path, sharded) of the newer one; either kind resumes under any layout
if init_from == "scratch" and found and not eval_only:
    die(f"{found[0]} already exists: continue it with --init_from=resume, or train into another --out_dir")

# -----------------------------------------------------------------------------
# data: memory-mapped shards, random windows. Every rank draws the same global batch of window
# offsets from one generator and takes its own rows, so N ranks see exactly what 1 process would.

if master:
    data_dir = prepare.prepare(dataset=dataset, data_root=data_root, tokenizer=tokenizer,
                               vocab_size=vocab_size, input=input, num_shards=num_shards)
if ddp:
    torch.distributed.barrier()
data_dir = Path(data_root) / dataset
meta = prepare.load_meta(data_dir)
splits = {s: [prepare.read_bin(data_dir / f) for f in meta[s]["shards"]] for s in ("train", "val")}
for s, shards in splits.items():
    longest = max(len(x) for x in shards)
    if longest <= block_size:
        die(f"the {s} split of {data_dir} has only {longest} tokens in its largest shard, not enough for "
            f"block_size={block_size}: lower --block_size or use more data")
# window starts per shard, so sampling is uniform over all windows of the split
n_windows = {s: np.cumsum([max(0, len(x) - block_size) for x in shards]) for s, shards in splits.items()}
n_train = sum(len(x) for x in splits["train"])
if master and max_iters * total_batch_size > n_train:
    print(f"warning: {max_iters} steps x {total_batch_size} tokens = {max_iters * total_batch_size / 1e6:.1f}M tokens, "
          f"but the train split has {n_train / 1e6:.1f}M: it will be repeated {max_iters * total_batch_size / n_train:.1f} "
          f"times (fewer --max_iters, or more data{': --num_shards' if dataset == 'fineweb10B' else ''})")


def get_batch(split, ix):
    """The (x, y) windows of `split` starting at global window numbers `ix`."""
    shards, cum = splits[split], n_windows[split]
    ix = ix.numpy()
    shard_ix = np.searchsorted(cum, ix, side="right")
    starts = ix - np.concatenate([[0], cum])[shard_ix]
    buf = np.stack([shards[j][i:i + block_size + 1] for j, i in zip(shard_ix, starts)]).astype(np.int64)
    buf = torch.from_numpy(buf)
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def sample_windows(split, gen, n):
    return torch.randint(int(n_windows[split][-1]), (n,), generator=gen)

# -----------------------------------------------------------------------------
# model and optimizer

import model as M

data_vocab = meta["vocab_size"]
ckpt = None
if init_from == "resume" and not found:
    load_checkpoint(out / "ckpt.pt")  # the usual error: nothing to resume
if init_from == "resume" or eval_only and found:
    resume_path, sharded = found
    # on the CPU: the RNG states must stay CPU tensors. A sharded one's tensors are read after parallelize
    ckpt = parallel.load_extra(resume_path) if sharded else load_checkpoint(resume_path)
    if ckpt["meta"]["vocab_size"] != data_vocab or ckpt["tokenizer"]["kind"] != meta["tokenizer"]["kind"]:
        die(f"{resume_path} was trained on a {ckpt['tokenizer']['kind']} tokenizer of {ckpt['meta']['vocab_size']} "
            f"tokens but {data_vocab}-token {meta['tokenizer']['kind']} data is in {data_dir}: "
            f"use the same dataset/tokenizer or another --out_dir")
    model = M.GPT(M.GPTConfig(**ckpt["model_args"]))
    if not sharded:
        model.load_state_dict(ckpt["model"])
elif init_from == "scratch":
    padded = math.ceil(data_vocab / pad_vocab) * pad_vocab
    model = M.GPT(M.GPTConfig(vocab_size=padded, block_size=block_size, n_layer=n_layer, n_head=n_head,
                              n_kv_head=n_kv_head, n_embd=n_embd, dropout=dropout, bias=bias, norm=norm,
                              pos=pos, rope_theta=rope_theta, mlp=mlp, tie_embeddings=tie_embeddings,
                              qk_norm=qk_norm, logit_softcap=logit_softcap, zero_init=zero_init,
                              value_embeds=value_embeds, unet=unet))
else:
    from hf import load_model
    model, _, tok = load_model(init_from, out_dir, "cpu")
    if tok.kind != meta["tokenizer"]["kind"]:
        die(f"{init_from} uses the {tok.kind} tokenizer but {data_dir} was prepared with {meta['tokenizer']['kind']}: "
            f"prepare it with --tokenizer={tok.kind} (and another dataset name or --force)")
    # pretraining data holds text ids and <|endoftext|> only (the chat tokens above it never occur): GPT-2's
    # 50257 rows cover GPT-2-tokenized data although the tokenizer counts 50261 tokens
    if meta["eot_id"] >= model.config.vocab_size:
        die(f"{data_dir} uses token ids up to {meta['eot_id']} but {init_from} has only {model.config.vocab_size} "
            f"token embeddings: prepare the data with the model's own tokenizer")
if block_size > model.config.block_size:
    die(f"block_size={block_size} exceeds the model's context of {model.config.block_size}")
if block_size < model.config.block_size and init_from not in ("scratch", "resume"):
    model.crop_block_size(block_size)  # as nanoGPT: GPT-2's 1024 positions cut to the trained context
model.to(device)
raw_model = model  # the module whose state we save (FSDP shards it in place, a pipeline stage keeps its part)
n_params = raw_model.num_params()
with torch.device("meta"):  # the whole model's FLOPs for the MFU, shapes only: a pipeline stage is a part
    flops_model = M.GPT(raw_model.config) if pp > 1 else raw_model
model = parallel.parallelize(model, mesh, ddp, device, activation_checkpointing, compile, cpu_offload, dtype)
# after parallelize: FSDP replaces the parameters with sharded ones, which the optimizer must hold
opt = make_optimizer(optimizer, raw_model, learning_rate, muon_lr, weight_decay, (beta1, beta2), device_type)
pipe = None
if pp > 1:  # each microbatch's summed loss over this rank's tokens of the step: FSDP averages over the ranks
    tokens_per_rank = batch_size * block_size * grad_accum
    pipe = parallel.pipeline(model, mesh, device, grad_accum, pp_schedule, lambda logits, y: torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum") / tokens_per_rank)
train_gen = torch.Generator().manual_seed(seed)
step, best_val_loss = 0, float("inf")
if ckpt is not None and sharded:
    parallel.load_sharded(resume_path, raw_model, opt if init_from == "resume" else None)
if ckpt is not None and init_from == "resume":
    if not sharded:
        if ckpt["config"].get("optimizer", "adamw") != optimizer:
            die(f"{resume_path} was trained with optimizer={ckpt['config'].get('optimizer', 'adamw')}: resume with "
                f"that (--optimizer=...), or start a new --out_dir")
        opt.load_state_dict(ckpt["optimizer"])
    step, best_val_loss = ckpt["step"], ckpt["best_val_loss"]
    train_gen.set_state(ckpt["rng"]["data"])
    restore_rng(ckpt["rng"], rank, world_size, device_type)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if master:
        print(f"resuming from {resume_path} at step {step}")
del ckpt  # free memory
if master:
    layout = parallel.describe(mesh) if on_mesh else ""
    print(f"model: {n_params / 1e6:.2f}M parameters, {device} {dtype}, {layout}"
          f"{world_size} rank(s) x {grad_accum} micro-steps x {batch_size}x{block_size} = {total_batch_size} tokens/step")

tok_bytes = {s: meta[s]["bytes"] / meta[s]["tokens"] if meta[s].get("bytes") else None for s in ("train", "val")}


def score(batch):
    """Mean loss of one batch: the model's own forward (not DDP's: ranks score unequal counts), or, in a
    pipeline, the pass through every stage (the loss is on the last stage, 0 on the others)."""
    with autocast:
        if pipe is not None:
            return parallel.pipeline_pass(pipe, *batch, device)
        return raw_model(*batch)[1].float()


@torch.no_grad()
def evaluate():
    """Mean loss over the same eval_iters batches every time (a fixed generator), and bits per byte. Each rank
    scores its share of the batches and the sums are all-reduced: every rank gets the same figures."""
    model.eval()
    result = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(seed + 1)
        total = torch.zeros((), device=device)
        for k in range(eval_iters):
            ix = sample_windows(split, gen, batch_size)  # every rank draws every batch: the same ones as 1 rank
            if k % dp_world == dp_rank:
                total += score(get_batch(split, ix))
        # FSDP's forward gathers weights with the other ranks: a rank with one batch fewer runs a spare one
        if on_mesh and dp_rank >= eval_iters % dp_world > 0:
            score(get_batch(split, ix))
        if ddp:
            torch.distributed.all_reduce(total)
        result[split] = total.item() / eval_iters / tp  # the tp ranks of a group hold the same losses
        if tok_bytes[split]:
            result[f"{split}_bpb"] = result[split] / math.log(2) / tok_bytes[split]
    model.train()
    return result


def save():
    """Every rank calls it (the ranks' RNG states are gathered; FSDP's ranks each write their shards);
    a plain checkpoint is written by rank 0."""
    extra = {"model_args": asdict(raw_model.config), "config": config, "step": step,
             "best_val_loss": best_val_loss, "tokenizer": meta["tokenizer"], "meta": meta,
             "rng": {"data": train_gen.get_state(), **rng_states(ddp, device_type)},
             "scaler": scaler.state_dict() if scaler is not None else None}
    if on_mesh:
        parallel.save_sharded(ckpt_path, raw_model, opt, extra)
    elif master:
        save_checkpoint({"model": raw_model.state_dict(), "optimizer": opt.state_dict(), **extra}, ckpt_path)


jsonl = metrics_log(out, master)
if master and wandb_log:
    try:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only")
        wandb_log = False


def log(record):
    jsonl(record)
    if wandb_log:
        wandb.log(record, step=record["step"])

# -----------------------------------------------------------------------------
# training loop

start_step, t_start = step, time.time()
t_last, timed_steps, train_time, steps_done = None, 0, 0.0, 0  # the first step (compile, warm-up) is not timed
eval_time = 0.0  # seconds spent evaluating: the eval records' "time" is training time (for time-to-loss)
rows_per_step = batch_size * grad_accum * dp_world
checks = StepChecks(fp16=scaler is not None)  # loss, grad norm and inf/NaN steps, read from the device when logging


def what_is_saved():
    """What the user still has, for the error that stops a run after an inf or NaN."""
    return f"the last good checkpoint {ckpt_path} is untouched" if ckpt_path.exists() else "no checkpoint was saved"


while True:
    trained = time.time() - t_start - eval_time  # seconds of training so far
    if ddp and max_time > 0:  # every rank stops, and schedules, on rank 0's clock (their own would disagree)
        trained = torch.tensor([trained], dtype=torch.float64, device=device)
        torch.distributed.broadcast(trained, 0)
        trained = trained.item()
    out_of_time = max_time > 0 and trained >= max_time
    if step % eval_interval == 0 or step == max_iters or out_of_time:
        t_eval = time.time()
        checks.check(what_is_saved())  # never save weights after an inf or NaN
        ev = evaluate()
        improved = ev["val"] < best_val_loss  # the same on every rank (all-reduced)
        best_val_loss = min(best_val_loss, ev["val"])
        if master:
            bpb = f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else ""
            print(f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}{bpb}")
            log({"step": step, "train_loss": ev["train"], "val_loss": ev["val"], "val_bpb": ev.get("val_bpb"),
                 "time": round(trained, 3)})
        if step > start_step and (improved or always_save_checkpoint) and not eval_only:
            save()
        eval_time += time.time() - t_eval
        if t_last is not None:
            t_last += time.time() - t_eval  # evaluation time is not training time
    if step == max_iters or eval_only or out_of_time:
        break

    at = step if max_time <= 0 else trained / max_time * max_iters  # evaluation is not training time
    lr = get_lr(at, learning_rate, min_lr, warmup_iters, lr_decay_iters, lr_schedule, cooldown_frac)
    ix = sample_windows("train", train_gen, rows_per_step)  # the whole global batch; this rank takes its rows
    rows = [(m * dp_world + dp_rank) * batch_size for m in range(grad_accum)]
    if pipe is None:
        batches = (get_batch("train", ix[r:r + batch_size]) for r in rows)  # lazy: loaded one micro-step ahead
        loss = accumulate_gradients(model, batches, batch_size * block_size * grad_accum, autocast, ddp, scaler)
    else:  # this rank's rows of every micro-step in one batch, which the schedule cuts into its microbatches
        with autocast:
            loss = parallel.pipeline_pass(pipe, *get_batch("train", torch.cat(
                [ix[r:r + batch_size] for r in rows])), device)
        torch.distributed.all_reduce(loss)  # the last stage's losses, to every rank (each tp rank holds them)
        loss /= dp_world * tp
    if optimizer == "muon":  # its momentum warms up from 0.85 to muon_momentum (modded-nanogpt)
        for g in opt.muon.param_groups:
            g["momentum"] = 0.85 + (muon_momentum - 0.85) * min(1.0, at / max(1, muon_momentum_warmup))
    grad_norm, bad = optimizer_step(opt, model.parameters(), lr, grad_clip, scaler,
                                    mesh["pp"].get_group() if pp > 1 else None)
    checks.record(step, loss, grad_norm, bad)
    step += 1
    timed_steps += 1
    if t_last is None:  # the first step of this run compiles and warms up: timing starts after it
        if device_type == "cuda":
            torch.cuda.synchronize()
        t_last, timed_steps = time.time(), 0

    if step % log_interval == 0:
        lossf, normf = checks.check(what_is_saved())  # every rank: all stop together
        now = time.time()
        if master and timed_steps:
            dt, t_last = now - t_last, now
            train_time, steps_done = train_time + dt, steps_done + timed_steps
            tok_s = total_batch_size * timed_steps / dt
            mfu = flops_model.estimate_mfu(tok_s / world_size, device, block_size)
            eta = train_time / steps_done * (max_iters - step) if max_time <= 0 else max_time - (now - t_start - eval_time)
            extra = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            mem = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else None
            extra += f" | peak mem {mem:.1f} GiB" if mem is not None else ""
            extra += f" | {checks.skipped} fp16 steps skipped, scale {scaler.get_scale():.0f}" if checks.skipped else ""
            print(f"step {step}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {normf:.2f} | "
                  f"{tok_s / 1e3:.1f}k tok/s{extra} | ETA {fmt_time(eta)}")
            log({"step": step, "loss": lossf, "lr": lr, "grad_norm": normf, "tok_per_sec": tok_s, "mfu": mfu,
                 "peak_mem_gib": mem, "skipped_steps": checks.skipped, "time": round(now - t_start, 3)})
        elif master:
            print(f"step {step}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {normf:.2f}")
            log({"step": step, "loss": lossf, "lr": lr, "grad_norm": normf, "time": round(now - t_start, 3)})
        t_last, timed_steps = now, 0

if sample_at_end and not eval_only:
    gpt = parallel.whole_model(raw_model, mesh) if on_mesh else raw_model  # under a mesh: a plain copy on rank 0
    if master:
        import tokenizer as T
        tok = T.from_spec(meta["tokenizer"])
        gen = gpt.to(device).generate(torch.tensor([[tok.eot_id]], device=device), max_new_tokens=120,
                                      temperature=0.8, top_k=200, seed=seed)
        ids = [int(t[0]) for t in gen if int(t[0]) < tok.n_vocab]  # a padded vocabulary row has no text
        if tok.eot_id in ids:
            ids = ids[:ids.index(tok.eot_id)]
        print("-" * 40 + "\n" + tok.decode(ids) + "\n" + "-" * 40)
if master:
    print(f"done in {fmt_time(time.time() - t_start)}: best val loss {best_val_loss:.4f}"
          + (f", val bpb {ev['val_bpb']:.4f}" if "val_bpb" in ev else "")
          + (f"; checkpoint {ckpt_path} (sample it with: python sample.py --out_dir={out_dir})" if ckpt_path.exists() else ""))
del model, raw_model, opt  # what holds the process group goes before it (see common.end_ddp)
end_ddp(ddp)
