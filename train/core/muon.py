"""Muon for the matrices inside the blocks, AdamW for every other parameter: one optimizer.

Muon (Jordan et al., 2024) steps each hidden weight matrix W (out x in) along the
orthogonalised momentum of its gradient G:

    M  = mu * M + G                                  momentum buffer
    U  = G + mu * M                                  Nesterov look-ahead
    O  = orthogonalize(U)  ~  A B^T  where U = A S B^T (its SVD): S replaced by I
    W  = W - lr * wd * W - lr * sqrt(max(1, out / in)) * O

Why: a gradient matrix is dominated by a few large singular directions, and Adam's
per-entry scaling does not change that. Setting every singular value of the step to one
moves the weights as far along the rare directions as along the common ones, and on
small models it learns more per step than AdamW (docs/training.md has the figures).
sqrt(max(1, out / in)) keeps the step's size per entry the same for tall matrices.

orthogonalize runs `ns_steps` Newton-Schulz iterations of the odd matrix polynomial

    X <- a X + b (X X^T) X + c (X X^T)^2 X,     (a, b, c) = (3.4445, -4.7750, 2.0315)

from X = U / ||U||_F (so every singular value starts in (0, 1]). Each iteration maps a
singular value s to a s + b s^3 + c s^5; these coefficients push every s quickly into
roughly [0.7, 1.2], which is all Muon needs and costs only matrix products, run in
bfloat16 where the hardware multiplies it natively (GPUs, CPUs with AVX-512 BF16 or AMX)
and in float32 elsewhere: on a CPU without it (AVX2 only) a bfloat16 matmul is emulated,
~45x slower than float32 (0.98 vs 45 GFLOP/s measured, 512 x 512, one thread), and it
made the CPU demo's training 8x slower (440 vs 3,660 tokens/s). For a wide X (out < in)
we iterate on X; for a tall one on X^T, so X X^T is the smaller square.

In float32 a wide X (m x n, n >= 2 m) iterates on m x m matrices only (`_gram_form`):
every X_k is Q_k X_0 with Q_k a polynomial in G_0 = X_0 X_0^T, so with P_k = a I + b G_k
+ c G_k^2,

    Q_{k+1} = P_k Q_k,    G_{k+1} = X_{k+1} X_{k+1}^T = P_k G_k P_k,    X_steps = Q_steps X_0

the same matrix in exact arithmetic, in 4 m^2 n + (8 steps - 6) m^3 FLOPs instead of
steps (4 m^2 n + 2 m^3): 44% fewer for the tiny model's 192 x 768 blocks (57 vs 95 ms for
six of them, one thread). Its rounding error is larger (1e-4 relative to the exact
iteration in float32, against 5e-6), still far below what bfloat16 iterations carry
(Muon's usual precision), which is why it is not used there: in bf16 the G_k products
would compound their 4e-3 rounding.

Embeddings (the token table is also the LM head), LayerNorm gains and biases are not
hidden-layer matrices; their groups (use_muon=False) take plain AdamW steps:

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    p = p - lr * wd * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

A weight that stacks several matrices (attention's c_attn holds W_q, W_k and W_v, one under
the other) is orthogonalised block by block: its group sets `parts`, the number of equal
row blocks, or the rows of each block when they differ (grouped-query attention: C query
rows, then n_kv_head * d key rows and as many value rows).

Every group has its own lr; train/core/optim.py builds the groups and the schedule scales
them all together (each group's lr_scale).
"""

import torch

from . import runtime

# Coefficients of the quintic Newton-Schulz step, from Jordan et al. (2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def ns_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz products: bfloat16 where it is native, else float32."""
    if device.type == "cuda" or (device.type == "cpu" and runtime.cpu_supports_bf16()):
        return torch.bfloat16
    return torch.float32


def uses_gram_form(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether orthogonalize iterates on the small Gram matrices (module docstring)."""
    m, n = sorted((rows, cols))
    return dtype == torch.float32 and n >= 2 * m  # fewer FLOPs from n = 1.5 m on


@torch.no_grad()
def orthogonalize(
    update: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """U with its singular values pushed to ~1, same shape: (..., rows, cols), batched.
    The products run in `dtype` (None: ns_dtype, this device's choice)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype or ns_dtype(update.device))
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (..., small, large): x @ x.mT is the smaller square
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values now in (0, 1]
    if uses_gram_form(x.size(-2), x.size(-1), x.dtype):
        x = _gram_form(x, steps)
    else:
        for _ in range(steps):
            gram = x @ x.mT  # (..., small, small)
            x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


def _gram_form(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iterations on (..., m, m) matrices: X_steps = Q_steps X_0 (module docstring)."""
    a, b, c = NS_COEFFICIENTS
    g = x @ x.mT  # G_0 = X_0 X_0^T, (..., m, m)
    q = None
    for k in range(steps):
        p = b * g + c * g @ g
        p.diagonal(dim1=-2, dim2=-1).add_(a)  # P_k = a I + b G_k + c G_k^2
        q = p if q is None else p @ q  # Q_{k+1} = P_k Q_k
        if k < steps - 1:
            g = p @ g @ p  # G_{k+1} = P_k G_k P_k
    return q @ x  # (..., m, n)


def newton_schulz_flops(rows: int, cols: int, steps: int = 5, gram: bool = False) -> int:
    """FLOPs of orthogonalize on one rows x cols matrix, m = min(rows, cols), n = max.
    Each iteration computes X X^T (2 m^2 n), G G (2 m^3) and (b G + c G G) X (2 m^2 n);
    the Gram form X_0 X_0^T and Q X_0 once (4 m^2 n), then per iteration G G, P Q (not the
    first) and P G P (not the last): 2 + 2 + 4 m^3."""
    m, n = sorted((rows, cols))
    if gram:
        return 4 * m * m * n + (8 * steps - 6) * m**3
    return steps * (4 * m * m * n + 2 * m**3)


def row_blocks(parts: int | tuple[int, ...], rows: int) -> list[int]:
    """The rows of each block a weight of `rows` rows is orthogonalised in: `parts` equal
    blocks, or the row counts `parts` gives."""
    if isinstance(parts, int):
        return [rows // parts] * parts
    return list(parts)


class Muon(torch.optim.Optimizer):
    """Muon on groups with use_muon=True (2-D weights), AdamW on the others.

    Group options: lr, weight_decay, use_muon; Muon groups also momentum, ns_steps and
    parts (row blocks orthogonalised separately: their number, or a tuple of their row
    counts), AdamW groups betas and eps.
    """

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            use_muon=False,
            parts=1,
            momentum=momentum,
            ns_steps=ns_steps,
            betas=tuple(betas),
            eps=eps,
        )
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                parts = group["parts"]
                if isinstance(parts, int) and (p.dim() != 2 or p.size(0) % parts):
                    raise ValueError(
                        f"Muon takes 2-D weights whose rows split into {parts} "
                        f"equal blocks; got shape {tuple(p.shape)}"
                    )
                if not isinstance(parts, int) and (p.dim() != 2 or sum(parts) != p.size(0)):
                    raise ValueError(
                        f"Muon takes 2-D weights whose rows split into blocks of {tuple(parts)} "
                        f"rows; got shape {tuple(p.shape)}"
                    )

    def newton_schulz_flops(self) -> int:
        """FLOPs of one step's Newton-Schulz products: work the optimizer adds to every
        step, reported beside MFU, never counted in it (they are not model FLOPs)."""
        total = 0
        for group in self.param_groups:
            for p in group["params"] if group["use_muon"] else ():
                for rows in row_blocks(group["parts"], p.size(0)):
                    gram = uses_gram_form(rows, p.size(1), ns_dtype(p.device))
                    total += newton_schulz_flops(rows, p.size(1), group["ns_steps"], gram)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_steps([group for group in self.param_groups if group["use_muon"]])
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        return loss

    def _muon_steps(self, groups: list[dict]) -> None:
        """Every Muon weight's step, with one batched Newton-Schulz per block shape.

        A model's blocks come in a few shapes (the tiny model: 12 of 192 x 192, 6 of
        192 x 768 once the tall ones are transposed, as orthogonalize(U^T) =
        orthogonalize(U)^T). Stacking the blocks of one shape makes each Newton-Schulz
        product one bmm over all of them, not one small matmul per block: the same result
        (tests/test_muon.py) in far fewer calls. A weight's row blocks may have different
        shapes (grouped-query attention's c_attn): each goes with its own shape, and the
        step is put together row block by row block.
        """
        batches: dict[tuple, list] = {}  # (small, large, ns_steps) -> [(step, rows, tall, block)]
        steps: dict[torch.Tensor, torch.Tensor] = {}  # each weight's step, filled block by block
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = self._look_ahead(p, group["momentum"])  # (out, in)
                steps[p] = torch.empty_like(u)
                first = 0
                for rows in row_blocks(group["parts"], p.size(0)):
                    block = u[first : first + rows]  # (rows, in)
                    tall = rows > p.size(1)
                    block = block.mT if tall else block  # (small, large)
                    key = (*block.shape, group["ns_steps"])
                    item = (steps[p][first : first + rows], tall, block)
                    batches.setdefault(key, []).append(item)
                    first += rows
        for (small, large, ns_steps), items in batches.items():
            done = orthogonalize(torch.stack([block for *_, block in items]), ns_steps)
            for (out, tall, _), o in zip(items, done, strict=True):
                if tall:  # sqrt(max(1, rows / cols)): the same step size per entry
                    out.copy_(o.mT).mul_((large / small) ** 0.5)
                else:
                    out.copy_(o)
        for group in groups:
            for p in group["params"]:
                if p in steps:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p.add_(steps[p], alpha=-group["lr"])

    def _look_ahead(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """Update the momentum buffer and return U = G + mu M (same shape as p)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(p.grad)  # M = mu M + G
        return p.grad.add(buf, alpha=mu)  # U = G + mu M

    def _adamw_step(self, group: dict) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1.0 - beta1)  # m = b1 m + (1 - b1) g
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = (v / (1.0 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1.0 - lr * group["weight_decay"])
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
