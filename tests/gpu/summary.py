"""One line per GPU check from pytest's JUnit XML, and the exit status of ``tests/gpu/run.sh``:
1 if any check failed, if pytest itself failed, or if no check passed (everything skipped means
nothing was tested: a GPU run must not look green then).

    python tests/gpu/summary.py REPORT.xml PYTEST_STATUS
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from typing import List, Tuple


def outcomes(report: str) -> List[Tuple[str, str, float, str]]:
    """(check, PASSED/FAILED/SKIPPED, seconds, reason) per test case."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{(case.get('classname') or '').split('.')[-1]}::{case.get('name')}"
        secs = float(case.get("time", 0) or 0)
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")  # Elements without children are falsy: compare with None
        if failed is not None:
            out.append((name, "FAILED", secs, (failed.get("message") or "").splitlines()[0][:150]
                        if failed.get("message") else ""))
        elif skipped is not None:
            out.append((name, "SKIPPED", secs, (skipped.get("message") or "")[:150]))
        else:
            out.append((name, "PASSED", secs, ""))
    return out


def exit_status(results: List[Tuple[str, str, float, str]], pytest_status: int) -> Tuple[int, str]:
    passed = sum(r[1] == "PASSED" for r in results)
    failed = sum(r[1] == "FAILED" for r in results)
    if failed or pytest_status not in (0, 5):  # 5: nothing collected, judged by "none passed" below
        return 1, f"{failed} check(s) failed (pytest exit status {pytest_status})"
    if passed == 0:
        return 1, f"no check passed ({len(results)} skipped): nothing was tested"
    return 0, f"{passed} passed, {len(results) - passed} skipped"


def main(argv: List[str]) -> int:
    report, pytest_status = argv[0], int(argv[1])
    try:
        results = outcomes(report)
    except (OSError, ET.ParseError) as e:
        print(f"== GPU checks ==\nno report from pytest ({e}); exit status {pytest_status}")
        return 1
    print("\n== GPU checks ==")
    for name, status, secs, reason in results:
        print(f"{name}  {status:8} {reason}  ({secs:.0f}s)")
    status, line = exit_status(results, pytest_status)
    print(("OK: " if status == 0 else "FAILED: ") + line)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
