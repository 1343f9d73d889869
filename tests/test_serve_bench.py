"""python -m train.serve_bench: its parts on a tiny checkpoint, fast (the figures themselves
come from running it, not from a test)."""

import asyncio

import pytest
from live_server import TEXT, chat_checkpoint, live_server

import tokenizer
import train.serve_bench as bench
from model.continuous import ContinuousBatch
from train.server import policies
from train.settings import load


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = tokenizer.train_tokenizer(TEXT * 10 + bench.PROMPTS * 5, vocab_size=360)
    path = tmp_path_factory.mktemp("runs") / "sft" / "ckpt.pt"
    chat_checkpoint(path, tok, block_size=128)
    return path


def config(*overrides: str):
    return load("serve_bench", ["device=cpu", "precision=float32", *overrides])


def test_the_in_process_figures_and_the_clients_against_a_live_server(ckpt, monkeypatch):
    steps = []
    step = ContinuousBatch.step

    def counted(self):
        steps.append(len(self))
        return step(self)

    monkeypatch.setattr(ContinuousBatch, "step", counted)
    settings = ["max_tokens=8", "policy_clients=4", "requests_per_client=2"]
    cfg = config(f"checkpoint={ckpt}", *settings)
    here = bench.InProcess(cfg)
    local = {"terminal_chat_tokens_per_s": here.terminal_chat(), "policies": here.policies()}
    assert local["terminal_chat_tokens_per_s"] > 0
    assert set(local["policies"]) == {"continuous", "agreeing"}
    assert all(p["tokens_per_s"] > 0 for p in local["policies"].values())
    assert max(steps) == 4  # the continuous policy decoded the 4 clients together
    with live_server(ckpt, "max_batch=4") as live:
        result = asyncio.run(bench.level(live.url, "sft", 3, cfg))
    assert result["clients"] == 3 and result["requests"] == 6 and result["errors"] == 0
    assert 6 <= result["tokens"] <= 6 * 8 and result["ttft_p50_s"] > 0
    lines = bench.report([result], local)
    assert any("terminal chat" in line for line in lines)


def test_the_workload_alternates_settings_and_seeds_every_fourth():
    work = policies.Workload([[1, 2], [3]], clients=2, requests=4)
    first = work.first_requests(0.0)
    assert [r.client for r in first] == [0, 1]
    chain, req = [first[0]], first[0]
    while (req := work.next_after(req, 1.0)) is not None:
        chain.append(req)
    assert [r.number for r in chain] == [0, 1, 2, 3]
    assert [r.temperature for r in chain] == [0.7, 1.0, 0.7, 1.0]
    assert [r.seed is not None for r in chain] == [False, False, False, True]


def test_the_targets_are_judged_from_the_figures():
    def row(clients, total, per_client, p95, errors=0):
        figures = {"clients": clients, "requests": clients, "errors": errors}
        figures |= {"ttft_p50_s": p95 / 2, "ttft_p95_s": p95, "total_tokens_per_s": total}
        return {**figures, "client_tokens_per_s_median": per_client}

    local = {"terminal_chat_tokens_per_s": 100.0}
    good = bench.report([row(1, 90, 90, 0.1), row(16, 400, 25, 0.9), row(64, 500, 8, 2)], local)
    assert sum("(met)" in line for line in good) == 4
    bad = bench.report([row(1, 70, 70, 0.1), row(16, 200, 12, 1.5), row(64, 9, 1, 5, 3)], local)
    assert sum("NOT met" in line for line in bad) == 4
