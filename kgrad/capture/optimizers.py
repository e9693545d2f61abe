"""Which Keras optimizers a model's training step may call, by name.

The default `train_step` calls `model.optimizer`; a custom one (the keras-io GAN and VAE
pattern) calls optimizers the model holds as attributes, such as `d_optimizer` and
`g_optimizer`, while `compile()` still leaves an unused default in `model.optimizer`.
kgrad hooks all of them and learns from the step itself which ones it really calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras


def model_optimizers(model: keras.Model) -> dict[str, keras.optimizers.Optimizer]:
    """The Keras optimizers held by `model`, keyed by the attribute that holds them.

    `model.optimizer` comes first (as `"optimizer"`), then every other attribute of the
    model whose value is a Keras optimizer, in the order they were assigned. An
    optimizer held under two names is listed once, under the first.

    Args:
        model: A Keras model, compiled or not.

    Returns:
        A dict from attribute name to optimizer; empty when the model holds none.

    Example:

    >>> model.compile(optimizer="adam", loss="mse")  # doctest: +SKIP
    >>> list(model_optimizers(model))  # doctest: +SKIP
    ['optimizer']
    """
    found: dict[str, keras.optimizers.Optimizer] = {}
    seen: set[int] = set()
    candidates = [("optimizer", getattr(model, "optimizer", None))]
    candidates += list(vars(model).items())
    for name, value in candidates:
        if name.startswith("_") and name != "_optimizer":
            continue
        if isinstance(value, keras.optimizers.Optimizer) and id(value) not in seen:
            seen.add(id(value))
            found["optimizer" if name == "_optimizer" else name] = value
    return found


def select_optimizers(
    model: keras.Model, names: Sequence[str] | None, argument: str = "optimizers"
) -> dict[str, keras.optimizers.Optimizer]:
    """The optimizers of `model` named in `names` (all of them when `None`).

    Args:
        model: A Keras model.
        names: Attribute names such as `["d_optimizer"]`. Defaults to every optimizer.
        argument: The argument's name in error messages. Defaults to `"optimizers"`.

    Returns:
        A dict from name to optimizer, in the model's order.

    Raises:
        ValueError: if the model holds no optimizer (it is not compiled) or a name
            is not one of its optimizers.
    """
    available = model_optimizers(model)
    if not available:
        raise ValueError(
            f"Model {model.name!r} holds no Keras optimizer: call `model.compile("
            "optimizer=..., loss=...)` (or give the model its optimizers, such as "
            "`compile(d_optimizer=..., g_optimizer=...)`) before `fit`."
        )
    if names is None:
        return available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"`{argument}` names optimizers that model {model.name!r} does not hold. "
            f"Received: {argument}={list(names)!r}. Optimizers of this model: "
            f"{', '.join(available)}"
        )
    return {name: available[name] for name in names}


def check_optimizer_names(names: str | Sequence[str] | None, argument: str = "optimizers"):
    """Normalizes an `optimizers=` argument: `None`, or a non-empty list of names.

    Raises:
        ValueError: if `names` is neither `None`, a name, nor a list of names.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            f"`{argument}` must be the name of an optimizer attribute of the model or a "
            f"non-empty list of them, such as ['d_optimizer', 'g_optimizer']. "
            f"Received: {argument}={names!r}"
        )
    return list(names)
