"""Errors of the export package."""

from device_sdk.errors import SDKError


class ExportError(SDKError):
    """An export could not be made (bad checkpoint, unsupported option, exporter failure)."""


class VerificationError(ExportError):
    """An exported model does not match the PyTorch model; the message carries the numbers."""
