"""Every stage runs unchanged on the Llama family: pretrain (model=llama-tiny) -> SFT ->
reward model -> PPO (value function from the reward model) and DPO -> sample and chat ->
evaluate -> export -> bench. The model takes every change at once, the untied head and
QK-norm included (llama-tiny's defaults are tied, without QK-norm), at a size that runs in
seconds; tests/test_ddp.py runs llama-tiny on two processes.

Each stage runs in this process, composed by Hydra as its command line would be; each checks
what is particular to the family (its checkpoint's config, the reward model's frozen LM head).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from test_pretrain import overrides, read_metrics
from test_reward import make_pairs as even_pairs
from test_sample_cli import in_process
from test_sft import items as ok_items

import train.bench as bench
import train.dpo as dpo
import train.evaluate as evaluate
import train.ppo as ppo
import train.pretrain as pretrain
import train.reward as reward
import train.sft as sft
from train import export
from train.core.checkpoint import load_checkpoint, load_kind, load_model
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
FLOAT32 = ["device=cpu", "precision=float32"]
FAMILY = {
    "position": "rope",
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "n_kv_head": 1,
    "qk_norm": True,
    "tie_embeddings": False,
}


def run_stage(module, name: str, *args: str):
    return module.run(load(name, [*args, *FLOAT32]))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """The whole pipeline once; each test reads what it needs."""
    d = tmp_path_factory.mktemp("llama")
    family = [
        "model=llama-tiny",
        "model.n_kv_head=1",
        "model.qk_norm=true",
        "model.tie_embeddings=false",
    ]
    args = overrides(corpus, d / "pretrain", peak_tflops=1)
    run_stage(pretrain, "pretrain", *family, *args)

    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ok_items(range(900), 64, 1)))
    (d / "sft_test.json").write_text(json.dumps(ok_items(range(900, 999), 8, 2)))
    common = [
        "tasks.weight=0",
        "max_minutes=null",
        "warmup_iters=2",
        "log_interval=2",
        "batch_size=8",
        "lr=3e-3",
    ]
    run_stage(
        sft,
        "sft",
        f"init_from={d / 'pretrain'}",
        f"out_dir={d / 'sft'}",
        f"files=[{d / 'sft.jsonl'}]",
        f"eval_files=[{d / 'sft_test.json'}]",
        "max_iters=6",
        "eval_interval=6",
        *common,
    )

    pairs = even_pairs(range(0, 60), 48, seed=1)
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (d / "pairs_test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in even_pairs(range(60, 80), 8, seed=2))
    )
    prefs = [
        f"files=[{d / 'pairs.jsonl'}]",
        f"eval_files=[{d / 'pairs_test.jsonl'}]",
        "preferences.builtin=false",
        "epochs=1",
    ]
    run_stage(reward, "reward", f"init_from={d / 'sft'}", f"out_dir={d / 'rm'}", *prefs, *common)
    run_stage(dpo, "dpo", f"init_from={d / 'sft'}", f"out_dir={d / 'dpo'}", *prefs, *common)

    prompts = [{"prompt": f"Please confirm with OK: {k}"} for k in (7, 8)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    run_stage(
        ppo,
        "ppo",
        f"init_from={d / 'sft'}",
        f"reward_model={d / 'rm'}",
        f"out_dir={d / 'ppo'}",
        f"prompt_files=[{d / 'prompts.jsonl'}]",
        "reward=model",
        "advantage=gae",
        "iterations=2",
        "rollout_prompts=2",
        "minibatch_size=2",
        "ppo_epochs=1",
        "reply_tokens=4",
        "eval_interval=1000",
        "eval_max_new_tokens=4",
        *common,
    )
    return d


def test_pretraining_writes_a_llama_family_checkpoint_and_learns(runs):
    ckpt = load_checkpoint(runs / "pretrain")
    config = ckpt["model_config"]
    assert {k: config[k] for k in FAMILY} == FAMILY
    assert "embed.wpe.weight" not in ckpt["model"] and "h.0.attn.q_norm.weight" in ckpt["model"]
    records = read_metrics(runs / "pretrain")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert all(math.isfinite(r["val_bpb"]) for r in records if "val_bpb" in r)


@pytest.mark.parametrize(
    "stage, kind", [("sft", "gpt"), ("rm", "reward"), ("dpo", "gpt"), ("ppo", "policy_value")]
)
def test_every_stage_keeps_the_family(runs, stage, kind):
    ckpt = load_checkpoint(runs / stage)
    assert ckpt["model_kind"] == kind
    assert {k: ckpt["model_config"][k] for k in FAMILY} == FAMILY
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert (runs / stage / "done.json").is_file()


def test_the_reward_model_freezes_its_unused_untied_lm_head(runs):
    model, _, _ = load_kind(runs / "rm", "reward")
    assert not model.gpt.lm_head.weight.requires_grad
    assert model.gpt.embed.wte.weight.requires_grad
    sft_head = load_checkpoint(runs / "sft")["model"]["lm_head.weight"]
    assert torch.equal(model.gpt.lm_head.weight, sft_head)  # unchanged by training
    report = json.loads((runs / "rm" / "eval.json").read_text())["reward"]
    assert 0.0 <= report["pairwise_accuracy"] <= 1.0


def test_sample_chat_and_evaluate(runs, capsys, monkeypatch, tmp_path):
    code, out, err = in_process(
        capsys,
        monkeypatch,
        f"checkpoint={runs / 'ppo'}",
        "prompt=To be",
        "temperature=0",
        "max_new_tokens=8",
        *FLOAT32,
    )
    assert code == 0 and out.startswith("To be"), err
    code, out, err = in_process(
        capsys,
        monkeypatch,
        f"checkpoint={runs / 'dpo'}",
        "mode=chat",
        "max_new_tokens=4",
        *FLOAT32,
        stdin="Hello\n/reset\nAgain\n",
    )
    assert code == 0, err
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    result = run_stage(evaluate, "evaluate", f"checkpoint={runs / 'sft'}", f"text_file={text}")
    assert 0 < result["text"]["val_bpb"] < 20 and result["text"]["tokens"] > 0


def test_export_and_init_from_give_back_the_ppo_model(runs):
    transformers = pytest.importorskip("transformers")
    out = run_stage(export, "export", f"checkpoint={runs / 'ppo'}", f"out={runs / 'hf'}")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"  # QK-norm: Qwen3's layout
    model, tok, _ = load_model(runs / "ppo")
    back, _, _ = load_model(out)
    ids = torch.tensor([[tok.eos_id] + tok.encode("To be, or not")])
    with torch.no_grad():
        ours = model(ids)[0]
        torch.testing.assert_close(theirs(ids).logits, ours, rtol=0, atol=1e-4)
        assert torch.equal(back(ids)[0], ours)


def test_bench_runs_the_preset_and_transformers_beside_it(tmp_path):
    pytest.importorskip("transformers")
    micro = [
        "model=llama-tiny",
        "model.n_kv_head=1",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=32",
        "model.vocab_size=64",
        "repeats=1",
        "train_batch_size=2",
        "train_seq_len=16",
        "train_steps=1",
        "prompt_tokens=4",
        "new_tokens=8",
        "batch_sizes=[1,3]",
        "batch_new_tokens=4",
        "optimizer=muon",
        "hf=true",
        f"out_dir={tmp_path}",
    ]
    results = run_stage(bench, "bench", *micro)
    assert results["model_config"]["position"] == "rope" and results["params"] > 0
    assert results["sample"]["transformers"]["best"] > 0
    assert results["train"]["tokens_per_sec"]["best"] > 0
