#!/usr/bin/env bash
# The main job, shown: two ferry daemons on this machine act as two hosts,
# trust each other, run the test guest (dirty workload) on the first and
# migrate it live to the second with the progress display; then the report
# and the guest's own view (its heartbeats continue on the destination);
# then back to the first by post-copy.
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=bin/ferry

# Without /dev/kvm there is nothing to run a VM on here: the same demo runs
# inside two emulated hosts with real SVM (the lab, docs/lab.md).
if ! [ -c /dev/kvm ]; then
	echo "demo: this machine has no /dev/kvm, so ferry cannot run a VM on it directly."
	echo "demo: running the same demo inside two emulated hosts instead: QEMU (TCG) emulating AMD SVM"
	echo "demo: with nested paging, Debian's kernel with kvm-amd inside (docs/lab.md). Every instruction"
	echo "demo: of those hosts is emulated, so this takes a few minutes and its times are 10-50x slow."
	scripts/lab-host.sh build/lab
	exec $ferry lab run --guest test --modes precopy,postcopy
fi

work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
h1=$work/host1 h2=$work/host2
a1=127.0.0.1:7781 a2=127.0.0.1:7782
pids=()
cleanup() {
	status=$?
	if [ "$status" -ne 0 ]; then
		# Show why before the logs go with the work directory.
		for f in "$work"/d1.log "$work"/d2.log "$work"/host*/vms/*.log; do
			[ -s "$f" ] || continue
			echo "--- $f (last 20 lines)"
			tail -n 20 "$f"
		done
	fi
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting two hosts: daemons on $a1 and $a2"
FERRY_GUEST=$PWD/bin/ferry-guest.elf $ferry daemon --listen $a1 --data-dir "$h1" >"$work/d1.log" 2>&1 & pids+=($!)
FERRY_GUEST=$PWD/bin/ferry-guest.elf $ferry daemon --listen $a2 --data-dir "$h2" >"$work/d2.log" 2>&1 & pids+=($!)
for i in $(seq 50); do [ -S "$h1/api.sock" ] && [ -S "$h2/api.sock" ] && break; sleep 0.1; done
f1=$(grep -o 'SHA256:[^ ]*' "$work/d1.log" | head -1)
f2=$(grep -o 'SHA256:[^ ]*' "$work/d2.log" | head -1)
echo "host1 fingerprint $f1"
echo "host2 fingerprint $f2"
one() { $ferry --daemon "$h1/api.sock" "$@"; }
two() { $ferry --daemon "$h2/api.sock" "$@"; }

say "mutual trust (each host checks the other's fingerprint on the wire)"
one nodes trust $a2 --fingerprint "$f2" --name host2
two nodes trust $a1 --fingerprint "$f1" --name host1

say "host1: run the test guest, dirty workload (256 MiB working set, 100 MB/s, random pages)"
one run --detach --name demo --guest test --mem 1G --cpus 2 \
	--cmdline "workload=dirty size=256M rate=100M pattern=random"
sleep 2
one ps
one console --no-follow demo | tail -n 4

say "live migration host1 -> host2 (pre-copy, downtime limit 100ms)"
one migrate demo --to $a2 --mode precopy --downtime-limit 100ms

say "host2 now runs it"
two ps
sleep 2
say "the guest's own view: last heartbeats on host1, first ones on host2"
one_log=$h1/vms/demo.console two_log=$h2/vms/demo.console
grep 'ferry-guest: hb' "$one_log" | tail -n 3
echo "   --- switch-over ---"
grep 'ferry-guest: hb' "$two_log" | head -n 3
echo "   ..."
grep 'ferry-guest: hb' "$two_log" | tail -n 2
if grep -q 'FAIL\|EXCEPTION' "$two_log"; then echo "the guest reported a problem"; exit 1; fi

say "and back host2 -> host1 by post-copy: resume there at once, memory follows"
two migrate demo --to $a1 --mode postcopy
sleep 2
one ps
grep 'ferry-guest: hb' "$one_log" | tail -n 2
if grep -q 'FAIL\|EXCEPTION' "$one_log"; then echo "the guest reported a problem"; exit 1; fi
one stop demo
say "done"
