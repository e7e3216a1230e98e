# A Llama-style model (RoPE, RMSNorm, SwiGLU, GQA) of ~150M parameters for one GPU
# (an 80 GB H100 or larger; lower batch_size on smaller cards: accumulation keeps the global batch).
#   python train.py config/llama_1gpu.py      # first fetches 21 GPT-2-tokenized shards (~4 GB)
out_dir = "out-llama-1gpu"
dataset = "fineweb10B"
num_shards = 21             # 2.1B tokens: the 2.1B of max_iters x total_batch_size, seen once
tokenizer = "gpt2"
n_layer, n_head, n_kv_head, n_embd = 12, 12, 4, 768
block_size = 1024
norm, pos, mlp, bias = "rmsnorm", "rope", "swiglu", False
qk_norm, logit_softcap, zero_init, value_embeds, unet = False, 0.0, False, False, False  # exactly GPT-2 / Llama
tie_embeddings = False      # as Llama: 152.8M parameters (114.2M tied)
batch_size = 32
total_batch_size = 262144   # 8 micro-steps of 32 x 1024
max_iters = 8000            # ~2.1B tokens
learning_rate = 1.5e-3
min_lr = 1.5e-4
warmup_iters = 500
optimizer = "adamw"         # the recipe these figures were tuned with
weight_decay = 0.1          # (train.py's default run takes more)
lr_schedule = "wsd"
eval_interval = 250
eval_iters = 20
