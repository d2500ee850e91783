"""The URL and number rules: one place, used by the command line, the registry and the HTTP API."""

from __future__ import annotations

import pytest

from kvd.validate import Invalid, base_url, number


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h:1", "must start with http:// or https://"),
        ("http://:1", "has no host"),
        ("http://h:0", "invalid port"),
        ("http://h:1/?x", "without a query or fragment"),
        ("http://h:1/#top", "without a query or fragment"),
        ("http://h st:1", "spaces, control characters"),
        ("http://h/" + "a" * 3000, "longer than 2048"),
        ("http://[::1", "is not a URL"),
    ],
)
def test_a_url_that_breaks_the_rule_is_refused_with_its_name(url: str, message: str) -> None:
    with pytest.raises(Invalid, match=message) as e:
        base_url(url, "--advertise")
    assert str(e.value).startswith("--advertise")


@pytest.mark.parametrize("url", ["http://h:1", "https://10.0.0.6:5443/", "http://[::1]:5001", "http://h/base/"])
def test_a_base_url_is_accepted_unchanged(url: str) -> None:
    assert base_url(url, "--advertise") == url


@pytest.mark.parametrize(
    ("text", "kind", "minimum", "message"),
    [
        ("lots", int, 1, "--n must be a number, not 'lots'"),
        ("1.5", int, 1, "--n must be a number, not '1.5'"),
        ("0", int, 1, "--n must be at least 1, not 0"),
        ("nan", float, 0, "--n must be at least 0, not nan"),
        ("inf", float, 0, "--n must be at least 0, not inf"),
        ("-0.5", float, 0, "--n must be at least 0, not -0.5"),
    ],
)
def test_a_number_that_breaks_the_rule_is_refused(text: str, kind: type[float], minimum: float, message: str) -> None:
    with pytest.raises(Invalid) as e:
        number(text, kind, minimum, "--n")
    assert str(e.value) == message


def test_a_number_of_its_kind_at_the_minimum_is_accepted() -> None:
    assert (number("1", int, 1, "--n"), number("0.25", float, 0.25, "--n")) == (1, 0.25)
    assert type(number("3", int, 1, "--n")) is int
