"""TRL's RewardTrainer taught K-wise rankings. Its own collator and loss assume one
chosen and one rejected completion per row; ours keep a prompt's K completions
together and average the loss over the prompt's pairs (stages.rm_ranking). Kept apart
from stages/rm.py so that reading a config never imports trl."""

from __future__ import annotations

from trl import RewardTrainer

from engine.forward import packed_scores
from stages import rm_ranking as ranking


class RankingRewardTrainer(RewardTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # stages.rm.encode has tokenised and cut every row already

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["input_ids", "prompt_length", "better", "worse", "margins"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = packed_scores(model, inputs)
        better, worse, group, margins = (inputs[k] for k in ("better", "worse", "group", "margins"))
        loss = ranking.ranking_loss(rewards, better, worse, group, margins, self.args.center_rewards_coefficient or 0.0)
        mode = "train" if model.training else "eval"
        for key, value in ranking.pairwise_stats(rewards, better, worse).items():
            self._metrics[mode][key].append(value)
        return (loss, {"rewards": rewards}) if return_outputs else loss
