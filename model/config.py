"""GPTConfig: the handful of numbers that fix a GPT's shape."""

from dataclasses import asdict, dataclass

ATTENTION_KINDS = ("sdpa", "manual")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and regularisation of a GPT. Defaults are GPT-2 small (124M).

    n_layer:    number of transformer blocks
    n_head:     attention heads per block; n_embd must be divisible by it
    n_embd:     width C of the residual stream
    block_size: longest sequence the model reads (number of learned positions)
    vocab_size: number of token ids
    dropout:    dropout probability on embeddings, attention weights and residual branches
    bias:       whether Linear and LayerNorm layers carry a bias (GPT-2: True)
    attention:  "sdpa" (torch's fused kernel, flash attention on GPU) or "manual"
                (the step-by-step reference); both compute the same thing
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"GPTConfig.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, C / n_head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """Plain dict (ints, floats, strings) for checkpoints and JSON."""
        return asdict(self)
