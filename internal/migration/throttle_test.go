package migration

import (
	"testing"
	"time"
)

// TestThrottling: a guest dirtying memory several times faster than the
// link. Plain pre-copy cannot converge (TestPostcopyBeatsForcedStopCopy
// shows the forced stop-and-copy); with auto-converge, or a dirty-rate
// limit, the source slows the guest's vCPUs until a pass dirties less than
// it sends, and the migration converges within its downtime limit. The
// report says how much the guest was slowed, and the guest runs on clean.
func TestThrottling(t *testing.T) {
	for _, c := range []struct {
		name string
		opts Options
	}{
		{"auto-converge", Options{Mode: ModePreCopy, AutoConverge: true}},
		{"dirty-limit", Options{Mode: ModePreCopy, DirtyLimit: 15 << 20}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := bootGuest(t, 512<<20, 2, "workload=dirty size=128M rate=150M pattern=random")
			g.beats(t, 10)
			opts := c.opts
			opts.Bandwidth, opts.MaxIterations = 40<<20, 40
			res := migrate(t, g, opts, nil, nil)
			if res.err != nil || res.dstErr != nil {
				t.Fatalf("source %v, destination %v", res.err, res.dstErr)
			}
			logReport(t, res.rep)
			th := res.rep.Throttle
			if th == nil || th.MaxPercent == 0 || th.Held <= 0 {
				t.Fatalf("the guest was not throttled: %+v", th)
			}
			if res.rep.SwitchReason != SwitchConverged || res.rep.Downtime > time.Second {
				t.Fatalf("pre-copy did not converge (%s, downtime %s)", res.rep.SwitchReason, res.rep.Downtime)
			}
			res.dst.beats(t, 5)
			res.dst.clean(t, "destination")
			t.Logf("%s: throttle steps %v, guest held back %s over %s; downtime %s", c.name, th.Steps, th.Held, th.Active, res.rep.Downtime)
		})
	}
}
