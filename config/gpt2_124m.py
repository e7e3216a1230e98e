# GPT-2 (124M) on FineWeb10B, 8 GPUs: the llm.c / nanoGPT reproduction.
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# (rank 0 first fetches 101 GPT-2-tokenized shards, ~20 GB; or run prepare.py --dataset=fineweb10B --num_shards=101)
out_dir = "out-gpt2-124m"
dataset = "fineweb10B"
num_shards = 101            # 10.1B tokens: the 10.0B of max_iters x total_batch_size, seen once
tokenizer = "gpt2"
# exactly GPT-2's architecture (vocab padded from 50257 to 50304)
n_layer, n_head, n_embd = 12, 12, 768
n_kv_head = None
block_size = 1024
norm, pos, mlp, bias = "layernorm", "learned", "gelu", True
tie_embeddings = True
qk_norm, logit_softcap, zero_init, value_embeds, unet = False, 0.0, False, False, False  # exactly GPT-2 / Llama
dropout = 0.0
# ~0.5M tokens per step: 8 GPUs x 64 x 1024, no accumulation; 19073 steps = 10B tokens
batch_size = 64
total_batch_size = 524288
max_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
optimizer = "adamw"         # the recipe these figures were tuned with
lr_schedule = "cosine"
weight_decay = 0.1
eval_interval = 250
eval_iters = 20
log_interval = 10
