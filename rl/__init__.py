"""The RL algorithm's math: pure torch, no model code, so every piece is tested on
hand-written tensors (tests/rl).

    trajectory.py   the Rollout record and its shapes
    masked.py       means, variances and whitening over real tokens
    tokens.py       EOS truncation, sequence lengths, log-probs and entropy
    rewards.py      score normalisation, the missing-EOS penalty, KL shaping, KL controllers
    advantages.py   advantage estimators behind one signature (ESTIMATORS)
    losses.py       the clipped policy and value losses
"""
