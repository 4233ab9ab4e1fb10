"""Serving on this machine: the tritonserver bundled in nvidia-pytriton, started, watched and stopped by PID. Used by
the CLI (``serve``, ``evaluate --serve``) and the benchmarks alike (docs/operations.md).

``local_triton``         LocalTritonServer: a repository behind the real server, on the onnxruntime or python backend
``onnxruntime_backend``  builds Triton's onnxruntime backend (r24.10) from pinned sources (``make setup`` runs it)
``server_config``        the server's command line as one typed config
``processes``            child processes in their own group: start, wait until ready, SIGTERM -> SIGKILL; free ports
"""
