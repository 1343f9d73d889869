"""A tiny pretrained GPT-2, made offline: the Hugging Face directory tests load instead of gpt2.

A byte-level BPE trained here with `tokenizers` (GPT-2's kind: ByteLevel pre-tokenizer and
decoder, <|endoftext|> as its one special token) and a random GPT2LMHeadModel of a few
thousand parameters, saved as Hugging Face saves them (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json). Nothing is downloaded.
"""

from pathlib import Path

import torch

TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "Who's there? Nay, answer me: stand, and unfold yourself. Café, naïve.\n",
    "Please confirm with OK: ticket 4711. OK. Ack 12. OK.\n",
]
N_POSITIONS = 64


def byte_bpe(texts=TEXT, vocab_size: int = 400, normalized: bool = False):
    """A GPT-2-style byte-level BPE tokenizer (`tokenizers.Tokenizer`) trained on `texts`.
    normalized: the "normalized" flag of its <|endoftext|> (GPT-2's hub tokenizer has
    true: the token is matched in the normalised text)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    t.train_from_iterator(list(texts) * 20, trainer)
    state = json.loads(t.to_str())
    for token in state["added_tokens"]:
        token["normalized"] = normalized
    return Tokenizer.from_str(json.dumps(state))


def save_tokenizer(t, directory: Path) -> None:
    """Save a `tokenizers.Tokenizer` as transformers saves GPT-2's fast tokenizer."""
    import transformers

    end = "<|endoftext|>"
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token=end, eos_token=end)
    hf.save_pretrained(directory)


def random_gpt2(vocab_size: int, seed: int = 0, n_embd: int = 32):
    """A random transformers GPT2LMHeadModel (eval mode), biases and gains random too."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:  # GPT-2 starts these at 0 and 1
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_gpt2_dir(
    directory: Path, seed: int = 0, vocab_size: int = 400, normalized: bool = False
) -> Path:
    """A Hugging Face GPT-2 directory: random weights and a trained byte-level BPE
    (normalized: see byte_bpe)."""
    t = byte_bpe(vocab_size=vocab_size, normalized=normalized)
    random_gpt2(t.get_vocab_size(), seed).save_pretrained(directory)
    save_tokenizer(t, directory)
    return directory
