package guestlog

import (
	"fmt"
	"testing"
	"time"
)

func TestRecorderAndHeartbeatGap(t *testing.T) {
	base := time.Unix(1000, 0)
	clock := base
	src := NewRecorder(nil)
	src.now = func() time.Time { return clock }
	dst := NewRecorder(nil)
	dst.now = func() time.Time { return clock }
	beat := func(r *Recorder, cpu, seq int) {
		fmt.Fprintf(r, "ferry-guest: hb cpu=%d seq=%d tsc=1 pages=0 rate=0 worst_us=0\n", cpu, seq)
	}
	for i := 0; i < 5; i++ {
		clock = base.Add(time.Duration(i) * 100 * time.Millisecond)
		beat(src, 0, i)
		beat(src, 1, i)
	}
	switchAt := clock.Add(50 * time.Millisecond)
	clock = clock.Add(350 * time.Millisecond) // cpu 0 comes back first
	beat(dst, 0, 5)
	clock = clock.Add(100 * time.Millisecond)
	beat(dst, 1, 5)
	// A partial line is not a line yet.
	src.Write([]byte("ferry-guest: hb cpu=0 seq=9"))
	lines := append(src.Lines(), dst.Lines()...)
	if len(lines) != 12 {
		t.Fatalf("%d lines", len(lines))
	}
	if g := HeartbeatGap(lines, switchAt); g != 450*time.Millisecond {
		t.Fatalf("gap %s, want 450ms", g)
	}
}
