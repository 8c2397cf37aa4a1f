"""The one error type for bad user input: the runner prints its message as one line and exits 2."""


class ConfigError(ValueError):
    """A bad value in the run's configuration or inputs, found before any sampling starts."""
