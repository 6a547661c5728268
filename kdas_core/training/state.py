"""Train state for an exact --resume: optimiser moments, distiller adapters, progress counters.

Stored as safetensors too (tensors + JSON), so resuming never unpickles anything.
"""

from __future__ import annotations

from typing import Any

import torch

from kdas_core.io.checkpoint import read_tensors, save_tensors


def save_train_state(path: str, optimizer: torch.optim.Optimizer, distillers: torch.nn.Module,
                     progress: dict[str, Any], scaler: torch.amp.GradScaler | None = None) -> None:
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    for key, val in distillers.state_dict().items():
        tensors[f"kd.{key}"] = val
    meta = {"format": "kdas-train-state/1", "param_groups": opt["param_groups"], "scalars": scalars,
            "progress": progress, "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    save_tensors(path, tensors, meta)


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded moment the memory layout of its parameter. A file stores tensors
    contiguous; a channels-last parameter's moments were channels-last when saved. The fused AdamW
    walks parameter and moments as flat memory, so a layout mismatch would pair the wrong
    elements: a resumed run would silently learn something else."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for key, val in st.items():
                if torch.is_tensor(val) and val.shape == p.shape and val.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=val.dtype).copy_(val)


def load_train_state(path: str, optimizer: torch.optim.Optimizer, distillers: torch.nn.Module,
                     scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    tensors, meta = read_tensors(path)
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _match_param_layout(optimizer)
    kd_state = {k[3:]: v for k, v in tensors.items() if k.startswith("kd.")}
    distillers.load_state_dict(kd_state, strict=True)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta["progress"]
