"""Fail unless a pytest JUnit XML report shows tests that all ran: none skipped, none failed (CI's vLLM step)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "skipped", "failures", "errors")}
    print(f"{path}: {counts}")
    if counts["tests"] == 0 or counts["skipped"] or counts["failures"] or counts["errors"]:
        print("error: every vLLM test must run and pass here (none skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
