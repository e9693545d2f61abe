"""zoo: plain, residual and batch-norm MLP/CNN builders, a registry and small data sets.

The builders are added by the zoo issue; this package exists so that `pip install .`
ships both top-level packages from day one.
"""

__all__: list[str] = []
