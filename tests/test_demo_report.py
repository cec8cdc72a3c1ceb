"""trm/demo/report.py: the latency summaries, also when a run probed nothing (`trm demo --freshness-probes 0`)."""
import io

from rich.console import Console

from trm.demo.report import _latency, _percentiles


def test_no_probes_is_reported_as_not_measured_not_a_crash():
    none = _percentiles([])
    assert none == {"p50": None, "p99": None, "n": 0}
    assert _latency(none) == "not measured (0 probes)"
    some = _percentiles([10.0, 20.0, 30.0])
    assert some["n"] == 3 and some["p50"] == 20.0
    out = io.StringIO()
    Console(file=out).print(_latency(some))
    assert out.getvalue().strip() == "p50 20 ms, p99 30 ms"
