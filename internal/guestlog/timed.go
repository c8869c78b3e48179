package guestlog

import (
	"bytes"
	"io"
	"sync"
	"time"
)

// TimedLine is a console line with the host time it arrived.
type TimedLine struct {
	At   time.Time
	Line Line
}

// Recorder is an io.Writer for a guest console that keeps every protocol
// line with its arrival time on the host, and passes all output on to an
// optional writer. Arrival times, not the guest's TSC, measure what an
// outside observer of the guest sees: a guest whose clocks are restored
// does not see its own downtime.
type Recorder struct {
	mu      sync.Mutex
	partial []byte
	lines   []TimedLine
	next    io.Writer
	now     func() time.Time
}

// NewRecorder records lines and forwards output to next (may be nil).
func NewRecorder(next io.Writer) *Recorder {
	return &Recorder{next: next, now: time.Now}
}

// Write records complete lines.
func (r *Recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	at := r.now()
	r.partial = append(r.partial, p...)
	for {
		i := bytes.IndexByte(r.partial, '\n')
		if i < 0 {
			break
		}
		if l, ok := Parse(string(r.partial[:i])); ok {
			r.lines = append(r.lines, TimedLine{At: at, Line: l})
		}
		r.partial = r.partial[i+1:]
	}
	if len(r.partial) > 64<<10 { // a runaway line: drop it
		r.partial = r.partial[:0]
	}
	r.mu.Unlock()
	if r.next != nil {
		return r.next.Write(p)
	}
	return len(p), nil
}

// Lines returns a copy of the recorded lines.
func (r *Recorder) Lines() []TimedLine {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]TimedLine(nil), r.lines...)
}

// IsBeat reports whether a line is a heartbeat (hb or verify).
func IsBeat(l Line) bool { return l.Kind == KindHeartbeat || l.Kind == KindVerify }

// HeartbeatGap is the guest-observed downtime around a switch: for each
// CPU, the time between its last heartbeat that arrived before `switchAt`
// and its first heartbeat after it (lines from the source, then the
// destination, merged by arrival time); the largest over CPUs. Zero if a
// CPU has no beat on one side.
func HeartbeatGap(lines []TimedLine, switchAt time.Time) time.Duration {
	before := map[uint64]time.Time{}
	after := map[uint64]time.Time{}
	for _, tl := range lines {
		if !IsBeat(tl.Line) {
			continue
		}
		cpu := tl.Line.MustUint("cpu")
		if !tl.At.After(switchAt) {
			if tl.At.After(before[cpu]) {
				before[cpu] = tl.At
			}
		} else if a, ok := after[cpu]; !ok || tl.At.Before(a) {
			after[cpu] = tl.At
		}
	}
	var gap time.Duration
	for cpu, b := range before {
		if a, ok := after[cpu]; ok && a.Sub(b) > gap {
			gap = a.Sub(b)
		}
	}
	return gap
}

// WorkRate is the guest workload's progress in pages per second over the
// lines that arrived in [from, to]: pages written (dirty's hb lines) or
// pages checked (verify lines), per CPU between its first and last beat in
// the window by the guest's own clock, summed over CPUs. Comparing it
// before and during a migration gives the application's degradation. Zero
// when no CPU has two beats in the window.
func WorkRate(lines []TimedLine, from, to time.Time) float64 {
	type span struct {
		first, last Line
		written     uint64 // hb: pages written after the first beat
		n           int
	}
	per := map[uint64]*span{}
	for _, tl := range lines {
		if !IsBeat(tl.Line) || tl.At.Before(from) || tl.At.After(to) {
			continue
		}
		cpu, err := tl.Line.Uint("cpu")
		if err != nil {
			continue
		}
		s := per[cpu]
		if s == nil {
			per[cpu] = &span{first: tl.Line, last: tl.Line, n: 1}
			continue
		}
		s.last, s.n = tl.Line, s.n+1
		if tl.Line.Kind == KindHeartbeat {
			p, _ := tl.Line.Uint("pages")
			s.written += p
		}
	}
	var rate float64
	for _, s := range per {
		t0, err0 := s.first.Uint("ms")
		t1, err1 := s.last.Uint("ms")
		if s.n < 2 || err0 != nil || err1 != nil || t1 <= t0 {
			continue
		}
		work := s.written
		if s.last.Kind == KindVerify {
			c0, _ := s.first.Uint("checked")
			c1, _ := s.last.Uint("checked")
			work = c1 - min(c0, c1)
		}
		rate += float64(work) / (float64(t1-t0) / 1000)
	}
	return rate
}

// Checks is the guest's own verification over the lines that arrived in
// [from, to]: pages checked (dirty check=1 hb lines, verify lines) and
// errors counted, summed over CPUs. Both counters are cumulative in the
// guest, so per CPU it is its last beat in the window less its last beat
// at or before from (nothing before from: since boot). Lines from a
// migration's source and destination merged by arrival time, with from
// the switch, give what the guest checked and found on the destination.
func Checks(lines []TimedLine, from, to time.Time) (checked, errors uint64) {
	type count struct{ base, last [2]uint64 }
	per := map[uint64]*count{}
	for _, tl := range lines {
		l := tl.Line
		if !HasCheck(l) || tl.At.After(to) {
			continue
		}
		cpu, err := l.Uint("cpu")
		if err != nil {
			continue
		}
		c := per[cpu]
		if c == nil {
			c = &count{}
			per[cpu] = c
		}
		v := [2]uint64{l.MustUint("checked"), l.MustUint("errors")}
		if !tl.At.After(from) {
			c.base = v
		}
		c.last = v
	}
	for _, c := range per {
		checked += c.last[0] - min(c.base[0], c.last[0])
		errors += c.last[1] - min(c.base[1], c.last[1])
	}
	return checked, errors
}
