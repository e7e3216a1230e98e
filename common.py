"""
Pieces every script shares: config overrides, clear errors, atomic writes, progress lines,
checkpoint I/O, downloads, device and DDP set-up, gradient accumulation and the learning-rate schedule.
The ground floor: it imports no other file of this project.
"""
import ast
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

# -----------------------------------------------------------------------------
# errors and files

def die(msg):
    """One clear line and exit code 2: for mistakes the user can fix (never a traceback)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; rename over `path` only if the block succeeds,
    so a crash (or SIGKILL) never leaves a half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Progress:
    """A progress line on stderr with rate and ETA: rewritten in place on a terminal,
    printed at most every `every` seconds otherwise (logs stay short)."""

    def __init__(self, total, desc, unit="", every=5.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.t0, self.last, self.shown = 0, time.time(), 0.0, None
        self.tty = sys.stderr.isatty()

    def update(self, n=1, force=False):
        self.n += n
        now = time.time()
        if not force and now - self.last < (0.2 if self.tty else self.every):
            return
        self.last, self.shown = now, self.n
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        line = f"{self.desc}: {fmt_num(self.n)}{self.unit}"
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            line += f"/{fmt_num(self.total)}{self.unit} ({100 * self.n / self.total:.0f}%), ETA {fmt_time(eta)}"
        line += f", {fmt_num(rate)}{self.unit}/s"
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.shown != self.n:  # the final count, unless that line is already out
            self.update(0, force=True)
        if self.tty:
            print(file=sys.stderr)


def fmt_num(x):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def fmt_time(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# -----------------------------------------------------------------------------
# config: module-level variables overridden by config files and --key=value

CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))


def config_keys(g):
    """The config variables of a script: lowercase globals of plain types (UPPER_CASE ones are constants)."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def configure(g, argv=None):
    """nanoGPT's configurator as a function: `python x.py config/y.py --key=value`.
    Overrides are applied to the dict `g` (the script's globals) and the config is returned."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    for arg in argv:
        if arg in ("-h", "--help"):
            print((g.get("__doc__") or "").strip() + "\n\nconfig (override with --key=value or a config/x.py file):")
            for k in keys:
                print(f"  --{k}={g[k]!r}")
            sys.exit(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                die(f"config file '{arg}' not found (arguments are config/x.py files or --key=value)")
            file_vars = {}
            try:
                exec(compile(Path(arg).read_text(), arg, "exec"), {}, file_vars)
            except Exception as e:
                die(f"config file '{arg}' failed to run: {type(e).__name__}: {e}")
            for k, v in file_vars.items():
                if k in config_keys({k: v}):
                    set_key(g, keys, k, v, source=arg)
            continue
        if "=" not in arg and isinstance(g.get(arg[2:]), bool) and arg[2:] in keys:
            set_key(g, keys, arg[2:], True, source=arg)  # a bare --flag turns a True/False key on
            continue
        if "=" not in arg:
            die(f"argument '{arg}' should look like --key=value")
        k, raw = arg[2:].split("=", 1)
        try:
            v = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            v = raw  # a bare string such as --device=cpu
        set_key(g, keys, k, v, source=arg)
    return {k: g[k] for k in keys}


def set_key(g, keys, k, v, source):
    if k not in keys:
        near = [x for x in keys if x.split("_")[0] == k.split("_")[0]][:5]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        die(f"unknown config key '{k}' in {source}{hint}; valid keys: {', '.join(sorted(keys))}")
    old = g[k]
    if old is not None and v is not None:
        if isinstance(old, bool) != isinstance(v, bool):
            die(f"{source}: '{k}' must be True or False, got {v!r}")
        if isinstance(old, float) and isinstance(v, int):
            v = float(v)
        elif isinstance(old, (tuple, list)) and isinstance(v, (tuple, list)):
            v = type(old)(v)
        elif type(old) is not type(v):
            die(f"{source}: '{k}' must be of type {type(old).__name__} like its default {old!r}, got {v!r}")
    g[k] = v

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(obj, path):
    """torch.save to a temp file, then rename: killing the process mid-write leaves the
    previous checkpoint intact and loadable."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, map_location="cpu"):
    import torch
    path = Path(path)
    if not path.is_file():
        die(f"no checkpoint at {path}: train one first (python train.py --out_dir={path.parent}) or fix --out_dir")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        die(f"checkpoint {path} is corrupt or not a checkpoint of this project ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); delete it and train again")


# -----------------------------------------------------------------------------
# devices, DDP, schedule

def pick_device(device="auto"):
    import torch
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            die(f"device='{device}' but CUDA is not available here; use --device=cpu (or auto)")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpp_compiler():
    """The C++ compiler torch.compile's CPU code would be built with ($CXX, g++, c++ or clang++ on PATH), or None."""
    import shutil
    return next(filter(None, (shutil.which(c) for c in [os.environ.get("CXX") or "g++", "g++", "c++", "clang++"])), None)


def check_compiler(device):
    """torch.compile on a CPU builds C++ with the system's compiler: without one it fails deep inside inductor,
    so say it before any work starts."""
    if str(device).startswith("cpu") and not cpp_compiler():
        die("--compile=True on a CPU needs a C++ compiler (g++ or clang++; apt-get install g++), or leave --compile off")


def setup_ddp(device="auto", seed=1337):
    """Under torchrun: init the process group (nccl on CUDA, gloo on CPU) and pin this rank's device.
    Seeds torch with seed + rank (dropout differs per rank; data order is the scripts' own generators)
    and allows TF32 matmuls on CUDA. Returns (ddp, rank, local_rank, world_size, device)."""
    import torch
    import torch.distributed as dist
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device = pick_device(device)
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # a long timeout: the other ranks wait in a barrier while rank 0 prepares the data, which on a first
        # run may download shards for longer than the default 10 minutes that NCCL's watchdog allows
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2),
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    torch.manual_seed(seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world_size, device


def end_ddp(ddp):
    """End a torchrun rank: wait for every rank, then tear the process group down. The caller drops its own
    references to the wrapped model and the optimizer first (`del`): a process group that is still held is
    only destroyed at interpreter exit, and there gloo aborts now and then ("terminate called without an
    active exception", exit code -6: 4 in 40 two-rank CPU runs of train.py, none in 80 with them dropped)."""
    if not ddp:
        return
    import gc
    import torch.distributed as dist
    gc.collect()
    dist.barrier()  # no rank tears the group down while another still writes or reads
    dist.destroy_process_group()


def rng_states(ddp, device_type):
    """Every rank's RNG states, gathered onto each rank: {'torch': [per rank], 'cuda': [per rank] or None}.
    Ranks are seeded apart (their dropout masks differ), so resuming must give each rank its own back."""
    import torch
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state() if device_type == "cuda" else None)
    every = [mine]
    if ddp:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
    return {"torch": [s[0].cpu() for s in every], "cuda": [s[1].cpu() for s in every] if mine[1] is not None else None}


def restore_rng(rng, rank, world_size, device_type):
    """Give this rank its own saved RNG states (see rng_states); checkpoints of older versions hold rank 0's only."""
    import torch
    states = rng["torch"] if isinstance(rng["torch"], list) else [rng["torch"]]
    cuda = rng.get("cuda")
    cuda = cuda if isinstance(cuda, list) or cuda is None else [cuda]
    if len(states) != world_size and rank == 0:
        print(f"note: the checkpoint holds the RNG states of {len(states)} rank(s), this run has {world_size}: "
              f"dropout will not repeat the uninterrupted run's exactly")
    torch.set_rng_state(states[rank % len(states)])
    if device_type == "cuda" and cuda:
        torch.cuda.set_rng_state(cuda[rank % len(cuda)])


def precision(device, dtype="auto"):
    """The dtype name and the autocast context to run the model in. 'auto': bfloat16 on CUDA GPUs with bf16
    tensor cores, float16 (with loss scaling, see grad_scaler) on older ones such as V100 and T4, whose bf16
    is emulated and very slow, and float32 elsewhere (bf16 matmuls are slow on CPUs too)."""
    import torch
    device_type = device.split(":")[0]
    if dtype == "auto":
        dtype = "float32"
        if device_type == "cuda":
            # is_bf16_supported() alone counts emulation (True on a V100)
            dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    if dtype == "float32":
        return dtype, nullcontext()
    return dtype, torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def grad_scaler(dtype, device):
    """float16's gradients underflow without loss scaling: a GradScaler for float16 (as nanoGPT), else None."""
    import torch
    return torch.amp.GradScaler(device.split(":")[0]) if dtype == "float16" else None


def lm_loss_sum(model, batch):
    """Summed cross-entropy over the targets (y != -1) of one (x, y) micro-batch. The model's loss is their
    mean; times their count is the sum (every micro-batch has a target: examples without one are dropped)."""
    x, y = batch
    _, loss = model(x, y)
    return loss * (y != -1).sum()


def accumulate_gradients(model, batches, n_items, autocast, ddp, scaler=None, loss_sum=lm_loss_sum):
    """Forward and backward over the micro-batches of one optimizer step, so that the gradient is that of the
    mean loss over every item (target token, or DPO pair) of the GLOBAL batch: each micro-batch's summed loss
    is divided by the number of items over all micro-steps and ranks (n_items is this rank's count; the ranks'
    counts are summed here). A mean per micro-batch would give a micro-batch of 2 reply tokens the weight of
    one of 61 (transformers fixed that in 4.46). Under DDP or FSDP, gradients are averaged over the ranks on
    the last micro-step only (see no_sync), hence the factor world_size. `batches` may be lazy: the next one
    is loaded while the device still runs the last backward. Returns the global mean loss as a 0-dim tensor
    on the device (no host sync: read it when logging)."""
    import torch
    dev = next(model.parameters()).device
    world = torch.distributed.get_world_size() if ddp else 1
    n = torch.as_tensor(n_items, dtype=torch.float32).to(dev)
    if ddp:
        torch.distributed.all_reduce(n)
    total = torch.zeros((), device=dev)
    it = iter(batches)
    nxt = next(it, None)
    while nxt is not None:
        batch, nxt = nxt, next(it, None)
        with nullcontext() if not ddp or nxt is None else no_sync(model):
            with autocast:  # the forward only: backward runs in the forward's dtypes anyway
                s = loss_sum(model, batch)
            loss = s * (world / n)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += s.detach().float()
    if ddp:
        torch.distributed.all_reduce(total)
    return total / n


@contextmanager
def no_sync(model):
    """No gradient sync in this backward (gradients accumulate locally; the last micro-step syncs them all):
    DDP's no_sync, or FSDP2's set_requires_gradient_sync(False), which skips the reduce-scatter."""
    if not hasattr(model, "set_requires_gradient_sync"):
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():  # tensor parallel alone: no sync
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def optimizer_step(optimizer, params, lr, grad_clip, scaler=None, pp_group=None):
    """Unscale (float16), clip to a global L2 norm of grad_clip (0: never) and apply the gradients at lr, then
    clear them. A step whose gradients hold an inf or NaN changes no weight: float16's GradScaler skips it
    and lowers the scale; otherwise the fused optimizer gets found_inf, which skips its update on the device.
    Nothing waits for the GPU: returns (grad norm before clipping, whether the step was skipped), both 0-dim
    device tensors, for the caller to read at its log interval (see StepChecks)."""
    import torch
    if scaler is not None:
        scaler.unscale_(optimizer)
    # grouped by device mesh: sharded (DTensor) gradients of FSDP or tensor parallel, whose norm covers every
    # rank's shards, and the plain gradients of what tensor parallel leaves whole (the same on its ranks)
    groups = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) for g in groups.values()]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if pp_group is not None:  # pipeline stages hold different layers: the norm is over all of them
        sq = norm.square()
        torch.distributed.all_reduce(sq, group=pp_group)
        norm = sq.sqrt()
    # on the CPU the comparison costs nothing and skipping a multiply by 1 saves ~1.5% of a small step;
    # on a GPU it would wait for the device, and min(1, grad_clip / norm) is applied there instead
    if grad_clip > 0 and (norm.device.type != "cpu" or norm > grad_clip):
        for g in groups.values():
            torch.nn.utils.clip_grads_with_norm_(g, grad_clip, norm)
    bad = ~torch.isfinite(norm)
    for group in optimizer.param_groups:  # (Muon's groups run at their own multiple of the schedule's lr)
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):  # fused AdamW
        optimizer.found_inf = bad.float()
        optimizer.step()
    elif not bad:  # an optimizer without found_inf: the check waits for the device
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, bad


class MuonWithAdamW:
    """Two optimizers stepped as one: torch.optim.Muon for the blocks' matrices, AdamW for the rest (embeddings,
    head, norms, biases). param_groups spans both (each group's lr_scale sets its lr relative to the schedule's);
    state_dict holds both."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups

    def step(self):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, sd):
        self.adamw.load_state_dict(sd["adamw"])
        self.muon.load_state_dict(sd["muon"])


def newton_schulz(g, steps=5, coefficients=(3.4445, -4.775, 2.0315), eps=1e-7):
    """Muon's orthogonalisation of a matrix, or of a stack of them (..., rows, cols): each scaled to norm 1,
    then `steps` rounds of the quintic X <- aX + (bS + cS^2)X with S = XX^T (on the short side), which pushes
    every singular value towards 1 (to ~0.7-1.2)."""
    a, b, c = coefficients
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


def muon_optimizer(params, lr, weight_decay, momentum=0.95):
    """torch.optim.Muon's update (Nesterov momentum as its lerp, Newton-Schulz, Keller Jordan's lr scale
    sqrt(max(1, rows/cols)), decoupled weight decay), with Newton-Schulz in float32 off CUDA: torch runs it in
    bfloat16, whose matmuls CPUs emulate slowly (the default train.py step: 1.8-2.0k tok/s with torch's, 4.2-4.3k
    with float32, the same losses to 4 digits). Matrices of one shape go through Newton-Schulz together, as
    modded-nanogpt batches them (the small ones' steps are mostly per-call overhead). On CUDA it is
    torch.optim.Muon itself."""
    import torch
    params = list(params)
    if params and params[0].device.type == "cuda":
        return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="original")

    class Muon(torch.optim.Optimizer):
        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
                by_shape = {}
                for p in group["params"]:
                    if p.grad is not None:
                        by_shape.setdefault(tuple(p.shape), []).append(p)
                for (rows, cols), same in by_shape.items():
                    bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in same]
                    for p, buf in zip(same, bufs):
                        buf.lerp_(p.grad, 1 - mu)
                    updates = newton_schulz(torch.stack([p.grad.lerp(buf, mu) for p, buf in zip(same, bufs)]).float())
                    for p, u in zip(same, updates):
                        p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-lr * max(1, rows / cols) ** 0.5)
    return Muon(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))


def muon_with_adamw(model, muon_lr_scale, weight_decay, betas, device_type):
    """optimizer='muon' (modded-nanogpt, nanochat): Muon (muon_optimizer) on the 2-D weights inside the
    transformer blocks (a fused matrix such as [q; k; v] is orthogonalised whole), running at muon_lr_scale
    times the schedule's lr; the model's AdamW on everything else."""
    hidden = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and ".h." in f".{n}"]
    muon = muon_optimizer(hidden, muon_lr_scale, weight_decay)
    muon.param_groups[0]["lr_scale"] = muon_lr_scale
    return MuonWithAdamW(muon, model.configure_optimizers(weight_decay, 1.0, betas, device_type, skip=hidden))


def check_optimizer(kind, sharded, float16):
    """train.py's and finetune.py's `optimizer`, checked before the model loads: 'adamw' or 'muon', and muon
    only where each matrix is whole (one process or DDP) and without float16's GradScaler."""
    if kind not in ("adamw", "muon"):
        die(f"optimizer must be 'adamw' or 'muon', got '{kind}'")
    if kind == "muon" and sharded:
        die("optimizer='muon' runs in one process or under DDP: its Newton-Schulz step needs each matrix whole, and "
            "FSDP, tensor and pipeline parallel shard them (use --optimizer=adamw there)")
    if kind == "muon" and float16:
        die("optimizer='muon' with float16 (its GradScaler) is not supported: use --dtype=bfloat16 or float32")


def make_optimizer(kind, model, learning_rate, muon_lr, weight_decay, betas, device_type):
    """The optimizer check_optimizer allowed: the model's AdamW, or Muon with AdamW at muon_lr for the matrices."""
    if kind == "adamw":
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    return muon_with_adamw(model, muon_lr / learning_rate, weight_decay, betas, device_type)


class StepChecks:
    """What a training loop reads back from the device only every log_interval steps: the last loss and grad
    norm, and the steps skipped for an inf or NaN (their weights are unchanged). A non-finite loss, or a
    skipped step outside float16 (where GradScaler skips overflowing steps by design), stops the run with a
    clear error: call check() before every log line and before every checkpoint is written."""

    def __init__(self, fp16):
        self.fp16, self.skipped = fp16, 0
        self.loss = self.grad_norm = self._bad = self._first = None

    def record(self, step, loss, grad_norm, bad):
        import torch
        self.loss, self.grad_norm = loss, grad_norm
        bad = bad | ~torch.isfinite(loss)
        if self._bad is None:
            self._bad, self._first = torch.zeros((), dtype=torch.long, device=bad.device), torch.full((), -1, device=bad.device)
        self._first = torch.where((self._first < 0) & bad, step, self._first)
        self._bad += bad

    def check(self, saved):
        """(loss, grad_norm) as floats; dies when the run cannot go on. `saved` says what the user still has."""
        if self._bad is None:
            return float("nan"), float("nan")
        loss, norm, nbad, first = (float(self.loss), float(self.grad_norm), int(self._bad), int(self._first))
        self._bad.zero_()
        self._first.fill_(-1)
        if nbad and (not self.fp16 or not math.isfinite(loss)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            die(f"{what} is {loss if what == 'loss' else norm} (inf or NaN first at step {first}; that step changed "
                f"no weight); {saved}. Lower --learning_rate or check the data")
        self.skipped += nbad
        return loss, norm


def metrics_log(out_dir, enabled=True):
    """A log(record) that appends the record as one JSON line to out_dir/metrics.jsonl and flushes it (so a
    killed run keeps every line); a no-op where not enabled (DDP ranks other than 0)."""
    if not enabled:
        return lambda record: None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(out_dir) / "metrics.jsonl", "a")

    def log(record):
        f.write(json.dumps(record) + "\n")
        f.flush()
    return log


def get_lr(step, learning_rate, min_lr, warmup_iters, decay_iters, schedule="cosine", cooldown_frac=0.2):
    """Linear warmup, then cosine to min_lr at decay_iters ('cosine'), or hold and decay linearly
    over the last cooldown_frac of decay_iters ('wsd': warmup-stable-decay)."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    if schedule == "wsd":
        cooldown_start = decay_iters - int(cooldown_frac * decay_iters)
        if step < cooldown_start:
            return learning_rate
        frac = (step - cooldown_start) / max(1, decay_iters - cooldown_start)
        return learning_rate + frac * (min_lr - learning_rate)
    frac = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (learning_rate - min_lr)

# -----------------------------------------------------------------------------
# downloads: the one helper every script fetches files with


class _Retry(Exception):
    pass


def download(url, dest, sha256=None, size=None, retries=4, backoff=1.0, timeout=30, mirror="", offline_hint=""):
    """Fetch url to dest unless dest is already there (and matches size/sha256 when given). Streams into
    dest.part with a progress line, resumes it with an HTTP Range request after a cut connection or on the
    next run, retries connection errors and 5xx with exponential backoff, checks size and sha256, and renames
    to dest only when complete. Returns dest."""
    import requests
    dest = Path(dest)
    if mirror:
        url = mirror.rstrip("/") + "/" + url.rsplit("/", 1)[-1]
    elif os.environ.get("HF_ENDPOINT") and url.startswith("https://huggingface.co/"):
        url = os.environ["HF_ENDPOINT"].rstrip("/") + url[len("https://huggingface.co"):]
    if dest.exists():
        problem = check_file(dest, sha256, size)
        if problem:
            die(f"{dest} exists but {problem}: delete it to download it again from {url}")
        return dest
    part = dest.with_name(dest.name + ".part")
    attempt, last_error = 0, ""
    while True:
        have = part.stat().st_size if part.exists() else 0
        got = 0
        try:
            # identity: byte ranges and lengths then refer to the file itself, not to a compressed form
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416 and have:  # the part file already holds everything (or too much)
                    if size is None or have == size:
                        break
                    part.unlink()
                    raise _Retry("server refused to resume (416)")
                if r.status_code >= 500 or r.status_code == 429:
                    raise _Retry(f"HTTP {r.status_code}")
                if r.status_code not in (200, 206):
                    die(f"downloading {url} failed: HTTP {r.status_code} {r.reason}")
                start = have
                if r.status_code == 206:
                    cr = r.headers.get("Content-Range", "")
                    if not cr.startswith(f"bytes {have}-"):
                        part.unlink()
                        raise _Retry(f"unexpected Content-Range '{cr}'")
                else:
                    start = 0  # the server sent the whole file (it ignores Range)
                length = r.headers.get("Content-Length")
                total = start + int(length) if length is not None else size
                if size is not None and total is not None and total != size:
                    die(f"downloading {url}: the server offers {total} bytes, expected {size}")
                prog = Progress(total, f"download {dest.name}", "B")
                prog.update(start)
                part.parent.mkdir(parents=True, exist_ok=True)
                with open(part, "ab" if start else "wb") as f:
                    # small chunks: a read cut by a dropped connection loses its chunk, the rest is resumed
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        got += len(chunk)
                        prog.update(len(chunk))
                prog.close()
                if total is not None and start + got < total:
                    raise _Retry(f"connection closed after {start + got} of {total} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Retry) as e:
            last_error = short_reason(e)
            attempt = 0 if got else attempt + 1  # progress made: the connection is worth trying again
            # an unknown host name rarely resolves a few seconds later: usually this machine is offline
            if attempt > retries or last_error.startswith("cannot resolve"):
                kept = f"; the partial download in {part} is resumed on the next run" if part.exists() else ""
                die(f"could not download {url} ({last_error}). If this machine is offline, fetch that URL "
                    f"elsewhere and put the file at {dest}{kept}{offline_hint}")
            wait = backoff * 2 ** max(attempt - 1, 0) if attempt else 0
            print(f"download {dest.name}: {last_error}; retrying{f' in {wait:.1f}s' if wait else ''}", file=sys.stderr)
            time.sleep(wait)
    problem = check_file(part, sha256, size)
    if problem:
        part.unlink()
        die(f"downloaded {url} but {problem}; nothing was kept, try again (or fetch it by hand to {dest})")
    os.replace(part, dest)
    return dest


def short_reason(e):
    msg = str(e)
    for key, reason in (("NameResolution", "cannot resolve the host name"), ("Name or service not known",
                        "cannot resolve the host name"), ("Connection refused", "connection refused"),
                        ("timed out", "timed out"), ("Connection reset", "connection reset")):
        if key in msg:
            return reason
    return (msg.splitlines() or [type(e).__name__])[0][:200]


def check_file(path, sha256, size):
    """None when path has the expected size and sha256 (each when known), else what is wrong."""
    n = path.stat().st_size
    if size is not None and n != size:
        return f"has {n} bytes, expected {size}"
    if sha256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256:
            return f"its sha256 is {h.hexdigest()}, expected {sha256}"
    return None
