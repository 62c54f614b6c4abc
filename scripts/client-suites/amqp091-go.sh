# amqp091-go's own tests (unit and integration: `go test -tags integration`),
# for scripts/client-suites.sh.
# Made for github.com/rabbitmq/amqp091-go v1.5.0 as Debian 12 ships it (package
# golang-github-rabbitmq-amqp091-go-dev 1.5.0-2, with its tests); the checkout
# is a copy of that source:
#   apt-get install -y golang-go golang-github-rabbitmq-amqp091-go-dev golang-uber-goleak-dev
#   cp -a /usr/share/gocode/src/github.com/rabbitmq/amqp091-go SUITES_DIR/amqp091-go
# Go modules cannot be downloaded here, so suite_setup vendors the one
# dependency, go.uber.org/goleak, from Debian's golang-uber-goleak-dev
# (1.2.0, where go.mod asks for 1.1.12) into ./vendor, and the tests build
# with -mod=vendor, GOPROXY=off and GOPATH/GOCACHE inside the checkout.
# The integration tests read $AMQP_URL. Counts come from `go test -json`
# (top-level tests and examples). A package that fails with no failed test
# counts as one failure: a build error, or goleak's check in TestMain
# (goleak.VerifyTestMain) finding goroutines left over after all tests passed.

_amqp091_go_env() {
    export GOPATH="$PWD/.gopath" GOCACHE="$PWD/.gocache" GOFLAGS=-mod=vendor \
        GOPROXY=off GOTOOLCHAIN=local GO111MODULE=on
}

suite_setup() {
    local src=/usr/share/gocode/src/go.uber.org/goleak
    if [ ! -f "$src/leaks.go" ] || ! command -v go >/dev/null; then
        apt-get install -y golang-go golang-uber-goleak-dev
    fi
    rm -rf vendor
    mkdir -p vendor/go.uber.org/goleak/internal/stack
    local f
    for f in "$src"/*.go; do
        case "$f" in *_test.go) ;; *) cp "$f" vendor/go.uber.org/goleak/ ;; esac
    done
    cp "$src/internal/stack/stacks.go" vendor/go.uber.org/goleak/internal/stack/
    local want
    want="$(awk '$1 == "go.uber.org/goleak" { print $2 } $1 == "require" && $2 == "go.uber.org/goleak" { print $3 }' go.mod)"
    printf '# go.uber.org/goleak %s\n## explicit\ngo.uber.org/goleak\ngo.uber.org/goleak/internal/stack\n' \
        "${want:-v1.1.12}" >vendor/modules.txt
    _amqp091_go_env
    go vet -tags integration . >/dev/null
}

suite_run() {
    local log="$1" json=".client-suites-results.json"
    _amqp091_go_env
    AMQP_URL="$AMQP_URL" timeout 900 go test -count=1 -tags integration -timeout 600s \
        -json . >"$json" 2>>"$log" || true
    # A readable transcript (the tests' own output) goes to the log.
    python3 - "$json" >>"$log" <<'PY'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        ev = json.loads(line)
    except ValueError:
        sys.stdout.write(line)
        continue
    if ev.get("Action") == "output":
        sys.stdout.write(ev.get("Output", ""))
PY
    python3 - "$json" <<'PY'
import json, sys
result = {}
package_failed = False
for line in open(sys.argv[1], errors="replace"):
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    test, action = ev.get("Test"), ev.get("Action")
    if test is None:
        if action == "fail":
            package_failed = True
        continue
    if "/" in test:
        continue  # subtests count with their parent
    if action in ("pass", "fail", "skip"):
        result[test] = action
    elif action == "run":
        result.setdefault(test, "run")
# A test still "run" at the end was cut off by the timeout: a failure.
passed = sum(1 for a in result.values() if a == "pass")
skipped = sum(1 for a in result.values() if a == "skip")
failed = sum(1 for a in result.values() if a in ("fail", "run"))
if package_failed and failed == 0:
    failed += 1  # build error, or goleak's leftover goroutines after the tests
print(passed, failed, skipped)
PY
}
