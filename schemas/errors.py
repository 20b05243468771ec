"""The one error type for bad user input: a single readable line naming what is wrong and what is accepted."""


class SpecError(ValueError):
    """Bad user input (spec, shorthand text, option). ``str(err)`` is one line meant for people."""

    def __init__(self, message: str):
        # One line, always: specs are often pasted into shells and logs.
        super().__init__(" ".join(str(message).split()))


class PlacementError(RuntimeError):
    """A layout could not place what the request asks for; the pipeline retries with a derived seed."""


class GenerationError(RuntimeError):
    """A sample could not be generated within the spec's bounded number of attempts."""
