"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (recipe, dataset, path, name), with a message saying what to do."""

    exit_code = 2
