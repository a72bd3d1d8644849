"""loadkit's exceptions: one class per kind of failure, the CLI's exit code on each.

Raised with loadkit's own one-line message, which names the file, tensor or key at fault.
"""


class Error(Exception):
    """Anything loadkit refuses or fails to do (the CLI's exit code 1: internal, out of memory, I/O)."""

    exit_code = 1


class UsageError(Error, ValueError):
    """An option or argument value that is not allowed (exit code 2): a dtype, a device, a token."""

    exit_code = 2


class InputError(Error):
    """A bad checkpoint or input (exit code 3): missing file, corrupt header, a tensor whose
    name, shape or dtype does not fit the model, missing weights."""

    exit_code = 3


class PluginError(Error):
    """No plugin serves the architecture or quantization method, or a plugin was refused (exit code 4)."""

    exit_code = 4


_BY_EXIT_CODE = {cls.exit_code: cls for cls in (Error, UsageError, InputError, PluginError)}


def error_type(exit_code: int) -> type[Error]:
    """The class for a failure of this exit code (the extension raises through this)."""
    return _BY_EXIT_CODE.get(exit_code, Error)
