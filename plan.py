"""
Plan a training run: what you have (GPUs) and what you want to train (a model) -> the memory per GPU under
each parallel layout, the simplest layout that fits, Chinchilla-optimal tokens, the wall time and the
torchrun command (and, with --write_config, a config file for train.py). Instant: the model is built on the
meta device, so its parameter count is exactly what train.py builds.

    python plan.py --gpus=8xH100 --model=7B
    python plan.py --gpus=64xH100 --model=70B --write_config=config/llama_70b.py
    python plan.py --gpus=8xH200 --params=13e9 --seq_len=4096
    python plan.py --gpus=1xA100-40GB --model=gpt2 --batch_size=16

Accounting, bytes per GPU (GB = 1e9 bytes). P: the parameters on the GPU (after tensor/pipeline slicing),
N: the ranks sharding them.
  Model state (ZeRO, Rajbhandari et al. 2020): mixed precision costs 16 bytes per parameter, 2 (bf16 weights)
    + 2 (bf16 grads) + 12 (fp32 master weights, Adam m and v). ZeRO-1 shards the 12: 2 + 2 + 12/N; ZeRO-2
    the grads too: 2 + 14/N; ZeRO-3 (FSDP) all of it: 16/N. This repo's DDP (autocast) and FSDP2
    (MixedPrecisionPolicy) hold fp32 weights and grads instead: 4 + 4 + 8 (Adam m, v), the same 16 (/N under
    FSDP, counted per tensor as FSDP shards dim 0, so rank 0's padding is in). float32: 4 + 4 + 8 as well.
    torch DDP also keeps its gradient buckets, +4 per parameter (parallel.py doesn't set gradient_as_bucket_view).
    ZeRO-1 and ZeRO-2 are shown for comparison only: train.py runs DDP or FSDP.
  Tensor parallel (tp, inside a node): each block's four Linears (q/k/v, attention output, MLP up(+gate), MLP
    down) are split tp ways; embeddings, lm_head and every norm stay whole on each rank (as do the row-parallel
    biases). Pipeline (pp): layers split evenly, earlier stages take the extra one; stage 0 also holds the
    embeddings, the last stage the final norm and lm_head; the largest stage is reported. pp needs untied
    embeddings (a tied wte/lm_head would live on two stages).
  Activations (Korthikanti et al. 2022), bytes per layer in 16-bit (s seq_len, b batch_size, h n_embd, a heads,
    t tp): s*b*h*(34 + 5*a*s/h) without recomputation; flash attention (SDPA) stores no scores: 34*s*b*h;
    under tp (no sequence parallel) s*b*h*(10 + 24/t); with activation checkpointing 2*s*b*h per layer (the
    block input) plus one block's working set, recomputed one block at a time. Plus the logits, s*b*vocab*(2 + 4)
    (bf16 logits and the fp32 copy the loss takes). float32 doubles the 16-bit terms. Under pp (1F1B) the
    first stage holds pp microbatches of batch_size sequences in flight, stage i pp - i.
    The constants are GPT-2's (4h GELU MLP, full heads); SwiGLU and GQA move them a little.
  Tokens: Chinchilla-optimal 20 per parameter (Hoffmann et al. 2022). Time: GPT.flops_per_token(seq_len)
    (6 x non-embedding parameters + 12 x n_layer x n_embd x seq_len, PaLM) x tokens / (GPUs x peak x mfu).
"""
import ast
import functools
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch

import common
import model as M
import parallel
from common import configure, die

# -----------------------------------------------------------------------------
gpus = "8xH100"            # COUNTxKIND, e.g. 64xH100, 1xA100-40GB, 8xH200 (kinds: GPUS below)
gpus_per_node = 8          # tensor parallel stays inside a node (NVLink); more GPUs than this = several nodes
model = "124M"             # a model.PRESETS name, or 124M / 1B / 7B / 70B (SIZES); "" with params= or n_layer=...
params = 0.0               # > 0 (and model=""): a Llama-style shape of about this many parameters
n_layer = 0                # explicit shape: each one set (> 0) overrides the model's
n_embd = 0
n_head = 0
n_kv_head = 0
vocab_size = 0             # 0: the model's; for params= and the llama-* presets 50304 (GPT-2's, padded to 64)
mlp_hidden = 0             # 0: the model's (GPTConfig's default for an explicit shape)
seq_len = 0                # tokens per sequence (train.py's block_size); 0: 1024 for GPT-2 presets, else 2048
batch_size = 8             # sequences per GPU per micro-step (per microbatch under pp)
total_batch_size = 0       # tokens per optimizer step; 0: the smallest multiple of a micro-step >= 2**19 (0.5M)
mfu = 0.4                  # model FLOPs utilisation assumed for the wall time
dtype = "bfloat16"         # 'bfloat16' (mixed precision, fp32 master weights) | 'float32'
headroom = 0.1             # share of GPU memory left free: CUDA context, NCCL buffers, FSDP's gathered blocks, fragmentation
tp = 0                     # 0: try 1, 2, 4, 8 (within a node); > 0: only this tensor-parallel degree
pp = 0                     # 0: try pipeline stages only when nothing else fits; > 0: only this many stages
write_config = ""          # a path: write a train.py config for the chosen layout there
# -----------------------------------------------------------------------------

GB = 1e9
# kind -> (memory in GB as sold, the model.GPU_PEAK_FLOPS name for the dense bf16 peak); the usable memory is a
# little more (an 80 GB H100 reports 85.5e9 bytes), so the marketed figure errs on the safe side
GPUS = {"H100": (80, "H100"), "H100-PCIe": (80, "H100 PCIe"), "H100-NVL": (94, "H100 NVL"), "H800": (80, "H800"),
        "H200": (141, "H200"), "H200-NVL": (141, "H200 NVL"), "B200": (180, "B200"), "GB200": (186, "GB200"),
        "A100": (80, "A100"), "A100-80GB": (80, "A100"), "A100-40GB": (40, "A100"), "A800": (80, "A800"),
        "L40S": (48, "L40S"), "L40": (48, "L40"), "L4": (24, "L4"), "RTX4090": (24, "RTX 4090"),
        "RTX3090": (24, "RTX 3090"), "A6000": (48, "A6000"), "V100": (32, "V100"), "V100-16GB": (16, "V100"),
        "T4": (16, "T4")}
_LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
SIZE_NAMES = {"124M": "GPT-2 small, model.PRESETS['gpt2']", "1B": "Llama-3.2-1B's shape", "7B": "Llama-2-7B's shape",
              "70B": "Llama-2-70B's shape"}
SIZES = {  # plan.py's named sizes: GPT-2 small and the shapes of Llama-3.2-1B, Llama-2-7B and Llama-2-70B
    "124M": dict(M.PRESETS["gpt2"]),
    "1B": dict(_LLAMA, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, mlp_hidden=8192, vocab_size=128256,
               tie_embeddings=True, rope_theta=500000.0),
    "7B": dict(_LLAMA, n_layer=32, n_embd=4096, n_head=32, n_kv_head=32, mlp_hidden=11008, vocab_size=32000,
               tie_embeddings=False),
    "70B": dict(_LLAMA, n_layer=80, n_embd=8192, n_head=64, n_kv_head=8, mlp_hidden=28672, vocab_size=32000,
                tie_embeddings=False),
}
DEFAULT_VOCAB = 50304
TRAIN_KEYS_FILE = Path(__file__).resolve().parent / "train.py"


def gpu_spec(spec):
    """'8xH100' -> (8, kind, memory GB, peak FLOP/s)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\S+)\s*", str(spec))
    if not m:
        die(f"gpus='{spec}' should look like COUNTxKIND, e.g. 8xH100; kinds: {', '.join(GPUS)}")
    n, kind = int(m[1]), {k.lower(): k for k in GPUS}.get(m[2].lower())
    if kind is None:
        die(f"unknown GPU kind '{m[2]}' in gpus='{spec}'; known kinds: {', '.join(GPUS)}")
    if n < 1:
        die(f"gpus='{spec}': the count must be positive")
    mem, peak_name = GPUS[kind]
    return n, kind, mem, M.peak_flops(peak_name)


def gpt(cfg):
    """The GPT of cfg on the meta device: shapes without memory."""
    with torch.device("meta"):
        return M.GPT(cfg)


@functools.lru_cache(maxsize=64)
def _shapes(key):
    return [(name, tuple(p.shape)) for name, p in gpt(M.GPTConfig(**dict(key))).named_parameters()]


def shapes(cfg):
    """[(name, shape)] of cfg's parameters (tied weights once), built once per shape."""
    return _shapes(tuple(sorted(vars(cfg).items())))


def count_params(cfg):
    """Exactly what model.GPT(cfg) holds (tied weights once)."""
    return sum(math.prod(shape) for _, shape in shapes(cfg))


def model_config(name="", n_params=0, block_size=2048, overrides=None, vocab=0):
    """(GPTConfig, how it was chosen) from a preset/size name, a parameter count, and explicit overrides."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    if name:
        if name in SIZES:
            args, how = dict(SIZES[name]), f"{name} ({SIZE_NAMES[name]})"
        elif name in M.PRESETS:
            args, how = dict(M.PRESETS[name]), f"model.PRESETS['{name}']"
        else:
            die(f"unknown model '{name}': one of {', '.join([*SIZES, *M.PRESETS])}, or params= / n_layer= ...")
        args.setdefault("vocab_size", DEFAULT_VOCAB)
    elif n_params:
        args, how = shape_for(n_params, vocab or DEFAULT_VOCAB)
    elif overrides:
        missing = [k for k in ("n_layer", "n_embd", "n_head") if k not in overrides]
        if missing:
            die(f"an explicit shape needs n_layer, n_embd and n_head (missing {', '.join(missing)})")
        args, how = dict(_LLAMA, tie_embeddings=False, vocab_size=DEFAULT_VOCAB), "explicit Llama-style shape"
    else:
        die("say what to train: --model=NAME, --params=7e9, or --n_layer= --n_embd= --n_head=")
    args.update(overrides)
    if vocab:
        args["vocab_size"] = vocab
    args["block_size"] = block_size  # train.py builds the context it trains on (learned positions: that many rows)
    try:
        cfg = M.GPTConfig(**args)
    except (ValueError, TypeError) as e:
        die(f"model shape: {e}")
    return cfg, how


def shape_for(target, vocab):
    """A Llama-style shape of about `target` parameters: head_dim 128 (64 below 1024 wide), n_head a multiple of
    8 from 1024 wide (so tp = 2, 4, 8 divide it), full attention heads, GPTConfig's SwiGLU hidden (8/3 n_embd
    rounded up to 64, what train.py builds), untied. Each width solves n_layer for the target (the count is
    linear in it); of the widths within 5% of the target, the one whose n_embd/n_layer is nearest Llama-2-7B's
    128 wins."""
    widths = [(h, 64) for h in (2, 4, 6, 8, 12)] + [(h, 128) for h in range(8, 257, 8)]
    cands = []
    for heads, hd in widths:
        base = dict(_LLAMA, n_embd=heads * hd, n_head=heads, vocab_size=vocab, tie_embeddings=False, block_size=8)
        c1, c2 = count_params(M.GPTConfig(n_layer=1, **base)), count_params(M.GPTConfig(n_layer=2, **base))
        layers = max(1, round((target - (2 * c1 - c2)) / (c2 - c1)))
        cands.append((layers, heads * hd, heads, 2 * c1 - c2 + layers * (c2 - c1)))
    if target < min(c[3] for c in cands) * 0.5:
        die(f"params={target:.3g} is too small for a Llama-style shape with a {vocab}-token vocabulary "
            f"(at least {min(c[3] for c in cands):,} parameters): give n_layer/n_embd/n_head, or a smaller vocab_size")
    near = [c for c in cands if abs(c[3] / target - 1) <= 0.05] or [min(cands, key=lambda c: abs(c[3] - target))]
    L, h, heads, _ = min(near, key=lambda c: abs(math.log(c[1] / c[0] / 128)))
    return (dict(_LLAMA, n_layer=L, n_embd=h, n_head=heads, vocab_size=vocab, tie_embeddings=False),
            f"Llama-style shape for params={target:.3g}: head_dim {h // heads}, n_layer solved per width, "
            f"the width within 5% whose n_embd/n_layer is nearest 128")


@contextmanager
def probing():
    """Run parallel.layout without its die() ending the program: SystemExit becomes a False."""
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def valid(cfg, n_gpus, dp_shard, tp=1, pp=1):
    """Whether parallel.layout (what train.py checks) accepts the degrees, and pp's own rule (untied)."""
    if pp > 1 and cfg.tie_embeddings:
        return False
    try:
        with probing():
            parallel.layout(n_gpus, dp_shard, tp, pp, cfg.n_head, cfg.n_kv_head, cfg.n_layer)
        return True
    except SystemExit:
        return False


def _parts(name, shape, cfg):
    """The tensors a parameter is under a mesh: parallel.split_fused makes q|k|v and SwiGLU's gate|up separate
    Linears (FSDP and tensor parallel then shard each part on its own)."""
    module = ".".join(name.split(".")[-3:-1])
    if module == "attn.c_attn":
        hd = cfg.n_embd // cfg.n_head
        return [(r,) + tuple(shape[1:]) for r in (cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd)]
    if module == "mlp.c_fc" and cfg.mlp == "swiglu":
        return [(shape[0] // 2,) + tuple(shape[1:])] * 2
    return [shape]


def _tp_slice(name, shape, tp):
    """The shape of this parameter (part) on one tensor-parallel rank (parallel._tensor_parallel's plan): q/k/v
    and the MLP's up(+gate) are column parallel (weight and bias rows split), the two output projections row
    parallel (weight columns split, bias whole); norms, embeddings and lm_head are whole."""
    if tp == 1 or ".h." not in name:
        return shape
    module, leaf = ".".join(name.split(".")[-3:-1]), name.split(".")[-1]
    if module in ("attn.c_attn", "mlp.c_fc"):
        return (math.ceil(shape[0] / tp),) + tuple(shape[1:])  # tp divides the heads (layout), mlp_hidden in practice
    if module in ("attn.c_proj", "mlp.c_proj") and leaf == "weight":
        return (shape[0], math.ceil(shape[1] / tp))
    return shape


def stage_numels(cfg, tp=1, pp=1, shard=1):
    """Per pipeline stage: [parameters on one GPU of it before FSDP, on FSDP's rank 0], FSDP sharding dim 0 of
    each tensor over `shard` ranks with rank 0 taking the ceiling of the rows (torch.chunk)."""
    layers = parallel.stage_layers(cfg.n_layer, pp)
    first = [sum(layers[:i]) for i in range(pp)]
    out = [[0, 0] for _ in range(pp)]
    for name, full in shapes(cfg):
        if ".h." in name:
            i = int(name.split(".")[2])
            stage = max(s for s in range(pp) if first[s] <= i)
        elif "wte" in name or "wpe" in name:
            stage = 0
        else:  # ln_f, lm_head
            stage = pp - 1
        for part in _parts(name, full, cfg):
            shape = _tp_slice(name, part, tp)
            rest = math.prod(shape[1:])
            out[stage][0] += shape[0] * rest
            out[stage][1] += math.ceil(shape[0] / shard) * rest
    return out


def memory(cfg, n_gpus, dp_shard=1, tp=1, pp=1, zero=None, dtype="bfloat16", seq_len=1024, batch_size=1,
           activation_checkpointing=False):
    """Bytes per GPU {params, grads, optimizer, activations} (the largest pipeline stage) of one layout.
    zero: 0 DDP, 1 and 2 ZeRO-1/2 over the data-parallel ranks (the paper's accounting), 3 FSDP over dp_shard
    ranks (dp_shard=-1: all data-parallel ranks); None: 3 when dp_shard != 1, else 0."""
    dp = n_gpus // (tp * pp)
    shard = dp if dp_shard == -1 else dp_shard
    zero = (3 if shard > 1 else 0) if zero is None else zero
    k = 2 if dtype == "float32" else 1  # 16-bit units of one activation element
    s, b, h, t = seq_len, batch_size, cfg.n_embd, tp
    per_layer = s * b * h * (10 + 24 / t) * k  # flash attention: no a*s/h scores term; tp=1 gives 34
    best = None
    for i, (n, local) in enumerate(stage_numels(cfg, tp, pp, shard if zero == 3 else 1)):
        L, inflight = parallel.stage_layers(cfg.n_layer, pp)[i], pp - i  # 1F1B: stage i holds pp - i microbatches
        if activation_checkpointing:
            acts = (2 * s * b * h * k * L) * inflight + per_layer  # block inputs, one block recomputed at a time
        else:
            acts = per_layer * L * inflight
        if i == pp - 1:
            acts += s * b * cfg.vocab_size * (2 * k + 4)  # logits (replicated under tp) and the loss's fp32 copy
        if zero == 3:
            m = dict(params=4 * local, grads=4 * local, optimizer=8 * local)
        elif zero == 0:  # DDP: fp32 weights (autocast casts them), fp32 grads, Adam m and v; buckets: see below
            ddp = n_gpus > 1 and tp == 1 and pp == 1  # torch DDP wraps only a plain multi-rank run
            m = dict(params=4 * n, grads=4 * n * (2 if ddp else 1), optimizer=8 * n)
        elif dtype == "float32":  # ZeRO-1/2 without mixed precision: 4 + 4 + 8, sharded as the paper does
            m = dict(params=4 * n, grads=4 * n / (dp if zero == 2 else 1), optimizer=8 * n / dp)
        else:
            m = dict(params=2 * n, grads=2 * n / (dp if zero == 2 else 1), optimizer=12 * n / dp)
        m["activations"] = acts
        if best is None or sum(m.values()) > sum(best.values()):
            best = m
    return best


def chinchilla_tokens(n_params):
    return 20 * n_params


def wall_seconds(cfg, tokens, n_gpus, peak, mfu, seq_len):
    """Training time: flops_per_token (forward + backward at seq_len) x tokens / (GPUs x peak x mfu)."""
    return gpt(cfg).flops_per_token(seq_len) * tokens / (n_gpus * peak * mfu)


def candidates(cfg, n_gpus, per_node, want_tp=0, want_pp=0, with_pp=False):
    """The layouts to show, in order of preference: (label, dp_shard, tp, pp, zero, preferred)."""
    out = []
    tps = [want_tp] if want_tp else [t for t in (1, 2, 4, 8) if t <= min(per_node, n_gpus)]
    pps = [want_pp] if want_pp else [1] + ([p for p in (2, 4, 8, 16, 32) if p <= cfg.n_layer] if with_pp else [])
    if 1 in tps and 1 in pps:
        out.append(("DDP" if n_gpus > 1 else "1 GPU", 1, 1, 1, 0))
        if n_gpus > 1:
            out += [("ZeRO-1", 1, 1, 1, 1), ("ZeRO-2", 1, 1, 1, 2), ("FSDP", -1, 1, 1, 3)]
    for p in pps:
        for t in tps:
            if t * p == 1:
                continue
            dp = n_gpus // (t * p) if n_gpus % (t * p) == 0 else 0
            label = ("FSDP x " if dp > 1 else "") + " x ".join(([f"TP{t}"] if t > 1 else []) + ([f"PP{p}"] if p > 1 else []))
            out.append((label, -1, t, p, 3))
    return [c for c in out if c[4] in (1, 2) or valid(cfg, n_gpus, c[1], c[2], c[3])]


def evaluate(cfg, n_gpus, limit, seq, batch, dtype="bfloat16", per_node=8, want_tp=0, want_pp=0):
    """[(label, dp_shard, tp, pp, zero, ac, memory dict, total, fits)], PP rows added only when nothing without
    pipeline stages fits (or pp was asked for)."""
    rows = []
    for with_pp in (False, True):
        for label, d, t, p, z in candidates(cfg, n_gpus, per_node, want_tp, want_pp, with_pp):
            if with_pp and p == 1:
                continue
            for ac in (False, True):
                m = memory(cfg, n_gpus, d, t, p, z, dtype, seq, batch, ac)
                rows.append((label + (" + AC" if ac else ""), d, t, p, z, ac, m, sum(m.values()),
                             sum(m.values()) <= limit))
        if want_pp or any(r[8] and r[4] in (0, 3) for r in rows):
            break
    return rows


def choose(rows):
    """The simplest layout that fits: fewest pipeline stages, then the smallest tp, then no activation
    checkpointing before it, then DDP before FSDP: DDP, FSDP, (DDP + AC), FSDP + AC, FSDP x TP2, ..., then PP."""
    ok = [r for r in rows if r[8] and r[4] in (0, 3)]  # train.py runs DDP and FSDP, not ZeRO-1/2
    return min(ok, key=lambda r: (r[3], r[2], r[5], r[4])) if ok else None


def train_keys():
    """train.py's config keys: its module-level assignments before `config = configure(globals())` (not run)."""
    keys = []
    for node in ast.parse(TRAIN_KEYS_FILE.read_text()).body:
        if isinstance(node, ast.Assign):
            names = [t for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
            if any(isinstance(t, ast.Name) and t.id == "config" for t in names):
                break
            keys += [t.id for t in names if isinstance(t, ast.Name)]
    return keys


def gb(x):
    return f"{x / GB:8.1f}"


def fmt_days(s):
    return f"{s / 86400:.1f} days" if s >= 2 * 86400 else f"{s / 3600:.1f} hours" if s >= 3600 else f"{s / 60:.1f} minutes"


def main():
    n_gpus, kind, mem, peak = gpu_spec(gpus)
    for k in ("gpus_per_node", "batch_size", "mfu", "headroom"):
        v = globals()[k]
        if not isinstance(v, (int, float)) or v <= 0 or k in ("mfu", "headroom") and v >= 1:
            die(f"{k} must be positive{' and below 1' if k in ('mfu', 'headroom') else ''}, got {v!r}")
    for k in ("params", "n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "mlp_hidden", "seq_len",
              "total_batch_size", "tp", "pp"):
        if globals()[k] < 0:
            die(f"{k} must be positive (or 0: {'choose' if k in ('tp', 'pp', 'total_batch_size') else 'unset'}), got {globals()[k]}")
    if dtype not in ("bfloat16", "float32"):
        die(f"dtype must be 'bfloat16' (mixed precision) or 'float32', got '{dtype}'")
    if n_gpus > gpus_per_node and n_gpus % gpus_per_node:
        die(f"{n_gpus} GPUs is not a whole number of {gpus_per_node}-GPU nodes (--gpus_per_node)")
    if tp and (tp > min(gpus_per_node, n_gpus)):
        die(f"tp={tp} must stay inside a node of {min(gpus_per_node, n_gpus)} GPUs")
    name = "" if params and model == "124M" else model  # --params alone replaces the default model
    seq = seq_len or (1024 if name in M.PRESETS and name.startswith("gpt2") or name == "124M" else 2048)
    cfg, how = model_config(name, params, seq, dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                                  n_kv_head=n_kv_head, mlp_hidden=mlp_hidden), vocab_size)
    if tp or pp:  # an asked-for layout must be one train.py takes: parallel.layout's own error, exit 2
        if pp > 1 and cfg.tie_embeddings:
            die(f"pp={pp} needs untied embeddings (the tied wte/lm_head would live on two stages)")
        parallel.layout(n_gpus, -1, tp or 1, pp or 1, cfg.n_head, cfg.n_kv_head, cfg.n_layer)
    n_params = count_params(cfg)
    limit = mem * GB * (1 - headroom)

    c = cfg
    print(f"model: {how}")
    print(f"  n_layer {c.n_layer}, n_embd {c.n_embd}, n_head {c.n_head}, n_kv_head {c.n_kv_head}, mlp {c.mlp} "
          f"hidden {c.mlp_hidden}, vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} embeddings, "
          f"{c.norm}, {c.pos} positions: {n_params:,} parameters")
    print(f"GPUs: {n_gpus} x {kind}, {mem} GB and {peak / 1e12:.0f} TFLOP/s (dense bf16) each, "
          f"{max(1, n_gpus // gpus_per_node)} node(s) of {min(n_gpus, gpus_per_node)}; a layout fits under "
          f"{limit / GB:.1f} GB ({headroom:.0%} left for the CUDA context, NCCL, FSDP's gathered blocks, fragmentation)")
    print(f"batch: {batch_size} sequences x {seq} tokens per GPU per micro-step, {dtype}"
          f"{' (mixed precision: fp32 master weights)' if dtype == 'bfloat16' else ''}")
    print("accounting: DDP/FSDP 4 (fp32 weights) + 4 (fp32 grads) + 8 (Adam m, v) = 16 B/param, FSDP /N per tensor, "
          "DDP +4 for its gradient buckets; ZeRO-1 2+2+12/N, ZeRO-2 2+14/N (Rajbhandari et al. 2020, not in train.py)")
    print(f"  activations per layer (Korthikanti et al. 2022, flash attention): s*b*h*(10 + 24/tp) x "
          f"{2 if dtype == 'float32' else 1} x 2 bytes; AC: 2*s*b*h per layer + one block; logits s*b*vocab*(2+4); "
          f"PP: the largest stage, pp microbatches in flight (1F1B)")

    rows = evaluate(cfg, n_gpus, limit, seq, batch_size, dtype, gpus_per_node, tp, pp)
    print(f"\nmemory per GPU (GB = 1e9 bytes), {n_gpus} x {kind}:")
    width = max(len(r[0]) for r in rows) + 2
    print(f"  {'layout':<{width}}{'degrees':<22}{'params':>8}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}  fits")
    for label, d, t, p, z, ac, m, total, fits in rows:
        dp = n_gpus // (t * p)
        deg = f"dp_shard {dp if d == -1 else d} tp {t} pp {p}" if z == 3 else f"dp {dp}"
        note = "" if z in (0, 3) else "  (not in train.py)"
        print(f"  {label:<{width}}{deg:<22}{gb(m['params'])} {gb(m['grads'])} {gb(m['optimizer'])} "
              f"{gb(m['activations'])} {gb(total)}  {'yes' if fits else 'no'}{note}")

    best = choose(rows)
    if best is None:
        need = None
        for n in (n_gpus * 2 ** i for i in range(1, 12)):
            found = choose(evaluate(cfg, n, limit, seq, batch_size, dtype, gpus_per_node, tp, pp))
            if found:
                need = (n, found[0])
                break
        state_fits = any(r[7] - r[6]["activations"] <= limit for r in rows if r[4] in (0, 3))
        print(f"\ndoes not fit on {n_gpus} x {kind} at batch_size {batch_size}"
              + (f": it needs {need[0]} x {kind} ({need[1]})" + (", or a smaller batch_size" if state_fits else
                 " (its weights, gradients and optimizer state alone do not fit)") if need else
                 ": not on up to 2048 times as many either"))
        return
    label, d, t, p, z, ac, m, total, _ = best
    dp = n_gpus // (t * p)
    shard = (dp if d == -1 else d) if z == 3 else 1
    print(f"\nsimplest layout that fits: {label} (dp_shard={shard}, tp={t}, pp={p}, "
          f"activation_checkpointing={ac}): {total / GB:.1f} GB of {mem} GB per GPU")

    tokens = chinchilla_tokens(n_params)
    secs = wall_seconds(cfg, tokens, n_gpus, peak, mfu, seq)
    fpt = gpt(cfg).flops_per_token(seq)
    print(f"Chinchilla-optimal tokens (20 x parameters, Hoffmann et al. 2022): {tokens / 1e9:,.2f}B")
    print(f"wall time at {mfu:.0%} MFU: {fpt:.4g} FLOPs/token x {tokens:.4g} tokens / ({n_gpus} x "
          f"{peak:.4g} x {mfu}) = {secs:,.0f} s = {fmt_days(secs)}")

    micro = batch_size * seq * dp
    tbs = total_batch_size or micro * math.ceil(2 ** 19 / micro)
    if tbs % micro:
        print(f"note: total_batch_size {tbs} rounded up to {micro * math.ceil(tbs / micro)}, a multiple of "
              f"batch_size x seq_len x {dp} data-parallel ranks = {micro}")
        tbs = micro * math.ceil(tbs / micro)
    keys = train_keys()
    run_cfg = dict(n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head, n_embd=c.n_embd,
                   mlp_hidden=c.mlp_hidden, norm=c.norm, pos=c.pos, mlp=c.mlp, bias=c.bias,
                   tie_embeddings=c.tie_embeddings, rope_theta=c.rope_theta, qk_norm=c.qk_norm,
                   logit_softcap=c.logit_softcap, zero_init=c.zero_init, value_embeds=c.value_embeds, unet=c.unet,
                   optimizer="adamw",  # train.py's default Muon needs whole matrices: FSDP, TP and PP shard them
                   weight_decay=0.1,  # GPT-2's and Llama's (train.py's default suits its small data-bound run)
                   block_size=seq, batch_size=batch_size,
                   total_batch_size=tbs, max_iters=math.ceil(tokens / tbs), dtype=dtype, dp_shard=shard, tp=t, pp=p,
                   activation_checkpointing=ac)
    default_hidden = M.GPTConfig(**{**vars(cfg), "mlp_hidden": None}).mlp_hidden
    if "mlp_hidden" not in keys and default_hidden == c.mlp_hidden:
        del run_cfg["mlp_hidden"]  # train.py builds this one by itself
    missing = [k for k in run_cfg if k not in keys]
    for k in missing:
        print(f"note: train.py has no '{k}' key; the config file leaves it as a comment")
    if "mlp_hidden" in missing:
        other = count_params(M.GPTConfig(**{**vars(cfg), "mlp_hidden": None}))
        print(f"  so train.py builds GPTConfig's default mlp hidden {default_hidden}: {other:,} parameters, "
              f"not {n_params:,}")
    print(f"note: train.py takes the vocabulary from the data (padded to a multiple of pad_vocab=64), not "
          f"{c.vocab_size}; max_iters = {math.ceil(tokens / tbs):,} steps of {tbs:,} tokens")
    lines = [f"# written by plan.py: {how}; {n_params:,} parameters on {n_gpus} x {kind}",
             f"# {label}: {total / GB:.1f} GB per GPU; {tokens / 1e9:.2f}B tokens (Chinchilla), ~{fmt_days(secs)} at {mfu:.0%} MFU",
             "# choose the data (dataset=, tokenizer=) and a learning rate for this size: train.py's defaults are for its tiny model"]
    lines += [f"{'# ' if k in missing else ''}{k} = {v!r}" for k, v in run_cfg.items()]
    if write_config:
        with common.atomic_path(write_config) as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")
        print(f"wrote {write_config}")
        args = write_config
    else:
        args = " ".join(f"--{k}={v}" for k, v in run_cfg.items() if k not in missing)
    nodes = max(1, n_gpus // gpus_per_node)
    if n_gpus == 1:
        cmd = f"python train.py {args}"
    elif nodes == 1:
        cmd = f"torchrun --standalone --nproc_per_node={n_gpus} train.py {args}"
    else:
        cmd = (f"torchrun --nnodes={nodes} --nproc_per_node={gpus_per_node} --node_rank=R --rdzv_backend=c10d "
               f"--rdzv_endpoint=HOST:29500 train.py {args}")
    print(f"\nrun{f' (on each node: R = 0..{nodes - 1}, HOST = node 0' + chr(39) + 's address)' if nodes > 1 else ''}:")
    print(f"  {cmd}")


if __name__ == "__main__":
    config = configure(globals())
    main()
