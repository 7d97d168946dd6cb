"""Denoisers by name: ``@register_model("name")`` adds a model; :func:`build_model` looks it up.

The name is the value of ``ModelConfig.arch``.

Diff-ST (``"diffst"``), the Guided-DM baseline (``"guided_dm"``) and the regressor baselines of
:mod:`diffst.models.baselines` register themselves when :mod:`diffst.models` is imported; a new model (a baseline, an ablation) registers the same way, in its own
module, without editing a central list::

    @register_model("my_baseline")
    class MyBaseline(nn.Module):
        def __init__(self, cfg: ModelConfig): ...

A registered class is called with the validated :class:`~diffst.models.config.ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from diffst.errors import InputError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MODELS", "build_model", "model_class", "register_model"]

# Called with the validated ModelConfig (not named here: models.config imports this module to check ``arch``).
ModelFactory = Callable[[Any], "nn.Module"]
F = TypeVar("F", bound=ModelFactory)

#: Registered denoisers: name (the value of ``ModelConfig.arch``) -> class (or factory) taking the config.
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Class decorator: make ``ModelConfig(arch=name)`` build the decorated class.

    Registering the same class again (a module reloaded) is allowed; another class under a taken name is
    an error, so two models never silently share a name.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"A model's registered name must be a non-empty string, got {name!r}.")

    def decorator(factory: F) -> F:
        known = MODELS.get(name)
        if known is not None and _qualname(known) != _qualname(factory):
            raise InputError(
                f"Model name {name!r} is already registered to {_qualname(known)}; choose another name for "
                f"{_qualname(factory)}."
            )
        MODELS[name] = factory
        return factory

    return decorator


def model_class(name: str) -> ModelFactory:
    """Return the class registered as ``name``; raises InputError listing the registered names."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"Unknown model {name!r}: registered models are {sorted(MODELS)}. Set model.arch to one of them, "
            "or register the model with @register_model (and import its module) first."
        ) from None


def build_model(cfg: Any) -> nn.Module:
    """Instantiate the denoiser registered as ``cfg.arch`` (``DiffST``, ``GuidedDMBaseline``, ...).

    Parameters
    ----------
    cfg
        A :class:`~diffst.models.config.ModelConfig`.
    """
    return model_class(cfg.arch)(cfg)


def _qualname(factory: ModelFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
