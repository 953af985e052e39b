"""Errors that reach users. Each message says what was wrong and what to do about it."""


class FluxCoreError(Exception):
    """Base class: anything raised on purpose by flux_core."""


class WeightError(FluxCoreError):
    """A checkpoint could not be read or does not match the model it was detected as."""


class ConfigError(FluxCoreError):
    """Bad user input: a size, a step count, a missing file, an unavailable backend."""


class Interrupted(FluxCoreError):
    """The caller's interrupt callback asked the sampler to stop."""
