"""The machinery every training stage shares: the runtime (device, precision, DDP), the one
training loop (trainer.py) and what guards it (guards.py), the set-up around a stage
(stage.py), the optimizer and its schedule (optim.py, muon.py), checkpoints (one format,
checkpoint.py; a Hugging Face model read as one, pretrained.py), atomic files, metrics.jsonl,
the progress bar and the machine's peak FLOP/s."""
