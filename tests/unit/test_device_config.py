"""DeviceConfig refuses what an app might pass by mistake, before anything contacts a server."""

import math

import pytest

from device_sdk.device import DeviceConfig
from device_sdk.errors import ConfigError


@pytest.mark.parametrize(("field", "value", "message"), [
    ("budget_mb", "4000", "budget_mb must be a positive number of MiB, got '4000'"),
    ("budget_mb", math.nan, "budget_mb must be a positive number of MiB, got nan"),
    ("budget_mb", True, "budget_mb must be a positive number of MiB, got True"),
    ("budget_mb", 0, "budget_mb must be a positive number of MiB, got 0"),
    ("poll_s", 0, "poll_s must be a positive number of seconds, got 0"),
    ("poll_s", -1.0, "poll_s must be a positive number of seconds, got -1.0"),
    ("budget_step_s", 2.0, "budget_step_s must be a positive number of seconds and goes with budget_mb"),
])
def test_bad_numbers_are_refused_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        DeviceConfig(server="http://127.0.0.1:9", data=tmp_path, state_dir=tmp_path / "s", **{field: value})
    DeviceConfig(server="http://127.0.0.1:9", data=tmp_path, state_dir=tmp_path / "s", budget_mb=4000, poll_s=0.5)
