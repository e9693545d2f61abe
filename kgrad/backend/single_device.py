"""The strategy stand-in of the backends that have no `tf.distribute` strategy."""

from __future__ import annotations

import contextlib


class SingleDevice:
    """The strategy stand-in of a model trained without a `tf.distribute` strategy:
    one replica, and a scope that does nothing."""

    num_replicas_in_sync = 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
