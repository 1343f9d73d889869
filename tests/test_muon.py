"""Muon (train/core/muon.py) and how train/core/optim.py hands it the model's parameters."""

import pytest
import torch

import train.core.runtime as runtime
from errors import UserError
from model import GPT, GPTConfig
from train.core.muon import (
    NS_COEFFICIENTS,
    Muon,
    _gram_form,
    newton_schulz_flops,
    ns_dtype,
    orthogonalize,
    uses_gram_form,
)
from train.core.optim import OptimizerSettings, build_optimizer, set_lr

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True)


@pytest.mark.parametrize("shape", [(64, 64), (48, 128), (128, 48), (3, 40, 40)])
def test_orthogonalize_sets_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # an ill-conditioned input: U diag(s) V^T with s spread over a factor of 20
    *batch, rows, cols = shape
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(*batch, rows, k)).Q
    v = torch.linalg.qr(torch.randn(*batch, cols, k)).Q
    g = u @ torch.diag_embed(torch.logspace(-1.3, 0, k).expand(*batch, k)) @ v.mT
    o = orthogonalize(g, steps=5)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    # and it points where U V^T (the exact answer) points
    exact = u @ v.mT
    cos = (o * exact).sum() / (o.norm() * exact.norm())
    assert cos > 0.95


def test_orthogonalize_is_batched_block_by_block():
    torch.manual_seed(1)
    g = torch.randn(3, 16, 24)
    together = orthogonalize(g)
    for i in range(3):
        assert torch.allclose(together[i], orthogonalize(g[i]), atol=1e-6)


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    """Muon stacks a model's blocks by shape (tall c_fc transposed beside wide mlp.c_proj,
    c_attn's three blocks beside the square c_proj) for one bmm per shape: its steps equal
    the module docstring's formula applied to one matrix at a time."""
    torch.manual_seed(5)
    model = GPT(GPTConfig(**TINY))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=0.02)
    groups = [g for g in opt.param_groups if g["use_muon"]]
    weights = [(p, p.detach().clone(), g) for g in groups for p in g["params"]]
    momentum = [torch.zeros_like(w) for _, w, _ in weights]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        for (p, w, g), m in zip(weights, momentum, strict=True):
            m.mul_(g["momentum"]).add_(p.grad)  # M = mu M + G
            u = p.grad + g["momentum"] * m  # U = G + mu M
            blocks = [orthogonalize(b, g["ns_steps"]) for b in u.chunk(g["parts"])]
            rows, cols = blocks[0].shape
            w.mul_(1 - g["lr"] * g["weight_decay"])
            w.sub_(g["lr"] * max(1, rows / cols) ** 0.5 * torch.cat(blocks))
            assert torch.allclose(p, w, atol=1e-6)


def standard_iterations(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The module docstring's iteration, written out (x already normalised, wide)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        g = x @ x.mT
        x = a * x + (b * g + c * g @ g) @ x
    return x


@pytest.mark.parametrize("shape", [(4, 48, 128), (2, 32, 64), (192, 768)])
@pytest.mark.parametrize("native", ["0", "1"])
def test_the_gram_form_equals_the_standard_iteration(monkeypatch, shape, native):
    """float32, wide blocks: orthogonalize iterates on the small Gram matrices; the result
    is the standard iteration's (computed in float64) to 1e-3. On a CPU with native bf16
    the iterations run in bf16 (the standard form; ~4e-2 from the float64 result); asked
    for float32, they take the Gram form there too."""
    monkeypatch.setenv(runtime.CPU_BF16_ENV, native)
    *_, m, n = shape
    assert uses_gram_form(m, n, torch.float32) and not uses_gram_form(m, n, torch.bfloat16)
    assert not uses_gram_form(m, m, torch.float32)  # square: the standard form is cheaper
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    x = (g / g.norm(dim=(-2, -1), keepdim=True)).double()
    exact = standard_iterations(x)
    own = torch.bfloat16 if native == "1" else torch.float32
    assert ns_dtype(torch.device("cpu")) == own
    for dtype, tolerance in ((None, 1e-3 if own == torch.float32 else 6e-2), (torch.float32, 1e-3)):
        for update in (g, g.mT):  # wide, and tall (transposed inside)
            out = orthogonalize(update, dtype=dtype)
            out = out.mT if update is not g else out
            assert ((out.double() - exact).norm() / exact.norm()) < tolerance


@pytest.mark.parametrize("gram", [True, False])
def test_newton_schulz_flops_counts_what_runs(gram):
    """newton_schulz_flops (what optimizer_mfu counts) equals torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(7))
    with FlopCounterMode(display=False) as counter:
        _gram_form(x, 5) if gram else standard_iterations(x, 5)
    assert counter.get_total_flops() == 3 * newton_schulz_flops(16, 64, 5, gram)


def run_muon_steps(opt_class, steps=4, **kwargs) -> torch.Tensor:
    """The weight change of a (96, 32) matrix after `steps` steps on fixed gradients."""
    torch.manual_seed(2)
    w0 = torch.randn(96, 32)
    w = w0.clone().requires_grad_()
    if opt_class is Muon:
        opt = Muon([{"params": [w], "use_muon": True}], **kwargs)
    else:
        opt = opt_class([w], **kwargs)
    for _ in range(steps):
        w.grad = torch.randn(96, 32)
        opt.step()
    return w.detach() - w0


def test_muon_step_equals_torch_muon():
    """Same momentum, Nesterov, Newton-Schulz and shape scaling as torch.optim.Muon."""
    if not hasattr(torch.optim, "Muon"):  # added in PyTorch 2.9; the reference only
        pytest.skip("this PyTorch has no torch.optim.Muon to compare with")
    ours = run_muon_steps(Muon, lr=0.02, weight_decay=0.1, momentum=0.95)
    ref = run_muon_steps(torch.optim.Muon, lr=0.02, weight_decay=0.1, momentum=0.95)
    plain = run_muon_steps(torch.optim.Muon, lr=0.02, weight_decay=0.1, nesterov=False)
    # Equal up to bfloat16 rounding (the two order their products differently): within 5%,
    # where the same steps without Nesterov's look-ahead differ by more than 10%.
    assert (ours - ref).norm() < 0.05 * ref.norm()
    assert (ours - plain).norm() > 0.10 * ref.norm()


def test_muon_adamw_groups_equal_torch_adamw():
    torch.manual_seed(3)
    w0 = torch.randn(10, 7)
    b0 = torch.randn(7)
    ours = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    ref = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    opt_ours = Muon(
        [{"params": [ours[0]], "weight_decay": 0.1}, {"params": [ours[1]], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.99),
    )
    opt_ref = torch.optim.AdamW(
        [{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.99),
    )
    for _ in range(5):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_stacked_matrices_are_orthogonalised_one_by_one():
    """parts=3 on a (3n, n) weight == three (n, n) weights, each stepped on its own."""
    torch.manual_seed(4)
    w0 = torch.randn(3 * 16, 16)
    stacked = w0.clone().requires_grad_()
    pieces = [w0[i * 16 : (i + 1) * 16].clone().requires_grad_() for i in range(3)]
    opt_stacked = Muon([{"params": [stacked], "use_muon": True, "parts": 3}], lr=0.02)
    opt_pieces = Muon([{"params": pieces, "use_muon": True}], lr=0.02)
    for _ in range(3):
        g = torch.randn(3 * 16, 16)
        stacked.grad = g.clone()
        for i, p in enumerate(pieces):
            p.grad = g[i * 16 : (i + 1) * 16].clone()
        opt_stacked.step()
        opt_pieces.step()
    assert torch.allclose(stacked, torch.cat(pieces), atol=1e-6)
    # treating the stack as one matrix is a different step
    whole = w0.clone().requires_grad_()
    whole.grad = torch.randn(3 * 16, 16)
    Muon([{"params": [whole], "use_muon": True}], lr=0.02).step()
    assert not torch.allclose(whole, w0, atol=1e-4)


def test_muon_rejects_what_it_cannot_orthogonalise():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.zeros(8, requires_grad=True)], "use_muon": True}], lr=0.02)
    with pytest.raises(ValueError, match="3 equal blocks"):
        Muon([{"params": [torch.zeros(8, 4, requires_grad=True)], "use_muon": True, "parts": 3}],
             lr=0.02)  # fmt: skip


def test_build_optimizer_gives_muon_the_blocks_matrices_only():
    model = GPT(GPTConfig(**TINY))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=0.02)
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {"muon": set(), "adamw_decay": set(), "adamw_no_decay": set()}
    for g in opt.param_groups:
        key = "muon" if g["use_muon"] else "adamw_decay" if g["weight_decay"] else "adamw_no_decay"
        by_kind[key] |= {names[id(p)] for p in g["params"]}
        if g["use_muon"]:
            assert g["parts"] == (3 if all("c_attn" in names[id(p)] for p in g["params"]) else 1)
    assert by_kind["muon"] == {
        f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                         "mlp.c_proj")}  # fmt: skip
    # the token table (also the LM head) and positions: AdamW with decay; norms, biases: none
    assert by_kind["adamw_decay"] == {"embed.wte.weight", "embed.wpe.weight"}
    assert all(n.endswith("bias") or "ln" in n for n in by_kind["adamw_no_decay"])
    n_params = sum(len(s) for s in by_kind.values())
    assert n_params == len(list(model.parameters()))  # every parameter, once

    # the schedule moves both rates together: Muon's stays muon_lr / lr times AdamW's
    set_lr(opt, 5e-4)
    lrs = {g["use_muon"]: g["lr"] for g in opt.param_groups}
    assert lrs[False] == pytest.approx(5e-4) and lrs[True] == pytest.approx(0.01)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(GPT(GPTConfig(**TINY)), lr=1e-3, weight_decay=0.0, kind="sgd")
    with pytest.raises(UserError, match="optimizer='sgd' is not valid: it must be one of adamw"):
        OptimizerSettings("sgd", 0.0, [0.9, 0.95], 0.02, 0.95)  # checked before any work


@pytest.mark.parametrize("native", [True, False])
def test_newton_schulz_runs_in_bf16_only_where_it_is_native(monkeypatch, native):
    """On a CPU without native bfloat16 (AVX2 only) bf16 matmuls are emulated and ~45x
    slower than float32: the iterations run in float32 there, with the same result."""
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1" if native else "0")
    assert ns_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    out = orthogonalize(g)
    assert out.dtype == torch.float32
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3  # singular values pushed near 1 either way


def test_unequal_row_blocks_are_orthogonalised_one_by_one():
    """Grouped-query attention's c_attn: 16 query rows, then 4 key and 4 value rows. parts
    given as row counts == three weights stepped on their own (each at its own shape's
    scale: the 4 x 16 blocks are wide, the 16 x 16 one square)."""
    torch.manual_seed(6)
    sizes = (16, 4, 4)
    w0 = torch.randn(sum(sizes), 16)
    stacked = w0.clone().requires_grad_()
    pieces = [p.clone().requires_grad_() for p in w0.split(sizes)]
    opt_stacked = Muon([{"params": [stacked], "use_muon": True, "parts": sizes}], lr=0.02)
    opt_pieces = Muon([{"params": pieces, "use_muon": True}], lr=0.02)
    for _ in range(3):
        g = torch.randn(sum(sizes), 16)
        stacked.grad = g.clone()
        for p, gp in zip(pieces, g.split(sizes), strict=True):
            p.grad = gp.clone()
        opt_stacked.step()
        opt_pieces.step()
    assert torch.allclose(stacked, torch.cat(pieces), atol=1e-6)
    assert opt_stacked.newton_schulz_flops() == opt_pieces.newton_schulz_flops()
    with pytest.raises(ValueError, match=r"blocks of \(16, 4, 4\) rows"):
        Muon(
            [
                {
                    "params": [torch.zeros(20, 16, requires_grad=True)],
                    "use_muon": True,
                    "parts": sizes,
                }
            ],
            lr=0.02,
        )


def test_build_optimizer_splits_grouped_query_attention_at_its_widths():
    config = GPTConfig(
        **{
            **TINY,
            "n_head": 4,
            "n_kv_head": 1,
            "bias": False,
            "position": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "qk_norm": True,
            "tie_embeddings": False,
        }
    )
    model = GPT(config)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert groups["h.0.attn.c_attn.weight"]["parts"] == (32, 8, 8)  # C, then 1 head of 8 twice
    assert (
        groups["h.1.mlp.c_gate.weight"]["use_muon"]
        and groups["h.1.mlp.c_gate.weight"]["parts"] == 1
    )
    assert not groups["lm_head.weight"]["use_muon"] and groups["lm_head.weight"]["weight_decay"]
    assert not groups["h.0.attn.q_norm.weight"]["use_muon"]
    assert groups["h.0.attn.q_norm.weight"]["weight_decay"] == 0.0
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = model.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.h[0].attn.c_attn.weight)
