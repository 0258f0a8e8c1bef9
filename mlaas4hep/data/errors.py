"""The data layer's one error: input that cannot be used, named by file, tree, branch or field."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, tree, branch or field."""
