"""The weight sync: learner rank 0 broadcasts the policy to every generator worker.

    coordinator.py  WeightSync: the one owner (backend decision, settings, readiness gate, lock,
                    the published version) behind connect / publish / restore / reform / close
    settings.py     SyncSettings: what every member of one group agrees on, as one value
    protocol.py     one sync: sender and receiver walking the same bucket plan (the import surface)
    buckets.py      the manifest and the bucket plan; memory.py: a receiver's memory plan
    transport.py    the group (gloo / NCCL), deadlines, the readiness gate (SyncGate)
    net.py          ports, the rendezvous host, a TCPStore bound to that host only
    nccl.py         refusing a communicator vLLM disabled; errors.py: WeightSyncError
"""
