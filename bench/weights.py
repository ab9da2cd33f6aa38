"""Weights in and out of modules: one copy loop for every checkpoint, resume and initialisation, and
one LoRA-free copy of the base model for the recipes that train a network initialised from it."""

from __future__ import annotations

import copy
from typing import Callable

import torch


def copy_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], misfit: Callable[[int], Exception] | None = None) -> None:
    """Copy named tensors into ``module``'s parameters in place. Names the module lacks raise
    ``misfit(count)`` (the caller's one-line error) before anything is copied."""
    params = dict(module.named_parameters())
    unknown = set(tensors) - set(params)
    if unknown:
        raise misfit(len(unknown)) if misfit is not None else KeyError(f"{len(unknown)} tensors the module lacks, e.g. {sorted(unknown)[0]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def without_lora(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every peft LoRA layer replaced by the base layer it wraps, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            without_lora(child)
    return module


def base_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A standalone copy of ``module`` as the base model has it: LoRA layers removed (the frozen copy
    of a full fine-tuning has none), so training the copy never touches the tuned model's adapters."""
    return without_lora(copy.deepcopy(module))
