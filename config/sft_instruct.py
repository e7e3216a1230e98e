# SFT on the shared instruction data (1,100 Alpaca-style records; 110 held out by a fixed permutation)
#   python finetune.py config/sft_instruct.py     then     python dpo.py config/dpo_instruct.py
init_from = "out"
out_dir = "out-sft-instruct"
data = "../shared/data/instruction-data.json"
epochs = 6              # a small set: more passes (the best held-out checkpoint is kept)
eval_interval = 25
