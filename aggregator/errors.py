"""Domain errors of the aggregator. Routes map them to HTTP answers (see ``app.py``); each carries a reason code."""


class AggregatorError(Exception):
    """Base class. ``status`` is the HTTP status the route layer answers with; ``code`` a stable reason."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, **details) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


def error_body(err: AggregatorError) -> dict:
    """The JSON body of every error answer (``schemas.ErrorBody``)."""
    return {"error": err.code, "detail": err.message, "extra": err.details}


class Unauthorized(AggregatorError):
    status, code = 401, "unauthorized"


class Forbidden(AggregatorError):
    status, code = 403, "forbidden"


class NotFound(AggregatorError):
    status, code = 404, "not_found"


class Conflict(AggregatorError):
    status, code = 409, "conflict"


class RoundClosed(Conflict):
    code = "round_closed"


class DeviceRetired(Conflict):
    """An enrollment with the token of a device the admin retired."""

    code = "device_retired"


class PayloadTooLarge(AggregatorError):
    status, code = 413, "payload_too_large"


class InvalidUpdate(AggregatorError):
    status, code = 422, "invalid_update"


class NotReady(AggregatorError):
    status, code = 409, "federation_not_ready"


class AggregationFailed(AggregatorError):
    """A round's uploads could not be turned into a publishable global (the round is then ``failed``)."""

    status, code = 500, "aggregation_failed"


class DataDirLocked(AggregatorError):
    """Another aggregator process already serves this data directory."""

    status, code = 500, "data_dir_locked"
