"""common.errors.echo and the bounds ApiError keeps on what a caller sent."""
from common import errors


def test_echo_keeps_short_input_and_cuts_long_input_at_256_characters():
    assert errors.echo("ref-chat") == "ref-chat"
    assert errors.echo("x" * 256) == "x" * 256
    assert errors.echo("é" * 10_000) == "é" * 256 + "..."
    assert errors.echo(12345) == "12345"


def test_an_api_error_bounds_its_param_and_its_whole_message():
    error = errors.InvalidRequest("bad: " + "y" * 5000, param="p" * 5000)
    assert error.param == "p" * 256 + "..."
    assert error.body()["error"]["message"] == "bad: " + "y" * (errors.MESSAGE_CHARS_MAX - 5) + "..."
    assert errors.InvalidRequest("fine", param=None).param is None
