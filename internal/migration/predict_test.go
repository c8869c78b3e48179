package migration

import (
	"math"
	"testing"
	"time"
)

// profileOf builds a profile whose horizons follow a guest that writes
// rate random pages per tick over a working set of ws pages.
func profileOf(ws, rate float64, ticks int) *DirtyProfile {
	p := &DirtyProfile{Pages: 1 << 18, DataPages: 1 << 16, Tick: 100 * time.Millisecond}
	for i := 1; i <= ticks; i++ {
		p.Horizon = append(p.Horizon, uint64(ws*(1-math.Exp(-rate*float64(i)/ws))))
	}
	return p
}

func TestDirtyWithinExtrapolates(t *testing.T) {
	// 64 Ki pages of working set, 4 Ki random writes per 100 ms: after 10
	// s nearly all of the working set, never more.
	p := profileOf(1<<16, 4096, 10)
	for _, c := range []struct {
		d    time.Duration
		want float64
	}{{500 * time.Millisecond, 1 << 16 * (1 - math.Exp(-4096*5.0/(1<<16)))}, {5 * time.Second, 1 << 16 * (1 - math.Exp(-4096*50.0/(1<<16)))}, {time.Minute, 1 << 16}} {
		got := p.DirtyWithin(c.d)
		if math.Abs(got-c.want)/c.want > 0.05 {
			t.Errorf("within %s: %.0f pages, want %.0f", c.d, got, c.want)
		}
	}
	// A sequential writer: linear growth goes on.
	lin := &DirtyProfile{Pages: 1 << 20, Tick: 100 * time.Millisecond}
	for i := 1; i <= 10; i++ {
		lin.Horizon = append(lin.Horizon, uint64(1000*i))
	}
	if got := lin.DirtyWithin(5 * time.Second); got < 45000 || got > 51000 {
		t.Errorf("linear writer within 5 s: %.0f pages, want about 50000", got)
	}
}

func TestPredictPicks(t *testing.T) {
	opts := Options{Mode: ModeAuto}
	// A quiet guest on a fast link: pre-copy converges.
	quiet := profileOf(1024, 10, 10)
	if pr := Predict(quiet, 1<<30, opts); pr.Choice != ModePreCopy {
		t.Fatalf("quiet guest: %s (%s)", pr.Choice, pr.Reason)
	}
	// A guest dirtying faster than the link: post-copy after one pass,
	// unless rollback is required.
	busy := profileOf(1<<16, 8192, 10)
	pr := Predict(busy, 40<<20, opts)
	if pr.Choice != ModeHybrid {
		t.Fatalf("busy guest: %s (%s)", pr.Choice, pr.Reason)
	}
	auto, _ := pr.Estimate(ModeAuto)
	pre, _ := pr.Estimate(ModePreCopy)
	if auto.Downtime >= pre.Downtime || pre.Converges {
		t.Fatalf("auto %+v, pre-copy %+v", auto, pre)
	}
	opts.RequireRollback = true
	if pr := Predict(busy, 40<<20, opts); pr.Choice != ModePreCopy {
		t.Fatalf("busy guest, rollback required: %s", pr.Choice)
	}
}

func TestColdPagesFirst(t *testing.T) {
	x := &sender{}
	todo := make([]uint64, 2)
	for _, i := range []uint64{3, 7, 64, 90} {
		setBit(todo, i)
	}
	hot := make([]uint64, 2)
	setBit(hot, 7)
	setBit(hot, 64)
	x.warm(hot)
	x.warm(hot) // 7 and 64 dirtied in two passes
	var order []uint64
	x.forEachByHeat(todo, func(i uint64) error { order = append(order, i); return nil })
	want := []uint64{3, 90, 7, 64}
	for i := range want {
		if i >= len(order) || order[i] != want[i] {
			t.Fatalf("order %v, want %v", order, want)
		}
	}
}
