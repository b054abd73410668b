"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class EvomergeError(Exception):
    """Bad input (recipe, model, path, option): reported as one line, never as a traceback."""
