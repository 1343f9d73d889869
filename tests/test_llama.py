"""The Llama family (what changed since GPT-2), piece by piece and as a whole:

- each piece against a hand computation: RMSNorm, the rotary embedding (it keeps lengths and
  makes scores depend on relative positions only), SwiGLU, grouped-query attention's head
  mapping;
- the KV cache is sized by the key/value heads, and cached decoding equals uncached decoding
  and full forward passes with rotary embeddings: within the context, past it (the window
  slides) and with left-padded batches;
- the configuration: what it refuses, old checkpoints (without the new fields) still load;
- a checkpoint's parameter count and FLOPs by hand.

tests/test_llama_hf.py compares the family with transformers' Llama and Qwen3.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_generate import prompts_of, reference_greedy, run

from model import GPT, GPTConfig
from model.attention import CausalSelfAttention
from model.generate import complete
from model.mlp import SwiGLU
from model.norm import RMSNorm
from model.rotary import apply_rotary, inverse_frequencies, rotary_tables
from train.core.checkpoint import load_model, save_checkpoint

LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
SHAPE = dict(n_layer=2, n_head=6, n_embd=48, block_size=16, vocab_size=64)


def llama(seed: int = 0, std: float = 0.5, **overrides) -> GPT:
    """A small Llama-family GPT in eval mode with large random weights (every parameter,
    norm gains included), so that the next token depends on all of the context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SHAPE, **LLAMA, "n_kv_head": 2, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else std * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- the pieces


def test_rms_norm_by_hand():
    norm = RMSNorm(5, eps=1e-6)
    assert torch.equal(norm.weight, torch.ones(5))  # the gain starts at 1 (not 1 + w)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0]))
    x = torch.tensor([[1.0, -2.0, 3.0, 0.0, 4.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    for row in range(2):
        rms = math.sqrt(sum(v * v for v in x[row].tolist()) / 5 + 1e-6)
        expected = [w * v / rms for w, v in zip(norm.weight.tolist(), x[row].tolist(), strict=True)]
        assert norm(x)[row].tolist() == pytest.approx(expected, rel=1e-6)
    # no centring: adding a constant changes the output (LayerNorm would ignore it)
    assert not torch.allclose(norm(x + 1.0), norm(x))
    # computed in float32 whatever the input's dtype, then cast back
    half = x.to(torch.bfloat16)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(
        norm(half),
        norm.weight
        * (half.float() * torch.rsqrt(half.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(
            torch.bfloat16
        ),
    )
    assert torch.allclose(norm(half).float(), expected, atol=0.05)


def test_rotary_embedding_by_hand():
    """d = 4: dimension 0 pairs with 2, 1 with 3 (rotate_half), theta_i = theta^(-2i/d)."""
    theta, m = 100.0, 3
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert inverse_frequencies(4, theta).tolist() == pytest.approx([1.0, 0.1])
    cos, sin = rotary_tables(torch.tensor([m]), 4, theta)  # (1, 1, 1, 4)
    got = apply_rotary(x.view(1, 1, 1, 4), cos, sin).flatten().tolist()
    a0, a1 = m * 1.0, m * 0.1
    expected = [
        1.0 * math.cos(a0) - 3.0 * math.sin(a0),
        2.0 * math.cos(a1) - 4.0 * math.sin(a1),
        3.0 * math.cos(a0) + 1.0 * math.sin(a0),
        4.0 * math.cos(a1) + 2.0 * math.sin(a1),
    ]
    assert got == pytest.approx(expected, abs=1e-6)
    assert cos.dtype == torch.float32  # angles in float32, whatever the model's dtype


def test_rotary_embedding_keeps_lengths_and_scores_depend_on_the_offset_only():
    d, theta = 16, 10000.0
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g), torch.randn(1, 1, 1, d, generator=g)

    def rotated(x, m):
        return apply_rotary(x, *rotary_tables(torch.tensor([m]), d, theta))

    def score(m, n):  # query at position m, key at position n
        return (rotated(q, m) * rotated(k, n)).sum().item()

    for m in (0, 1, 7, 100):
        assert rotated(q, m).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
    for offset in (0, 3, 10):
        scores = [score(m + offset, m) for m in (0, 5, 40, 99)]
        assert scores == pytest.approx([scores[0]] * 4, abs=1e-4)
    assert score(3, 0) != pytest.approx(score(5, 0), abs=1e-3)  # the offset does matter


def test_swiglu_by_hand():
    config = GPTConfig(**{**SHAPE, **LLAMA, "n_embd": 8, "n_head": 2, "mlp_hidden": 4})
    torch.manual_seed(1)
    mlp = SwiGLU(config)
    x = torch.randn(2, 3, 8)
    w_g, w_u, w_d = mlp.c_gate.weight, mlp.c_fc.weight, mlp.c_proj.weight  # (F,C), (F,C), (C,F)
    out = torch.zeros(2, 3, 8)
    for b in range(2):
        for t in range(3):
            for j in range(8):
                total = 0.0
                for f in range(4):
                    gate = sum(x[b, t, c].item() * w_g[f, c].item() for c in range(8))
                    up = sum(x[b, t, c].item() * w_u[f, c].item() for c in range(8))
                    silu = gate / (1.0 + math.exp(-gate))  # u * sigmoid(u)
                    total += silu * up * w_d[j, f].item()
                out[b, t, j] = total
    assert torch.allclose(mlp(x), out, atol=1e-5)


def test_swiglu_costs_what_gelu_costs_by_default():
    for C in (192, 768):
        c = GPTConfig(**{**SHAPE, **LLAMA, "n_embd": C, "n_head": 3})
        assert c.swiglu_hidden == 8 * C // 3  # 512, 2048: 3 C F = 2 C 4C exactly
    assert GPTConfig(**{**SHAPE, **LLAMA, "n_embd": 36}).swiglu_hidden == 96  # 96 = 16 * 6 >= 96


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_grouped_query_attention_maps_query_head_h_to_key_value_head_h_over_the_group(attention):
    """6 query heads, 2 key/value heads: heads 0-2 read key/value head 0, heads 3-5 head 1;
    each head's output written out by hand from its own slices of c_attn."""
    config = GPTConfig(**{**SHAPE, **LLAMA, "n_kv_head": 2, "attention": attention})
    torch.manual_seed(2)
    attn = CausalSelfAttention(config).eval()
    C, H, D, T = 48, 6, 8, 5
    assert attn.c_attn.weight.shape == (C + 2 * 2 * D, C)  # Q: C rows, K and V: 2 heads each
    x = torch.randn(1, T, C)
    q, k, v = (x @ attn.c_attn.weight.T).split([C, 2 * D, 2 * D], dim=-1)
    heads = []
    for h in range(H):
        g = h // (H // 2)  # its key/value head
        qh, kh, vh = (
            q[0, :, h * D : (h + 1) * D],
            k[0, :, g * D : (g + 1) * D],
            v[0, :, g * D : (g + 1) * D],
        )
        scores = qh @ kh.T / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        heads.append(F.softmax(scores, dim=-1) @ vh)  # (T, D)
    expected = torch.cat(heads, dim=-1) @ attn.c_proj.weight.T
    with torch.no_grad():
        assert torch.allclose(attn(x)[0], expected, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"tie_embeddings": False}])
def test_manual_attention_equals_sdpa_in_logits_and_gradients(overrides):
    manual = llama(std=0.3, attention="manual", **overrides).train()
    sdpa = GPT(GPTConfig(**{**manual.config.to_dict(), "attention": "sdpa"})).train()
    sdpa.load_state_dict(manual.state_dict())
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    for model in (manual, sdpa):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    torch.testing.assert_close(manual(idx)[0], sdpa(idx)[0], rtol=0, atol=1e-5)
    for (name, p), q in zip(manual.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the KV cache


def test_the_cache_holds_the_key_value_heads_only():
    model = llama(n_kv_head=2)
    cache = model.new_cache(3)
    assert cache.k.shape == (2, 3, 2, 16, 8)  # (n_layer, B, n_kv_head, block_size, head_dim)
    assert llama(n_kv_head=None).new_cache(3).k.shape == (2, 3, 6, 16, 8)


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "n_kv_head": 3}])
def test_cached_decoding_in_pieces_equals_the_full_forward(attention, overrides):
    model = llama(attention=attention, **overrides)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2)
        pieces = [
            model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 6), (6, 7), (7, 12), (12, 16))
        ]
    scale = full.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module", params=["manual", "sdpa"])
def decoder(request) -> GPT:
    return llama(attention=request.param, qk_norm=True)


def test_greedy_cached_equals_uncached_equals_full_forward(decoder):
    idx = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(5))
    cached = run(decoder, idx, 11, temperature=0.0)  # 5 + 11 = 16: inside the context
    assert torch.equal(cached, run(decoder, idx, 11, temperature=0.0, use_cache=False))
    assert torch.equal(cached, reference_greedy(decoder, idx, 11, lambda s: s))


def test_past_the_context_the_window_slides_and_rotary_positions_start_again(decoder):
    """After a slide the kept tokens are prefilled again from slot 0, so their keys are
    rotated for their new positions: the same tokens as full forward passes over the
    documented window, with and without the cache."""
    block, keep = 16, 8
    idx = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    got = run(decoder, idx, 40, temperature=0.0)
    assert torch.equal(got, run(decoder, idx, 40, temperature=0.0, use_cache=False))
    start = 0

    def window(seq):
        nonlocal start
        if seq.size(1) - start > block:
            start = seq.size(1) - keep
        return seq[:, start:]

    assert torch.equal(got, reference_greedy(decoder, idx, 40, window))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(decoder, use_cache):
    """Row b's positions count from its first real token, for the rotary tables as for
    GPT-2's position table: the padding shifts nothing."""
    prompts = prompts_of([3, 9, 1, 12, 5], seed=7)
    n = 16 - 12 + 1
    batch = complete(decoder, prompts, n, temperature=0.0, use_cache=use_cache)
    for p, c in zip(prompts, batch, strict=True):
        assert c.tokens == reference_greedy(decoder, torch.tensor([p]), n, lambda s: s)[0].tolist()


def test_past_the_context_a_left_padded_batch_slides_together(decoder):
    """As tests/test_generate.py documents for GPT-2: rows share the slots and slide together."""
    block, keep = 16, 8
    prompts = prompts_of([2, 11, 6], seed=9)
    n = 30
    cached = complete(decoder, prompts, n, temperature=0.0)
    assert [c.tokens for c in cached] == [
        c.tokens for c in complete(decoder, prompts, n, temperature=0.0, use_cache=False)
    ]
    windows, expected = [list(p) for p in prompts], [[] for _ in prompts]
    slots = max(map(len, prompts))
    with torch.no_grad():
        for _ in range(n):
            for w, e in zip(windows, expected, strict=True):
                e.append(int(decoder(torch.tensor([w]))[0][0, -1].argmax()))
            if slots == block:
                windows, slots = [w[-(keep - 1) :] for w in windows], keep - 1
            for w, e in zip(windows, expected, strict=True):
                w.append(e[-1])
            slots += 1
    assert [c.tokens for c in cached] == expected


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(n_kv_head=4), "n_kv_head=4 must divide n_head=6"),
        (dict(n_kv_head=0), "n_kv_head must be a positive integer or null"),
        (dict(mlp="gelu", mlp_hidden=64), "mlp_hidden=64 is SwiGLU's width"),
        (dict(n_embd=42), "head_dim = n_embd / n_head must be even, got 7"),
        (dict(position="alibi"), "position must be one of"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(mlp="relu"), "mlp must be one of"),
        (dict(rope_theta=0), "rope_theta must be a number > 0"),
        (dict(rms_norm_eps=-1.0), "rms_norm_eps must be a number > 0"),
        (dict(qk_norm="yes"), "qk_norm must be true or false"),
        (dict(tie_embeddings=1), "tie_embeddings must be true or false"),
    ],
)
def test_invalid_variants_are_refused_naming_the_field(overrides, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**SHAPE, **LLAMA, **overrides})


def test_a_checkpoint_written_before_the_llama_fields_still_loads(tmp_path):
    """Checkpoints record GPTConfig.to_dict(); those of earlier versions lack the new fields,
    whose defaults are GPT-2's."""
    import tokenizer

    tok = tokenizer.train_tokenizer(["to be or not to be " * 50], vocab_size=280)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=tok.vocab_size))
    old = {
        k: v
        for k, v in model.config.to_dict().items()
        if k
        in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "vocab_size",
            "dropout",
            "bias",
            "attention",
        )
    }
    save_checkpoint(
        tmp_path / "old.pt",
        {
            "stage": "pretrain",
            "model_config": old,
            "model": model.state_dict(),
            "tokenizer": tok.state(),
        },
    )
    loaded, _, _ = load_model(tmp_path / "old.pt")
    assert loaded.config == model.config and loaded.config.position == "learned"
    idx = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


# ----------------------------------------------------------------------------- size


def test_parameters_by_hand():
    """No position table, no biases; per block 2 RMSNorm gains, Q (C x C) and K, V (C x K,
    K = n_kv_head d), W_o, SwiGLU's three matrices, QK-norm's two gains of width d; the final
    gain; the LM head counts again when untied."""
    C, V, L, F, K, d = 48, 64, 2, 128, 2 * 8, 8
    per_block = 2 * C + (C * C + 2 * C * K) + C * C + 3 * C * F + 2 * d
    tied = V * C + L * per_block + C
    model = llama(qk_norm=True)
    assert model.config.swiglu_hidden == F
    assert model.num_params() == model.num_params(include_position_embedding=False) == tied
    untied = llama(qk_norm=True, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.wte.weight
    assert untied.num_params() == tied + V * C
    # the untied token table is a lookup: the FLOPs count the head's matrix once either way
    assert untied.flops_per_token(16) == model.flops_per_token(16)
