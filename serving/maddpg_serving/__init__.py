"""Serving on this machine: the tritonserver bundled in nvidia-pytriton, started, watched and stopped by PID. Used by
the CLI (``serve``, ``evaluate --serve``) and the benchmarks alike."""
