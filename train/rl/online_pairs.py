"""Online DPO: preference pairs from the policy's own samples, drawn anew round after round.

Offline DPO learns from the SFT model's samples only; once the policy moves, those pairs
describe a model it no longer is, and a reply it now writes is never compared with
anything. Online (iterated) DPO asks the current policy instead:

    round r:  round_prompts training prompts, spread over the tasks and their forms
              (rollouts.py: PromptPicker), drawn from (seed, r)
              K (train_samples) replies to each from the current policy, temperature 1, judged
              (preference_data.py: sample_groups, data/judge.py)
              only right-over-wrong pairs (choose_pairs with wrong_pairs=0): a prompt
              the policy always or never gets right gives none
              log pi_ref of every reply (the frozen SFT model), once
              one pass over the round's pairs with DPO's loss; then round r + 1

The round's pairs go into the checkpoint as plain values, so a resumed run finishes the
round it stopped in with the very same pairs.
"""

import dataclasses

import numpy as np

from data.batching import LengthGroupedLoader
from data.preferences import RenderedGroup, collate_groups
from errors import UserError

from .preference_data import PreferencesConfig, rendered, sample_groups
from .rollouts import PromptPicker, form_weights

MAX_EMPTY_ROUNDS = 10  # rounds without a single pair before giving up


class OnlinePairs:
    """A batch source (train/core/trainer.py: Batches) of DPO pairs sampled from the
    policy as it trains, one round at a time (module docstring)."""

    def __init__(
        self, policy, reference_logps, tok, tasks, p: PreferencesConfig, settings, rt, log
    ) -> None:
        """reference_logps(groups): attaches log pi_ref to the rendered groups (dpo.py);
        tasks: the built-in TaskSet (training items to ask; test items give the forms'
        shares); settings: DPOSettings (round_prompts, batch_size, seed)."""
        self.policy, self.reference_logps, self.tok = policy, reference_logps, tok
        self.p, self.s, self.rt, self.log = p, settings, rt, log
        self.picker = PromptPicker(tasks.train, form_weights(tasks.test), balanced=True)
        self.round, self.groups, self.loader = 0, [], None

    def new_round(self) -> None:
        """Sample, judge and render the next round's pairs; a new pass over them."""
        rng = np.random.default_rng([self.s.seed, self.round, 7])
        items = self.picker.draw(self.s.round_prompts, rng)
        seed = self.p.seed + 1_000_003 * (self.round + 1)
        p = dataclasses.replace(self.p, seed=seed, samples=self.p.train_samples)
        was_training = self.policy.training
        self.policy.eval()
        with self.rt.autocast():
            groups = sample_groups(self.policy, self.tok, items, p, self.rt.device, 0, self.log, 0)
        self.policy.train(was_training)
        T = self.policy.config.block_size
        self.groups = rendered(self.tok, groups, T, f"round {self.round} pairs", self.log)
        self.reference_logps(self.groups)
        self.round += 1
        self.loader = self._loader(step=0)

    def _loader(self, step: int) -> LengthGroupedLoader | None:
        if not self.groups:  # nothing to compare this round: the next one will have
            return None
        loader = LengthGroupedLoader(
            self.groups,
            lambda g: g.length,
            lambda gs: collate_groups(gs, self.tok.pad_id),
            self.s.batch_size,
            self.s.seed + self.round,
            self.rt.rank,
            self.rt.world_size,
        )
        loader.step = step
        return loader

    def next_batch(self) -> dict:
        for _ in range(MAX_EMPTY_ROUNDS):
            if self.loader is not None and self.loader.epoch < 1.0:
                return self.loader.next_batch()
            self.new_round()  # this round's pairs are used up (or there were none)
        raise UserError(
            f"online DPO: {MAX_EMPTY_ROUNDS} rounds in a row gave no right-over-wrong pair "
            "(the policy answers every prompt always or never right); raise round_prompts "
            "or preferences.samples, or train offline with online=false"
        )

    def state_dict(self) -> dict:
        """The round and its pairs, as plain values (torch.load(weights_only=True))."""
        return {
            "round": self.round,
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "step": self.loader.step if self.loader is not None else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.groups = [RenderedGroup(**g) for g in state["groups"]]
        self.loader = self._loader(int(state["step"]))
