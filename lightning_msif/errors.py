"""The one exception type users catch: every message names the problem and the fix."""


class MSIFError(ValueError):
    """Bad input or an inconsistent state that lightning-msif refuses to compute on."""
