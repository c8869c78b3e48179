#!/usr/bin/env bash
# make test's runner: every Go test on this machine (go test -json), then,
# where this machine has no /dev/kvm, the most important KVM tests inside
# an emulated lab host (scripts/kvm-in-lab, docs/lab.md); then one summary
# (scripts/testsummary): each package's result, how many tests ran on this
# machine's /dev/kvm and how many in the lab, how many skipped and why,
# and a closing "N passed, N failed, N skipped" line. The tests' plain
# output is in build/test.log.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
host_json=build/test.json lab_json=build/test-lab.json log=build/test.log
rm -f "$lab_json"
# The boot loader tests also parse the real Debian kernels when they are built.
[ -f build/linux/vmlinux ] && export FERRY_TEST_VMLINUX="$PWD/build/linux/vmlinux"
[ -f build/linux/vmlinuz ] && export FERRY_TEST_BZIMAGE="$PWD/build/linux/vmlinuz"

if [ -c /dev/kvm ] && [ -r /dev/kvm ]; then
	echo "test: this machine has /dev/kvm: KVM tests run here; the lab's tests (Linux guests on emulated SVM hosts) run too"
else
	echo "test: this machine has no usable /dev/kvm: KVM tests skip here and their most important ones run inside an emulated SVM host (the lab, docs/lab.md) after the rest"
fi
# One package at a time: the KVM and lab tests of two packages would share
# two cores with their guests and turn timing into noise.
t0=$SECONDS
go test -p 1 -count=1 -json -timeout 40m ./... >"$host_json" 2>build/test.stderr
status=$?
echo "test: tests on this machine took $((SECONDS - t0)) s"
summary_args=("$host_json")
if ! [ -c /dev/kvm ]; then
	t0=$SECONDS
	if go run ./scripts/kvm-in-lab -out "$lab_json"; then
		echo "test: KVM tests in the lab took $((SECONDS - t0)) s"
	else
		echo "test: the KVM tests in the lab could not run to the end (see above)"
		status=1
	fi
	[ -s "$lab_json" ] && summary_args+=("$lab_json")
fi
cat build/test.stderr
go run ./scripts/testsummary -log "$log" "${summary_args[@]}"
sum=$?
[ "$status" -eq 0 ] && status=$sum
exit "$status"
