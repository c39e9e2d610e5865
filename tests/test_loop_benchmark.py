"""The loop benchmark's arithmetic (the benchmark itself is a job, not a test: research.benchmark_loop)."""
from research.benchmark_loop import window_total


def test_window_means_are_summed_back_over_their_steps():
    # log steps 10, 20 and a checkpoint window ending at 25: means 1.0, 2.0 and 4.0 per step
    assert window_total({10: 1.0, 20: 2.0, 25: 4.0}) == 10 * 1.0 + 10 * 2.0 + 5 * 4.0
    assert window_total({}) == 0.0
