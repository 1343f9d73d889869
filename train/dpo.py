"""python -m train.dpo: Direct Preference Optimization (make dpo), Rafailov et al. 2023.

The preference objective without a reward model and without sampling:

    policy, and a frozen reference: both the SFT weights at the start
    data: the reward model's preference set (built in: the SFT model's samples ranked by
          the tasks' judge, train/rl/preference_data.py; generated here when missing; only
          its right-over-wrong pairs by default, min_chosen_score) and/or the user's
          preference files, in the layouts the reward model reads, every pair of them
          online (the default with the built-in set): pairs sampled from the policy itself,
          round after round, right over wrong (train/rl/online_pairs.py); the preference
          set's validation and test pairs are still what is reported
    log pi_ref(y | x) of every response computed once, before training, and reused
    best.pt chosen on the validation pairs (the implicit reward orders them), the test
    items scored at the end beside the SFT model's, with McNemar's paired test
    train with the shared loop on (train/rl/losses.py: dpo_loss)

        h    = beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ]
        loss = -log sigmoid(h)          (with label smoothing s: -(1-s) log s(h) - s log s(-h))

    log-probabilities summed over the response's tokens only (the chat format's mask).

It optimises the same objective as PPO against a reward model with a KL penalty: the
optimal policy of max E[r] - beta KL(pi || pi_ref) is pi_ref exp(r / beta) / Z, so
r = beta log(pi / pi_ref) + beta log Z, and the reward model's Bradley-Terry loss written
with that r is DPO's loss (Z cancels in the difference). docs/alignment.md says more.
"""

import copy
import dataclasses
from functools import partial

import torch

from command import entry_point
from data.batching import LengthGroupedLoader
from data.preferences import collate_groups
from data.tasks import builtin_tasks
from errors import UserError

from .core.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_model, load_policy
from .core.stage import Stage
from .core.trainer import epochs_to_updates
from .eval.compare import format_paired, sampled
from .eval.sampled import sampling_entry
from .eval.task_eval import format_table, score
from .rl.losses import dpo_step, sequence_logprobs
from .rl.online_pairs import OnlinePairs
from .rl.preference_data import preference_groups, rendered
from .rl.stage import kept_policy
from .settings import DPOSettings


def keep_pairs(groups, min_chosen_score: float | None, log=print) -> list:
    """The built-in set's groups with only the pairs whose chosen reply the judge scored at
    least min_chosen_score (1.0: only right-over-wrong pairs, no preference between two
    mistakes); None: all. The judge's scores are 0..1 (data/judge.py), so the setting
    applies to the built-in set only: users' files score on their own scales, and their
    pairs are all kept. Pairs without scores are kept. Says what it dropped; UserError,
    naming the setting, when it drops every pair."""
    if min_chosen_score is None:
        return groups
    out = []
    for g in groups:
        pairs = [
            (a, b) for a, b in g.pairs if g.scores[a] is None or g.scores[a] >= min_chosen_score
        ]
        if pairs:
            out.append(dataclasses.replace(g, pairs=pairs))
    before, after = (sum(len(g.pairs) for g in gs) for gs in (groups, out))
    setting = f"min_chosen_score={min_chosen_score:g}"
    if before and not after:
        raise UserError(
            f"{setting} leaves none of the built-in set's {before} pairs (the judge scores "
            "replies 0..1); lower it, or keep every pair with min_chosen_score=null"
        )
    if after < before:
        log(
            f"{setting}: kept {after} of the built-in set's {before} pairs (those whose chosen "
            f"reply the judge scored at least {min_chosen_score:g})"
        )
    return out


@torch.no_grad()
def attach_reference_logps(reference, groups, pad_id: int, device, autocast) -> None:
    """Each group's ref_logps: log pi_ref(response | prompt) of its rows, computed once."""
    for first in range(0, len(groups), 16):
        chunk = groups[first : first + 16]
        batch = collate_groups(chunk, pad_id)
        ids, mask = batch["ids"].to(device), batch["mask"].to(device).float()
        with autocast():
            logps = sequence_logprobs(reference(ids)[0], ids, mask).float().cpu()
        for group, part in zip(
            chunk, torch.split(logps, [len(g.rows) for g in chunk]), strict=True
        ):
            group.ref_logps = part.tolist()


@torch.no_grad()
def preference_accuracy(model, groups, pad_id: int, device, beta: float) -> dict:
    """Held-out pairs whose chosen reply gets the higher implicit reward, and the margin."""
    hits, margins = [], []
    for first in range(0, len(groups), 16):
        batch = collate_groups(groups[first : first + 16], pad_id)
        ids, mask = batch["ids"].to(device), batch["mask"].to(device).float()
        rewards = beta * (
            sequence_logprobs(model(ids)[0], ids, mask).float().cpu() - batch["ref_logps"]
        )
        margin = rewards[batch["better"]] - rewards[batch["worse"]]
        hits += (margin > 0).tolist()
        margins += margin.tolist()
    if not hits:
        return {}
    return {"val_pref_accuracy": sum(hits) / len(hits), "val_margin": sum(margins) / len(margins)}


def pairs_source(s: DPOSettings, stage: Stage, policy, reference, tok, train):
    """The training pairs: the preference set's, in length-grouped batches; or, online,
    pairs sampled from the policy round after round (train/rl/online_pairs.py)."""
    rt = stage.runtime
    online = s.online and s.preferences.builtin and s.tasks.weight > 0
    if s.online and not online:
        why = "preferences.builtin=false" if not s.preferences.builtin else "tasks.weight=0"
        stage.log(f"online=true asks the built-in tasks; with {why} DPO trains on the files")
    if not online:
        pad = partial(collate_groups, pad_id=tok.pad_id)
        return LengthGroupedLoader(
            train, lambda g: g.length, pad, s.batch_size, s.seed, rt.rank, rt.world_size
        )

    def reference_logps(groups) -> None:
        attach_reference_logps(reference, groups, tok.pad_id, rt.device, rt.autocast)

    tasks = builtin_tasks(s.tasks, s.data)
    return OnlinePairs(policy, reference_logps, tok, tasks, s.preferences, s, rt, stage.log)


def run(settings: DPOSettings) -> dict:
    s = settings
    with Stage("dpo", s) as stage:
        rt = stage.runtime
        policy, tok, init = load_policy(s.init_from, dropout=0.0)
        keep = partial(keep_pairs, min_chosen_score=s.min_chosen_score, log=stage.log)
        groups = preference_groups(s, stage, policy, tok, init["path"], keep_builtin=keep)
        reference = copy.deepcopy(policy).requires_grad_(False).to(rt.device).eval()
        if stage.resumed is not None:
            policy, tok, _ = load_model(stage.resumed["path"], dropout=0.0)
        T = policy.config.block_size
        train, val, test = (
            rendered(tok, groups[split], T, f"{what} comparisons", stage.log)
            for split, what in (("train", "training"), ("val", "validation"), ("test", "held-out"))
        )
        for part in (train, val, test):
            attach_reference_logps(reference, part, tok.pad_id, rt.device, rt.autocast)
        loader = pairs_source(s, stage, policy, reference, tok, train)
        max_iters = s.max_iters
        if max_iters is None:
            per_update = s.batch_size * s.grad_accum * rt.world_size
            max_iters = epochs_to_updates(s.epochs, len(train), per_update)
        tasks = builtin_tasks(s.tasks, s.data) if s.tasks.weight > 0 else None
        items = tasks.test if tasks else []  # scored before and at the end only
        policy.to(rt.device)
        before = score(policy, tok, items, rt, s.eval_max_new_tokens) if not stage.resumed else {}

        def evaluate(m) -> dict:  # the validation pairs and items: what picks best.pt
            figures = preference_accuracy(m, val, tok.pad_id, rt.device, s.beta)
            if s.eval_tasks and tasks and tasks.val:
                accuracy = score(m, tok, tasks.val, rt, s.eval_max_new_tokens)["overall"]
                figures["val_accuracy"] = accuracy["accuracy"]
            return figures

        step = partial(
            dpo_step, beta=s.beta, label_smoothing=s.label_smoothing, nll_coef=s.nll_coef
        )
        stage.train(
            policy,
            tok,
            loader,
            step,
            evaluate=evaluate,
            max_iters=max_iters,
            flops_per_token=policy.flops_per_token(T),
            init_from=init["path"],
        )
        kept = kept_policy(stage, policy)
        models = {"sft": reference, "dpo": kept or policy}
        if kept is not None:
            models["dpo_last"] = policy
        return finish(s, stage, models, before, items, tok, test, init["path"])


def finish(s: DPOSettings, stage: Stage, models: dict, before, items, tok, test, sft_path):
    """The test items scored for the kept model (and the last), beside SFT's scored before
    training, with the paired tests and the sampled figures; eval.json."""
    rt = stage.runtime
    results = {"sft": before} if before else {}
    for name in ("dpo", "dpo_last"):
        if name in models:
            results[name] = score(models[name], tok, items, rt, s.eval_max_new_tokens)
    if not results.get("dpo"):
        return {}
    reference = models["sft"]
    for name in results:
        model = models[name]
        results[name]["sampled"] = sampled(
            model, reference, None, tok, items, rt, s.eval_max_new_tokens, s.seed
        )
        if s.sampled_k:  # the SFT model's cached beside its checkpoint
            checkpoint = sft_path if name == "sft" else None
            results[name]["sampling"] = sampling_entry(
                model, tok, items, s.sampled_k, s.sampled_per_task, rt, s.seed, checkpoint
            )
    title = "held-out accuracy (greedy, chat format; dpo: the checkpoint kept on validation)"
    stage.log(title + ":\n" + format_table(results))
    if before:
        stage.log(format_paired(results, "sft"))
    stage.log(f"dpo: KL to the reference {results['dpo']['sampled']['kl']:.3f} nats per reply")
    prefs = preference_accuracy(models["dpo"], test, tok.pad_id, rt.device, s.beta)
    kept = BEST_NAME if "dpo_last" in models else CHECKPOINT_NAME
    stage.save_eval({"checkpoint": str(stage.out_dir / kept), **results, "preferences": prefs})
    return results["dpo"]


@entry_point("dpo", DPOSettings)
def main(settings: DPOSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
