"""The error of the data pipeline."""


class DataError(ValueError):
    """Training data that cannot be used, with the reason and the file it concerns."""
