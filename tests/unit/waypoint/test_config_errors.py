"""Config errors are logged (and recorded as Events) once per distinct error, although the waypoint
recompiles its configuration on every xDS change."""

from __future__ import annotations

from waypoint.app import ConfigErrorsReporter
from waypoint.routing.model import ConfigError

BAD_SUBSET = ConfigError("VirtualService", "bookinfo", "reviews", "spec.http[0].route[0].destination.subset",
                         "subset 'nope' is not defined")
BAD_REGEX = ConfigError("VirtualService", "bookinfo", "ratings", "spec.http[0].match[0].uri.regex", "bad regex")


def test_an_error_is_reported_once_while_it_lasts_and_again_when_it_returns() -> None:
    reporter = ConfigErrorsReporter(None)

    assert reporter.new_errors([BAD_SUBSET]) == [BAD_SUBSET]
    assert reporter.new_errors([BAD_SUBSET]) == []  # recompiled, same error: quiet
    assert reporter.new_errors([BAD_SUBSET, BAD_REGEX]) == [BAD_REGEX]
    assert reporter.new_errors([]) == []  # fixed
    assert reporter.new_errors([BAD_SUBSET]) == [BAD_SUBSET]  # broken again: reported again
