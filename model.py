"""
The GPT: one model for both GPT-2 style (LayerNorm, learned positions, GELU, biases) and
Llama style (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) and a KV-cache generator.
Hugging Face weight interop (GPT2LMHeadModel, LlamaForCausalLM) is in hf.py.
References: nanoGPT's model.py; transformers' modeling_gpt2.py and modeling_llama.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 for speed
    block_size: int = 1024       # longest context
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None -> n_head; fewer -> grouped-query attention (1 = multi-query)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True            # biases in Linears and LayerNorms, like GPT-2
    norm: str = 'layernorm'      # 'layernorm' | 'rmsnorm'
    pos: str = 'learned'         # 'learned' | 'rope'
    rope_theta: float = 10000.0
    mlp: str = 'gelu'            # 'gelu' (exact, as nanoGPT) | 'gelu_tanh' (GPT-2's approximation) | 'swiglu' | 'relu2'
    mlp_hidden: int | None = None  # None -> 4*n_embd (gelu) or 8/3*n_embd rounded up to 64 (swiglu, as Llama)
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    norm_eps: float = 1e-5
    # modded-nanogpt's switches (off: GPT-2's and Llama's architectures, which hf.py exports, stay exactly as they are)
    qk_norm: bool = False        # each head's q and k to unit RMS before attention (and before RoPE)
    logit_softcap: float = 0.0   # > 0: logits = cap * tanh(logits / cap)
    zero_init: bool = False      # the output projections (attention's and the MLP's c_proj) start at zero
    value_embeds: bool = False   # each layer's values get a learned vector of the token they stand for
    unet: bool = False           # U-net skips: layer i's output joins the input of layer n_layer-1-i (learned weights)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd if self.mlp != 'swiglu' else 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for key, allowed in (('norm', ('layernorm', 'rmsnorm')), ('pos', ('learned', 'rope')), ('mlp', ('gelu', 'gelu_tanh', 'swiglu', 'relu2'))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"GPTConfig.{key}={getattr(self, key)!r}: must be one of {allowed}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) and n_head by n_kv_head ({self.n_kv_head})")


_LLAMA = dict(norm='rmsnorm', pos='rope', mlp='swiglu', bias=False, tie_embeddings=False)
PRESETS = {
    # exactly GPT-2's architectures (gpt2: 124,439,808 parameters with tied embeddings)
    'gpt2':        dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, mlp='gelu_tanh'),
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024, mlp='gelu_tanh'),
    'gpt2-large':  dict(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024, mlp='gelu_tanh'),
    'gpt2-xl':     dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024, mlp='gelu_tanh'),
    # Llama-style, CPU-sized to one-GPU-sized (vocab_size comes from the data)
    'llama-tiny':   dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=256),
    'llama-small':  dict(_LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=512),
    'llama-medium': dict(_LLAMA, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024),
    'llama-large':  dict(_LLAMA, n_layer=24, n_head=16, n_kv_head=4, n_embd=1024, block_size=2048),
}

# dense bf16 tensor-core peaks (FLOP/s) for MFU; the first name contained in the device name wins,
# so more specific names come first. GPUs without bf16 list their fp16 peak.
GPU_PEAK_FLOPS = [('H200 NVL', 835e12), ('H200', 989e12), ('H100 NVL', 835e12), ('H100 PCIe', 756e12),
                  ('H100', 989e12), ('H800', 989e12), ('GB200', 2500e12), ('B200', 2250e12), ('A100', 312e12),
                  ('A800', 312e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12), ('RTX 4090', 165e12),
                  ('RTX 3090', 71e12), ('A6000', 155e12), ('V100', 125e12), ('T4', 65e12)]


def peak_flops(device_name):
    """The GPU_PEAK_FLOPS entry of a CUDA device name: the first key it contains (most specific first)."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if key in device_name), None)


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split('.')[:2]) >= (2, 5)  # sdpa's enable_gqa


def sdpa_gqa(device_type, dtype):
    """Whether SDPA should share kv heads itself (enable_gqa) rather than get K/V repeated per query head.
    On CUDA only the flash kernel (fp16/bf16) serves enable_gqa: fp32 would fall back to the slow math
    path. On CPU enable_gqa is ~8% faster than repeat_interleave (training shapes, torch 2.13)."""
    return _SDPA_GQA and (device_type != 'cuda' or dtype in (torch.float16, torch.bfloat16))


class Norm(nn.Module):
    """LayerNorm (optional bias, which nn.LayerNorm lacks) or RMSNorm."""

    def __init__(self, dim, kind, bias, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == 'layernorm' else None

    def forward(self, x):
        if self.kind == 'rmsnorm':
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rope_tables(head_dim, length, theta):
    """cos and signed sin, each (length, 1, head_dim), for apply_rope at positions 0..length-1
    (fp32; attention casts them to q's dtype so that bf16 autocast doesn't upcast q and k)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)[:, None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, D) by position. Dimension i is paired with i + D/2 (HF's rotate_half layout, so
    transformers' Llama q/k weights load as they are; Meta's interleaved layout would need a permutation):
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] = x * cos + roll(x, D/2) * [-sin, sin]."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class Linear(nn.Linear):
    """nn.Linear with a decoding fast path. Batch-1 decoding is bound by reading the weights, and on CPU
    MKL's matrix-vector product streams a wide weight stored (in, out) ~1.6x faster than nn.Linear's
    (out, in) (x @ W^T on a 2-core AVX2 CPU; slower when out < in). generate() sets weight_t, a
    transposed copy, for the length of a call on CPU; autograd and state_dict never see it."""
    weight_t = None

    def forward(self, x):
        if self.weight_t is None or torch.is_grad_enabled():  # the copy is for inference only
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.size(-1))
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], -1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout, self.qk_norm = config.dropout, config.qk_norm
        # q, k and v projections in one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, rope=None, cache=None, pos=0, mask=None, ve=None):
        """mask: None (causal) or boolean (B, 1, T, keys), True = attend; generate() passes it for left padding.
        ve: None or the value embeddings of the tokens (B, T, n_kv_head * head_dim), added to v."""
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hd)
        if ve is not None:
            qkv = torch.cat((qkv[:, :, :nh + nkv], qkv[:, :, nh + nkv:] + ve.view(B, T, nkv, hd)), dim=2)
        if rope is not None or self.qk_norm:  # q and k are adjacent in qkv: normalise and rotate both at once
            qk, v = qkv.split([nh + nkv, nkv], dim=2)
            qk = F.rms_norm(qk, (hd,)) if self.qk_norm else qk
            qk = apply_rope(qk, rope[0].to(qk.dtype), rope[1].to(qk.dtype)) if rope is not None else qk
            q, k = qk.split([nh, nkv], dim=2)
        else:
            q, k, v = qkv.split([nh, nkv, nkv], dim=2)  # split, not slicing: its backward is one cat
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k_cache, v_cache = cache
            if isinstance(pos, torch.Tensor):  # one token per row, each at its own position (serve.py's batch)
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, pos], v_cache[rows, :, pos] = k[:, :, 0], v[:, :, 0]
            else:
                k_cache[:, :, pos:pos + T] = k
                v_cache[:, :, pos:pos + T] = v
            if T == 1:
                # decode: one new query attends to every cached position (no mask unless some are padding);
                # the query heads sharing a kv head become that head's "queries" (GQA without repeating K/V)
                q = q.reshape(B, nkv, nh // nkv, hd)
                n = pos + 1 if mask is None else mask.size(-1)
                y = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask)
                return self.c_proj(y.view(B, 1, -1))
            assert pos == 0, "prefill starts at position 0 (so the causal mask is the plain one)"
        dropout = self.dropout if self.training else 0.0
        gqa = nkv != nh and sdpa_gqa(q.device.type, q.dtype)
        if nkv != nh and not gqa:  # materialise the repeated heads (older torch, fp32 on CUDA)
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                           **({'enable_gqa': True} if gqa else {}))
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, -1))  # -1: this rank's heads under tensor parallel
        return F.dropout(y, dropout, True) if dropout else y


class ReLUSquared(torch.autograd.Function):
    """relu(h)^2 with a one-op backward, grad * 2 relu(h): autograd's relu-then-square ran 4 elementwise passes
    backward and made the ReLU^2 MLP's activation ~1.6x slower (fwd+bwd, 2-core CPU)."""

    @staticmethod
    def forward(ctx, h):
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        r, = ctx.saved_tensors
        return grad * r * 2


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.kind, self.dropout = config.mlp, config.dropout
        self.swiglu = config.mlp == 'swiglu'
        # SwiGLU's gate and up projections are fused into one matmul: [gate; up]
        self.c_fc = Linear(config.n_embd, config.mlp_hidden * (2 if self.swiglu else 1), bias=config.bias)
        self.c_proj = Linear(config.mlp_hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == 'relu2':
            h = ReLUSquared.apply(h)
        else:  # exact GELU is ~3x faster than the tanh form on CPU
            h = F.gelu(h, approximate='tanh' if self.kind == 'gelu_tanh' else 'none')
        y = self.c_proj(h)
        return F.dropout(y, self.dropout, True) if self.dropout and self.training else y


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config.n_embd, config.norm, config.bias, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, pos=0, mask=None, ve=None):
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config.n_embd, config.norm, config.bias, config.norm_eps),
        ))
        if config.pos == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # tables computed once, not saved in checkpoints
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        if config.value_embeds:  # modded-nanogpt's value embeddings (one table per layer here)
            self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_kv_head * config.n_embd // config.n_head)
                                              for _ in range(config.n_layer))
        if config.unet:
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2*n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # (zero_init: each block starts as the identity)
                nn.init.normal_(p, mean=0.0, std=0.0 if config.zero_init else 0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Parameter count (tied weights once). non_embedding drops the position table and, when
        untied, the token table: what remains is what does matmul work per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.pos == 'learned':
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token at context seq_len (default: the model's), as in the
        PaLM paper (appendix B): attention's share grows with the context actually trained on."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def estimate_mfu(self, tokens_per_sec, device=None, seq_len=None):
        """Model FLOPs utilisation against the peak of the GPU in use (per-GPU tokens/s, sequences of seq_len);
        None on CPU or an unknown GPU."""
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        if device.type != 'cuda':
            return None
        peak = peak_flops(torch.cuda.get_device_name(device))
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_sec / peak

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, skip=()):
        """AdamW with weight decay on matrices (Linear weights, embeddings) only, not on biases and norm gains;
        the parameters in skip are left to another optimizer."""
        skipped = {id(q) for q in skip}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in skipped]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        # the fused kernel (CUDA, and CPU since torch 2.4) made the baby shakespeare_char step ~10% faster on CPU;
        # it takes one kind of tensor, and tensor parallel alone leaves whole tensors beside its DTensor slices
        mixed = len({type(p) for p in params}) > 1
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ('cuda', 'cpu') and not mixed,
                                 foreach=False if mixed else None)

    @torch.no_grad()
    def resize_vocab(self, new_vocab_size):
        """Grow (or shrink) the token embedding and lm_head, keeping the existing rows; new rows get
        the usual N(0, 0.02) init. Used when fine-tuning adds tokens (e.g. chat markers)."""
        old_wte, old_head = self.transformer.wte.weight, self.lm_head.weight
        keep = min(new_vocab_size, old_wte.size(0))
        wte = nn.Embedding(new_vocab_size, self.config.n_embd, device=old_wte.device, dtype=old_wte.dtype)
        head = Linear(self.config.n_embd, new_vocab_size, bias=False, device=old_wte.device, dtype=old_wte.dtype)
        self._init_weights(wte)
        wte.weight[:keep] = old_wte[:keep]
        if self.config.tie_embeddings:
            head.weight = wte.weight
        else:
            self._init_weights(head)
            head.weight[:keep] = old_head[:keep]
        self.transformer.wte, self.lm_head = wte, head
        for i, old_ve in enumerate(self.value_embeds if self.config.value_embeds else []):
            ve = nn.Embedding(new_vocab_size, old_ve.weight.size(1), device=old_wte.device, dtype=old_wte.dtype)
            self._init_weights(ve)
            ve.weight[:keep] = old_ve.weight[:keep]
            self.value_embeds[i] = ve
        self.config.vocab_size = new_vocab_size

    def crop_block_size(self, block_size):
        """Shorten the context (e.g. GPT-2's 1024 to train with 256): the first block_size positions are kept."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab); loss is the mean cross-entropy over targets != -1."""
        logits = self._run(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _run(self, idx, cache=None, pos=0, last_only=False, pad=None):
        """idx (B, T): the tokens at columns pos..pos+T-1 (of the cache, when there is one); or, with pos a
        LongTensor (B,) and T = 1, row b's token at column pos[b] (rows of different lengths). pad (B,) or None:
        row b is left-padded, its tokens start at column pad[b] with position 0, and the mask hides the pad
        columns from every query (a pad query sees itself: some SDPA backends make an all-masked row NaN)."""
        T = idx.size(1)
        last = int(pos.max()) if isinstance(pos, torch.Tensor) else pos  # pos (B,): row b's one token is at pos[b]
        if last + T > self.config.block_size:
            raise ValueError(f"sequence of {last + T} tokens is longer than block_size {self.config.block_size}")
        first = 'wte' in self.transformer  # a later pipeline stage (parallel.py) gets hidden states, not ids
        x = self.transformer.wte(idx) if first else idx
        where, mask, rope = slice(pos, pos + T), None, None
        if isinstance(pos, torch.Tensor):  # every row sees its own columns 0..pos[b]
            where = pos[:, None]
            mask = (torch.arange(last + 1, device=idx.device) <= where)[:, None, None]
        elif pad is not None:
            cols = torch.arange(pos + T, device=idx.device)  # key columns; the queries are cols[pos:]
            qc = cols[pos:, None]
            where = (qc.T - pad[:, None]).clamp(min=0)  # (B, T) positions
            mask = ((cols <= qc) & ((cols >= pad[:, None, None]) | (cols == qc)))[:, None]  # (B, 1, T, pos + T)
        if self.config.pos == 'learned':
            x = x + self.transformer.wpe.weight[where] if first else x
        else:  # (T, 1, hd), or (B, T, 1, hd) per row
            rope = (self.rope_cos[where], self.rope_sin[where])
        if self.config.dropout and self.training and first:
            x = F.dropout(x, self.config.dropout, True)
        skips, half = [], self.config.n_layer // 2 if self.config.unet else 0
        for i, block in enumerate(self.transformer.h.children()):
            if i >= self.config.n_layer - half:  # U-net: the mirror layer of the first half's output
                x = x + self.skip_weights[i - (self.config.n_layer - half)] * skips.pop()
            ve = self.value_embeds[i](idx) if self.config.value_embeds else None
            x = block(x, rope, cache[i] if cache is not None else None, pos, mask, ve)
            if i < half:
                skips.append(x)
        if self.lm_head is None:  # not the last pipeline stage
            return x
        if last_only:  # generation only needs the next-token logits: skip the rest of the lm_head
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(), seed=None,
                 num_samples=1, use_cache=True):
        """Yield the next token of every row, a LongTensor (B*num_samples,), once per step (streaming).
        idx: (B, T) prompts, or a list of B prompts (lists of ids) of any lengths: those are left-padded,
        every row keeps positions 0..len-1 and a mask hides the padding, so each row gets exactly what
        it would get alone. Row b*num_samples+s is sample s of prompt b. temperature 0 = greedy.
        A row that produced a stop token yields -1 afterwards; the generator ends when all rows have
        stopped or after max_new_tokens. The model sees at most the last block_size tokens: with the
        KV cache the prompt is prefilled once (shared by the samples) and then one token costs one
        position; once the context outgrows block_size the window slides and every step recomputes it,
        exactly like use_cache=False."""
        pad = None
        if isinstance(idx, (list, tuple)):
            rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in idx]
            if not rows or min(map(len, rows)) == 0:
                raise ValueError("generate needs non-empty prompts")
            lens = torch.tensor([len(r) for r in rows])
            idx = torch.zeros(len(rows), int(lens.max()), dtype=torch.long, device=self.lm_head.weight.device)
            for b, r in enumerate(rows):
                idx[b, idx.size(1) - len(r):] = r
            if (lens != lens.max()).any():  # equal lengths take the mask-free path
                pad = (lens.max() - lens).to(idx.device)
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError("generate needs a non-empty (B, T) prompt")
        was_training = self.training
        self.eval()
        cpu = idx.device.type == 'cpu'  # GPUs read both weight layouts equally fast
        try:
            self.decode_weights(cpu)
            yield from self._generate(idx, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed,
                                      num_samples, use_cache, pad)
        finally:
            self.decode_weights(False)
            self.train(was_training)

    def decode_weights(self, on=True):
        """Give every Linear with out >= in a transposed copy of its current weight for CPU decoding (see
        Linear), or take them away. The copies' memory is kept for the next call (filling fresh memory
        costs ~3x the copy itself: 0.3 s per call for gpt2); del model.decode_buffers frees it."""
        bufs = self.__dict__.setdefault('decode_buffers', {})  # a plain attribute: not in state_dict
        for name, m in self.named_modules():
            if isinstance(m, Linear) and m.out_features >= m.in_features:
                if not on:
                    m.weight_t = None
                    continue
                wt = m.weight.detach().t()
                if name not in bufs or bufs[name].shape != wt.shape or bufs[name].dtype != wt.dtype:
                    bufs[name] = torch.empty_like(wt, memory_format=torch.contiguous_format)
                m.weight_t = bufs[name].copy_(wt)

    def compile_decoding(self):
        """Compile generate()'s one-token step: its first call compiles (~10-30 s on a CPU), and again for another
        kind of batch (one row, several, ragged). At batch 1 on a CPU a small model's token costs more in per-op
        calls than in arithmetic, which the compiled step mostly removes (sample.py --compile=True)."""
        self.decode_step = torch.compile(self._run, dynamic=True)  # dynamic: one graph for every position
        return self

    def kv_cache(self, rows, length, device):
        """An empty KV cache: per layer (k, v), each (rows, n_kv_head, length, head_dim), in the dtype k and v
        come out in (autocast's, when it is on: call this inside it)."""
        c, kind = self.config, torch.device(device).type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.lm_head.weight.dtype
        shape = (rows, c.n_kv_head, length, c.n_embd // c.n_head)
        return [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                for _ in range(c.n_layer)]

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, num_samples, use_cache, pad):
        B0, T0 = idx.shape
        B, bs, dev = B0 * num_samples, self.config.block_size, idx.device
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        with torch.inference_mode():  # a little less per-op overhead than no_grad: it counts at batch 1
            stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=dev) if stop_tokens else None
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            seq = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=dev)  # prompt + generated tokens
            seq[:, :T0] = idx.repeat_interleave(num_samples, dim=0)
            pads = pad.repeat_interleave(num_samples) if pad is not None else None
        cache, n = None, T0  # n = tokens in seq; the cache (when used) holds seq[:, :n-1]
        step = self.__dict__.get('decode_step', self._run)  # compile_decoding() sets it
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                if use_cache and n <= bs and cache is None:
                    # prefill the distinct prompts once, then give each sample its own copy of the cache
                    cache = self.kv_cache(B0, min(bs, T0 + max_new_tokens), dev)
                    logits = self._run(idx, cache, pos=0, last_only=True, pad=pad)
                    if num_samples > 1:
                        cache = [(k.repeat_interleave(num_samples, 0), v.repeat_interleave(num_samples, 0)) for k, v in cache]
                        logits = logits.repeat_interleave(num_samples, 0)
                elif use_cache and n <= bs:
                    logits = step(seq[:, n - 1:n], cache, pos=n - 1, pad=pads)
                else:  # no cache, or the window slides: recompute the last block_size tokens
                    start = max(0, n - bs)  # a padded row's positions restart at its first column in the window
                    wpad = None if pads is None else (pads - start).clamp(min=0)
                    logits = self._run(seq[:, start:n], last_only=True, pad=wpad)
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
                seq[:, n] = nxt
                n += 1
                if stop is not None:
                    nxt = torch.where(done, -1, nxt)
                    done |= torch.isin(seq[:, n - 1], stop)
            yield nxt.clone()  # made outside inference mode: an ordinary tensor the caller may use anywhere
            if stop is not None and done.all():
                return


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, V): greedy when temperature is 0, else sample softmax(logits /
    temperature) cut to the top_k most likely, then to the smallest set whose probability reaches top_p:
    transformers' order (temperature, top_k, top_p) and its TopPLogitsWarper rule (HF's top_k also keeps
    ties with the k-th logit; torch.topk keeps exactly k)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None
    if top_k is not None:  # topk returns them sorted, which top_p needs
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))
    elif top_p is not None and top_p < 1.0:
        logits, ids = logits.sort(dim=-1, descending=True)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        # drop a token when it and every less likely one hold <= 1 - top_p (the mass before it is >= top_p),
        # summed from the least likely up as HF does, so that a boundary case is cut the same way
        tail = probs.flip(-1).cumsum(dim=-1).flip(-1)
        probs[..., 1:][tail[..., 1:] <= 1 - top_p] = 0.0  # the top token always stays
    choice = torch.multinomial(probs, 1, generator=generator)
    return (ids.gather(-1, choice) if ids is not None else choice).squeeze(-1)
