"""Errors meant for the user: the CLI prints their message as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input or configuration the user can fix (missing file, wrong config, incompatible checkpoint...)."""
