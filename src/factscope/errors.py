"""User-facing errors: one clear message that names the culprit, never a deep traceback."""


class FactscopeError(Exception):
    """An error caused by the user's input or environment (bad model name, malformed data, ...).

    The CLI prints its message alone and exits with status 2.
    """
