"""Exceptions raised by the device SDK.

Every error a user can meet derives from :class:`SDKError`; each message says what was wrong and what to do.
"""


class SDKError(Exception):
    """Base class of all device SDK errors."""


class Cancelled(SDKError):
    """The app asked a device to stop (its ``stop`` event was set): training stopped at a step boundary, a wait at
    its next poll; a :class:`~device_sdk.device.Device` is back at its last checkpoint."""


class ConfigError(SDKError, ValueError):
    """A configuration value is invalid (reported all at once, see the config dataclasses)."""


class ModelNotFoundError(SDKError, FileNotFoundError):
    """A base model could not be found locally and cannot be downloaded."""


class InjectionError(SDKError):
    """Adapters could not be attached to a base model (unknown family, no matching target modules, ...)."""


class DataError(SDKError):
    """A user's data folder is missing, empty or malformed."""


class AdapterFileError(SDKError):
    """An adapter file does not match the model it is loaded into, or is not an adapter file at all."""


class CompileError(SDKError):
    """``torch.compile`` could not build the compiled form of a computation (``TrainConfig.compile``)."""


class BudgetError(SDKError):
    """A hardware budget is too small for even one expert at the requested batch shape."""
