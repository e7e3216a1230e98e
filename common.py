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
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world_size, device


def precision(device, dtype="auto"):
    """The dtype name and the autocast context to run the model in: 'auto' is bfloat16 on CUDA GPUs that
    have it, float32 elsewhere (bf16 matmuls are very slow on CPUs)."""
    import torch
    device_type = device.split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"dtype must be auto, float32, bfloat16 or float16, got '{dtype}'")
    if dtype == "float32":
        return dtype, nullcontext()
    return dtype, torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def accumulate_gradients(model, micro_batches, autocast, ddp):
    """Forward and backward over the (x, y) micro-batches, each loss scaled by 1/len(micro_batches);
    under DDP gradients are all-reduced on the last micro-step only. Returns the step's mean loss,
    averaged over ranks (a float: NaN and inf are the caller's to check before optimizer.step())."""
    import torch
    n = len(micro_batches)
    loss_sum = 0.0
    for i, (x, y) in enumerate(micro_batches):
        sync = nullcontext() if not ddp or i == n - 1 else model.no_sync()
        with sync:
            with autocast:  # the forward only: backward runs in the forward's dtypes anyway
                _, loss = model(x, y)
            loss = loss / n
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    if ddp:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    return float(loss_sum)


def clip_gradients(params, max_norm):
    """Scale the gradients so their global L2 norm is at most max_norm (0: never); returns the norm before
    clipping, for the logs. The multiply is skipped when it would be by 1: on CPU it is one op per
    tensor, ~1.5% of nanoGPT's baby shakespeare_char step."""
    import torch
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0 and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


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


def optimizer_step(optimizer, lr, lossf, step, saved):
    """Apply the step's gradients at learning rate lr, then clear them. A NaN or inf loss stops the run
    (exit 2) before the weights are touched; `saved` says what the user still has."""
    if not math.isfinite(lossf):
        die(f"loss is {lossf} at step {step}; {saved}. Lower --learning_rate or check the data")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
