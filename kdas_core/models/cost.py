"""Model size and cost: parameter count and multiply-accumulates at a given input size.

MACs come from PyTorch's own FlopCounterMode (FLOPs / 2). It counts every matmul, including
the attention products inside PVTv2 and the SAM, which thop-style hook counters skip; that is
why our teacher counts 10.8 GMACs at 352² where the Polyp-PVT/KDAS papers print 10.0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the model; importing this module alone stays cheap
    import torch


def count_params(model: "torch.nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: "torch.nn.Module", size: int = 352) -> int:
    """MACs of one forward pass of the fused prediction (P1 + P2) for a 1x3xSxS input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.predict_logits(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
