"""A registry of named model variants, each a dict of arguments over one builder.

A variant is a small function, decorated with `register_model(builder)`, that returns the
builder arguments which make it that variant (as timm's `resnet18` does over `ResNet`).
`create_model(name, **overrides)` calls the builder with those arguments updated by the
overrides; `get_model_spec(name)` returns them without building anything, so tests and
search spaces can reason about a variant. The built-in variants live in `zoo.variants`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import keras

ModelBuilder = Callable[..., keras.Model]

_REGISTRY: dict[str, ModelSpec] = {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered variant: a builder and the arguments that make the variant.

    Attributes:
        name: The registered name, e.g. `"mlp_residual"`.
        builder: The function that builds the model, e.g. `zoo.build_mlp`.
        default_args: The variant's builder arguments (read-only). When the builder takes a
            `name` argument and the variant does not set one, the model is named after the
            variant.
        description: The first line of the variant function's docstring.
    """

    name: str
    builder: ModelBuilder
    default_args: Mapping[str, Any]
    description: str = ""

    def args(self, **overrides: Any) -> dict[str, Any]:
        """Returns the builder arguments with `overrides` applied, after checking their names.

        Raises:
            ValueError: If an override is not an argument of the builder.
        """
        parameters = inspect.signature(self.builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = sorted(set(overrides) - set(parameters))
        if unknown and not takes_any:
            raise ValueError(
                f"Unknown override(s) {unknown} for model {self.name!r}. "
                f"`{self.builder.__name__}` accepts: {', '.join(parameters)}"
            )
        args = dict(self.default_args)
        if "name" in parameters:
            args.setdefault("name", self.name)
        args.update(overrides)
        return args

    def build(self, **overrides: Any) -> keras.Model:
        """Builds the variant, with `overrides` replacing its default arguments."""
        return self.builder(**self.args(**overrides))


def register_model(
    builder: ModelBuilder, *, name: str | None = None
) -> Callable[[Callable[[], Mapping[str, Any]]], Callable[[], Mapping[str, Any]]]:
    """Returns a decorator that registers a variant of `builder`.

    The decorated function takes no arguments and returns the builder arguments of the
    variant; it is registered under its own name unless `name` is given, and returned
    unchanged.

    Args:
        builder: The function that builds the model from keyword arguments, e.g.
            `zoo.build_mlp`.
        name: The name to register under. Defaults to the decorated function's name.

    Returns:
        The decorator.

    Raises:
        ValueError: If `builder` is not callable, or the name is already registered.

    Example:

    >>> import zoo
    >>> @register_model(zoo.build_mlp)
    ... def mlp_tanh_deep():
    ...     '''Plain tanh MLP, 10 blocks of 32 units.'''
    ...     return dict(input_shape=(64,), num_classes=10, depth=10, activation="tanh")
    >>> create_model("mlp_tanh_deep").name
    'mlp_tanh_deep'
    """
    if not callable(builder):
        raise ValueError(
            "`register_model` takes the builder, e.g. `@register_model(zoo.build_mlp)`. "
            f"Received: builder={builder!r}"
        )

    def decorator(variant: Callable[[], Mapping[str, Any]]) -> Callable[[], Mapping[str, Any]]:
        variant_name = name or variant.__name__
        if variant_name in _REGISTRY:
            raise ValueError(
                f"A model named {variant_name!r} is already registered. Pick another `name`."
            )
        doc = inspect.getdoc(variant) or ""
        _REGISTRY[variant_name] = ModelSpec(
            name=variant_name,
            builder=builder,
            default_args=types.MappingProxyType(dict(variant())),
            description=doc.splitlines()[0] if doc else "",
        )
        return variant

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Returns the sorted names of the registered models that match a wildcard pattern.

    Args:
        pattern: An `fnmatch` pattern, e.g. `"mlp_*"` or `"*_bn"`. Defaults to `"*"`.

    Returns:
        The matching names, sorted; empty when none match.

    Example:

    >>> list_models("*_bn")
    ['cnn_bn', 'cnn_residual_bn', 'mlp_bn', 'mlp_residual_bn']
    """
    return sorted(fnmatch.filter(_REGISTRY, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """Returns the registered `ModelSpec` called `name`.

    Args:
        name: A registered name; see `list_models()`.

    Returns:
        The spec: its builder and default arguments.

    Raises:
        ValueError: If no model is registered under `name`; the message lists the names.

    Example:

    >>> get_model_spec("mlp_bn").default_args["block"]
    'batchnorm'
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown model name: {name!r}. Registered models: {', '.join(list_models())}"
        )
    return _REGISTRY[name]


def create_model(name: str, /, **overrides: Any) -> keras.Model:
    """Builds the registered model `name`, with `overrides` replacing its default arguments.

    Args:
        name: A registered name; see `list_models()`.
        **overrides: Builder arguments to change, e.g. `depth=8, activation="tanh"`.

    Returns:
        The built (uncompiled) model, named after the variant unless `name` is overridden.

    Raises:
        ValueError: If `name` is unknown (the message lists the registered names), an
            override is not a builder argument, or the builder rejects a value.

    Example:

    >>> model = create_model("mlp_residual", depth=2, width=16)
    >>> model.name, model.output_shape
    ('mlp_residual', (None, 10))
    """
    return get_model_spec(name).build(**overrides)
