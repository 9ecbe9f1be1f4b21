"""Stand-ins for the streaming producer's unit tests (tests/rollout/test_streaming_*.py): a
published version the staleness gate reads, and a router that records the groups it is handed
instead of placing them on engines (the real engines: tests/e2e/test_streaming_e2e.py)."""
from __future__ import annotations


class Published:
    def __init__(self, version):
        self.version = version

    def watch(self, notify):
        pass

    def unwatch(self, notify):
        pass


class Recorder:
    def __init__(self):
        self.groups = []

    def submit(self, groups):
        self.groups += list(groups)
