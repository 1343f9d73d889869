"""What a GPT is: pure nn.Modules, no files, no configs, no training logic."""

from .config import GPTConfig
from .gpt import GPT, IGNORE_INDEX
from .kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "KVCache"]
