"""
Sample from a trained model (out_dir/ckpt.pt), from GPT-2 (--init_from=gpt2) or from a Hugging Face
directory (--init_from=/path/to/dir). Tokens stream to stdout as they are generated; the rate goes to stderr.
    python sample.py --out_dir=out --start="To be" --num_samples=3 --max_new_tokens=200 --temperature=0.8
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --top_p=0.95 --seed=1
    python sample.py --quantize=int8 --compile=True --temperature=0   # the fastest batch-1 decoding on a CPU
    python sample.py --out_dir=out-dpo --chat=True              # chat with a fine-tuned model (finetune.py, dpo.py)
    python sample.py --out_dir=out-dpo --chat=True --start="What does `json.dumps` do?"   # one reply
"""
import codecs
import os
import sys
import time
from pathlib import Path

import torch

from common import check_compiler, configure, die, pick_device, precision
from hf import load_model
from quant import check_mode, for_decoding

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', ..., or a Hugging Face model directory
out_dir = 'out'
start = "\n"          # the prompt, or FILE:path to read it from a file ('<|endoftext|>' for unconditional samples)
num_samples = 3       # samples of the same prompt, generated together (one shared prefill)
max_new_tokens = 200
temperature = 0.8     # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200           # sample only from the top_k most likely tokens (None = all)
top_p = 1.0           # ...and from the smallest set of them whose probability reaches top_p (1.0 = off)
seed = 1337
stop_at_eot = True    # a sample ends at <|endoftext|>
device = 'auto'       # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
chat = False          # chat in the template of a fine-tuned model: messages from stdin, or one reply to --start
quantize = ''         # '' | 'int8' | 'int4': decode with quantized weights on the CPU (quant.py)
compile = False       # torch.compile the one-token decode step: ~10-30 s first, then 1.2-4x faster at batch 1 on a CPU
config = configure(globals())
# -----------------------------------------------------------------------------

if num_samples < 1 or max_new_tokens < 1:
    die(f"num_samples ({num_samples}) and max_new_tokens ({max_new_tokens}) must be at least 1")
if temperature < 0 or (top_k is not None and top_k < 1) or not 0 < top_p <= 1:
    die(f"need temperature >= 0, top_k >= 1 or None, 0 < top_p <= 1 (got {temperature}, {top_k}, {top_p})")
check_mode(quantize)
device = pick_device(device)
if compile:
    check_compiler(device)
model, ckpt, tok = load_model(init_from, out_dir, device)
model = for_decoding(model.eval(), quantize, device)
if compile:
    model.compile_decoding()  # (a chat compiles during its first reply)

if start.startswith('FILE:'):
    path = Path(start[len('FILE:'):])
    if not path.is_file():
        die(f"prompt file {path} not found (--start=FILE:path reads the prompt from a file)")
    start = path.read_text(encoding='utf-8')
_, ctx = precision(device)  # bf16 autocast on GPUs that have it, as in training; float32 elsewhere
if chat:  # replies stream and end at <|end|>; the prompt is the conversation in the chat template
    from chat_data import chat_session
    chat_session(model, tok, ckpt, None if start == "\n" else start, max_new_tokens, temperature, top_k, top_p,
                 seed, device, ctx)
    sys.exit(0)
ids = tok.encode(start, allowed_special='all')
if not ids:
    die("the prompt is empty: give --start=TEXT, --start=FILE:path, or --start='<|endoftext|>' for unconditional samples")
if max(ids) >= model.config.vocab_size:
    die(f"the prompt uses token id {max(ids)} (a special token?) but the model only has {model.config.vocab_size} tokens")
block_size = model.config.block_size
if len(ids) > block_size:
    print(f"warning: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
          f"keeping the last {block_size}", file=sys.stderr)
    ids = ids[-block_size:]

stop = (tok.eot_id,) if stop_at_eot else ()
prompt_text = tok.decode(ids)
# one incremental UTF-8 decoder per sample: a character split across tokens prints once it is whole
decoders = [codecs.getincrementaldecoder('utf-8')(errors='replace') for _ in range(num_samples)]
pending = [prompt_text for _ in range(num_samples)]  # text not yet printed, per sample
finished = [False] * num_samples
shown = 0  # the sample being streamed; the others are buffered until it ends


def show(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def advance():
    """Print the finished samples in order, then whatever the next unfinished one has so far."""
    global shown
    while shown < num_samples:
        show(pending[shown])
        pending[shown] = ''
        if not finished[shown]:
            return
        show('\n---------------\n')
        shown += 1


x = torch.tensor([ids], dtype=torch.long, device=device)
if compile:  # compile before the clock starts: three steps of the same shapes as the run (a prefill, two compiled)
    t0 = time.time()
    with ctx:
        for i, _ in enumerate(model.generate(x, max_new_tokens, num_samples=num_samples)):
            if i == 2:
                break
    print(f"compiled the decode step in {time.time() - t0:.1f}s", file=sys.stderr)
n_tokens, t0 = 0, time.time()
try:
    with ctx:
        for step in model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop_tokens=stop, seed=seed, num_samples=num_samples):
            for i, t in enumerate(step.tolist()):
                if finished[i]:
                    continue
                if t == -1 or t in stop:
                    finished[i] = True
                    continue
                n_tokens += 1
                piece = tok.decode_bytes([t]) if t < tok.n_vocab else b''  # a padded vocab row has no text
                pending[i] += decoders[i].decode(piece)
            advance()
    finished = [True] * num_samples
    for i in range(num_samples):
        pending[i] += decoders[i].decode(b'', final=True)
    advance()
except BrokenPipeError:  # piped into e.g. `head`, which has seen enough
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
dt = time.time() - t0
print(f"{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s ({num_samples} sample(s) in one batch on {device}"
      f"{', compiled' if compile else ''})",
      file=sys.stderr)
