# DPO on the shared preference data: the same 1,100 instructions with a polite (chosen) and an impolite
# (rejected) reply. Same length as instruction-data.json, so the same 110 records are held out as in SFT.
#   python finetune.py config/sft_instruct.py     then     python dpo.py config/dpo_instruct.py
init_from = "out-sft-instruct"
out_dir = "out-dpo-instruct"
data = "../shared/data/instruction-data-with-preference.json"
epochs = 3
eval_interval = 50
