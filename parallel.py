"""
Scaling past one GPU's memory: the one place that lays a GPT over the ranks of a torchrun job. train.py,
finetune.py and dpo.py call it the same way:

    mesh = make_mesh(world_size, dp_shard, device_type)          # None: plain DDP (or one process)
    model = parallelize(model, mesh, ddp, ...)                    # AC, compile, then FSDP2 or DDP
    save_sharded(out_dir / "ckpt", model, optimizer, extra)      # DCP: any number of ranks loads it back

dp_shard is the FSDP degree (1: no sharding, -1: every rank); the data-parallel replicas are what the world
size leaves, world = dp_replicate x dp_shard, so dp_replicate > 1 with dp_shard > 1 is HSDP. Each transformer
block is one FSDP unit and the root (embeddings, tied lm_head, final norm) another, as in TorchTitan, whose
order we follow: the pipeline cut, tensor parallel, activation checkpointing, compile per block, FSDP.
tp (Megatron-style DTensor slices of each block's matrices) and pp (torch.distributed.pipelining stages,
GPipe or 1F1B over the micro-steps) are more mesh dimensions: world = pp x dp_replicate x dp_shard x tp.
"""
import os
import re
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from common import die

EXTRA = "extra.pt"  # the non-tensor part of a sharded checkpoint: step, config, every rank's RNG states...


def layout(world_size, dp_shard=1, tp=1, pp=1, n_head=1, n_kv_head=1, n_layer=1, cpu_offload=False):
    """The degrees {'pp', 'dp_replicate', 'dp_shard', 'tp'} of a run of world_size ranks, world = pp x
    dp_replicate x dp_shard x tp (dp_shard=-1: every rank that tp and pp leave), or one clear line (exit 2)
    naming what does not fit. plan.py checks its layouts with it too."""
    for k, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1 or world_size % v:
            die(f"{k}={v} must be a positive divisor of the world size {world_size}")
    if world_size % (tp * pp):
        die(f"tp x pp = {tp * pp} must divide the world size {world_size}")
    rest = world_size // (tp * pp)
    dp_shard = rest if dp_shard == -1 else dp_shard
    if not isinstance(dp_shard, int) or dp_shard < 1 or rest % dp_shard:
        die(f"dp_shard={dp_shard} must be -1 (all ranks) or a positive divisor of the world size {world_size}"
            + (f" / (tp x pp = {tp * pp}) = {rest}" if tp * pp > 1 else ""))
    if n_head % tp or n_kv_head % tp:
        die(f"tp={tp} must divide n_head={n_head} and n_kv_head={n_kv_head}: each rank holds whole heads")
    if pp > n_layer:
        die(f"pp={pp} is more pipeline stages than n_layer={n_layer} layers: use pp <= {n_layer}")
    if cpu_offload and dp_shard == 1:
        die("cpu_offload=True needs FSDP: run under torchrun with --dp_shard=-1 (or another degree > 1)")
    if (tp > 1 or pp > 1) and dp_shard == 1 and rest > 1:
        die(f"tp/pp with {rest // dp_shard} plain data-parallel replicas is not built: add --dp_shard=-1 "
            f"(FSDP over the {rest} data-parallel ranks)")
    return {"pp": pp, "dp_replicate": rest // dp_shard, "dp_shard": dp_shard, "tp": tp}


def stage_layers(n_layer, pp):
    """Layers of each pipeline stage: even, the earlier stages taking one more when uneven (the first stage
    also holds the embeddings, the last the final norm and lm_head; plan.py counts them the same way)."""
    return [n_layer // pp + (i < n_layer % pp) for i in range(pp)]


def make_mesh(world_size, dp_shard, device_type, cpu_offload=False, tp=1, pp=1, cfg=None):
    """The DeviceMesh ('pp', 'dp_replicate', 'dp_shard', 'tp') of a sharded run (the order of TorchTitan:
    tensor parallel innermost, on the fastest links), or None when nothing is sharded (DDP: today's path).
    cfg: the GPTConfig, whose heads and layers tp and pp must divide."""
    c = cfg or type("C", (), {"n_head": tp, "n_kv_head": tp, "n_layer": pp})
    deg = layout(world_size, dp_shard, tp, pp, c.n_head, c.n_kv_head, c.n_layer, cpu_offload)
    # dp_shard=-1 under torchrun is FSDP even on one rank (FSDP's own overhead, measured by bench.py gpu)
    if deg["dp_shard"] == 1 and tp == 1 and pp == 1 and not (dp_shard == -1 and dist.is_initialized()):
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, tuple(deg.values()), mesh_dim_names=tuple(deg))


def autocast_for(mesh, device, dtype, autocast):
    """The autocast context to train in: under FSDP on CUDA none, FSDP's MixedPrecisionPolicy casts instead
    (see parallelize). float16 needs a GradScaler over sharded gradients, which is not built here."""
    if mesh is not None and dtype == "float16":
        die("dtype=float16 (loss scaling) is not supported with FSDP, tensor or pipeline parallel here: use "
            "--dtype=bfloat16 or float32")
    return nullcontext() if mesh is not None and device.startswith("cuda") else autocast


def _checkpoint_block(block):
    """Activation checkpointing of one block: keep its input, recompute its activations in the backward.
    The instance's forward is wrapped (not the module): parameter names and the state dict stay as they are."""
    from torch.utils.checkpoint import checkpoint
    forward = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


class SplitLinear(nn.Module):
    """A fused Linear (attention's q|k|v, SwiGLU's gate|up) as one Linear per part. Tensor parallel shards each
    part by rows (ColwiseParallel), so every rank holds whole heads of q, of k and of v; sharding the fused
    matrix would hand rank 0 all of q and rank 1 k and v. The output is the parts' outputs side by side,
    which is the fused layout (of this rank's heads). Under any mesh the model is split so (see split_fused):
    its sharded checkpoint holds <name>.q.weight, ... whatever the tp degree."""

    def __init__(self, fused, sizes):
        super().__init__()
        ws = fused.weight.detach().split(list(sizes.values()))
        bs = fused.bias.detach().split(list(sizes.values())) if fused.bias is not None else [None] * len(ws)
        for name, w, b in zip(sizes, ws, bs):
            part = nn.Linear(w.size(1), w.size(0), bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                part.weight.copy_(w)
                if b is not None:
                    part.bias.copy_(b)
            self.add_module(name, part)

    def forward(self, x):
        return torch.cat([part(x) for part in self.children()], dim=-1)


def fused_parts(model):
    """{fused Linear's name: {part: rows}} of a GPT: each attention's c_attn, and each SwiGLU's c_fc."""
    parts = {}
    for i, block in model.transformer.h.named_children():  # a pipeline stage keeps its blocks' numbers
        a, name = block.attn, f"transformer.h.{i}"
        parts[f"{name}.attn.c_attn"] = {"q": a.n_head * a.head_dim, "k": a.n_kv_head * a.head_dim,
                                        "v": a.n_kv_head * a.head_dim}
        if block.mlp.swiglu:
            h = block.mlp.c_proj.in_features
            parts[f"{name}.mlp.c_fc"] = {"gate": h, "up": h}
    return parts


def split_fused(model):
    for name, sizes in fused_parts(model).items():
        owner, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner)
        setattr(owner, attr, SplitLinear(getattr(owner, attr), sizes))


def split_views(sd, parts):
    """A plain (fused) state dict as the split one of a sharded checkpoint: views of the fused tensors, so
    that loading into them fills the fused ones in place."""
    out = {}
    for k, v in sd.items():
        name, _, leaf = k.rpartition(".")
        if name in parts:
            out.update({f"{name}.{p}.{leaf}": t for p, t in zip(parts[name], v.split(list(parts[name].values())))})
        else:
            out[k] = v
    return out


def fuse(sd):
    """A split state dict (of a model under a mesh, or of a sharded checkpoint) as the plain one: q|k|v and
    gate|up concatenated back into c_attn and c_fc, in that order."""
    out = {}
    for k, v in sd.items():
        m = _SPLIT.match(k)
        if m is None:
            out[k] = v
        elif m["part"] in ("q", "gate"):
            rest = ("k", "v") if m["part"] == "q" else ("up",)
            out[f"{m['name']}.{m['leaf']}"] = torch.cat([v] + [sd[f"{m['name']}.{p}.{m['leaf']}"] for p in rest])
    return out


_SPLIT = re.compile(r"(?P<name>.*\.(?:attn\.c_attn|mlp\.c_fc))\.(?P<part>q|k|v|gate|up)\.(?P<leaf>weight|bias)$")


def _tensor_parallel(model, tp_mesh):
    """Megatron-style tensor parallel of every block (parallelize_module): q, k, v and the MLP's up (and gate)
    projections split by output rows, the two output projections by input columns, so each block costs one
    all-reduce in the forward and one in the backward per sublayer. Embeddings, norms and lm_head stay whole
    on every rank (their inputs are the same on all of them, and so are their gradients)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp = tp_mesh.size()
    for block in _blocks(model):
        plan = {"attn.c_attn.q": ColwiseParallel(), "attn.c_attn.k": ColwiseParallel(),
                "attn.c_attn.v": ColwiseParallel(), "attn.c_proj": RowwiseParallel(), "mlp.c_proj": RowwiseParallel()}
        plan.update({"mlp.c_fc.gate": ColwiseParallel(), "mlp.c_fc.up": ColwiseParallel()} if block.mlp.swiglu
                    else {"mlp.c_fc": ColwiseParallel()})
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head //= tp  # the heads of this rank: its forward views q|k|v by them
        block.attn.n_kv_head //= tp


def _blocks(model):
    return list(model.transformer.h.children())


def parallelize(model, mesh, ddp, device, activation_checkpointing=False, compile=False, cpu_offload=False,
                dtype="float32"):
    """The model to train, laid over the ranks, in TorchTitan's order: tensor parallel, activation
    checkpointing per block, compile per block, then FSDP2 over the data-parallel ranks (per block, then the
    root; all in place, so `model` stays the module whose state dict we save). Without a mesh: compile the
    whole model, then DDP under torchrun. Under FSDP on CUDA the low-precision dtype is FSDP's
    MixedPrecisionPolicy (bf16/fp16 params in compute, fp32 gradient reduction; the caller then runs without
    autocast)."""
    pp = _size(mesh, "pp") if mesh is not None else 1
    if pp > 1 and model.config.tie_embeddings:
        die(f"pp={pp} needs untied embeddings (a tied wte/lm_head would live on the first and the last stage): "
            f"add --tie_embeddings=False")
    if mesh is None:  # today's path: the whole model compiled, then DDP
        if activation_checkpointing:
            for block in _blocks(model):
                _checkpoint_block(block)
        net = torch.compile(model) if compile else model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            # no buffer changes in training (the RoPE tables are constants): nothing to broadcast every forward
            net = DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None,
                                          broadcast_buffers=False)
        return net
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    # every rank starts from rank 0's weights, as DDP ensures (ranks are seeded apart; fully_shard and
    # parallelize_module keep each rank's own slice of its own initialisation)
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    tp = _size(mesh, "tp")
    if tp > 1 and model.config.dropout:
        die(f"dropout={model.config.dropout} with tp={tp} is not supported (each rank would drop its "
            f"own mask of the same activations): use --dropout=0.0")
    if pp > 1:
        _cut_stage(model, mesh["pp"].get_local_rank(), pp)
    split_fused(model)
    if tp > 1:
        _tensor_parallel(model, mesh["tp"])
    blocks = _blocks(model)
    if activation_checkpointing:
        for block in blocks:
            _checkpoint_block(block)
    if compile:
        for block in blocks:
            block.compile()  # in place (nn.Module.compile): the names of the parameters do not change
    replicas, shards = _size(mesh, "dp_replicate"), _size(mesh, "dp_shard")
    if replicas * shards == 1 and (tp > 1 or _size(mesh, "pp") > 1):  # no data-parallel ranks to shard over
        return model
    kw = {"mesh": mesh["dp_replicate", "dp_shard"] if replicas > 1 else mesh["dp_shard"]}  # 2-D: HSDP
    if device.startswith("cuda") and dtype != "float32":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    if cpu_offload:  # pinned host memory only where an accelerator copies from it
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    # every unit reshards after its forward, the root and the last block too (TorchTitan keeps those two whole
    # for the backward that follows at once): an evaluation has no backward to reshard them, and would leave
    # whole tensors in the model where the optimizer holds the shards
    for block in blocks:
        fully_shard(block, reshard_after_forward=True, **kw)
    fully_shard(model, reshard_after_forward=True, **kw)  # the root: wte with the tied lm_head, the final norm
    return model


def _cut_stage(model, stage, pp):
    """Keep only this pipeline stage's part of the GPT, in place: its blocks in a ModuleDict under their own
    numbers (so the state dict's keys are the whole model's, and a pipeline checkpoint loads anywhere), the
    embeddings on the first stage, the final norm and lm_head on the last (model.GPT._run skips what is gone)."""
    layers = stage_layers(model.config.n_layer, pp)
    first = sum(layers[:stage])
    h = model.transformer.h
    model.transformer.h = nn.ModuleDict({str(i): h[i] for i in range(first, first + layers[stage])})
    if stage > 0:
        for name in ("wte", "wpe"):
            if name in model.transformer:
                del model.transformer[name]
    if stage < pp - 1:
        del model.transformer["ln_f"]
        model.lm_head = None
    model.forward = model._run  # one tensor out (hidden states, or the last stage's logits): the schedule's loss


def pipeline(model, mesh, device, n_microbatches, schedule, loss_fn):
    """The torch.distributed.pipelining schedules of this rank's stage: (train, eval, first, last). train runs
    a step's micro-steps as n_microbatches microbatches ('gpipe': all forwards, then all backwards; '1f1b':
    one forward, one backward once the pipe is full, so a stage holds at most pp microbatches' activations)
    with loss_fn(logits, targets) on the last stage; eval runs one batch forward, for the mean loss."""
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    pp_mesh = mesh["pp"]
    stage, n = pp_mesh.get_local_rank(), pp_mesh.size()
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in kinds:
        die(f"pp_schedule='{schedule}' is not one of {', '.join(kinds)}")
    if schedule == "1f1b" and n_microbatches < n:
        die(f"pp_schedule='1f1b' needs at least pp={n} micro-steps per step, got {n_microbatches}: raise "
            f"total_batch_size or lower batch_size (or use --pp_schedule=gpipe)")

    def make(kind, micro, fn):  # the eval schedule gets a stage of its own: a schedule sizes its stage's buffers
        return kind(PipelineStage(model, stage, n, torch.device(device), group=pp_mesh.get_group()), micro,
                    loss_fn=fn, scale_grads=False)
    mean_loss = lambda logits, y: F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
    return make(kinds[schedule], n_microbatches, loss_fn), make(ScheduleGPipe, 1, mean_loss), stage == 0, stage == n - 1


def pipeline_pass(pipe, x, y, device):
    """One pass of a whole batch through the pipeline `pipe` (what pipeline() returns): with gradients, the
    train schedule's forward and backward; under no_grad, the eval schedule's forward. The first stage feeds x,
    the last scores y. Returns the sum of the microbatches' losses on the last stage, 0 elsewhere."""
    train, evaluate, first, last = pipe
    losses = []
    args = (x,) if first else ()
    kw = dict(target=y, losses=losses) if last else {}
    if torch.is_grad_enabled():
        train.step(*args, **kw, return_outputs=False)
    else:
        evaluate.eval(*args, **kw)
    return torch.stack(losses).sum().detach() if losses else torch.zeros((), device=device)


def _size(mesh, dim):  # a mesh built without some dimension (a test's 2-D one) has degree 1 there
    return mesh[dim].size() if dim in mesh.mesh_dim_names else 1


def data_rank(mesh, rank, world_size):
    """(this rank's index among the data-parallel ranks, their number): the ranks of one tensor-parallel
    group (and of one pipeline) compute on the same rows."""
    if mesh is None:
        return rank, world_size
    c, shards = mesh.get_coordinate(), mesh["dp_shard"].size()
    return c[1] * shards + c[2], mesh["dp_replicate"].size() * shards


def describe(mesh):
    """The layout, for the run's first line: 'FSDP: 2 shards x 1 replica(s), tensor parallel 2, '."""
    d = dict(zip(mesh.mesh_dim_names, mesh.shape))
    out = [f"FSDP: {d['dp_shard']} shards x {d['dp_replicate']} replica(s)"] if d["dp_shard"] > 1 else []
    out += [f"{name} {d[k]}" for k, name in (("tp", "tensor parallel"), ("pp", "pipeline stages")) if d.get(k, 1) > 1]
    return ", ".join(out) + ", "


def whole_model(model, mesh):
    """A plain copy of a model laid over a mesh, on rank 0 (None elsewhere; every rank calls it): the FSDP
    shards and tensor-parallel slices gathered, q|k|v fused back, the pipeline stages' parts put together.
    What generate() runs on at the end of a run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    import model as M
    pp = _size(mesh, "pp")
    # cpu_offload gathers onto global rank 0 only, which holds no later stage's part
    sd = fuse(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=pp == 1)))
    if pp > 1:  # each stage's part to rank 0, sent by the first rank of the stage's data/tensor-parallel group
        first = all(c == 0 for c in mesh.get_coordinate()[1:])
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object({k: v.cpu() for k, v in sd.items()} if first else None, parts, dst=0)
        sd = {k: v for p in parts or [] if p for k, v in p.items()}
    if dist.get_rank() != 0:
        return None
    plain = M.GPT(model.config)
    plain.load_state_dict(sd)
    return plain


# -----------------------------------------------------------------------------
# sharded checkpoints: torch.distributed.checkpoint (DCP), a directory any number of ranks can read


def save_sharded(path, model, optimizer, extra):
    """Every rank writes its shards of the model and optimizer into path/ (DCP files) and rank 0 adds `extra`
    (a dict torch.save can hold: step, config, all ranks' RNG states, the data generator). Written to a temp
    directory and renamed: a kill mid-write leaves the previous checkpoint whole (it is deleted only after
    the new one is complete)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if rank == 0:
        torch.save(extra, tmp / EXTRA)
        if path.exists():
            os.replace(path, old)  # a kill between these two renames leaves .old: load_sharded falls back on it
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def sharded_dir(path):
    """The sharded checkpoint directory at path (or its previous version, if a kill interrupted the rename),
    or None."""
    path = Path(path)
    for p in (path, path.with_name(f".{path.name}.old")):
        if (p / EXTRA).is_file():
            return p
    return None


def load_extra(path):
    return torch.load(Path(path) / EXTRA, map_location="cpu", weights_only=True)


def load_sharded(path, model, optimizer=None):
    """Fill model (under a mesh on any number of ranks, or a plain module in one process) and optimizer from
    the sharded checkpoint at path: DCP reshards to whatever layout this run has. A plain model reads the
    split q/k/v (gate/up) tensors into views of its fused ones. The shapes must match: another model shape is
    one clear error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        msd, osd = get_model_state_dict(model), None
    else:
        msd, osd = get_state_dict(model, optimizer)  # also creates the optimizer state to load into
    parts = {} if is_split(model) else fused_parts(model)
    sd = {"model": split_views(msd, parts)}
    if osd is not None:
        state = {k: v for k, v in osd["state"].items() if k.rpartition(".")[0] not in parts}
        for k, v in osd["state"].items():
            name, _, leaf = k.rpartition(".")
            if name in parts:
                views = {s: split_views({f"{name}.{leaf}": t}, parts) if t.dim() else None for s, t in v.items()}
                for p in parts[name]:
                    state[f"{name}.{p}.{leaf}"] = {s: views[s][f"{name}.{p}.{leaf}"] if views[s] else t
                                                   for s, t in v.items()}
        sd["optim"] = {"state": state, "param_groups": osd["param_groups"]}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for k, v in sd["model"].items():  # checked up front: DCP's own error is a traceback per rank
        shape = tuple(saved[f"model.{k}"].size) if f"model.{k}" in saved else None
        if shape != tuple(v.shape):
            die(f"the sharded checkpoint {path} does not fit this model: {k} is {shape or 'missing'} there, "
                f"{tuple(v.shape)} here; resume with the model settings it was trained with")
    # the kernel choice stays this run's (a tensor-parallel run saves fused=False, which one process needs not);
    # copied first: DCP loads the saved groups into these very dicts
    kernels = [{k: g[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in g}
               for g in (osd["param_groups"] if osd is not None else [])]
    with warnings.catch_warnings():  # one plain process needs no group: DCP warns that it "assumes" so
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
    if osd is None:
        set_model_state_dict(model, msd)
        return
    # the views filled msd's and osd's tensors; the saved groups name the split parts, a plain model the fused
    groups = [{**g, **mine,
               "params": list(dict.fromkeys(_fused_name(k) for k in g["params"])) if parts else g["params"]}
              for g, mine in zip(sd["optim"]["param_groups"], kernels)]
    set_state_dict(model, optimizer, model_state_dict=msd,
                   optim_state_dict={"state": osd["state"] if parts else sd["optim"]["state"], "param_groups": groups})


def _fused_name(k):
    m = _SPLIT.match(k)
    return f"{m['name']}.{m['leaf']}" if m else k


def _fuse_optim(osd):
    """fuse() for an optimizer state dict keyed by parameter name: the parts' moments concatenated."""
    state, seen = {}, set()
    for k, v in osd["state"].items():
        f = _fused_name(k)
        if f == k:
            state[k] = v
        elif f not in seen:
            seen.add(f)
            names = [n for n in osd["state"] if _fused_name(n) == f]
            state[f] = {s: torch.cat([osd["state"][n][s] for n in names]) if t.dim() else t for s, t in v.items()}
    groups = [{**g, "params": list(dict.fromkeys(_fused_name(k) for k in g["params"]))} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def find_checkpoint(out_dir):
    """(path, sharded) of the checkpoint in out_dir: ckpt.pt (one process, DDP) or the ckpt/ directory
    (FSDP), the more recently written when both are there; None when there is neither."""
    plain, sharded = Path(out_dir) / "ckpt.pt", sharded_dir(Path(out_dir) / "ckpt")
    found = [(p.stat().st_mtime, p, p != plain) for p in (plain, sharded) if p is not None and p.exists()]
    return max(found)[1:] if found else None


def plain_state(model, optimizer):
    """{'model', 'optimizer'} state dicts for a plain ckpt.pt (what finetune.py and dpo.py write). Under FSDP
    a collective: every rank calls it, rank 0 gets the whole tensors on the CPU (the optimizer's state then
    keyed by parameter name, not number: only train.py resumes an optimizer, and it writes ckpt/ instead)."""
    if not is_split(model):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    m, o = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": fuse(m), "optimizer": _fuse_optim(o) if o else o}


def is_split(model):
    """Whether the model is laid over a mesh (FSDP, tensor parallel): its fused Linears are split then."""
    return any(isinstance(m, SplitLinear) for m in model.modules())


def full_state_dict(path):
    """The plain (unsharded) model state dict of a sharded checkpoint, read in one process without a process
    group: what hf.load_model, sample.py and eval.py use, and what export writes into a ckpt.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = dcp.FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return fuse({k[len("model."):]: v for k, v in sd.items()})


def export(out_dir):
    """out_dir/ckpt/ (sharded) -> out_dir/ckpt.pt, a plain checkpoint of the same step, optimizer included:
    train.py resumes it in one process (or DDP) exactly as it would the directory."""
    from dataclasses import asdict
    from common import save_checkpoint
    import model as M
    src = sharded_dir(Path(out_dir) / "ckpt")
    if src is None:
        die(f"no sharded checkpoint in {Path(out_dir) / 'ckpt'} (one is written by train.py with dp_shard > 1)")
    extra = load_extra(src)
    cfg = extra["config"]
    model = M.GPT(M.GPTConfig(**extra["model_args"]))
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), "cpu")
    load_sharded(src, model, optimizer)
    save_checkpoint({**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "model_args": asdict(model.config)}, Path(out_dir) / "ckpt.pt")
    return Path(out_dir) / "ckpt.pt"


if __name__ == "__main__":  # python parallel.py OUT_DIR: the sharded OUT_DIR/ckpt/ as a plain OUT_DIR/ckpt.pt
    import sys
    if len(sys.argv) != 2:
        die("usage: python parallel.py OUT_DIR (writes OUT_DIR/ckpt.pt from the sharded OUT_DIR/ckpt/)")
    print(f"wrote {export(sys.argv[1])}")
