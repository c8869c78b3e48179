package guestlog

import (
	"fmt"
	"strings"
	"testing"
	"time"
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
	for _, l := range strings.Split(checkSample, "\n") {
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

func TestWorkRate(t *testing.T) {
	at := time.Unix(1000, 0)
	var lines []TimedLine
	add := func(sec float64, s string) {
		l, ok := Parse(s)
		if !ok {
			t.Fatalf("unparsed %q", s)
		}
		lines = append(lines, TimedLine{At: at.Add(time.Duration(sec * float64(time.Second))), Line: l})
	}
	// CPU 0 checks 1000 pages/s, CPU 1 writes 500 pages/s.
	for i := 0; i <= 10; i++ {
		add(float64(i), fmt.Sprintf("ferry-guest: verify cpu=0 seq=%d tsc=1 ms=%d passes=0 checked=%d mutated=0 regs=0 errors=0", i, i*1000, i*1000))
		add(float64(i), fmt.Sprintf("ferry-guest: hb cpu=1 seq=%d tsc=1 ms=%d pages=500 rate=1 worst_us=1", i, i*1000))
	}
	if r := WorkRate(lines, at, at.Add(10*time.Second)); r < 1499 || r > 1501 {
		t.Fatalf("rate %f, want 1500", r)
	}
	if r := WorkRate(lines, at.Add(20*time.Second), at.Add(30*time.Second)); r != 0 {
		t.Fatalf("empty window: rate %f", r)
	}
}

const checkSample = `ferry-guest: boot cpus=2 tsc_khz=2596140 apic_hz=1000000000 avx=1 region=0x400000 region_mb=64 boot_ms=18 cmdline="workload=dirty size=64M check=1"
ferry-guest: start cpu=0 workload=dirty base=0x400000 pages=8192 table=0x23f8000 table_pages=8
ferry-guest: hb cpu=0 seq=0 tsc=1000 ms=100 pages=2560 rate=104857600 worst_us=100 checked=0 errors=0
ferry-guest: hb cpu=1 seq=0 tsc=1000 ms=100 pages=2560 rate=104857600 worst_us=100 checked=0 errors=0
ferry-guest: hb cpu=0 seq=1 tsc=2000 ms=200 pages=2560 rate=104857600 worst_us=100 checked=900 errors=0
ferry-guest: hb cpu=1 seq=1 tsc=2000 ms=200 pages=2560 rate=104857600 worst_us=100 checked=1000 errors=0
ferry-guest: hb cpu=0 seq=2 tsc=3000 ms=300 pages=2560 rate=104857600 worst_us=100 checked=3400 errors=0
ferry-guest: hb cpu=1 seq=2 tsc=3000 ms=300 pages=2560 rate=104857600 worst_us=100 checked=3500 errors=2
`

func TestCheckCounters(t *testing.T) {
	lines, err := ParseAll(strings.NewReader(checkSample))
	if err != nil {
		t.Fatal(err)
	}
	s := Summarize(lines)
	// The FAIL lines went to a console no one read: the counters still tell.
	if !s.Checking || s.Checked != 6900 || s.BeatErrors != 2 || len(s.Failures) != 0 {
		t.Fatalf("summary %+v", s)
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "2 errors") {
		t.Fatalf("Healthy() = %v", err)
	}
	clean := Summarize(lines[:len(lines)-1])
	if err := clean.Healthy(); err != nil || clean.Checked != 4400 {
		t.Fatalf("without the last line: checked %d, Healthy() = %v", clean.Checked, err)
	}
	// check=0 heartbeats carry no counters.
	plain, _ := ParseAll(strings.NewReader(sample))
	if ps := Summarize(plain); ps.Checking || ps.Checked != 0 || ps.BeatErrors != 0 || HasCheck(plain[2]) {
		t.Fatalf("check=0 summary %+v", ps)
	}

	at := time.Unix(1000, 0)
	var timed []TimedLine
	for i, l := range lines {
		timed = append(timed, TimedLine{At: at.Add(time.Duration(i) * time.Second), Line: l})
	}
	// Everything: since boot.
	if c, e := Checks(timed, time.Time{}, at.Add(time.Hour)); c != 6900 || e != 2 {
		t.Fatalf("Checks over all: %d checked, %d errors", c, e)
	}
	// After the seq=1 beats (lines 4 and 5 arrive at +4 s, +5 s).
	if c, e := Checks(timed, at.Add(5*time.Second), at.Add(time.Hour)); c != 5000 || e != 2 {
		t.Fatalf("Checks after seq 1: %d checked, %d errors", c, e)
	}
	if c, e := Checks(timed, at.Add(time.Hour), at.Add(2*time.Hour)); c != 0 || e != 0 {
		t.Fatalf("Checks over an empty window: %d checked, %d errors", c, e)
	}
}
