"""Bytes on disk to batches: corpus sources, data preparation, loaders, instruction data."""
