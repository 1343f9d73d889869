"""Rotary position embeddings (RoPE; Su et al. 2021), as Llama and Qwen compute them.

GPT-2 adds a learned vector per position to the token's (model/embedding.py). RoPE instead
turns each query and key by an angle proportional to its position, pair of dimensions by
pair of dimensions. With d the head width, dimension i (i < d/2) is paired with i + d/2
(transformers' "rotate_half" layout, not interleaved neighbours), and at position m the
pair turns by the angle m * theta_i:

    theta_i = rope_theta^(-2i/d)                         i = 0 .. d/2 - 1
    x'_i       = x_i cos(m theta_i) - x_{i+d/2} sin(m theta_i)
    x'_{i+d/2} = x_{i+d/2} cos(m theta_i) + x_i sin(m theta_i)

or, with cos and sin repeated over both halves and rotate_half(x) = [-x_{d/2..}, x_{..d/2}],

    rope(x, m) = x * cos(m theta) + rotate_half(x) * sin(m theta)

A rotation keeps lengths, and the score of query m with key n becomes
q^T R(m)^T R(n) k = q^T R(n - m) k: it depends on the positions only through n - m. So no
position table is learned, and a key stored in the KV cache keeps its rotation: a token
once placed never moves. Frequencies and angles are computed in float32 (as transformers
does; in bfloat16, m theta rounds badly for m in the hundreds), then cast to the queries'
dtype.
"""

import torch


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta_i = theta^(-2i/d), i = 0 .. d/2 - 1: (d/2,) float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_i for each position m, repeated over the two halves.

    positions: (T,) or (B, T) integers. Returns cos, sin: (1 or B, 1, T, d) float32, the 1
    broadcasting over the heads of (B, H, T, d) queries and keys.
    """
    if positions.dim() == 1:
        positions = positions[None]  # (1, T)
    inv_freq = inverse_frequencies(head_dim, theta, positions.device)  # (d/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, d/2): m * theta_i
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): pair i and i + d/2 share one
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, d) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x_1, x_2] -> [-x_2, x_1], halves of the last dim: the 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x) = x * cos + rotate_half(x) * sin. x: (B, H, T, d); cos, sin: (B|1, 1, T, d)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
