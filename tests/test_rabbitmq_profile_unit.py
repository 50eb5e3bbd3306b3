"""bench/rabbitmq_profile.py's reading of rabbitmq-diagnostics runtime_thread_stats (pure parsing)."""
from bench import rabbitmq_profile

SAMPLE = """Will collect runtime thread stats on webos@localhost for 3 seconds...
Average thread real-time    : 3000268 us
Accumulated system run-time : 6690640 us
Average scheduler run-time  : 1898134 us

        Thread emulator     port      aux check_io       gc    other    sleep

Stats per thread:
     async( 0)    0.00%    0.00%    0.00%    0.00%    0.00%    0.00%  100.00%
 scheduler( 1)   35.26%   19.42%    1.68%    0.57%    4.63%    2.33%   36.11%

Stats per type:
         async    0.00%    0.00%    0.00%    0.00%    0.00%    0.00%  100.00%
     scheduler   38.14%   15.39%    1.43%    0.54%    4.91%    2.85%   36.73%
"""


class FakeNode:
    def run(self, script, *arguments, timeout=300):
        assert script.endswith("rabbitmq-diagnostics") and arguments[0] == "runtime_thread_stats"
        return SAMPLE


def test_thread_stats_are_read_per_thread_type_with_each_activity():
    table = rabbitmq_profile.thread_stats(FakeNode(), 3)
    assert set(table) == {"async", "scheduler"}  # the per-thread rows are not mixed in
    assert table["scheduler"] == {"emulator": 38.14, "port": 15.39, "aux": 1.43, "check_io": 0.54,
                                  "gc": 4.91, "other": 2.85, "sleep": 36.73}
