"""What the stages share, so that no stage imports another:

    settings.py     LoRA settings and the trainer settings common to SFT and RM
    training.py     TRL Trainer pieces: arguments, checkpoint markers, the merged-LoRA save
    data.py         reading rows with file:line errors: SFT examples, prompts, splits
    preferences.py  ranked completions (K-wise, pairs, dialogues) for the reward model
    judge.py        loading a `module:function` judge, and the reward model's score stats
"""
