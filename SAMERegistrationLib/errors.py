"""Exceptions with messages meant for the person running a registration."""


class InputError(ValueError):
    """Bad user input. The message names the file or option, the problem and what to do, in one line."""


class RegistrationCancelled(RuntimeError):
    """Raised between iterations when the caller asked the pipeline to stop."""


class RegistrationFailed(RuntimeError):
    """The registration ran but its result is unusable (e.g. NaN/Inf); nothing was written."""
