# Fine-tune OpenAI's GPT-2 on tiny Shakespeare (nanoGPT's finetune_shakespeare), the classic first run:
#   python train.py config/finetune_shakespeare.py              # gpt2 (124M); --init_from=gpt2-xl as nanoGPT
# GPT-2 needs data in its own tokens: this prepares data/shakespeare-gpt2 with the GPT-2 tokenizer. Its 50257
# embedding rows cover them (the chat tokens above <|endoftext|> never occur in pretraining data).
init_from = "gpt2"
out_dir = "out-shakespeare"
dataset = "shakespeare"
data_root = "data/gpt2"          # apart from a shakespeare prepared with our own BPE
tokenizer = "gpt2"
block_size = 1024                # GPT-2's whole context
batch_size = 1
total_batch_size = 32768         # 32 micro-steps of 1 x 1024 tokens, as nanoGPT's gradient accumulation
max_iters = 20
learning_rate = 3e-5             # constant, as nanoGPT (decay_lr = False)
min_lr = 3e-5
warmup_iters = 0
optimizer = "adamw"         # the recipe these figures were tuned with
weight_decay = 0.1          # (train.py's default run takes more)
lr_schedule = "cosine"
eval_interval = 5
eval_iters = 40
always_save_checkpoint = False   # only when val loss improves
