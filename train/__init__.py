"""Entry points and the machinery they share: runtime, optimizer, loop, checkpoints, logging."""
