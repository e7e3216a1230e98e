"""
Where models come from: load_model() gives the model and tokenizer of a checkpoint of ours, of a Hugging
Face directory or of GPT-2 on the hub. And Hugging Face interop without extra packages: read and write
safetensors, build a GPT from a local GPT2LMHeadModel or LlamaForCausalLM directory (config.json + weights),
write one back that transformers loads, and fetch GPT-2's weights from the hub.

Export a checkpoint with its tokenizer (and chat template, for a fine-tuned one) for transformers:
$ python hf.py --out_dir=out --save_dir=out-hf
>>> AutoModelForCausalLM.from_pretrained("out-hf"), AutoTokenizer.from_pretrained("out-hf")
"""
import json
import math
import os
import struct
from pathlib import Path

import torch

from common import atomic_path, configure, die, download, load_checkpoint
from model import GPT, GPTConfig
import tokenizer as T


SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    """Read a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} and then the raw tensors (offsets count from there)."""
    try:
        with open(path, 'rb') as f:
            (n,) = struct.unpack('<Q', f.read(8))
            header = json.loads(f.read(n))
            data = bytearray(f.read())  # the tensors below are views into it: no second copy
        buf = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        out = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            dtype, (begin, end) = SAFETENSORS_DTYPES[info['dtype']], info['data_offsets']
            if not 0 <= begin <= end <= buf.numel():
                raise ValueError(f"tensor {name} lies outside the file")
            raw = buf[begin:end] if begin % dtype.itemsize == 0 else buf[begin:end].clone()  # view() needs alignment
            out[name] = raw.view(dtype).reshape(info['shape'])
        return out
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        die(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); download it again")


def save_safetensors(tensors, path):
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    blobs = []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8)
        header[name] = {'dtype': names[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + blob.numel()]}
        blobs.append(blob)
        offset += blob.numel()
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)  # keeps the tensors 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(struct.pack('<Q', len(head)) + head)
        for blob in blobs:
            f.write(blob.numpy().data)


def read_hf_weights(path):
    path = Path(path)
    if (path / 'model.safetensors').exists():
        return load_safetensors(path / 'model.safetensors')
    if (path / 'model.safetensors.index.json').exists():  # sharded checkpoint
        shards = set(json.loads((path / 'model.safetensors.index.json').read_text())['weight_map'].values())
        return {k: v for shard in sorted(shards) for k, v in load_safetensors(path / shard).items()}
    if (path / 'pytorch_model.bin').exists():
        try:
            return torch.load(path / 'pytorch_model.bin', map_location='cpu', weights_only=True)
        except Exception as e:
            die(f"{path / 'pytorch_model.bin'} could not be read ({type(e).__name__}: {e})")
    die(f"{path} has no model.safetensors or pytorch_model.bin")


_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')  # GPT-2 stores these (in, out)


def load_hf(path):
    """Build a GPT from a local Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM)."""
    path = Path(path)
    if not (path / 'config.json').exists():
        die(f"{path}/config.json not found: expected a Hugging Face model directory (config.json + model.safetensors)")
    hf = json.loads((path / 'config.json').read_text())
    kind = hf.get('model_type')
    if kind == 'gpt2':
        act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}.get(hf.get('activation_function', 'gelu_new'))
        if act is None:
            die(f"{path}: activation_function {hf['activation_function']!r} unsupported (GPT-2 uses gelu_new)")
        config = GPTConfig(mlp=act, vocab_size=hf['vocab_size'], block_size=hf['n_positions'], n_layer=hf['n_layer'],
                           n_head=hf['n_head'], n_embd=hf['n_embd'], mlp_hidden=hf.get('n_inner'), bias=True,
                           tie_embeddings=hf.get('tie_word_embeddings', True), norm_eps=hf.get('layer_norm_epsilon', 1e-5))
    elif kind == 'llama':
        rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
        if rope.get('rope_type', rope.get('type', 'default')) != 'default' or hf.get('hidden_act', 'silu') != 'silu' \
                or hf.get('attention_bias', False) != hf.get('mlp_bias', False) \
                or hf.get('head_dim', hf['hidden_size'] // hf['num_attention_heads']) * hf['num_attention_heads'] != hf['hidden_size']:
            die(f"{path}: this Llama variant (rope scaling, activation, bias or head_dim) is not supported")
        config = GPTConfig(vocab_size=hf['vocab_size'], block_size=hf['max_position_embeddings'],
                           n_layer=hf['num_hidden_layers'], n_head=hf['num_attention_heads'],
                           n_kv_head=hf.get('num_key_value_heads'), n_embd=hf['hidden_size'],
                           mlp_hidden=hf['intermediate_size'], bias=hf.get('attention_bias', False), norm='rmsnorm',
                           pos='rope', mlp='swiglu', rope_theta=hf.get('rope_theta') or rope.get('rope_theta', 10000.0),
                           tie_embeddings=hf.get('tie_word_embeddings', False), norm_eps=hf.get('rms_norm_eps', 1e-6))
    else:
        die(f"{path}: model_type {kind!r} is not supported (GPT2LMHeadModel or LlamaForCausalLM)")
    hf_sd = read_hf_weights(path)
    try:
        sd = _from_hf_gpt2(hf_sd) if kind == 'gpt2' else _from_hf_llama(hf_sd, config)
    except KeyError as e:
        die(f"{path}: tensor {e} missing from the weights")
    if config.tie_embeddings:
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    model = GPT(config)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        die(f"{path}: weights do not match config.json: {str(e).splitlines()[1].strip()}")
    return model


def _from_hf_gpt2(hf_sd):
    sd = {}
    for k, v in hf_sd.items():
        k = k.removeprefix('transformer.')
        if k.endswith(('attn.bias', 'attn.masked_bias')) and v.dim() == 4:  # old checkpoints' causal-mask buffers
            continue
        sd[k if k.startswith('lm_head') else 'transformer.' + k] = v.t() if k.endswith(_CONV1D) else v
    return sd


def _llama_keys(c):
    """Our state_dict keys with the Llama tensors each is made of, in order, and their sizes along dim 0:
    q, k and v are fused into c_attn, gate and up into c_fc; everything else maps one to one (sizes None)."""
    hd = c.n_embd // c.n_head
    keys = [('transformer.wte.weight', ['model.embed_tokens.weight'], None),
            ('transformer.ln_f.weight', ['model.norm.weight'], None)]
    if not c.tie_embeddings:
        keys.append(('lm_head.weight', ['lm_head.weight'], None))
    for i in range(c.n_layer):
        p, o = f'model.layers.{i}.', f'transformer.h.{i}.'
        keys += [(o + 'ln_1.weight', [p + 'input_layernorm.weight'], None),
                 (o + 'ln_2.weight', [p + 'post_attention_layernorm.weight'], None)]
        for kind in ('weight', 'bias') if c.bias else ('weight',):
            keys += [(o + 'attn.c_attn.' + kind, [p + f'self_attn.{x}_proj.{kind}' for x in 'qkv'],
                      [c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd]),
                     (o + 'attn.c_proj.' + kind, [p + 'self_attn.o_proj.' + kind], None),
                     (o + 'mlp.c_fc.' + kind, [p + f'mlp.{x}_proj.{kind}' for x in ('gate', 'up')], [c.mlp_hidden] * 2),
                     (o + 'mlp.c_proj.' + kind, [p + 'mlp.down_proj.' + kind], None)]
    return keys


def _from_hf_llama(hf_sd, c):
    return {ours: torch.cat([hf_sd[k] for k in theirs]) if sizes else hf_sd[theirs[0]]
            for ours, theirs, sizes in _llama_keys(c)}


def save_hf(model, path, tok=None, chat=False):
    """Write `model` as a Hugging Face directory that transformers loads: GPT-2 style models as
    GPT2LMHeadModel, Llama style ones (RMSNorm + RoPE + SwiGLU) as LlamaForCausalLM. With tok, its tokenizer
    too (tokenizer.to_hf: AutoTokenizer gives our ids) and generation_config.json (generate() stops at end of
    text; chat: also at <|end|>, and tokenizer_config.json gets our chat template)."""
    c = model.config
    odd = [k for k, on in (("qk_norm", c.qk_norm), ("logit_softcap", c.logit_softcap), ("mlp='relu2'", c.mlp == "relu2"),
                           ("value_embeds", c.value_embeds), ("unet", c.unet)) if on]
    if odd:
        die(f"save_hf: {', '.join(odd)} cannot be exported: GPT2LMHeadModel and LlamaForCausalLM have no such switch "
            f"(train with it off to export; zero_init is only an initialisation and exports)")
    path = Path(path)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    eot = None if tok is None else tok.eot_id
    common = dict(vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings, torch_dtype='float32',
                  bos_token_id=eot, eos_token_id=eot)
    if (c.norm, c.pos, c.n_kv_head) == ('layernorm', 'learned', c.n_head) and c.mlp != 'swiglu':
        hf = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', n_positions=c.block_size, n_embd=c.n_embd,
                  n_layer=c.n_layer, n_head=c.n_head, n_inner=c.mlp_hidden, activation_function='gelu_new' if c.mlp == 'gelu_tanh' else 'gelu',
                  layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        out = {}
        for k, v in sd.items():
            if k == 'lm_head.weight' and c.tie_embeddings:
                continue
            out[k] = v.t() if k.endswith(_CONV1D) else v
            bias = k[:-len('weight')] + 'bias'
            if not c.bias and k.endswith('weight') and not k.endswith(('wte.weight', 'wpe.weight', 'lm_head.weight')):
                out[bias] = torch.zeros(out[k].shape[-1])  # GPT-2 always has biases: zeros are the same model
    elif (c.norm, c.pos, c.mlp) == ('rmsnorm', 'rope', 'swiglu'):
        hd = c.n_embd // c.n_head
        hf = dict(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=c.n_embd,
                  intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  num_key_value_heads=c.n_kv_head, head_dim=hd, max_position_embeddings=c.block_size,
                  rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, rope_scaling=None,
                  rope_parameters={'rope_type': 'default', 'rope_theta': c.rope_theta}, hidden_act='silu',
                  attention_bias=c.bias, mlp_bias=c.bias, **common)
        out = {}
        for ours, theirs, sizes in _llama_keys(c):
            out.update(zip(theirs, sd[ours].split(sizes) if sizes else [sd[ours]]))
    else:
        die(f"save_hf: norm={c.norm}, pos={c.pos}, mlp={c.mlp}, n_kv_head={c.n_kv_head} is neither GPT-2 "
            "(layernorm, learned, gelu, no GQA) nor Llama (rmsnorm, rope, swiglu) style")
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(out, path / 'model.safetensors')
    files = {'config.json': hf}
    if tok is not None:
        T.to_hf(tok, path, chat=chat, n_rows=c.vocab_size)
        stop = [tok.special['<|end|>'], eot] if chat else eot
        files['generation_config.json'] = dict(bos_token_id=eot, eos_token_id=stop, pad_token_id=eot)
    for name, obj in files.items():
        with atomic_path(path / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=2) + '\n')


HF_REPOS = {name: f'openai-community/{name}' for name in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')}


def from_pretrained(name, cache_dir=None):
    """GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or a hub id 'org/name') from the
    Hugging Face hub. Uses transformers' own cache when it has them, else downloads into cache_dir."""
    repo = HF_REPOS.get(name, name)
    hub = Path(os.environ.get('HF_HUB_CACHE', Path.home() / '.cache' / 'huggingface' / 'hub'))
    for snap in sorted(hub.glob(f"models--{repo.replace('/', '--')}/snapshots/*")):
        if (snap / 'config.json').exists() and ((snap / 'model.safetensors').exists() or (snap / 'pytorch_model.bin').exists()):
            return load_hf(snap)
    d = Path(cache_dir or Path.home() / '.cache' / 'llm-from-scratch') / repo.replace('/', '--')
    for fname in ('config.json', 'model.safetensors'):
        if not (d / fname).exists():
            download(f'https://huggingface.co/{repo}/resolve/main/{fname}', d / fname,
                     offline_hint=f"; or put {repo}'s config.json and model.safetensors in a directory and pass "
                                  f"it instead (--init_from=/path/to/{repo.split('/')[-1]})")
    return load_hf(d)


def hf_tokenizer(path, vocab_size):
    """The tokenizer of a Hugging Face model directory: its own tokenizer.json (tokenizer.from_hf, byte-level
    BPE only); without one, GPT-2's, but only for a model with GPT-2's vocabulary (GPT-2 saved without its
    tokenizer, or padded as nanoGPT's 50304)."""
    path = Path(path)
    if (path / 'tokenizer.json').is_file():
        return T.from_hf(path)
    if (path / 'tokenizer.model').is_file():
        die(f"{path}: its tokenizer is SentencePiece (tokenizer.model), which is not supported: only byte-level "
            f"BPE tokenizer.json (GPT-2, Llama 3, Qwen2 style)")
    if not 50257 <= vocab_size <= 50304:
        die(f"{path} has no tokenizer.json and its vocab_size {vocab_size} is not GPT-2's 50257: put the model's "
            f"tokenizer.json (byte-level BPE) beside its config.json")
    return T.get_tokenizer("gpt2")


def load_model(init_from, out_dir, device="cpu", grow_vocab=False):
    """The model and tokenizer any script starts from: init_from='resume' reads out_dir/ckpt.pt,
    'gpt2'/'gpt2-medium'/... the official weights (with our GPT-2 tokenizer), anything else a directory in
    Hugging Face layout (with its own tokenizer: hf_tokenizer).
    grow_vocab: a model with fewer embedding rows than the tokenizer has tokens (GPT-2's 50257 lack the chat
    tokens) gets new rows, up to a multiple of 64 (fine-tuning then learns them); otherwise that is an error.
    A sharded checkpoint (out_dir/ckpt/ of an FSDP run, or an init_from directory holding one) is read
    whole into one process, with no process group: DCP reassembles the shards.
    Returns (model, checkpoint or None, tokenizer); a sharded one's checkpoint holds no tensors but the RNG's."""
    import parallel
    if init_from not in ("resume", None) and os.path.isdir(init_from) and parallel.sharded_dir(Path(init_from) / "ckpt"):
        init_from, out_dir = "resume", init_from  # finetune.py --init_from=a train.py out_dir of dp_shard > 1
    found = parallel.find_checkpoint(out_dir) if init_from == "resume" else None
    if found and found[1]:
        ckpt = parallel.load_extra(found[0])
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(parallel.full_state_dict(found[0]))
        tok = T.from_spec(ckpt["tokenizer"])
    elif init_from == "resume":
        # on the CPU: RNG states must stay CPU tensors, and the optimizer state need not reach the GPU
        ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt", map_location="cpu")
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        tok = T.from_spec(ckpt["tokenizer"])
    else:
        ckpt = None
        if init_from.startswith("gpt2") and not os.path.isdir(init_from):
            model, tok = from_pretrained(init_from), T.get_tokenizer("gpt2")
        elif os.path.isdir(init_from):
            model = load_hf(init_from)
            tok = hf_tokenizer(init_from, model.config.vocab_size)
        else:
            die(f"init_from='{init_from}' is neither 'resume', a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) "
                f"nor a directory in Hugging Face layout")
    if tok.n_vocab > model.config.vocab_size and grow_vocab:
        new_size = 64 * math.ceil(tok.n_vocab / 64)
        print(f"the model has {model.config.vocab_size} token embeddings, the tokenizer {tok.n_vocab} tokens "
              f"(with the chat tokens): growing the embeddings to {new_size} rows")
        model.resize_vocab(new_size)
    # GPT-2's own 50257 rows lack the chat tokens: text needs only the ids up to end-of-text
    if tok.eot_id >= model.config.vocab_size:
        die(f"the tokenizer's end-of-text id is {tok.eot_id} but the model has only {model.config.vocab_size} "
            f"token embeddings: they do not belong together (check init_from / out_dir)")
    if max(tok.ranks.values()) >= model.config.vocab_size:
        die(f"the tokenizer's text tokens have ids up to {max(tok.ranks.values())} but the model has only "
            f"{model.config.vocab_size} token embeddings: they do not belong together (check init_from / out_dir)")
    return model.to(device), ckpt, tok


def export(out_dir, save_dir, overwrite):
    """out_dir/ckpt.pt as a Hugging Face directory save_dir (model, tokenizer, generation config)."""
    if not save_dir:
        die("give --save_dir=DIR: the directory to write the Hugging Face model into")
    save = Path(save_dir)
    if save.resolve() == Path(out_dir).resolve():
        die(f"save_dir '{save_dir}' is out_dir itself: write the Hugging Face files into another directory")
    if save.exists() and not save.is_dir():
        die(f"save_dir '{save_dir}' exists and is not a directory")
    if save.is_dir() and any(save.iterdir()) and not overwrite:
        die(f"save_dir '{save_dir}' is not empty: choose another --save_dir, or pass --overwrite=True to "
            f"replace the Hugging Face files in it")
    model, ckpt, tok = load_model("resume", out_dir)
    save_hf(model, save, tok, chat=bool(ckpt.get("chat")))
    print(f"saved {Path(out_dir) / 'ckpt.pt'} ({model.num_params() / 1e6:.2f}M parameters, {tok.kind} tokenizer"
          f"{', chat template' if ckpt.get('chat') else ''}) to {save} in Hugging Face layout")


if __name__ == "__main__":
    # config, nanoGPT style (`--key=value`); a dict rather than globals(), as in tokenizer.py
    config = dict(
        out_dir="out",      # the checkpoint to export: out_dir/ckpt.pt
        save_dir="",        # the Hugging Face directory to write (config.json, model.safetensors, tokenizer...)
        overwrite=False,    # write into a save_dir that is not empty (its other files are left alone)
    )
    configure(config)
    export(**config)
