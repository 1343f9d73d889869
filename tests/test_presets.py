"""The model size presets in conf/model/: each one is a valid GPTConfig, and the GPT-2 ones
have GPT-2's shapes and parameter counts.

The big models are built on the `meta` device: tensors with shapes but no memory and no
random initialisation, so counting gpt2-xl's 1.5 billion parameters takes milliseconds.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from model import GPT, GPTConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))

# Published GPT-2 shapes and parameter counts (vocab 50257, context 1024, tied LM head).
GPT2 = {
    "gpt2": (12, 12, 768, 124_439_808),
    "gpt2-medium": (24, 16, 1024, 354_823_168),
    "gpt2-large": (36, 20, 1280, 774_030_080),
    "gpt2-xl": (48, 25, 1600, 1_557_611_200),
}


def load_preset(name: str) -> GPTConfig:
    values = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{name}.yaml"), resolve=True)
    return GPTConfig(**values)


def test_the_documented_presets_exist():
    assert {"tiny", "small", *GPT2} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_a_valid_config(name):
    config = load_preset(name)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() > 0
    assert model.flops_per_token() > 6 * model.num_params(include_position_embedding=False)


@pytest.mark.parametrize("name", sorted(GPT2))
def test_gpt2_preset_parameter_count(name):
    n_layer, n_head, n_embd, n_params = GPT2[name]
    config = load_preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert (config.block_size, config.vocab_size, config.bias) == (1024, 50257, True)
    with torch.device("meta"):
        model = GPT(config)
    assert model.embed.wte.weight.is_meta  # nothing was allocated
    assert model.num_params() == n_params


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_run_a_forward(name):
    """The presets meant for a CPU really build and run (a few tokens, on the CPU)."""
    config = load_preset(name)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        logits, loss = model(idx, idx)
    assert logits.shape == (1, 8, config.vocab_size)
    assert torch.isfinite(loss)
