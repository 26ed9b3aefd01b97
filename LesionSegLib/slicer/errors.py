"""The errors of the Slicer layer, each with the reason shown to the user as it is."""


class LesionSegError(ValueError):
    """Bad input to the logic, with the reason (shown to the user as it is)."""


class BridgeError(ValueError):
    """A node or file that cannot be converted, with the reason."""
