import pytest

from dagsmith.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("1m30s", 90), ("2h", 7200), ("1d", 86400), (3, 3.0)]
)
def test_parse(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "ten seconds", "-1s", "8d", True, "1s2"])
def test_reject(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_round_trip() -> None:
    for seconds in (0.25, 1, 61, 3600, 90061):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
