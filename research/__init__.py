"""Research and measurement scripts, apart from the entry points users submit (jobs/).

The memory experiments (memory_experiment, memory_report: docs/memory-experiments.md), the parts of
`python -m jobs.benchmark` (benchmark_data, benchmark_loop, benchmark_train), the step's speed against another
tree (step_speed_vs_tree) and the GPU checks (gpu_loop_check, device_checks.sh: docs/speed.md). Each runs as
`python -m research.<name> --help`.
"""
