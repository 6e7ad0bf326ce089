"""Model registry (timm style): ``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, aliases: tuple[str, ...] = ()) -> Callable:
    """Decorator registering a model factory under ``name`` (and optional aliases)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS or name in _ALIASES:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of the registered models (aliases excluded), sorted."""
    return sorted(_MODELS)


def resolve_model_name(name: str) -> str:
    """Canonical registered name for ``name`` or an alias; ``ValueError`` listing valid ones."""
    if name in _MODELS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    valid = list_models() + sorted(_ALIASES)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} Registered models: {', '.join(valid)}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name or alias (e.g. ``"ds_mbnet_v1"``,
            ``"slimmable_mbnet_v1_bn_uniform"``).
        **kwargs: forwarded to the model factory (``num_classes``, ``in_chans``, ...).

    Returns:
        The model, with ``model.model_name`` and ``model.model_kwargs`` recorded so that
        checkpoints can rebuild it.
    """
    canonical = resolve_model_name(name)
    model = _MODELS[canonical](**kwargs)
    model.model_name = canonical
    model.model_kwargs = dict(kwargs)
    return model
