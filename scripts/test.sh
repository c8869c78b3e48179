#!/usr/bin/env bash
# Run every Go test, keep the full log in build/test.log, print the package
# results, how many tests used /dev/kvm, and a closing "N passed, N failed,
# N skipped" line.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
log=build/test.log
# The boot loader tests also parse the real Debian kernels when they are built.
[ -f build/linux/vmlinux ] && export FERRY_TEST_VMLINUX="$PWD/build/linux/vmlinux"
[ -f build/linux/vmlinuz ] && export FERRY_TEST_BZIMAGE="$PWD/build/linux/vmlinuz"
# One package at a time: the KVM tests of two packages would share two
# cores with their guests and turn timing into noise.
go test -p 1 -count=1 -v -timeout 30m ./... >"$log" 2>&1
status=$?
grep -E '^(ok|FAIL|panic:|---)' "$log" | grep -vE '^    ' | grep -vE '^--- PASS' || true
passed=$(grep -cE '^\s*--- PASS' "$log")
failed=$(grep -cE '^\s*--- FAIL' "$log")
skipped=$(grep -cE '^\s*--- SKIP' "$log")
kvm=$(grep -cE 'KVM-TEST-RAN' "$log")
if [ "$kvm" -eq 0 ]; then
	echo "KVM tests: none ran (/dev/kvm missing?); skipped ones say why:"
	grep -A1 -E '^\s*--- SKIP' "$log" | grep -i kvm | sort -u | head -5
else
	echo "KVM tests: $kvm ran against /dev/kvm"
fi
if [ "$status" -ne 0 ]; then
	echo "failures (full log in $log):"
	grep -B2 -A20 -E '^\s*--- FAIL' "$log" | head -150
fi
echo "$passed passed, $failed failed, $skipped skipped"
exit "$status"
