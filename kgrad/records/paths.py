"""Checks that a log destination can be written, before training starts."""

from __future__ import annotations

import os


def check_writable_file(path: str | os.PathLike, argument: str) -> str:
    """Makes sure `path` can be appended to, creating its folder if needed.

    Args:
        path: The file to append to.
        argument: The argument name to quote in the error.

    Returns:
        The path as a string.

    Raises:
        ValueError: if the file or its folder cannot be created or written.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"`{argument}` must be a file path, but {path!r} is a directory. "
            "Give a file name such as 'grad_norms.csv'."
        )
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ValueError(
            f"`{argument}` is not writable: {error.strerror}. Received: "
            f"{argument}={path!r}. Choose a path in a folder you can write to."
        ) from error
    return path


def check_writable_dir(path: str | os.PathLike, argument: str) -> str:
    """Makes sure `path` is (or can be made) a writable folder.

    Args:
        path: The folder.
        argument: The argument name to quote in the error.

    Returns:
        The path as a string.

    Raises:
        ValueError: if the folder cannot be created or written.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".kgrad-write-check")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"`{argument}` is not a writable folder: {error.strerror}. Received: "
            f"{argument}={path!r}. Choose a folder you can write to."
        ) from error
    return path
