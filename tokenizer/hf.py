"""Our tokenizers in Hugging Face's format: tokenizer.json and tokenizer_config.json.

    save_hf_tokenizer(tok, "my-model/", model_max_length=1024)
    AutoTokenizer.from_pretrained("my-model/")        # in any program with transformers

What transformers then loads is a fast tokenizer (no sentencepiece, no protobuf) which
- encodes text to our ids: the gpt2 kind is the very tokenizer it wraps; a SentencePiece
  model is rebuilt as the same BPE for the `tokenizers` library (_from_sentencepiece);
- knows our control tokens as special tokens at our ids (bos, eos, pad, the chat tokens);
- puts <|eos|> in front of a text (tokenizer(text)), as train.sample does: our documents
  follow an <|eos|>;
- carries a chat template that writes tokenizer/chat.py's format, so that
  apply_chat_template(messages, add_generation_prompt=True) gives render_prompt's ids.

Typed control tokens. transformers finds special tokens in the text it encodes, and chat
templates rely on it: apply_chat_template renders the conversation to ONE string and
encodes it. A message that spells "<|user|>" would therefore forge a turn, and no setting
can tell the template's "<|user|>" from the message's inside that one string
(split_special_tokens=True would break the template's own). So the template escapes every
message, and the tokenizer undoes the escape after it has found the special tokens:

    template, each message:   content.replace(E, E+E).replace("<|", "<" + E + "|")
    tokenizer (normalizer):   text.replace("<" + E + "|", "<|").replace(E+E, E)

An escaped message contains no "<|", so no special token is found in it, and the
normaliser gives back the message exactly, which then encodes as ordinary text. This holds
for tokens matched before normalisation only, so every added token is written with
"normalized": false, the base tokenizer's own too (GPT-2's <|endoftext|> is marked true). E is
U+FDD0, a Unicode noncharacter (reserved for programs' internal use, never text). The
price: text encoded directly has "<" E "|" read as "<|" and E E as E; text without U+FDD0
encodes exactly as ours does. Raw text that must not yield control tokens is encoded with
tokenizer(text, split_special_tokens=True), as for any Hugging Face tokenizer.
"""

import json
from pathlib import Path
from typing import Any

from errors import UserError
from tokenizer.base import Tokenizer
from tokenizer.gpt2 import _tokenizers
from tokenizer.special import BOS, EOS, PAD, SPECIAL_TOKENS

CHAT_TOKENS = ("system", "user", "assistant", "end")  # the special tokens besides bos, eos, pad
ESCAPE = "\ufdd0"  # a Unicode noncharacter; see the module docstring
SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's stand-in for a space

# tokenizer/chat.py's format: <|bos|>, then per message its role token, its content
# (escaped) and <|end|>; with add_generation_prompt, <|assistant|> at the end.
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{{ '<|system|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% else %}{{ raise_exception('roles are system (first only), user and assistant') }}"
    "{% endif %}"
    "{{ message['content'] | replace('\ufdd0', '\ufdd0\ufdd0') | replace('<|', '<\ufdd0|') }}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json for `tok` into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_backend(tok).save(str(out / "tokenizer.json"))
    config = {
        # PreTrainedTokenizerFast: the class every transformers version loads from tokenizer.json
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SPECIAL_TOKENS[n] for n in CHAT_TOKENS],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,  # else decode() drops spaces before punctuation
        "split_special_tokens": False,  # the chat template's tokens are found; messages escaped
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def hf_backend(tok: Tokenizer) -> Any:
    """A `tokenizers.Tokenizer` encoding text as tok.encode does, with the control tokens as
    special tokens at tok's ids, the messages' escape undone and <|eos|> put in front."""
    tokenizers = _tokenizers()
    if tok.kind not in BACKENDS:
        raise UserError(f"cannot write a {tok.kind} tokenizer in Hugging Face's format")
    t = BACKENDS[tok.kind](tok)
    n = tokenizers.normalizers
    undo = [n.Replace("<" + ESCAPE + "|", "<|"), n.Replace(ESCAPE + ESCAPE, ESCAPE)]
    t.normalizer = n.Sequence(undo + ([t.normalizer] if t.normalizer is not None else []))
    t.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS.values()]
    )
    for name, s in SPECIAL_TOKENS.items():
        if t.token_to_id(s) != tok.special_ids[name]:
            raise UserError(
                f"cannot write this tokenizer in Hugging Face's format: {s} would get id "
                f"{t.token_to_id(s)}, not {tok.special_ids[name]}"
            )
    p = tokenizers.processors
    eos_first = p.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, tok.eos_id)]
    )
    t.post_processor = p.Sequence([t.post_processor, eos_first]) if t.post_processor else eos_first
    return matched_before_normalising(t)


def matched_before_normalising(t: Any) -> Any:
    """`t` with every added token marked normalized=false: found in the text as written,
    before the normaliser undoes the template's escape. One marked true (GPT-2's hub
    tokenizer marks its <|endoftext|> so) would be found after it, in the message's text."""
    state = json.loads(t.to_str())
    for token in state["added_tokens"]:
        token["normalized"] = False
    return _tokenizers().Tokenizer.from_str(json.dumps(state))


def _from_gpt2(tok) -> Any:
    """The gpt2 kind wraps a `tokenizers` tokenizer already: a fresh copy of it."""
    return _tokenizers().Tokenizer.from_str(tok.to_bytes().decode("utf-8"))


def _from_sentencepiece(tok) -> Any:
    """Our SentencePiece BPE model as a `tokenizers` BPE that encodes every text alike.

    SentencePiece's BPE splits the text into characters, then repeatedly merges the adjacent
    pair whose union is the piece with the highest score; `tokenizers`' BPE merges the pair
    that comes first in its merge list. So the merge list is every split of every piece into
    two pieces, ordered by the piece's score: the same merges in the same order.
    - vocabulary: the same pieces at the same ids, with SentencePiece's "▁" written as the
      space it stands for; a literal "▁" is then unknown and becomes its three UTF-8 bytes,
      as SentencePieceTokenizer.encode writes it;
    - byte_fallback: a character with no piece becomes one <0xNN> piece per UTF-8 byte;
    - no pre-tokenizer: SentencePiece, too, encodes the text as one sequence;
    - decoder: <0xNN> pieces back to bytes, then everything joined. (A run of byte pieces
      that is not valid UTF-8 becomes one U+FFFD per byte, where SentencePiece keeps the
      valid bytes in it: only broken text, which encode never gives, decodes differently.)
    """
    tokenizers = _tokenizers()
    sp = tok.sp
    vocab, text_pieces = {}, {}  # piece -> id: all of them / those that text is made of
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)):
            piece = piece.replace(SPACE_SYMBOL, " ")
            text_pieces[piece] = i
        vocab[piece] = i
    merges = sorted(
        (-sp.get_score(i), i, k, (piece[:k], piece[k:]))
        for piece, i in text_pieces.items()
        for k in range(1, len(piece))
        if piece[:k] in text_pieces and piece[k:] in text_pieces
    )
    model = tokenizers.models.BPE(
        vocab=vocab, merges=[m[-1] for m in merges], unk_token=sp.id_to_piece(0), byte_fallback=True
    )
    t = tokenizers.Tokenizer(model)
    d = tokenizers.decoders
    t.decoder = d.Sequence([d.ByteFallback(), d.Fuse()])
    return t


BACKENDS = {"gpt2": _from_gpt2, "sentencepiece": _from_sentencepiece}
