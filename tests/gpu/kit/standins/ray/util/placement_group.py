"""Placement groups of the GPU kit's Ray stand-in: one machine, so every group is ready at once."""
from __future__ import annotations

from typing import Any, Dict, List


class PlacementGroup:
    def __init__(self, bundles: List[Dict[str, float]], strategy: str):
        self.bundle_specs, self.strategy = [dict(b) for b in bundles], strategy

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> Any:
        from ray import _resolved
        return _resolved(self, "placement_group.ready")

    def wait(self, timeout_seconds: float = 30) -> bool:
        return True


def placement_group(bundles: List[Dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: Any = None, **_ignored: Any) -> PlacementGroup:
    return PlacementGroup(bundles, strategy)


def remove_placement_group(pg: PlacementGroup) -> None:
    return None
