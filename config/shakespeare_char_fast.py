# Our fastest CPU recipe for tiny Shakespeare at the byte level: Llama style (RoPE, RMSNorm, SwiGLU),
# a higher learning rate and fewer steps. Target: nanoGPT's baby val loss (1.886) in under half its time.
out_dir = "out-shakespeare-char-fast"
dataset = "shakespeare"
tokenizer = "byte"
norm, pos, mlp, bias = "rmsnorm", "rope", "swiglu", False
n_layer, n_head, n_kv_head, n_embd = 4, 4, 4, 128
dropout = 0.0
block_size, batch_size = 64, 16
total_batch_size = 1024
learning_rate = 3e-3
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 30
max_iters = 500
lr_decay_iters = 500
eval_interval = 100
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
