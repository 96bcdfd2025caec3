"""The zero-downtime bench's verdicts: why a request failed, how failures group, where they sit against the
action and the switches, the p99 during a switch against the baseline's, and what counts against the target."""

import httpx
import pytest

from bench.failures import (
    Sample,
    cut,
    error_reason,
    failure_records,
    group_failures,
    near_marks,
    nearest_offset,
    percentile,
    status_reason,
)
from bench.soak_report import (
    PhaseWindow,
    compare_to_baseline,
    failed_outside_bad_releases,
    phase_report,
    render,
    totals_by_kind,
)

APP1, APP2 = "http://10.0.0.11:8000", "http://10.0.0.12:8000"


def sample(at, reason=None, latency=0.01, base=APP1, method="GET", client="keepalive", rid="r"):
    return Sample(at, latency, base, method, client, rid, reason)


def test_a_request_fails_unless_it_gets_its_methods_status():
    assert status_reason("POST", 202) is None and status_reason("GET", 200) is None
    # A 200 to an ingest is not an acknowledgement: the events may not be stored.
    assert status_reason("POST", 200) == "HTTP 200"
    assert status_reason("GET", 502) == "HTTP 502"


def test_a_transport_error_is_named_by_class_and_message():
    exc = httpx.RemoteProtocolError("Server disconnected\n without sending a response.")
    assert error_reason(exc) == "RemoteProtocolError: Server disconnected without sending a response."
    assert error_reason(httpx.ReadTimeout("")) == "ReadTimeout"
    assert len(error_reason(httpx.ConnectError("x" * 500))) == len("ConnectError: ") + 100


def test_failures_group_by_reason_method_host_and_client_most_frequent_first():
    samples = [
        sample(1, "HTTP 502", base=APP2, method="POST", client="fresh"),
        sample(2, "RemoteProtocolError: Server disconnected", client="idle-gaps"),
        sample(3, "HTTP 502", base=APP2, method="POST", client="fresh"),
        sample(4),
        sample(5, "HTTP 502", base=APP1, method="POST", client="fresh"),
    ]
    assert group_failures(samples) == [
        ("HTTP 502 on POST 10.0.0.12 (fresh)", 2),
        ("HTTP 502 on POST 10.0.0.11 (fresh)", 1),
        ("RemoteProtocolError: Server disconnected on GET 10.0.0.11 (idle-gaps)", 1),
    ]


def test_a_failure_is_placed_against_the_action_start_and_the_nearest_switch():
    assert nearest_offset(105.0, [100.0, 106.5]) == -1.5
    assert nearest_offset(99.0, [100.0, 106.5]) == -1.0
    assert nearest_offset(99.0, []) is None
    [record] = failure_records("rollback app", [sample(104.25, "HTTP 502", rid="abc"), sample(104.3)],
                               action_start=100.0, switches=[103.0, 110.0])
    assert (record.phase, record.request_id, record.since_action_s, record.from_switch_s) == (
        "rollback app", "abc", 4.25, 1.25)
    assert "+4.25s into the action, +1.25s from the nearest switch" in record.line()


def test_percentile_is_nearest_rank():
    values = [i / 1000 for i in range(1, 101)]
    assert percentile(values, 0.99) == 0.099
    assert percentile(values, 0.5) == 0.05
    assert percentile([0.3], 0.99) == 0.3
    assert percentile([], 0.99) is None


def test_near_marks_keeps_the_requests_answered_around_a_switch():
    samples = [sample(t) for t in (10.0, 12.0, 13.5, 20.0)]
    assert [s.at for s in near_marks(samples, [14.0], window_s=2.0)] == [12.0, 13.5]
    assert near_marks(samples, []) == []


def windows():
    return [
        PhaseWindow("baseline", "baseline", 0, 0, 2, 12, 14),
        PhaseWindow("rollback app", "rollback-app", 1, 14, 16, 30, 32, switches=(20.0,)),
        PhaseWindow("bad", "bad-release", 1, 32, 34, 60, 62, switches=(40.0,), exit_code=3),
        PhaseWindow("racy", "racy-control", 1, 62, 64, 66, 68, switches=(65.0,)),
    ]


def load_samples():
    # Baseline: p99 of 100 requests at 10..100 ms is 99 ms. The rollback: slow at its switch (300 ms), one
    # disconnect; the bad release: two 500s.
    baseline = [sample(2 + i / 10, latency=(i + 1) / 1000) for i in range(100)]
    rollback = [sample(17 + i / 100, latency=0.05) for i in range(100)] + [sample(20.5, latency=0.3)]
    rollback.append(sample(21.0, "RemoteProtocolError: Server disconnected", client="idle-gaps"))
    bad = [sample(40.1, "HTTP 500"), sample(41.0, "HTTP 500"), sample(45.0)]
    racy = [sample(65.1, "ConnectError: [Errno 111] Connection refused", client="fresh")]
    return baseline + rollback + bad + racy


def test_phase_reports_count_requests_failures_and_p99s_in_their_own_windows():
    reports = [phase_report(w, load_samples()) for w in windows()]
    baseline, rollback, bad, racy = reports
    assert (baseline.requests, baseline.failed, baseline.p99_ms) == (100, 0, 99.0)
    assert (rollback.requests, rollback.failed, rollback.switches) == (102, 1, 1)
    assert rollback.p99_switch_ms == 300.0
    assert rollback.failures[0].from_switch_s == 1.0 and rollback.failures[0].since_action_s == 5.0
    assert bad.reasons == [("HTTP 500 on GET 10.0.0.11 (keepalive)", 2)] and bad.exit_code == 3

    assert compare_to_baseline(reports) == 99.0
    assert rollback.p99_vs_baseline == pytest.approx(3.03) and baseline.p99_vs_baseline is None
    # The bad release's 500s are its blast radius and the racy control must fail: only the rollback's
    # disconnect counts against the target.
    assert racy.failed == 1
    assert failed_outside_bad_releases(reports) == 1


def test_totals_and_text_show_every_kind_and_the_reasons():
    reports = [phase_report(w, load_samples()) for w in windows()]
    compare_to_baseline(reports)
    totals = {t.kind: t for t in totals_by_kind(reports)}
    assert totals["bad-release"].failed == 2 and totals["rollback-app"].worst_p99_vs_baseline == 3.03
    text = "\n".join(render(reports, 99.0))
    assert "1x RemoteProtocolError: Server disconnected on GET 10.0.0.11 (idle-gaps)" in text
    assert "round 1, bad (the bad release's blast radius)" in text
    assert "round 1, racy (the negative control)" in text
    assert "| 1 | rollback app | 102 | 1 | 14 | 1 | 50 | 300 | 3.03x |" in text


def test_cut_spans_the_bad_release_and_widens_to_every_failure():
    samples = [sample(9.0), sample(10.5, "HTTP 500"), sample(11.0), sample(12.0, "HTTP 500"), sample(14.0)]
    window = cut(samples, took_traffic=11.0, healthy=13.0)
    assert (window.start, window.end) == (10.5, 13.0)
    assert (window.requests, window.failed) == (3, 2)


def test_cut_counts_only_failed_requests_as_failed():
    samples = [sample(10.0 + i / 10) for i in range(10)] + [sample(10.35, "HTTP 500")]
    window = cut(samples, took_traffic=10.0, healthy=11.0)
    assert (window.requests, window.failed) == (11, 1)
    assert window.share == pytest.approx(1 / 11)


def test_a_window_without_requests_has_no_failed_share():
    assert cut([], took_traffic=1.0, healthy=2.0).share == 0.0
