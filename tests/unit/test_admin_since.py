"""`./dev admin reconcile --since T`: T as an ISO date or date/time, or Unix seconds."""
import argparse

import pytest

from devtool import admin


@pytest.mark.parametrize("text, since_ms", [
    ("2026-11-27", 1_795_737_600_000),                   # a date: midnight UTC
    ("2026-11-27T09:30:00", 1_795_771_800_000),          # no offset: UTC
    ("2026-11-27T09:30:00Z", 1_795_771_800_000),
    ("2026-11-27T10:30:00+01:00", 1_795_771_800_000),    # an offset is honoured
    ("2026-11-27 09:30:00.250Z", 1_795_771_800_250),
    ("1795771800", 1_795_771_800_000),                   # Unix seconds
    ("1795771800.5", 1_795_771_800_500),
    (" 0 ", 0),
])
def test_since_takes_iso_times_and_unix_seconds(text, since_ms):
    assert admin.parse_since(text) == since_ms


@pytest.mark.parametrize("text", ["yesterday", "", "-5", "1e9", "2026-13-01", "1969-12-31T23:59:59Z",
                                  "17957718000000000"])
def test_anything_else_is_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        admin.parse_since(text)


def test_a_bad_since_stops_the_command_with_a_usage_error():
    with pytest.raises(SystemExit) as usage:
        admin.main(["reconcile", "--since", "last week"])
    assert usage.value.code == 2
