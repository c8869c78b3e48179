package guestlog

import (
	"strings"
	"testing"
)

const sample = `noise before
ferry-guest: boot cpus=2 tsc_khz=2596140 apic_hz=1000000000 avx=1 region=0x400000 region_mb=256 boot_ms=18 cmdline="workload=dirty size=256M"
ferry-guest: start cpu=0 workload=dirty base=0x400000 pages=32768
ferry-guest: hb cpu=0 seq=0 tsc=1000 pages=2560 rate=112566128 worst_us=3318
ferry-guest: hb cpu=0 seq=1 tsc=5000 pages=2560 rate=1 worst_us=1
ferry-guest: hb cpu=0 seq=2 tsc=6000 pages=2560 rate=1 worst_us=1
ferry-guest: FAIL cpu=1 what=mem page=0x10 gpa=0x4000 offset=0x8 gen=3 expected=0x1 found=0x2
ferry-guest: exit errors=1 ms=2000
`

func TestParseAndSummarize(t *testing.T) {
	lines, err := ParseAll(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 7 {
		t.Fatalf("got %d lines", len(lines))
	}
	boot := lines[0]
	if boot.Kind != KindBoot || boot.Fields["cmdline"] != "workload=dirty size=256M" || boot.MustUint("region") != 0x400000 {
		t.Fatalf("boot line parsed as %+v", boot)
	}
	s := Summarize(lines)
	if !s.Booted || s.CPUs != 2 || s.Heartbeats != 3 || len(s.Failures) != 1 || !s.Exited || s.ExitErrors != 1 {
		t.Fatalf("summary %+v", s)
	}
	if s.MaxBeatGaps[0] != 4000 {
		t.Fatalf("max gap %d", s.MaxBeatGaps[0])
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "what=mem") {
		t.Fatalf("Healthy() = %v", err)
	}
	if _, err := lines[2].Uint("nope"); err == nil {
		t.Fatal("missing field accepted")
	}
}

const fillSample = `ferry-guest: boot cpus=2 tsc_khz=2596140 apic_hz=1000000000 avx=1 region=0x400000 region_mb=8 boot_ms=18 cmdline="workload=verify size=8M fill=16M fill_check=1" fill_base=0xc00000 fill_pages=4096
ferry-guest: fill cpu=1 base=0x1400000 pages=2048 content=mixed ms=30 took_us=9000
ferry-guest: fill cpu=0 base=0xc00000 pages=2048 content=mixed ms=31 took_us=9500
ferry-guest: start cpu=0 workload=verify base=0x400000 pages=1024
ferry-guest: verify cpu=0 seq=0 tsc=1000 ms=131 passes=1 checked=1024 mutated=64 regs=1 errors=0
ferry-guest: fillcheck cpu=0 base=0xc00000 pages=2048 bad=0 ms=2001 took_us=4000
ferry-guest: FAIL cpu=1 what=fill page=0xffb gpa=0x1bfb028 offset=0x28 content=text expected=0x6e6f20656874 found=0x6e6f20654874 words=1
ferry-guest: fillcheck cpu=1 base=0x1400000 pages=2048 bad=1 ms=2002 took_us=4100
ferry-guest: exit errors=1 ms=2003
`

func TestFillLines(t *testing.T) {
	lines, err := ParseAll(strings.NewReader(fillSample))
	if err != nil {
		t.Fatal(err)
	}
	boot := lines[0]
	if boot.Fields["cmdline"] != "workload=verify size=8M fill=16M fill_check=1" || boot.MustUint("fill_base") != 0xc00000 || boot.MustUint("fill_pages") != 4096 {
		t.Fatalf("boot line parsed as %+v", boot)
	}
	if f := lines[1]; f.Kind != KindFill || f.MustUint("base") != 0x1400000 || f.Fields["content"] != "mixed" || f.MustUint("took_us") != 9000 {
		t.Fatalf("fill line parsed as %+v", f)
	}
	s := Summarize(lines)
	if s.FillPages != 4096 || s.FillChecked != 4096 || s.Heartbeats != 1 || len(s.Failures) != 1 || s.ExitErrors != 1 {
		t.Fatalf("summary %+v", s)
	}
	if f := s.Failures[0]; f.Fields["what"] != "fill" || f.MustUint("gpa") != 0x1bfb028 || f.Fields["content"] != "text" {
		t.Fatalf("failure parsed as %+v", f)
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "what=fill") {
		t.Fatalf("Healthy() = %v", err)
	}
}

func FuzzParse(f *testing.F) {
	for _, l := range strings.Split(sample, "\n") {
		f.Add(l)
	}
	for _, l := range strings.Split(fillSample, "\n") {
		f.Add(l)
	}
	f.Add(`ferry-guest: boot cmdline="unterminated`)
	f.Fuzz(func(t *testing.T, s string) {
		l, ok := Parse(s)
		if ok && !strings.Contains(s, Prefix) {
			t.Fatal("accepted a line without the prefix")
		}
		_ = l.MustUint("cpu")
	})
}
