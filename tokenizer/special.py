"""The control tokens: markers that only code inserts, by id, and text can never produce.

    bos        <|bos|>        begin of a document
    eos        <|eos|>        end of a document (also the separator between documents
                              in the pretraining token files)
    pad        <|pad|>        padding in a batch of unequal lengths
    system     <|system|>     a system turn begins (chat format)
    user       <|user|>       a user turn begins
    assistant  <|assistant|>  an assistant turn begins
    end        <|end|>        the current turn ends

Every tokenizer kind reserves one id for each of them. Encoding text never yields these
ids: a user who types "<|user|>" gets the ordinary pieces for "<", "|", "user", ... so a
chat message cannot forge a role. Decoding a control id yields nothing (the empty string).
"""

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

# name -> string, in id order: every tokenizer kind gives them consecutive ids in this order.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": BOS,
    "eos": EOS,
    "pad": PAD,
    "system": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
    "end": END,
}
