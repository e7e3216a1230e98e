"""Tests of model.py and sample.py (merged into test_all.py later). Run: python test_all.py -k model ; -k sample"""
import math
import os
import subprocess
import sys
import tempfile
import unittest
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import model as M

ROOT = Path(__file__).resolve().parent


def need_transformers():
    try:
        import transformers
    except ImportError:
        raise unittest.SkipTest("transformers is not installed (pip install -r requirements-test.txt)")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def scramble(model, seed=0, gain=1.5):
    """Weights large enough that attention is sharp and logits are well apart: with GPT-2's small init,
    attention is nearly uniform and a wrong position or head mapping could go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if 'norm' in name or 'ln' in name else 0.0))
    return model.eval()


def one_thread(fn):
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine every parallel region
    waits for a descheduled worker (30x slower here): run these tests on one thread."""
    def wrapper():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(n)
    wrapper.__name__ = fn.__name__
    return wrapper


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, block_size=24)
    args.update(kw)
    return scramble(M.GPT(M.GPTConfig(**args)), seed)


LLAMA = dict(norm='rmsnorm', pos='rope', mlp='swiglu', bias=False, tie_embeddings=False, n_kv_head=2)


def greedy_reference(model, idx, n):
    """nanoGPT's sampling loop, greedy: recompute the cropped context for every token."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            idx = torch.cat([idx, nxt], dim=1)
    return torch.cat(out, dim=1)


def generated(model, idx, n, **kw):
    return torch.stack(list(model.generate(idx, n, **kw)), dim=1)

# -----------------------------------------------------------------------------
# Hugging Face parity


def check_hf_parity(hf_model, tmp):
    hf_model.eval()
    hf_model.save_pretrained(tmp / 'hf')
    ours = M.load_hf(tmp / 'hf')
    x = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf_model(x).logits, ours(x)[0]
    assert (ref - got).abs().max() < 1e-4, (ref - got).abs().max()
    assert ref.std() > 0.5  # logits that differ: the comparison means something
    hf_greedy = hf_model.generate(x[:1, :6], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=0)[:, 6:]
    assert generated(ours, x[:1, :6], 12, temperature=0).tolist() == hf_greedy.tolist()
    return ours, x, ref


def check_save_hf(ours, hf_class, tmp):
    M.save_hf(ours, tmp / 'ours')
    back = hf_class.from_pretrained(tmp / 'ours').eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (back(x).logits - ours(x)[0]).abs().max()
    assert diff < 1e-4, diff
    again = M.load_hf(tmp / 'ours').state_dict()  # and our own round trip is exact (GPT-2 adds zero biases)
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


@one_thread
def test_model_hf_gpt2_parity():
    tr = need_transformers()
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=24,
                                          bos_token_id=None, eos_token_id=None))
    scramble(hf)
    with tempfile.TemporaryDirectory() as tmp:
        ours, _, _ = check_hf_parity(hf, Path(tmp))
        assert (ours.config.mlp, ours.config.tie_embeddings) == ('gelu_tanh', True)
        check_save_hf(ours, tr.GPT2LMHeadModel, Path(tmp))
        # our nanoGPT-style variant (exact GELU, no biases, untied) is a GPT2LMHeadModel too
        check_save_hf(tiny(mlp='gelu', bias=False, tie_embeddings=False), tr.GPT2LMHeadModel, Path(tmp))


@one_thread
def test_model_hf_llama_gqa_parity():
    tr = need_transformers()
    torch.manual_seed(0)
    hf = tr.LlamaForCausalLM(tr.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            hidden_size=32, intermediate_size=48, vocab_size=97,
                                            max_position_embeddings=24, rope_theta=500.0,
                                            bos_token_id=None, eos_token_id=None))
    scramble(hf)
    with tempfile.TemporaryDirectory() as tmp:
        ours, _, _ = check_hf_parity(hf, Path(tmp))
        assert (ours.config.n_kv_head, ours.config.rope_theta, ours.config.mlp_hidden) == (2, 500.0, 48)
        check_save_hf(ours, tr.LlamaForCausalLM, Path(tmp))
        # multi-query attention, tied embeddings and biases
        check_save_hf(tiny(**dict(LLAMA, n_kv_head=1, tie_embeddings=True, bias=True)), tr.LlamaForCausalLM, Path(tmp))


def test_model_hf_pytorch_bin_and_bad_dirs():
    tr = need_transformers()
    hf = scramble(tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / 'bin'
        d.mkdir()
        (d / 'config.json').write_text(hf.config.to_json_string())
        torch.save(hf.state_dict(), d / 'pytorch_model.bin')  # the older layout
        x = torch.randint(0, 50, (1, 10))
        with torch.no_grad():
            assert (hf(x).logits - M.load_hf(d)(x)[0]).abs().max() < 1e-4
        script = ("import sys, model; model.load_hf(sys.argv[1])")
        (Path(tmp) / 'empty').mkdir()
        bad = Path(tmp) / 'bad'
        bad.mkdir()
        (bad / 'config.json').write_text(hf.config.to_json_string())
        (bad / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2')
        for path, words in ((Path(tmp) / 'empty', 'config.json'), (bad, 'not a valid safetensors')):
            r = subprocess.run([sys.executable, '-c', script, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and words in r.stderr and 'Traceback' not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_model_safetensors_roundtrip():
    tensors = {'f32': torch.randn(3, 5), 'f16': torch.randn(7).half(), 'bf16': torch.randn(2, 3).bfloat16(),
               'i64': torch.arange(5), 'bool': torch.tensor([True, False, True]), 'scalar': torch.tensor(2.5),
               'empty': torch.zeros(0, 4), 'i8': torch.tensor([-1, 2, 3], dtype=torch.int8),
               'after_odd': torch.randn(4, dtype=torch.float64)}  # lands at an offset not a multiple of 8
    with tempfile.TemporaryDirectory() as tmp:
        M.save_safetensors(tensors, Path(tmp) / 'x.safetensors')
        back = M.load_safetensors(Path(tmp) / 'x.safetensors')
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        return
    with tempfile.TemporaryDirectory() as tmp:  # and the reference implementation agrees both ways
        M.save_safetensors(tensors, Path(tmp) / 'ours.safetensors')
        assert all(torch.equal(load_file(Path(tmp) / 'ours.safetensors')[k], t) for k, t in tensors.items())
        save_file(tensors, Path(tmp) / 'ref.safetensors')
        assert all(torch.equal(M.load_safetensors(Path(tmp) / 'ref.safetensors')[k], t) for k, t in tensors.items())


def test_model_from_pretrained_cache_and_offline():
    ours = tiny(mlp='gelu_tanh')
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / 'cache'
        M.save_hf(ours, cache / 'openai-community--gpt2')  # already downloaded: nothing to fetch
        got = M.from_pretrained('gpt2', cache_dir=cache)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ours.state_dict().values()))
        # nothing cached and no network (a closed local port stands in for an offline machine)
        env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9', HF_HUB_CACHE=str(Path(tmp) / 'hub'))
        r = subprocess.run([sys.executable, '-c', f"import model; model.from_pretrained('gpt2-xl', cache_dir={str(cache)!r})"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
        assert 'could not download' in r.stderr and '--init_from=' in r.stderr, r.stderr
        assert not any((cache / 'openai-community--gpt2-xl').glob('*')), "no half-written files left behind"

# -----------------------------------------------------------------------------
# generation


@one_thread
def test_model_kv_cache_equals_recompute():
    # float64 so that "equal" means the algorithm, not rounding luck
    for style in (dict(), LLAMA, dict(LLAMA, n_kv_head=1)):
        model = tiny(**style).double()
        for T in (5, 24, 30):  # short prompt crossing block_size 24 while generating, exactly full, longer than it
            idx = torch.randint(0, 97, (3, T), generator=torch.Generator().manual_seed(T))
            ref = greedy_reference(model, idx, 30)
            assert generated(model, idx, 30, temperature=0).tolist() == ref.tolist(), (style, T)
            assert generated(model, idx, 30, temperature=0, use_cache=False).tolist() == ref.tolist(), (style, T)
        # samples of one prompt share its prefill: greedy, every sample is the single-sample continuation
        idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
        many = generated(model, idx, 10, temperature=0, num_samples=3)
        assert many.tolist() == greedy_reference(model, idx.repeat_interleave(3, 0), 10).tolist()


@one_thread
def test_model_kv_cache_logits_match():
    """The cached decode computes the same logits as the full forward (fp32 tolerance)."""
    for style in (dict(), LLAMA):
        model = tiny(**style)
        idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
        c = model.config
        cache = [(torch.zeros(2, c.n_kv_head, 20, c.n_embd // c.n_head), torch.zeros(2, c.n_kv_head, 20, c.n_embd // c.n_head))
                 for _ in range(c.n_layer)]
        with torch.no_grad():
            full = model(idx)[0]
            steps = [model._run(idx[:, :8], cache, pos=0)]
            steps += [model._run(idx[:, t:t + 1], cache, pos=t) for t in range(8, 20)]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


@one_thread
def test_model_sampling_options():
    model = tiny(**LLAMA)
    idx = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = generated(model, idx, 15, temperature=0)
    a = generated(model, idx, 15, temperature=1.0, seed=7, num_samples=4)
    assert a.tolist() == generated(model, idx, 15, temperature=1.0, seed=7, num_samples=4).tolist()  # seeded
    assert len({tuple(r) for r in a.tolist()}) > 1  # the samples differ from one another
    assert generated(model, idx, 15, top_k=1, seed=1).tolist() == greedy.tolist()
    assert generated(model, idx, 15, top_p=1e-6, seed=1).tolist() == greedy.tolist()
    assert generated(model, idx, 15, top_k=5, top_p=1e-6, seed=1).tolist() == greedy.tolist()
    # top_k / top_p only ever pick tokens inside their set
    logits = torch.randn(64, 97, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        picks = M.sample_next(logits, 1.0, top_k=3, generator=g)
        assert all(p in row.topk(3).indices for p, row in zip(picks, logits))
        probs = logits.softmax(-1)
        picks = M.sample_next(logits, 1.0, top_p=0.5, generator=g)
        for p, row in zip(picks, probs):  # the mass of tokens more likely than the pick is below top_p
            assert row[row > row[p]].sum() <= 0.5
    # stop tokens: a row yields its stop token, then -1; generation ends when every row has stopped
    idx2 = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    free = generated(model, idx2, 12, temperature=0)
    stop = free[0, 3].item()
    steps = generated(model, idx2, 12, temperature=0, stop_tokens=(stop,))
    first = [row.tolist().index(stop) if stop in row.tolist() else None for row in free]
    for r, row in enumerate(steps.tolist()):
        end = first[r] if first[r] is not None else len(row) - 1
        assert row[:end + 1] == free[r, :end + 1].tolist() and all(t == -1 for t in row[end + 1:])
    if all(f is not None for f in first):
        assert steps.size(1) == max(first) + 1
    # streaming: tokens come one step at a time, each an ordinary tensor
    gen = model.generate(idx, 3, temperature=0)
    step = next(gen)
    assert step.shape == (1,) and not step.is_inference() and step.item() == greedy[0, 0].item()
    assert model.training is False


@one_thread
def test_model_forward_loss_and_params():
    model = tiny(vocab_size=50)
    x = torch.randint(0, 50, (2, 10))
    y = torch.randint(0, 50, (2, 10))
    y[0, :4] = -1
    logits, loss = model(x, y)
    assert logits.shape == (2, 10, 50) and model(x)[1] is None
    keep = y.view(-1) != -1
    ref = F.cross_entropy(logits.view(-1, 50)[keep], y.view(-1)[keep])
    assert torch.allclose(loss, ref)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.device('meta'):  # no memory, no init time
        gpt2 = M.GPT(M.GPTConfig(**M.PRESETS['gpt2']))
        for name in M.PRESETS:
            M.GPT(M.GPTConfig(**M.PRESETS[name]))
    assert gpt2.num_params() == 124_439_808
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    # PaLM's estimate: 6N + 12 L H Q T
    assert gpt2.flops_per_token() == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert model.estimate_mfu(1000.0) is None  # CPU: no peak to compare with
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


@one_thread
def test_model_resize_vocab_and_crop():
    for tie in (True, False):
        model = tiny(vocab_size=50, tie_embeddings=tie)
        x = torch.randint(0, 50, (2, 10))
        with torch.no_grad():
            before = model(x)[0]
            model.resize_vocab(55)
            after = model(x)[0]
        assert after.shape[-1] == 55 and torch.equal(after[..., :50], before)
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie
        assert model.num_params() == tiny(vocab_size=55, tie_embeddings=tie).num_params()
    for style in (dict(), LLAMA):
        model = tiny(**style)
        x = torch.randint(0, 97, (2, 12))
        with torch.no_grad():
            before = model(x)[0]
            model.crop_block_size(12)
            assert torch.equal(model(x)[0], before) and model.config.block_size == 12


@one_thread
def test_model_training_gqa_and_dropout():
    """Loss goes down on a fixed batch, for both styles, with dropout on (the training path)."""
    for style in (dict(dropout=0.1), dict(LLAMA, dropout=0.1)):
        torch.manual_seed(0)
        model = M.GPT(M.GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16, **style))
        opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
        x = torch.randint(0, 50, (4, 16))
        losses = []
        for _ in range(30):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], losses

# -----------------------------------------------------------------------------
# sample.py


def write_checkpoint(path, model, tokenizer=None):
    import common
    common.save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config),
                                tokenizer=tokenizer or {'kind': 'byte', 'path': None}), path)


def chain_model(chain, eot=256):
    """A byte-level model whose greedy continuation of chain[0] is chain[1:] then <|endoftext|>:
    each token's embedding is one-hot and the lm_head row of the next token points at it."""
    model = M.GPT(M.GPTConfig(n_layer=1, n_head=1, n_embd=264, vocab_size=261, block_size=16, bias=False,
                              tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f:
            n.weight.fill_(1.0)
        model.transformer.wte.weight[:, :261] = torch.eye(261)
        for prev, nxt in zip(chain, chain[1:] + [eot]):
            model.lm_head.weight[nxt, prev] = 1.0
    return model


def run_sample(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / 'sample.py'), *args], cwd=cwd, capture_output=True,
                          text=True, encoding='utf-8', timeout=120)


def test_sample_streams_utf8():
    # 'é' and '☃' are 2 and 3 bytes: every byte a token, so characters arrive split across tokens
    text = 'é☃b'
    chain = [ord('a')] + list(text.encode('utf-8'))
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / 'out' / 'ckpt.pt', chain_model(chain))
        r = run_sample(tmp, '--start=a', '--temperature=0', '--num_samples=2', '--max_new_tokens=10', '--device=cpu')
        assert r.returncode == 0, r.stderr
        assert r.stdout == ('a' + text + '\n---------------\n') * 2, repr(r.stdout)
        assert 'tokens/s' in r.stderr
        # a prompt longer than the context is cropped, with a warning
        (Path(tmp) / 'p.txt').write_text('z' * 40 + 'a')
        r = run_sample(tmp, '--start=FILE:p.txt', '--temperature=0', '--num_samples=1', '--device=cpu')
        assert r.returncode == 0 and 'warning' in r.stderr and 'keeping the last 16' in r.stderr, r.stderr
        assert r.stdout == 'z' * 15 + 'a' + text + '\n---------------\n', repr(r.stdout)


def test_sample_bad_input():
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / 'out' / 'ckpt.pt', tiny(vocab_size=261, block_size=16))
        write_checkpoint(Path(tmp) / 'small' / 'ckpt.pt', tiny(vocab_size=64))  # byte tokenizer needs 261
        cases = [(['--out_dir=missing'], 'no checkpoint'),
                 (['--out_dir=small'], 'tokenizer has 261 tokens'),
                 (['--start='], 'prompt is empty'),
                 (['--start=FILE:nope.txt'], 'not found'),
                 (['--temperature=-1'], 'temperature')]
        for args, words in cases:
            r = run_sample(tmp, *args, '--device=cpu', '--max_new_tokens=3')
            assert r.returncode == 2, (args, r.returncode, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], (args, r.stderr)
            assert r.stdout == ''
