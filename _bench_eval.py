"""Benchmarks of eval.py (merged into bench.py later): batched log-likelihood scoring (one padded forward per
batch of options) against one forward per option, on the default model's shape (random weights)."""
import contextlib
import io
import random
import time

import torch

import eval as E
import model as M


def default_shape_model():
    """train.py's default architecture: 4 layers, 256 wide, GQA 4/2, RoPE, SwiGLU, vocab 4096, context 256."""
    torch.manual_seed(0)
    return M.GPT(M.GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                             bias=False, norm="rmsnorm", pos="rope", mlp="swiglu")).eval()


def bench_eval_batched_scoring():
    """Options per second, 4 options per question, contexts of 20-100 tokens and options of 5-30 tokens (the
    pydocs task's range). Baseline: the first 40 of the same requests, one forward each (batch_tokens=1)."""
    model = default_shape_model()
    rng = random.Random(0)
    reqs = []
    for q in range(50):
        ctx = [rng.randrange(4091) for _ in range(rng.randrange(20, 100))]
        reqs += [(ctx, [rng.randrange(4091) for _ in range(rng.randrange(5, 30))]) for _ in range(4)]
    rows = []
    results = {}
    for name, budget, n in (("one option per forward", 1, 40), ("batched, 2048 tokens", 2048, len(reqs)),
                            ("batched, 8192 tokens (default)", 8192, len(reqs))):
        with contextlib.redirect_stderr(io.StringIO()):
            E.loglikelihoods(model, reqs[:8], budget)  # warm-up
            t0 = time.perf_counter()
            results[name] = E.loglikelihoods(model, reqs[:n], budget)
            dt = time.perf_counter() - t0
        rows.append((name, n / dt, dt))
    base = rows[0][1]
    ref = results["one option per forward"]
    worst = max(abs(a[0] - b[0]) for r in results.values() for a, b in zip(r, ref))
    print(f"{'scoring (threads=' + str(torch.get_num_threads()) + ')':<34} "
          f"{'options/s':>10} {'seconds':>8} {'vs one-by-one':>14}")
    for name, rate, dt in rows:
        print(f"{name:<34} {rate:>10.1f} {dt:>8.2f} {rate / base:>13.2f}x")
    print(f"largest log-likelihood difference between the three: {worst:.2e} nats")


def bench_eval_lm_throughput():
    """Tokens per second of the bits-per-byte pass (full windows of block_size) for the default shape."""
    import numpy as np
    model = default_shape_model()
    stream = np.random.default_rng(0).integers(0, 4091, 32 * 256 + 1)
    with contextlib.redirect_stderr(io.StringIO()):
        E.stream_loss(model, stream[:257], 8192)
        t0 = time.perf_counter()
        _, n = E.stream_loss(model, stream, 8192)
        dt = time.perf_counter() - t0
    print(f"lm pass: {n} tokens in {dt:.2f}s = {n / dt:,.0f} tokens/s (threads={torch.get_num_threads()})")
