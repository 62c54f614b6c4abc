# Prints "PASSED FAILED SKIPPED" from the closing summary of Node's TAP
# reporter ("# pass N", "# fail N", "# cancelled N", "# skipped N",
# "# todo N"); cancelled tests count as failed. Exits 1 without a summary.
/^# (pass|fail|cancelled|skipped|todo) [0-9]+$/ { n[$2] = $3 }
END {
    if (!("pass" in n)) exit 1
    print n["pass"] + 0, n["fail"] + n["cancelled"], n["skipped"] + n["todo"]
}
