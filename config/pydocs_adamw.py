# The default run before Muon and the modded-nanogpt switches (python train.py until 2026-12): bench.py's
# bench_recipe times it as the baseline of the new default. About 6.5 minutes on a 2-core CPU, val bpb ~2.27.
out_dir = "out-adamw"
dataset = "pydocs"
tokenizer = "bpe"
vocab_size = 4096
block_size = 256
batch_size = 16
total_batch_size = 8192
n_layer = 4
n_head = 6
n_kv_head = 2
n_embd = 192
norm = "rmsnorm"
pos = "rope"
mlp = "swiglu"
bias = False
tie_embeddings = True
qk_norm, logit_softcap, zero_init, dropout = False, 0.0, False, 0.0
optimizer = "adamw"
lr_schedule = "cosine"
lr_decay_iters = 0
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 250
warmup_iters = 50
eval_interval = 50
eval_iters = 10
