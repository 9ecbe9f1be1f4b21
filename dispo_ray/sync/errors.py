"""The one error every weight-sync layer raises."""


class WeightSyncError(RuntimeError):
    """A weight-sync collective failed or timed out."""
