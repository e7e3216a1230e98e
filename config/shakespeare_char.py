# Tiny Shakespeare with the byte tokenizer (character level: the text is ASCII), GPT-2 style,
# as in nanoGPT's shakespeare_char. On CPU it is nanoGPT's "baby" model; on a GPU, its 6x384 model.
import torch

out_dir = "out-shakespeare-char"
dataset = "shakespeare"
tokenizer = "byte"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # it overfits: keep the best val checkpoint
# GPT-2 style, as nanoGPT
norm = "layernorm"
pos = "learned"
mlp = "gelu"
tie_embeddings = True
qk_norm, logit_softcap, zero_init, value_embeds, unet = False, 0.0, False, False, False  # exactly GPT-2 / Llama
bias = False
n_kv_head = None
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99  # a small batch: average the second moment over more steps
warmup_iters = 100
optimizer = "adamw"         # the recipe these figures were tuned with
weight_decay = 0.1          # (train.py's default run takes more)
lr_schedule = "cosine"
if torch.cuda.is_available():
    n_layer, n_head, n_embd, dropout = 6, 6, 384, 0.2
    block_size, batch_size = 256, 64
    max_iters = 5000
else:  # the "baby" CPU model
    n_layer, n_head, n_embd, dropout = 4, 4, 128, 0.0
    block_size, batch_size = 64, 12
    max_iters = 2000
    eval_iters = 20
    pad_vocab = 1  # 261 byte tokens as they are: padding to 320 costs ~6% of a step at this size
total_batch_size = block_size * batch_size
lr_decay_iters = max_iters
