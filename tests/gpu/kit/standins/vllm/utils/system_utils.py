"""GPU kit stand-in for ``vllm.utils.system_utils`` (the real one imports the platform interface,
psutil and Ray helpers): ``suppress_stdout``, which ``vllm.distributed.utils`` uses, as vLLM 0.32.0
writes it (stdout of C libraries silenced at the file-descriptor level unless debug logging is on)."""
import contextlib
import logging
import os
import sys

logger = logging.getLogger("vllm.utils.system_utils")


@contextlib.contextmanager
def suppress_stdout():
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    stdout_fd = 1
    stdout_dup = os.dup(stdout_fd)
    devnull_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stdout.flush()
        os.dup2(devnull_fd, stdout_fd)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(stdout_dup, stdout_fd)
        os.close(stdout_dup)
        os.close(devnull_fd)
