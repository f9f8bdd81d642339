"""The one exception type of the reward package: an error the user can fix."""


class UserError(Exception):
    """A one-line error the user can fix; CLIs turn it into exit code 2 without a traceback.

    The message says what is wrong (recipe, dataset, path, name) and what to do about it.
    """

    exit_code = 2
