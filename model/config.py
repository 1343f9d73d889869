"""GPTConfig: the handful of numbers (and choices) that fix a GPT's shape."""

from dataclasses import asdict, dataclass

ATTENTION_KINDS = ("sdpa", "manual")
POSITIONS = ("learned", "rope")  # GPT-2's learned table W_pe, or rotary embeddings
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and regularisation of a GPT. Defaults are GPT-2 small (124M).

    n_layer:    number of transformer blocks
    n_head:     attention heads per block; n_embd must be divisible by it
    n_embd:     width C of the residual stream
    block_size: longest sequence the model reads (its context)
    vocab_size: number of token ids
    dropout:    dropout probability on embeddings, attention weights and residual branches
    bias:       whether Linear and LayerNorm layers carry a bias (GPT-2: True)
    attention:  "sdpa" (torch's fused kernel, flash attention on GPU) or "manual"
                (the step-by-step reference); both compute the same thing

    What changed since GPT-2 (docs/model.md, "Since GPT-2"), each on its own switch so that
    they can be added one at a time; the defaults are GPT-2's, and a Llama is
    position=rope, norm=rmsnorm, mlp=swiglu, bias=false (with n_kv_head < n_head,
    tie_embeddings=false where it wants them; qk_norm=true makes it a Qwen3):
    position:       "learned" (a vector per position added to the tokens') or "rope"
                    (rotary embeddings: queries and keys rotated by their position)
    norm:           "layernorm" (GPT-2's, eps 1e-5) or "rmsnorm" (no mean, no shift)
    mlp:            "gelu" (GPT-2's, hidden width 4C) or "swiglu" (a gated feed-forward)
    mlp_hidden:     SwiGLU's hidden width; None: 8C/3 rounded up to a multiple of 16, which
                    gives it GELU's parameter count (3 matrices of C x 8C/3 = 2 of C x 4C)
    n_kv_head:      key/value heads (grouped-query attention); None: n_head (one per query
                    head, as in GPT-2); must divide n_head
    qk_norm:        RMSNorm on each head's query and key before the rotary embedding
    tie_embeddings: the LM head is the token table (GPT-2), or a matrix of its own
    rope_theta:     the rotary embedding's base: head pair i turns by theta^(-2i/d) per position
    rms_norm_eps:   epsilon of every RMSNorm (LayerNorm keeps GPT-2's 1e-5)
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"
    position: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    mlp_hidden: int | None = None
    n_kv_head: int | None = None
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            _positive_int(self, name)
        for name in ("mlp_hidden", "n_kv_head"):
            if getattr(self, name) is not None:
                _positive_int(self, name, "or null")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}"
                )
        for name, kinds in (
            ("attention", ATTENTION_KINDS),
            ("position", POSITIONS),
            ("norm", NORMS),
            ("mlp", MLPS),
        ):
            if getattr(self, name) not in kinds:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {kinds}, got {getattr(self, name)!r}"
                )
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPTConfig.{name} must be a number > 0, got {value!r}")
        self._check_variants()

    def _check_variants(self) -> None:
        """The relations between the choices since GPT-2."""
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}: each "
                "key/value head serves the same number of query heads"
            )
        if self.mlp_hidden is not None and self.mlp != "swiglu":
            raise ValueError(
                f"GPTConfig.mlp_hidden={self.mlp_hidden} is SwiGLU's width; with mlp={self.mlp!r} "
                "the hidden width is 4 * n_embd: set mlp=swiglu or mlp_hidden=null"
            )
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"GPTConfig: rotary embeddings turn pairs of dimensions, so head_dim = n_embd / "
                f"n_head must be even, got {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, C / n_head."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_kv_head or self.n_head

    @property
    def swiglu_hidden(self) -> int:
        """SwiGLU's hidden width: mlp_hidden, else 8C/3 rounded up to a multiple of 16."""
        return self.mlp_hidden or -(-8 * self.n_embd // (3 * 16)) * 16

    def to_dict(self) -> dict:
        """Plain dict (ints, floats, strings) for checkpoints and JSON."""
        return asdict(self)


def _positive_int(config: GPTConfig, name: str, alternative: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        extra = f" {alternative}" if alternative else ""
        raise ValueError(f"GPTConfig.{name} must be a positive integer{extra}, got {value!r}")
