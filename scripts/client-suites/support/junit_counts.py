"""Prints "PASSED FAILED SKIPPED" for the test cases in pytest JUnit XML
reports (scripts/client-suites.sh reads that line).

A test case with a failure or an error counts as failed once. A report that
is missing or unreadable (its run crashed or timed out) counts as one
failure; when every report is missing there are no counts at all, and the
exit status is 1, so the driver reports an error instead of 0/0/0.

    python3 junit_counts.py REPORT.xml [REPORT.xml ...]
"""

import sys
import xml.etree.ElementTree as ElementTree


def main(paths):
    passed = failed = skipped = missing = 0
    for path in paths:
        try:
            root = ElementTree.parse(path).getroot()
        except (OSError, ElementTree.ParseError) as error:
            print(f"junit_counts: {path}: {error}", file=sys.stderr)
            missing += 1
            continue
        for case in root.iter("testcase"):
            outcomes = {child.tag for child in case}
            if outcomes & {"failure", "error"}:
                failed += 1
            elif "skipped" in outcomes:
                skipped += 1
            else:
                passed += 1
    if missing == len(paths):
        return 1
    print(passed, failed + missing, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
