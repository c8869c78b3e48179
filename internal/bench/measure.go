package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// Observation is what the harness sees of one run while a system carries
// it out: both guest consoles with arrival times, and the link counters
// and clock at the start and end of the migration. Systems call Begin and
// End around the migration; everything else is measured here, the same way
// for every system.
type Observation struct {
	lab      *Lab
	Src, Dst *guestlog.Recorder

	mu                     sync.Mutex
	start, end             time.Time
	fwd0, back0, fwd, back uint64
	counterErr             error

	// Set by the system.
	ForcedStop   bool
	SystemReport any
	Offline      *Offline
}

// newObservation records both consoles, keeping a copy of each in
// srcLog and dstLog (may be nil).
func newObservation(lab *Lab, srcLog, dstLog io.Writer) *Observation {
	return &Observation{lab: lab, Src: guestlog.NewRecorder(srcLog), Dst: guestlog.NewRecorder(dstLog)}
}

// Begin marks the start of the migration.
func (o *Observation) Begin(ctx context.Context) {
	f, b, err := o.lab.Counters(ctx)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.start, o.fwd0, o.back0, o.counterErr = time.Now(), f, b, err
}

// End marks the moment the destination holds the whole guest.
func (o *Observation) End(ctx context.Context) {
	now := time.Now()
	f, b, err := o.lab.Counters(ctx)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.end, o.fwd, o.back = now, f, b
	if o.counterErr == nil {
		o.counterErr = err
	}
}

// WaitBeats waits until rec has shown n heartbeats, or says what the
// guest printed instead.
func WaitBeats(ctx context.Context, rec *guestlog.Recorder, n int, what string) error {
	for {
		beats, bad := 0, ""
		for _, tl := range rec.Lines() {
			switch {
			case guestlog.IsBeat(tl.Line):
				beats++
			case tl.Line.Kind == guestlog.KindFail || tl.Line.Kind == guestlog.KindException:
				bad = tl.Line.Raw
			}
		}
		if bad != "" {
			return fmt.Errorf("%s: the guest reported %q", what, bad)
		}
		if beats >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: no heartbeats from the guest (%d of %d): %w", what, beats, n, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// fill computes the harness's measurements into r.
func (o *Observation) fill(r *Result, hbInterval time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.counterErr != nil && r.Error == "" {
		r.Error = o.counterErr.Error()
	}
	r.ForcedStop = o.ForcedStop
	r.SystemReport = o.SystemReport
	r.Offline = o.Offline
	if !o.start.IsZero() && !o.end.IsZero() {
		r.TotalTime = o.end.Sub(o.start)
		r.BytesForward, r.BytesBack = o.fwd-o.fwd0, o.back-o.back0
	}
	lines := mergeLines(o.Src.Lines(), o.Dst.Lines())
	r.GuestErrors = guestFailures(lines)
	// The guest's own count covers FAIL lines past its 50-line cap.
	if _, counted := guestlog.Checks(lines, time.Time{}, time.Now()); int(counted) > r.GuestErrors {
		r.GuestErrors = int(counted)
	}
	// What the guest re-checked after it last ran on the source.
	r.GuestChecked, _ = guestlog.Checks(lines, lastBeat(o.Src.Lines()), time.Now())
	if o.start.IsZero() {
		return
	}
	end := o.end
	if end.IsZero() {
		end = time.Now()
	}
	r.HeartbeatGap = longestGap(lines, o.start, end)
	r.Downtime = max(r.HeartbeatGap-hbInterval, 0)
	if last := lastBeat(o.Src.Lines()); last.After(o.start) {
		r.SwitchAt = last.Sub(o.start)
	}
	r.Baseline = bytesRate(lines, o.start.Add(-2*time.Second), o.start)
	if r.Baseline > 0 && end.After(o.start) {
		done := bytesWritten(lines, o.start, end)
		r.Degradation = 1 - done/(r.Baseline*end.Sub(o.start).Seconds())
		r.Timeline = timeline(o.Src.Lines(), o.Dst.Lines(), o.start, r.Baseline)
	}
	r.Baseline /= 4096 // pages per second in the JSON
}

// guestFailures counts the guest's FAIL and EXCEPTION lines.
func guestFailures(lines []guestlog.TimedLine) int {
	n := 0
	for _, tl := range lines {
		if tl.Line.Kind == guestlog.KindFail || tl.Line.Kind == guestlog.KindException {
			n++
		}
	}
	return n
}

func mergeLines(a, b []guestlog.TimedLine) []guestlog.TimedLine {
	out := make([]guestlog.TimedLine, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		if j >= len(b) || (i < len(a) && !a[i].At.After(b[j].At)) {
			out = append(out, a[i])
			i++
		} else {
			out = append(out, b[j])
			j++
		}
	}
	return out
}

// longestGap is the longest time between consecutive heartbeats of one CPU
// that touches [from, to]: the last beat before `from` counts, so a pause
// that began just after the migration started is measured whole.
func longestGap(lines []guestlog.TimedLine, from, to time.Time) time.Duration {
	prev := map[uint64]time.Time{}
	var gap time.Duration
	for _, tl := range lines {
		if !guestlog.IsBeat(tl.Line) {
			continue
		}
		cpu, err := tl.Line.Uint("cpu")
		if err != nil {
			continue
		}
		if p, ok := prev[cpu]; ok && tl.At.After(from) && !p.After(to) {
			gap = max(gap, tl.At.Sub(p))
		}
		prev[cpu] = tl.At
	}
	// A guest that never beat again after `to` is down until now.
	for _, p := range prev {
		if p.Before(to) && !to.Before(from) {
			gap = max(gap, to.Sub(p))
		}
	}
	return gap
}

func lastBeat(lines []guestlog.TimedLine) time.Time {
	var t time.Time
	for _, tl := range lines {
		if guestlog.IsBeat(tl.Line) {
			t = tl.At
		}
	}
	return t
}

// bytesRate is the workload's mean write rate (bytes/s, summed over CPUs)
// from the hb lines that arrived in [from, to].
func bytesRate(lines []guestlog.TimedLine, from, to time.Time) float64 {
	sum := map[uint64]float64{}
	n := map[uint64]int{}
	for _, tl := range lines {
		if tl.Line.Kind != guestlog.KindHeartbeat || tl.At.Before(from) || tl.At.After(to) {
			continue
		}
		r, err := tl.Line.Uint("rate")
		if err != nil {
			continue
		}
		cpu := tl.Line.MustUint("cpu")
		sum[cpu] += float64(r)
		n[cpu]++
	}
	var total float64
	for cpu, s := range sum {
		total += s / float64(n[cpu])
	}
	return total
}

// bytesWritten is what the workload wrote in (from, to], by its beats.
func bytesWritten(lines []guestlog.TimedLine, from, to time.Time) float64 {
	var pages uint64
	for _, tl := range lines {
		if tl.Line.Kind != guestlog.KindHeartbeat || !tl.At.After(from) || tl.At.After(to) {
			continue
		}
		p, _ := tl.Line.Uint("pages")
		pages += p
	}
	return float64(pages) * 4096
}

// timeline is every heartbeat from 2 s before the migration on, with the
// rate it reports relative to the baseline (bytes/s).
func timeline(src, dst []guestlog.TimedLine, start time.Time, baseline float64) []RatePoint {
	var pts []RatePoint
	add := func(lines []guestlog.TimedLine, host string) {
		for _, tl := range lines {
			if tl.Line.Kind != guestlog.KindHeartbeat || tl.At.Before(start.Add(-2*time.Second)) {
				continue
			}
			r, err := tl.Line.Uint("rate")
			if err != nil {
				continue
			}
			pts = append(pts, RatePoint{T: tl.At.Sub(start).Seconds(), Relative: float64(r) / baseline, Host: host})
		}
	}
	add(src, "source")
	add(dst, "destination")
	return pts
}

// tailFile copies what is appended to path into w until ctx ends, polling
// every 2 ms (the arrival times are the harness's measurements, so the
// poll interval bounds their error). It waits for the file to appear.
func tailFile(ctx context.Context, path string, w io.Writer) {
	var f *os.File
	for f == nil {
		var err error
		if f, err = os.Open(path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			_, _ = w.Write(buf[:n])
			continue
		}
		if err != nil && err != io.EOF {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Millisecond):
		}
	}
}
