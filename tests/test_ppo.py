"""PPO: the per-token KL reward, GAE and group advantages against hand computations, the
clipped losses on hand-made numbers, rollouts whose log-probabilities a training forward
reproduces, the end-of-turn penalty, and a tiny `python -m train.ppo` run that learns."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_sft import save_sft

import tokenizer
from data.batching import collate
from model import GPT, GPTConfig
from model.generate import reply_logprobs
from model.heads import PolicyWithValue
from tokenizer.chat import render_conversation
from train.core.checkpoint import load_checkpoint
from train.core.trainer import clip_gradients
from train.rl.advantages import gae, group_advantages, kl_rewards, whiten
from train.rl.losses import clipped_policy_loss, clipped_value_loss, kl_penalty
from train.rl.rollouts import Rollouts, RolloutSettings
from train.rl.stage import verdict
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]


# --- the maths -------------------------------------------------------------------------


def test_kl_rewards_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    r = kl_rewards(logp, ref, score=2.0, beta=0.1)
    assert r.tolist() == pytest.approx([-0.05, 0.1, 2.0])  # -beta (logp - ref), + score last


def test_gae_by_hand():
    """gamma 1, lambda 0.5, three tokens; V after the last token is 0."""
    r, v = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.25, 0.75])
    adv, ret = gae(r, v, gamma=1.0, lam=0.5)
    d2 = 1.0 + 0.0 - 0.75  # delta_2 = r_2 + V(terminal) - V_2 = 0.25
    d1 = 0.0 + 0.75 - 0.25  # 0.5
    d0 = 0.0 + 0.25 - 0.5  # -0.25
    expected = [d0 + 0.5 * d1 + 0.25 * d2, d1 + 0.5 * d2, d2]
    assert adv.tolist() == pytest.approx(expected)
    assert ret.tolist() == pytest.approx([a + b for a, b in zip(expected, v.tolist(), strict=True)])


def test_gae_with_lambda_one_is_the_return_minus_the_value():
    r, v = torch.tensor([0.1, -0.2, 0.3, 1.0]), torch.tensor([0.4, 0.1, -0.3, 0.2])
    adv, ret = gae(r, v, gamma=1.0, lam=1.0)
    future = torch.flip(torch.cumsum(torch.flip(r, [0]), 0), [0])  # sum of rewards from t on
    assert torch.allclose(adv, future - v) and torch.allclose(ret, future)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    a = group_advantages(scores, group)  # Dr. GRPO: centred on the group's mean only
    assert a.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0])
    a = group_advantages(scores, group, scale=True)  # GRPO: over the group's std too
    mean, std = 0.5, 0.5  # group 0: population std of 1, 0, 0, 1
    expected = [(x - mean) / (std + 1e-4) for x in (1, 0, 0, 1)]
    assert a[:4].tolist() == pytest.approx(expected, rel=1e-6)
    assert a[4:].tolist() == [0.0, 0.0]  # all the same: nothing to learn


@pytest.mark.parametrize("scale", [False, True])
def test_a_group_of_equal_scores_gets_no_advantage_whatever_its_kl(scale):
    """The issue's worked example: four right replies whose KLs to the reference differ
    (0.10, 0.45, -0.05, 0.30) got advantages of about +-1 when the KL sat inside the
    normalised return; from the scores alone they are all 0."""
    old_way = torch.tensor([1.0 - 0.02 * kl for kl in (0.10, 0.45, -0.05, 0.30)])
    group = torch.zeros(4, dtype=torch.long)
    assert group_advantages(old_way, group, scale=True).abs().max() > 1  # the bug, shown
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])  # what the advantages are made of now
    assert group_advantages(scores, group, scale=scale).tolist() == [0.0] * 4


def test_the_kl_penalty_by_hand():
    """k3: r = log pi_ref - log pi, kl = e^r - r - 1, its gradient 1 - e^r per log pi."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    kl = kl_penalty(logp, ref)
    r = torch.tensor([-0.5, 1.0, 0.0])
    assert kl[0].tolist() == pytest.approx((r.exp() - r - 1).tolist())
    assert kl[0, 2].item() == 0.0 and (kl >= 0).all()  # the same token probability: no KL
    kl.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx((1 - r.exp()).tolist())


def test_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.75, 0.25, 0.55]]))  # ratios 1.5, 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    # min(rho A, clip(rho) A): 1.2 (clipped), -1.5 (unclipped is lower), -0.8, 2.2
    assert loss.item() == pytest.approx(-(1.2 - 1.5 - 0.8 + 2.2) / 4)
    assert clip_frac.item() == pytest.approx(3 / 4)
    rho = torch.tensor([1.5, 1.5, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(((rho - 1) - rho.log()).mean().item(), rel=1e-6)


def test_clipped_value_loss_by_hand():
    values, old, ret = (
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[2.0, 1.0]]),
    )
    loss = clipped_value_loss(values, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


# --- rollouts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer and a small GPT trained for a moment to answer 'Say yes' with ' no' a
    little more often than ' yes' (greedy: ' no'): a stand-in SFT model with something for
    RL to sharpen."""
    d = tmp_path_factory.mktemp("ppo")
    tok = tokenizer.train_tokenizer(["Say yes or no please. yes no " * 200], vocab_size=280)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=tok.vocab_size)
    model = GPT(config)
    prompt = [{"role": "user", "content": "Say yes"}]
    examples = [render_conversation(tok, prompt + [{"role": "assistant", "content": a}])
                for a in (" yes", " no") * 8 + (" no",) * 3]  # fmt: skip
    x, y = collate(examples, tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_sft(d / "sft.pt", tok, model)
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "Say yes", "answer": "yes"}) + "\n")
    said = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]
    (d / "held_out.jsonl").write_text(json.dumps({"messages": said}) + "\n")
    return {"dir": d, "tok": tok, "model": model.eval()}


ROLLOUTS = {  # a group of eight replies to one prompt, scored by the judge
    "rollout_prompts": 1, "group_size": 8, "advantage": "group", "reward": "tasks",
    "partial_credit": True,
    "reply_tokens": 48, "sample_batch": 64, "unfinished_penalty": -1.0, "seed": 0,
    "ppo_epochs": 2, "minibatch_size": 32, "beta": 0.02, "kl_target": None, "kl_horizon": 10000,
    "gamma": 1.0, "lam": 0.95, "scale_rewards": False, "drop_constant_groups": False,
    "balanced": False,
}  # fmt: skip


def rollouts_for(tiny, **settings):
    model = tiny["model"]
    items = [{"messages": [{"role": "user", "content": "Say yes"}], "answer": "yes", "task": "t"}]
    s = RolloutSettings(**{**ROLLOUTS, **settings})
    models = {"policy": model, "reference": model, "value": None, "reward": None}
    return Rollouts(models, tiny["tok"], items, s, torch.device("cpu"))


def test_rollout_logprobs_are_a_training_forwards_and_agree_with_the_sampler(tiny):
    """The old log-probabilities the loss's ratio starts from are a training forward's;
    the sampler's own agree with them within the window (float32)."""
    rollout = rollouts_for(tiny).collect()
    (batch,) = rollout.minibatches(epochs=1, size=8)
    with torch.no_grad():
        recomputed = reply_logprobs(tiny["model"](batch["ids"])[0], batch["ids"])
    m = batch["mask"].bool()
    assert m.any()
    assert torch.equal(recomputed[m], batch["old_logprobs"][m])  # the very forward
    assert rollout.figures["sampler_gap"] < 1e-5  # the sampler's agree
    assert abs(rollout.figures["kl"]) < 1e-4  # the policy is the reference here


def test_the_kl_controller_holds_a_toy_runs_kl_near_its_target(tiny):
    """A toy policy whose KL to the reference falls as beta rises (KL = 0.5 / beta): from
    beta 0.02 (KL 25) the controller brings the KL to its target of 4 and keeps it there."""
    source = rollouts_for(tiny, beta=0.02, kl_target=4.0, kl_horizon=256)
    history = []
    for _ in range(200):
        kl = 0.5 / source.beta
        history.append(kl)
        source.adapt_beta(kl, n=64)
    assert history[0] > 20
    assert all(abs(kl - 4.0) < 0.4 for kl in history[-50:])
    assert source.beta == pytest.approx(0.5 / 4.0, rel=0.1)


def test_policy_and_value_gradients_are_clipped_separately():
    """A huge value-loss gradient leaves the policy's gradient as it was."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    model = PolicyWithValue(config)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 1e-4 if i < len(list(model.policy.parameters())) else 1e3)
    policy_before = [p.grad.clone() for p in model.policy.parameters()]
    clip_gradients(model, max_norm=1.0)
    after = [p.grad for p in model.policy.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(policy_before, after, strict=True))
    value_norm = torch.cat([p.grad.flatten() for p in model.value.parameters()]).norm()
    assert value_norm.item() == pytest.approx(1.0, rel=1e-4)


def test_groups_without_signal_are_dropped_and_replaced(tiny, monkeypatch):
    """Dynamic sampling: a group whose replies all score the same is dropped and another
    prompt drawn in its place; the share dropped is a figure of the rollout."""
    source = rollouts_for(tiny, rollout_prompts=2, group_size=2, drop_constant_groups=True)
    draws = iter([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # scores of each draw

    def scores(items, replies):
        s = torch.tensor(next(draws))
        return s, s.clone(), torch.ones(len(s), dtype=torch.bool)

    monkeypatch.setattr(source, "score", scores)
    items, replies, s, gold, finished, dropped = source.gather()
    assert s.tolist() == [0.0, 1.0, 1.0, 0.0]  # the two groups with signal, in order
    assert len(items) == len(replies) == 4 and dropped == pytest.approx(2 / 4)


def test_a_reply_that_never_ends_its_turn_gets_the_penalty(tiny):
    source = rollouts_for(tiny, unfinished_penalty=-3.0)
    source.budgets = lambda items: [1] * len(items)  # 1 token: no <|end|>
    figures = source.collect().figures
    assert figures["unfinished"] == 1.0 and figures["score"] == -3.0
    assert figures["gold"] == 0.0


def test_the_judge_scores_a_finished_right_reply_one(tiny):
    figures = rollouts_for(tiny, reply_tokens=4).collect().figures
    assert 0.0 < figures["gold"] < 1.0  # some " yes" (1), some " no" (0)
    assert figures["score"] == pytest.approx(figures["gold"])  # reward=tasks: the judge


# --- a tiny run ---------------------------------------------------------------------------


def test_a_tiny_grpo_run_learns_to_say_yes_and_keeps_its_reference(tiny):
    """python -m train.grpo on one prompt the SFT model answers wrongly when greedy and
    rightly now and then: within seconds the greedy answer is right."""
    d = tiny["dir"]
    args = [f"init_from={d / 'sft.pt'}", f"out_dir={d / 'grpo'}", "group_size=8",
            "rollout_prompts=1", "minibatch_size=8", "ppo_epochs=2", "iterations=30",
            "tasks.weight=0", f"prompt_files=[{d / 'prompts.jsonl'}]",
            f"eval_files=[{d / 'held_out.jsonl'}]", "sampled_k=4", "sampled_per_task=1",
            "lr=3e-3", "min_lr=3e-4", "warmup_iters=0", "reply_tokens=4",
            "eval_interval=1000", "log_interval=2", "device=cpu", "precision=float32",
            "max_minutes=null"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "train.grpo", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(d / "grpo" / "metrics.jsonl")]
    gold = [r["rollout_gold"] for r in records if "rollout_gold" in r]
    assert gold[0] < 0.8 and sum(gold[-5:]) / 5 > 0.9, gold  # it learnt to say yes
    evaluation = json.loads((d / "grpo" / "eval.json").read_text())
    before, after = (evaluation[k]["overall"]["accuracy"] for k in ("sft", "grpo"))
    assert before == 0.0 and after == 1.0  # greedy: " no" before, " yes" after
    assert evaluation["sft"]["sampling"]["overall"]["pass"] == 1.0  # it said yes sometimes
    assert "grpo against sft (greedy, paired" in result.stdout
    assert (d / "grpo" / "reward_vs_kl.png").stat().st_size > 1000
    (times,) = [line for line in result.stdout.splitlines() if line.startswith("training time")]
    parts = dict(p.rsplit(" ", 2)[:2] for p in times.split(": ", 1)[1].split(", "))
    assert list(parts) == ["evaluation", "before", "generation", "scoring", "optimisation"]
    assert float(parts["generation"]) > 0 and float(parts["optimisation"]) > 0, times
    ckpt = load_checkpoint(d / "grpo")
    assert ckpt["stage"] == "grpo" and ckpt["model_kind"] == "gpt"
    sft = load_checkpoint(d / "sft.pt")["model"]
    assert any(not torch.equal(sft[k], v) for k, v in ckpt["model"].items())  # the policy moved


def test_with_dropout_in_the_sft_model_the_first_ratio_is_one(tiny, tmp_path):
    """The RL stage builds every model without dropout: a policy whose config has dropout
    0.1 (model=small) starts its first update at ratio 1 exactly (float32)."""
    from train.rl.stage import build_models

    save_sft(
        tmp_path / "sft.pt",
        tiny["tok"],
        GPT(dataclasses.replace(tiny["model"].config, dropout=0.1)),
    )
    cfg = load("grpo", [f"init_from={tmp_path / 'sft.pt'}", "device=cpu"])

    class FakeStage:
        resumed, runtime = None, type("R", (), {"device": torch.device("cpu")})

    model, frozen, _, _ = build_models(cfg, FakeStage)
    assert model.config.dropout == 0.0
    model.train()  # as during the updates
    source = rollouts_for({**tiny, "model": model})
    (batch,) = source.collect().minibatches(epochs=1, size=8)
    logprobs = reply_logprobs(model(batch["ids"])[0], batch["ids"])
    m = batch["mask"].bool()
    assert (logprobs[m] - batch["old_logprobs"][m]).exp().sub(1).abs().max() < 1e-5


def test_the_reference_never_changes_while_the_policy_learns(tiny, tmp_path):

    from train.rl.losses import ppo_step
    from train.rl.stage import build_models

    d = tiny["dir"]
    cfg = load(
        "ppo",
        [
            f"init_from={d / 'sft.pt'}",
            "reward=tasks",
            "advantage=group",
            "group_size=4",
            "device=cpu",
        ],
    )

    class FakeStage:
        resumed, runtime = None, type("R", (), {"device": torch.device("cpu")})

    model, frozen, tok, _ = build_models(cfg, FakeStage)
    before = {k: v.clone() for k, v in frozen["reference"].state_dict().items()}
    source = rollouts_for({**tiny, "model": model})
    source.models["reference"] = frozen["reference"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        minibatches = source.collect().minibatches(epochs=2, size=8)
        for minibatch in minibatches:
            loss = ppo_step(model, minibatch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(torch.equal(before[k], v) for k, v in frozen["reference"].state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in frozen["reference"].parameters())


def test_ppo_ptx_trains_on_the_corpus_and_reports_its_bits_per_byte(corpus, tiny, tmp_path):
    """PPO-ptx: pretraining windows join every update (ptx_loss is logged) and the
    pretraining split's bits per byte are reported before and after; a corpus prepared with
    another tokenizer than the policy's is refused in one line."""
    data = ["data=text", f"data.paths=['{corpus['file']}']", f"data.root='{corpus['root']}'",
            "data.vocab_size=400"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    prepared = subprocess.run([sys.executable, "-m", "data.prepare", *data], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    tok = tokenizer.load_tokenizer(corpus["root"] / "text" / "tokenizer.model")
    save_sft(tmp_path / "sft.pt", tok, n_embd=32)

    def ppo(init_from, out_dir):
        args = [f"init_from={init_from}", f"out_dir={out_dir}", "reward=tasks",
                "advantage=group", "group_size=4", "rollout_prompts=1", "minibatch_size=4",
                "ppo_epochs=1", "iterations=3", "tasks.weight=0", "reply_tokens=4",
                f"prompt_files=[{tiny['dir'] / 'prompts.jsonl'}]", "ptx_coef=0.5",
                "ptx_batch_size=2", "ptx_seq_len=16", "ptx_eval_tokens=256", "device=cpu",
                "precision=float32", "max_minutes=null", "eval_interval=1000", "log_interval=1",
                *data]  # fmt: skip
        return subprocess.run([sys.executable, "-m", "train.ppo", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    result = ppo(tmp_path / "sft.pt", tmp_path / "ppo")
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("pretraining split")]
    before, after = (float(x) for x in line.split(": ")[1].split(" -> "))
    assert 0 < before < 20 and 0 < after < 20 and before != after, line
    records = [json.loads(x) for x in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert any(r.get("ptx_loss", 0) > 0 for r in records)

    other = ppo(tiny["dir"] / "sft.pt", tmp_path / "other")  # another tokenizer
    assert other.returncode != 0
    (message,) = other.stderr.strip().splitlines()
    assert "prepared with another tokenizer than the policy's" in message, message


@pytest.mark.parametrize(
    "proxy, gold, words",
    [(0.4, -0.02, "the proxy rose while the gold fell"),
     (0.4, 0.0, "the proxy rose while the gold stalled"),
     (0.4, 0.1, "the gold rose with the proxy"),
     (-0.1, 0.1, "the gold rose"),
     (0.0, 0.0, "neither rose"),
     (0.2, float("nan"), "no gold score")],
)  # fmt: skip
def test_the_summary_says_whether_proxy_and_gold_rose_together(proxy, gold, words):
    line = verdict({"score": 0.3, "gold": 0.5}, {"score": 0.3 + proxy, "gold": 0.5 + gold})
    assert line.endswith(words) or words in line, line
    assert line.startswith(f"reward model {proxy:+.3f}")
