"""Benchmarks of model.py (merged into bench.py later): batch-1 greedy decoding speed on CPU."""
import tempfile
import time

import torch
import torch.nn.functional as F

import model as M


def _tokens_per_sec(fn, n):
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def _weights_floor(model):
    """tok/s if a token cost nothing but one pass over every weight matrix (matrix-vector products):
    batch-1 decoding reads all weights per token, so memory bandwidth caps it near this figure."""
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {n: torch.randn(1, n) for n in {w.shape[1] for w in mats}}

    def one_token(n):
        for _ in range(n):
            for w in mats:
                F.linear(x[w.shape[1]], w)
    one_token(3)
    return _tokens_per_sec(one_token, 50)


def _decode_row(name, config, new_tokens, recompute_tokens, hf_class):
    torch.manual_seed(0)
    model = M.GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 16))

    def ours(use_cache):
        def run(n):
            for _ in model.generate(prompt, n, temperature=0, use_cache=use_cache):
                pass
        return run
    ours(True)(20)  # warm-up
    row = {'model': name, 'kv': _tokens_per_sec(ours(True), new_tokens)}
    row['recompute'] = _tokens_per_sec(ours(False), recompute_tokens) if recompute_tokens else None
    row['floor'] = _weights_floor(model)
    row['hf'] = None
    if hf_class is not None:
        with tempfile.TemporaryDirectory() as tmp:
            M.save_hf(model, tmp)
            hf = hf_class.from_pretrained(tmp).eval()

        def hf_run(n):
            with torch.no_grad():
                out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            assert out.shape[1] == prompt.shape[1] + n
        hf_run(20)  # warm-up
        row['hf'] = _tokens_per_sec(hf_run, new_tokens)
        # the same weights: both produce the same greedy tokens
        ours_tokens = torch.stack(list(model.generate(prompt, 20, temperature=0)), 1)
        with torch.no_grad():
            hf_tokens = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)[:, 16:]
        row['same_tokens'] = ours_tokens.tolist() == hf_tokens.tolist()
    return row


def bench_decode():
    """Batch-1 greedy decoding on CPU: our KV cache vs recomputing the context (nanoGPT's loop) vs
    transformers' generate() on the same weights (save_hf -> GPT2LMHeadModel.from_pretrained)."""
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        hf_class = transformers.GPT2LMHeadModel
    except ImportError:
        hf_class = None
        print("transformers not installed: no comparison with transformers.generate")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt 16 tokens, greedy, float32")
    rows = [
        _decode_row('6L 384w, vocab 4096, 500 new', M.GPTConfig(n_layer=6, n_head=6, n_embd=384, vocab_size=4096,
                                                                block_size=1024), 500, 500, hf_class),
        _decode_row('gpt2 124M, vocab 50257, 200 new', M.GPTConfig(**M.PRESETS['gpt2']), 200, 0, hf_class),
    ]
    targets = {rows[0]['model']: (10, 3), rows[1]['model']: (None, 1.3)}
    fmt = lambda v, spec: '-' if v is None else format(v, spec)
    print(f"{'model':34} {'KV tok/s':>9} {'recompute':>9} {'HF gen':>8} {'KV/recomp':>10} {'KV/HF':>6} "
          f"{'targets':>12} {'weights floor':>13} {'same tokens as HF':>17}")
    for r in rows:
        t_rec, t_hf = targets[r['model']]
        ratio_rec = r['kv'] / r['recompute'] if r['recompute'] else None
        ratio_hf = r['kv'] / r['hf'] if r['hf'] else None
        tgt = f">={t_rec}x, " if t_rec else ""
        print(f"{r['model']:34} {r['kv']:9.1f} {fmt(r['recompute'], '9.1f'):>9} {fmt(r['hf'], '8.1f'):>8} "
              f"{fmt(ratio_rec, '9.1f') + 'x' if ratio_rec else '-':>10} {fmt(ratio_hf, '5.2f') + 'x' if ratio_hf else '-':>6} "
              f"{tgt + f'>={t_hf}x':>12} {r['floor']:13.1f} {str(r.get('same_tokens', '-')):>17}")
