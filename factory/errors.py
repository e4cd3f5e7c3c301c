"""Errors a user can act on. Each carries a one-line message that names what was wrong."""


class FactoryError(Exception):
    """Base for every error factory reports to a person as one line (never a traceback)."""


class ConfigError(FactoryError):
    """A job spec, profile, registry or policy file is invalid."""


class InputError(FactoryError):
    """An input (manifest row, image, adapter file) cannot be used."""


class ModelError(FactoryError):
    """A model could not be built, loaded or run."""
