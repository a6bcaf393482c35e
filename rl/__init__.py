"""The RL algorithm's math: pure torch, no model code, so every piece is tested on
hand-written tensors (tests/rl).

    trajectory.py   the Rollout record and its shapes
    masked.py       means, variances and whitening over real tokens
    tokens.py       EOS truncation, sequence lengths, log-probs and entropy
    kl.py           the k1, k2 and k3 estimators of KL to the reference
    rewards.py      normalising and combining reward sources, the missing-EOS penalty,
                    KL shaping, KL controllers
    advantages.py   advantage estimators behind one signature (ESTIMATORS): GAE and
                    the critic-free group ones (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline)
    losses.py       the clipped policy and value losses, the KL loss term, loss aggregation
"""
