"""Token id lists as one padded batch: shared by the encoder tasks and the generation scheduler."""

from __future__ import annotations

import torch


def pad_batch(inputs: list[list[int]], pad_id: int, device: torch.device, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids and their attention mask: right-padded (encoders, encoder-decoder
    prompts), or left-padded with ``left`` (decoder-only prompts, whose last tokens must line up)."""
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, seq in enumerate(inputs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)
