package migration

import (
	"time"
)

// Throttling during pre-copy (docs/migration.md, "Throttling"): when the
// guest dirties memory faster than the link carries it, pre-copy cannot
// converge; holding its vCPUs back part of the time lowers its dirty rate
// in proportion (vmm.VM.SetThrottle).

// Auto-converge steps, as operators know them from QEMU: start at 20 %,
// add 10 % each time a pass still dirtied more than half of what it sent.
const (
	throttleInitial   = 20
	throttleIncrement = 10
	throttleMax       = 99
)

// adjustThrottle runs after each pre-copy pass with what the pass sent
// and what the guest dirtied meanwhile (bytes), and the pass's length.
func (x *sender) adjustThrottle(iter int, sent, dirtied float64, d time.Duration) {
	o := x.Opts
	auto := o.AutoConverge || (o.Mode == ModeAuto && o.RequireRollback)
	if (!auto && o.DirtyLimit <= 0) || d <= 0 {
		return
	}
	cur := x.VM.Throttle()
	next := cur
	rate := dirtied / d.Seconds()
	reason := "auto-converge"
	switch {
	case o.DirtyLimit > 0:
		reason = "dirty-rate limit"
		switch {
		case rate > float64(o.DirtyLimit):
			// Slow the guest by the share it is over the limit (at
			// least a step): rate·(1−p') ≈ limit from rate·(1−p).
			want := 100 - int(float64(100-cur)*float64(o.DirtyLimit)/rate)
			next = max(cur+throttleIncrement/2, want)
		case rate < float64(o.DirtyLimit)/2 && cur > 0:
			next = cur - throttleIncrement
		}
	case iter >= 1 && dirtied > sent/2:
		// The pass's writes were more than half of what it moved: at
		// this pace pre-copy does not converge.
		if cur == 0 {
			next = throttleInitial
		} else {
			next = cur + throttleIncrement
		}
	}
	next = min(max(next, 0), throttleMax)
	if next == cur {
		return
	}
	if err := x.VM.SetThrottle(next); err != nil {
		x.Log.Warn("throttling the guest", "err", err)
		return
	}
	if x.rep.Throttle == nil {
		x.rep.Throttle = &ThrottleReport{Reason: reason}
	}
	t := x.rep.Throttle
	t.Steps = append(t.Steps, next)
	t.MaxPercent = max(t.MaxPercent, next)
	x.Log.Info("throttling the guest", "percent", next, "reason", reason, "dirty_rate", rate)
}

// endThrottle lifts the throttle (the guest runs on at full speed here,
// after a rollback) and records how much the guest was slowed.
func (x *sender) endThrottle() {
	if x.rep.Throttle == nil {
		return
	}
	st := x.VM.ThrottleStats()
	x.VM.SetThrottle(0)
	x.rep.Throttle.Active, x.rep.Throttle.Held = st.Active, st.Slept
}
