"""model/continuous.py: rows that join and leave a decoding batch between steps compute
what they compute alone; and the server's text helpers (stop strings, the shared cut of
a conversation to the context)."""

import random

import pytest
import torch

import tokenizer
from model import GPT, GPTConfig
from model.continuous import ContinuousBatch, Row
from model.generate import complete
from tokenizer.chat import drop_oldest_turns, render_prompt
from train.server.stops import StopStrings

V, BLOCK = 50, 32
STOP = 46  # a token some greedy replies of random_model() write and others do not


def random_model(attention: str = "manual", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=V, attention=attention
    )
    model = GPT(config).eval()
    with torch.no_grad():  # larger matrices than the init: replies depend on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def run_all(batch: ContinuousBatch, rows: list[Row], rng: random.Random) -> int:
    """Add the rows at random steps, as room allows; step until all are done."""
    pending, steps = list(rows), 0
    while pending or len(batch):
        while pending and batch.room() and rng.random() < 0.4:
            batch.add(pending.pop(0))
        batch.step()
        steps += 1
    return steps


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_greedy_rows_joining_at_any_step_write_what_they_write_alone(attention):
    model, rng = random_model(attention), random.Random(1)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 24))] for _ in range(40)]
    budgets = [rng.randint(1, BLOCK - len(p)) for p in prompts]  # up to the whole context
    alone = [
        complete(model, [p], b, temperature=0, stop_ids=[STOP])[0]
        for p, b in zip(prompts, budgets, strict=True)
    ]
    assert any(c.stopped for c in alone) and any(not c.stopped for c in alone)
    batch = ContinuousBatch(model, capacity=5)
    stops = frozenset({STOP})
    rows = [Row(p, b, 0.0, stop_ids=stops) for p, b in zip(prompts, budgets, strict=True)]
    steps = run_all(batch, rows, rng)
    assert steps < sum(len(c.tokens) for c in alone)  # rows did share steps
    for row, c in zip(rows, alone, strict=True):
        assert row.tokens == c.tokens
        assert row.finish == ("stop" if c.stopped else "length")
        assert row.text_tokens == c.text_tokens
    assert batch.rows == [] and batch.pos == 0


def test_the_slots_move_when_the_clock_reaches_the_context():
    """Long rows started at different steps: the shared clock passes block_size many times."""
    model = random_model()
    rows = [Row([1 + i, 2, 3], BLOCK - 3, temperature=0.0) for i in range(6)]
    batch = ContinuousBatch(model, capacity=3)
    seen_full = False
    pending = list(rows)
    while pending or len(batch):
        if pending and batch.room():
            batch.add(pending.pop(0))
        batch.step()
        seen_full |= batch.pos == BLOCK
    assert seen_full
    for row in rows:
        assert row.tokens == complete(model, [row.prompt], BLOCK - 3, temperature=0)[0].tokens


def test_a_seeded_row_draws_what_it_draws_alone_beside_other_rows():
    model, rng = random_model(), random.Random(2)
    prompt = [3, 4, 5, 6]
    first = torch.Generator().manual_seed(42)
    alone = complete(model, [prompt], 20, temperature=1.0, top_k=10, generator=first)[0].tokens
    batch = ContinuousBatch(model, capacity=8, top_k=10, generator=torch.Generator().manual_seed(0))
    seeded = Row(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(42))
    settings = [(0.7, None), (1.3, 0.9), (0.0, None), (0.7, None)]
    others = [Row([rng.randrange(V)], 20, temperature=t, top_p=p) for t, p in settings]
    run_all(batch, [others[0], seeded, *others[1:]], rng)
    assert seeded.tokens == alone
    another = Row(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(43))
    run_all(batch, [another], rng)
    assert another.tokens != alone


def test_a_cancelled_row_leaves_and_frees_its_place():
    model = random_model()
    batch = ContinuousBatch(model, capacity=2)
    a, b = Row([1, 2], 25, temperature=0.0), Row([3], 25, temperature=0.0)
    batch.add(a)
    batch.add(b)
    assert batch.room() == 0
    with pytest.raises(ValueError, match="full"):
        batch.add(Row([4], 5))
    batch.step()
    batch.step()
    batch.cancel(a)
    batch.step()
    assert a.finish == "cancelled" and len(a.tokens) == 2 and batch.rows == [b]
    c = Row([5, 6, 7], 10, temperature=0.0)
    batch.add(c)  # a's place
    while len(batch):
        batch.step()
    assert b.tokens == complete(model, [[3]], 25, temperature=0)[0].tokens
    assert c.tokens == complete(model, [[5, 6, 7]], 10, temperature=0)[0].tokens


def test_a_row_must_fit_the_context():
    batch = ContinuousBatch(random_model(), capacity=2)
    with pytest.raises(ValueError, match="exceed the context"):
        batch.add(Row([1] * 20, BLOCK - 19))
    with pytest.raises(ValueError, match="at least one token"):
        batch.add(Row([], 5))


# ------------------------------------------------------------------ stop strings


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    s, out = StopStrings(stops), []
    for piece in pieces:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(s.flush())
    return out, False


def test_a_stop_string_across_pieces_ends_the_text_and_is_never_sent():
    out, hit = feed(["END"], ["abc E", "N", "D more"])
    assert hit and "".join(out) == "abc " and out == ["abc ", "", ""]
    out, hit = feed(["\n\n", "Q:"], ["one\n", "two Q", ": three"])
    assert hit and "".join(out) == "one\ntwo "


def test_a_partial_stop_string_is_held_then_released():
    out, hit = feed(["END"], ["abc E", "N", "x", " tail"])
    assert not hit and out == ["abc ", "", "ENx", " tail", ""]
    out, hit = feed(["ab"], ["xa"])  # the reply ends on a partial match: it is sent
    assert not hit and "".join(out) == "xa"


# ------------------------------------------------------------------ the cut to the context


def test_drop_oldest_turns_keeps_the_system_message_and_ends_on_the_question():
    tok = tokenizer.train_tokenizer(["to be or not to be that is the question " * 20], 300)
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages.append({"role": "user", "content": f"question {i} to be"})
        messages.append({"role": "assistant", "content": f" answer {i} or not"})
    messages.append({"role": "user", "content": "the last question"})
    full = render_prompt(tok, messages)
    ids, kept = drop_oldest_turns(tok, messages, len(full) - 1)
    assert len(ids) <= len(full) - 1 and ids == render_prompt(tok, kept)
    assert kept[0] == messages[0] and kept[1]["role"] == "user" and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # the newest, in order
    assert len(messages) == 14  # the caller's list is left alone
    ids, kept = drop_oldest_turns(tok, messages, 1)  # nothing fits: system + the last
    assert kept == [messages[0], messages[-1]]
    for budget in range(len(full) + 2):
        ids, kept = drop_oldest_turns(tok, messages, budget)
        assert ids == render_prompt(tok, kept)
        assert len(ids) <= budget or kept == [messages[0], messages[-1]]
