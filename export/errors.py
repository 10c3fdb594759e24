"""Errors of the export package."""

from collections.abc import Iterator
from contextlib import contextmanager

from device_sdk.errors import SDKError


class ExportError(SDKError):
    """An export could not be made (bad checkpoint, unsupported option, exporter failure)."""


class VerificationError(ExportError):
    """An exported model does not match the PyTorch model; the message carries the numbers."""


@contextmanager
def exporter_failures(what: str) -> Iterator[None]:
    """Report any failure of a third-party exporter inside the block (torch.export, exir, torch.onnx raise many
    types) as one :class:`ExportError` ``"{what} failed: <type>: <message>"``; an ``ExportError`` passes as it is."""
    try:
        yield
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{what} failed: {type(err).__name__}: {str(err)[:500]}") from err
