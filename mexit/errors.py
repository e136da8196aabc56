"""Exception types shared by every stage.

``UserError`` marks a problem the user can fix (a wrong name, a missing file, a bad value). The CLI
prints its message on one line and exits with code 2, without a traceback; anything else is a bug and
keeps its traceback. Messages should say what is wrong *and* what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, files or environment, reported as one actionable line."""


class DataError(UserError):
    """A dataset file is missing, malformed or of the wrong format."""


class ConfigError(UserError):
    """An invalid name, value or combination of options."""


class BundleError(UserError):
    """A deployment bundle is missing, partial, tampered with, or of an unsupported format."""


class InputError(UserError, ValueError):
    """An inference input has the wrong shape, dtype, rank or non-finite values.

    Also a ``ValueError`` so that library users can catch it the conventional way.
    """


class BackendUnavailableError(UserError):
    """An optional backend (TensorRT, ONNX Runtime GPU, PyTorch) is not installed or has no device."""
