"""Text to token ids and back: SentencePiece training and loading, special tokens, the chat format."""
