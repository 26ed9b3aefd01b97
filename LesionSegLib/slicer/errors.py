"""The error of the Slicer logic: bad input, with the reason shown to the user as it is."""


class LesionSegError(ValueError):
    """Bad input to the logic, with the reason (shown to the user as it is)."""
