package guestlog

import (
	"strings"
	"testing"
)

// Lines the Linux guest's checker (guest/linux/ferry-check) printed under
// QEMU TCG (-smp 2), with the kernel's and /init's console output as it
// came: a clean run, and a run with every self-test option (kmsg_test,
// clock_test, corrupt_after with files=; docs/linux-guests.md, "The
// checker"), of which only the first and last heartbeats are kept.
const linuxClean = `ferry-linux: check started: ferry-check size=64M rate=16M pattern=hotcold files=8M exit_after=15s
ferry-guest: boot cpus=2 tsc_khz=0 apic_hz=0 avx=1 region=0 region_mb=64 boot_ms=3072 cmdline="size=64M rate=16M pattern=hotcold files=8M exit_after=15s" threads=2 pages=16384 files=8388608
ferry-guest: start cpu=0 workload=dirty base=0 pages=8192 first=0x0 pin=0
ferry-guest: start cpu=1 workload=dirty base=0 pages=8192 first=0x2000 pin=1
ferry-guest: hb cpu=0 seq=0 tsc=10197717327 ms=783 pages=255 rate=10156109 worst_us=2963 checked=255 errors=0 gap_us=11397
ferry-guest: hb cpu=1 seq=0 tsc=10329019365 ms=846 pages=255 rate=10428691 worst_us=620 checked=255 errors=0 gap_us=12526
ferry-guest: hb cpu=0 seq=1 tsc=10407379773 ms=884 pages=204 rate=8335698 worst_us=331 checked=459 errors=0 gap_us=13167
ferry-guest: hb cpu=1 seq=138 tsc=40032663342 ms=15018 pages=255 rate=10422193 worst_us=307 checked=28815 errors=0 gap_us=12909
ferry-guest: hb cpu=0 seq=139 tsc=40061685657 ms=15032 pages=255 rate=10421595 worst_us=936 checked=29172 errors=0 gap_us=10540
ferry-guest: final pages=16384 bad=0 ms=15082 took_us=33731
ferry-guest: exit errors=0 ms=15162 reason=exit_after mem=0 clock=0 kernel=0 file=0 checked=74371 max_gap_us=155319 kmsg_records=364
ferry-linux: check exit=0
ferry-linux: done, rebooting
`

const linuxFailing = `ferry-linux: check started: ferry-check size=16M rate=8M pattern=random hb=500ms files=4M kmsg_test=1 clock_test=1 corrupt_after=3s exit_after=6s
ferry-guest: boot cpus=2 tsc_khz=0 apic_hz=0 avx=1 region=0 region_mb=16 boot_ms=4106 cmdline="size=16M rate=8M pattern=random hb=500ms files=4M kmsg_test=1 clock_test=1 corrupt_after=3s exit_after=6s" threads=2 pages=4096 files=4194304
[    4.182875] ferry-check kmsg_test: watchdog: BUG: soft lockup - CPU#0 stuck for 0s! [ferry-check:1]
ferry-guest: start cpu=0 workload=dirty base=0 pages=2048 first=0x0 pin=0
ferry-guest: start cpu=1 workload=dirty base=0 pages=2048 first=0x800 pin=1
ferry-guest: FAIL what=kernel rule=soft_lockup ts_us=4182875 msg="ferry-check kmsg_test: watchdog: BUG: soft lockup - CPU#0 stuck for 0s! [ferry-check:1]"
ferry-guest: hb cpu=1 seq=0 tsc=13247872218 ms=792 pages=512 rate=4182421 worst_us=4388 checked=512 errors=0 gap_us=16677
ferry-guest: hb cpu=0 seq=0 tsc=13297377324 ms=816 pages=512 rate=4191596 worst_us=3254 checked=512 errors=0 gap_us=16590
ferry-guest: corrupt what=clock clock=realtime step_ms=-1000
ferry-guest: FAIL cpu=1 what=clock clock=realtime prev=1796321512412465630 now=1796321511425339060
ferry-guest: FAIL cpu=0 what=clock clock=realtime prev=1796321512417271530 now=1796321511427164560
ferry-guest: corrupt what=mem page=0x800 offset=0x18
ferry-guest: corrupt what=file offset=0x200000
ferry-guest: FAIL cpu=1 what=mem page=0x800 gpa=0x1f08e018 offset=0x18 gen=1 expected=0x80000000004 found=0x80000000104 words=1 va=0x7fd0f0c57018
ferry-guest: FAIL what=file path=/tmp/ferry-check.dat offset=0x200000 blocks=1
ferry-guest: hb cpu=1 seq=10 tsc=23736405084 ms=5796 pages=512 rate=4192275 worst_us=1888 checked=5760 errors=2 gap_us=13204
ferry-guest: hb cpu=0 seq=10 tsc=23784751977 ms=5819 pages=512 rate=4192854 worst_us=648 checked=5760 errors=1 gap_us=11709
ferry-guest: final pages=4096 bad=0 ms=6080 took_us=19953
ferry-guest: exit errors=5 ms=6190 reason=exit_after mem=1 clock=2 kernel=1 file=1 checked=15872 max_gap_us=38422 kmsg_records=367
ferry-linux: check exit=1
ferry-linux: done, rebooting
`

func TestLinuxCheckerClean(t *testing.T) {
	lines, err := ParseAll(strings.NewReader(linuxClean))
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 10 {
		t.Fatalf("got %d protocol lines, want 10", len(lines))
	}
	boot := lines[0]
	if boot.Kind != KindBoot || boot.Fields["cmdline"] != "size=64M rate=16M pattern=hotcold files=8M exit_after=15s" ||
		boot.MustUint("threads") != 2 || boot.MustUint("region_mb") != 64 {
		t.Fatalf("boot line parsed as %+v", boot)
	}
	if st := lines[2]; st.Kind != KindStart || st.MustUint("first") != 0x2000 || st.Fields["pin"] != "1" {
		t.Fatalf("start line parsed as %+v", st)
	}
	if hb := lines[3]; !HasCheck(hb) || hb.MustUint("gap_us") != 11397 || hb.MustUint("worst_us") != 2963 {
		t.Fatalf("hb line parsed as %+v", hb)
	}
	s := Summarize(lines)
	if !s.Booted || s.CPUs != 2 || s.Heartbeats != 5 || !s.Checking || s.Checked != 29172+28815 ||
		!s.Exited || s.ExitErrors != 0 || s.BeatErrors != 0 || len(s.Failures) != 0 {
		t.Fatalf("summary %+v", s)
	}
	if err := s.Healthy(); err != nil {
		t.Fatalf("Healthy() = %v", err)
	}
	if exit := lines[len(lines)-1]; exit.MustUint("max_gap_us") != 155319 || exit.Fields["reason"] != "exit_after" {
		t.Fatalf("exit line parsed as %+v", exit)
	}
}

func TestLinuxCheckerFailures(t *testing.T) {
	lines, err := ParseAll(strings.NewReader(linuxFailing))
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(lines)
	if len(s.Failures) != 5 || s.ExitErrors != 5 || s.BeatErrors != 3 || s.Checked != 2*5760 || s.Heartbeats != 4 {
		t.Fatalf("summary %+v", s)
	}
	what := map[string]Line{}
	for _, f := range s.Failures {
		what[f.Fields["what"]] = f
	}
	k := what["kernel"]
	if k.Fields["rule"] != "soft_lockup" || k.MustUint("ts_us") != 4182875 ||
		k.Fields["msg"] != "ferry-check kmsg_test: watchdog: BUG: soft lockup - CPU#0 stuck for 0s! [ferry-check:1]" {
		t.Fatalf("kernel failure parsed as %+v", k)
	}
	m := what["mem"]
	if m.MustUint("cpu") != 1 || m.MustUint("page") != 0x800 || m.MustUint("gpa") != 0x1f08e018 ||
		m.MustUint("expected") != 0x80000000004 || m.MustUint("found") != 0x80000000104 || m.MustUint("words") != 1 {
		t.Fatalf("mem failure parsed as %+v", m)
	}
	if c := what["clock"]; c.Fields["clock"] != "realtime" || c.MustUint("prev") <= c.MustUint("now") {
		t.Fatalf("clock failure parsed as %+v", c)
	}
	if f := what["file"]; f.Fields["path"] != "/tmp/ferry-check.dat" || f.MustUint("offset") != 0x200000 {
		t.Fatalf("file failure parsed as %+v", f)
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "what=kernel") {
		t.Fatalf("Healthy() = %v", err)
	}
}

// A kernel message may hold '=' and ':' (RCU stall reports do; /dev/kmsg
// writes a tab as \x09); the checker turns double quotes into single
// ones, so the quoted value ends at its closing quote.
func TestLinuxKernelMessage(t *testing.T) {
	l, ok := Parse(`ferry-guest: FAIL what=kernel rule=rcu_stall ts_us=61234567 msg="rcu: \x09(t=21002 jiffies g=1234 q=56 ncpus=2) 'x'"`)
	if !ok || l.Kind != KindFail || l.Fields["rule"] != "rcu_stall" ||
		l.Fields["msg"] != `rcu: \x09(t=21002 jiffies g=1234 q=56 ncpus=2) 'x'` || len(l.Fields) != 4 {
		t.Fatalf("parsed as %+v", l)
	}
}
