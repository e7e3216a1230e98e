"""
Scaling past one GPU's memory: the one place that lays a GPT over the ranks of a torchrun job. train.py,
finetune.py and dpo.py call it the same way:

    mesh = make_mesh(world_size, dp_shard, device_type)          # None: plain DDP (or one process)
    model = parallelize(model, mesh, ddp, ...)                    # AC, compile, then FSDP2 or DDP
    save_sharded(out_dir / "ckpt", model, optimizer, extra)      # DCP: any number of ranks loads it back

dp_shard is the FSDP degree (1: no sharding, -1: every rank); the data-parallel replicas are what the world
size leaves, world = dp_replicate x dp_shard, so dp_replicate > 1 with dp_shard > 1 is HSDP. Each transformer
block is one FSDP unit and the root (embeddings, tied lm_head, final norm) another, as in TorchTitan, whose
order we follow: (tensor parallel: later), activation checkpointing, compile per block, FSDP.
Tensor and pipeline parallelism would slot in as more mesh dimensions ahead of "dp_shard".
"""
import os
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from common import die

EXTRA = "extra.pt"  # the non-tensor part of a sharded checkpoint: step, config, every rank's RNG states...


def make_mesh(world_size, dp_shard, device_type, cpu_offload=False):
    """The (dp_replicate, dp_shard) DeviceMesh of an FSDP run, or None when nothing is sharded (dp_shard=1:
    DDP, today's path). Degrees that do not divide the world size stop the run with one line."""
    if dp_shard == -1:
        dp_shard = world_size
    if not isinstance(dp_shard, int) or dp_shard < 1 or world_size % dp_shard:
        die(f"dp_shard={dp_shard} must be -1 (all ranks) or a positive divisor of the world size {world_size}")
    if cpu_offload and dp_shard == 1:
        die("cpu_offload=True needs FSDP: run under torchrun with --dp_shard=-1 (or another degree > 1)")
    if dp_shard == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world_size // dp_shard, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def autocast_for(mesh, device, dtype, autocast):
    """The autocast context to train in: under FSDP on CUDA none, FSDP's MixedPrecisionPolicy casts instead
    (see parallelize). float16 needs a GradScaler over sharded gradients, which is not built here."""
    if mesh is not None and dtype == "float16":
        die("dtype=float16 (loss scaling) is not supported with FSDP here: use --dtype=bfloat16 or float32")
    return nullcontext() if mesh is not None and device.startswith("cuda") else autocast


def _checkpoint_block(block):
    """Activation checkpointing of one block: keep its input, recompute its activations in the backward.
    The instance's forward is wrapped (not the module): parameter names and the state dict stay as they are."""
    from torch.utils.checkpoint import checkpoint
    forward = block.forward
    block.forward = lambda *args, **kwargs: checkpoint(forward, *args, use_reentrant=False, **kwargs)


def parallelize(model, mesh, ddp, device, activation_checkpointing=False, compile=False, cpu_offload=False,
                dtype="float32"):
    """The model to train, laid over the ranks: activation checkpointing per block, then compile, then FSDP2
    over `mesh` (per block, then the root; in place, so `model` stays the module whose state dict we save) or,
    without a mesh, DDP under torchrun. Under FSDP on CUDA the low-precision dtype is FSDP's MixedPrecisionPolicy
    (bf16/fp16 params in compute, fp32 gradient reduction; the caller then runs without autocast)."""
    blocks = model.transformer.h
    if activation_checkpointing:
        for block in blocks:
            _checkpoint_block(block)
    if mesh is None:  # today's path: the whole model compiled, then DDP
        net = torch.compile(model) if compile else model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            # no buffer changes in training (the RoPE tables are constants): nothing to broadcast every forward
            net = DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None,
                                          broadcast_buffers=False)
        return net
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    # every rank starts from rank 0's weights, as DDP ensures (ranks are seeded apart; fully_shard keeps each
    # rank's own slice of its own initialisation)
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    if compile:
        for block in blocks:
            block.compile()  # in place (nn.Module.compile): the names of the parameters do not change
    kw = {"mesh": mesh if mesh.shape[0] > 1 else mesh["dp_shard"]}  # 2-D: HSDP (replicas of a sharded model)
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


@contextmanager
def gathered(model):
    """Whole weights for generate() under FSDP (every rank calls it and generates alike): generate calls the
    model's inner _run, not its forward, so FSDP's hook that gathers the root's weights (embeddings, lm_head,
    final norm) never fires, and on CPU it takes transposed copies of every Linear's weight up front."""
    units = [m for m in model.modules() if hasattr(m, "unshard")]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()

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
    """Fill model (FSDP on any number of ranks, or a plain module in one process) and optimizer from the
    sharded checkpoint at path: DCP reshards to whatever layout this run has. The shapes must match: another
    model shape is one clear error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        sd = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)  # also creates the optimizer state to load into
        sd = {"model": model_sd, "optim": optim_sd}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for k, v in sd["model"].items():  # checked up front: DCP's own error is a traceback per rank
        shape = tuple(saved[f"model.{k}"].size) if f"model.{k}" in saved else None
        if shape != tuple(v.shape):
            die(f"the sharded checkpoint {path} does not fit this model: {k} is {shape or 'missing'} there, "
                f"{tuple(v.shape)} here; resume with the model settings it was trained with")
    with warnings.catch_warnings():  # one plain process needs no group: DCP warns that it "assumes" so
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


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
    if not is_fsdp(model):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    m, o = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": m, "optimizer": o}


def is_fsdp(model):
    return hasattr(model, "set_requires_gradient_sync")


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
    return {k[len("model."):]: v for k, v in sd.items()}


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
