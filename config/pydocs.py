# The default run (python train.py): a small Llama-style model on the embedded Python-docs corpus.
# 6-9 minutes on a 2-core CPU. Every value here equals train.py's default; copy and edit.
out_dir = "out"
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
mlp = "relu2"
bias = False
tie_embeddings = False
qk_norm, logit_softcap, zero_init = True, 0.0, True
optimizer = "muon"
muon_lr = 0.02
lr_schedule = "cosine"
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 250
warmup_iters = 50
eval_interval = 50
eval_iters = 10
