package migration

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// TestMigratePostcopyModes moves a 2-vCPU verify guest with every mode
// that ends in post-copy; the guest checks its memory and registers on
// the destination while pages still arrive, and after.
func TestMigratePostcopyModes(t *testing.T) {
	for _, c := range []struct {
		name, cmdline string
		opts          Options
	}{
		{"postcopy", "size=64M", Options{Mode: ModePostCopy}},
		{"demand-finished", "size=64M", Options{Mode: ModeDemand}},
		{"hybrid", "size=64M", Options{Mode: ModeHybrid, PrecopyPasses: 2, Bandwidth: 100 << 20, DowntimeLimit: time.Millisecond}},
		// A link no faster than the guest dirties its 16 MiB: pre-copy
		// passes stop shrinking.
		{"precopy-postcopy-on-stall", "size=16M", Options{Mode: ModePreCopy, PostcopyOnStall: true, Bandwidth: 4 << 20, DowntimeLimit: time.Millisecond}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=verify "+c.cmdline)
			g.beats(t, 3)
			var hook func(*Source)
			if c.opts.Mode == ModeDemand {
				// Demand paging ends when the operator says so: then
				// the rest is pushed.
				hook = func(s *Source) {
					go func() {
						for s.Finish() != nil {
							time.Sleep(50 * time.Millisecond)
						}
					}()
				}
			}
			res := migrate(t, g, c.opts, nil, hook)
			if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
				t.Fatalf("migration failed: source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
			}
			logReport(t, res.rep)
			p := res.rep.Postcopy
			if p == nil {
				t.Fatalf("no post-copy phase (switch reason %q)", res.rep.SwitchReason)
			}
			if p.End != "resident" || p.PagesPushed+p.PagesDemand < p.PagesNeeded {
				t.Fatalf("post-copy ended %q with %d+%d of %d pages", p.End, p.PagesPushed, p.PagesDemand, p.PagesNeeded)
			}
			checkMoved(t, g, res)
			logDegradation(t, g, res)
		})
	}
}

// TestDemandPagingSendsOnlyWhatIsTouched: a guest with 96 MiB of data it
// never touches after the move (fill=) runs at the destination in demand
// mode until it exits; the migration completes with the untouched pages
// never sent, and the guest's own checks pass.
func TestDemandPagingSendsOnlyWhatIsTouched(t *testing.T) {
	g := bootGuest(t, 256<<20, 2, "workload=verify size=16M fill=96M content=mixed exit_after=6s")
	g.beats(t, 3)
	res := migrate(t, g, Options{Mode: ModeDemand}, nil, nil)
	if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
		t.Fatalf("migration failed: source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
	}
	logReport(t, res.rep)
	exit, err := res.dst.vm.Wait()
	if err != nil || exit.Status != 0 {
		t.Fatalf("guest ended with %v status %d\n%s", err, exit.Status, res.dst.raw.String())
	}
	res.dst.clean(t, "destination")
	p := res.rep.Postcopy
	fill := uint64(96<<20) / 4096
	if p.End != "guest-ended" {
		t.Fatalf("post-copy ended %q, want guest-ended", p.End)
	}
	// Zero pages of the fill are not needed at all; the others must not
	// have been sent.
	if p.PagesNever < fill*3/4 || p.PagesPushed != 0 {
		t.Fatalf("%d pages never sent, %d pushed; want most of the %d fill pages never sent and no push", p.PagesNever, p.PagesPushed, fill)
	}
	t.Logf("demand paging: %d of %d needed pages sent on demand, %d never needed", p.PagesDemand, p.PagesNeeded, p.PagesNever)
}

// TestPostcopyBeatsForcedStopCopy: a guest dirtying memory faster than
// the link. Pre-copy cannot converge and is forced to a long
// stop-and-copy; post-copy and hybrid switch over with the machine state
// alone and finish the memory afterwards.
func TestPostcopyBeatsForcedStopCopy(t *testing.T) {
	const link = 40 << 20
	var downtime = map[Mode]time.Duration{}
	for _, opts := range []Options{
		{Mode: ModePreCopy, MaxIterations: 4, Bandwidth: link, DowntimeLimit: time.Millisecond},
		{Mode: ModePostCopy, Bandwidth: link},
		{Mode: ModeHybrid, PrecopyPasses: 2, Bandwidth: link, DowntimeLimit: time.Millisecond},
		{Mode: ModeAuto, Bandwidth: link},
	} {
		t.Run(string(opts.Mode), func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=dirty size=64M pattern=random")
			g.beats(t, 3)
			res := migrate(t, g, opts, nil, nil)
			if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
				t.Fatalf("source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
			}
			logReport(t, res.rep)
			res.dst.beats(t, 5)
			res.dst.clean(t, "destination")
			logDegradation(t, g, res)
			downtime[opts.Mode] = res.rep.Downtime
		})
	}
	t.Logf("switch-over downtime with the guest dirtying faster than a %d MiB/s link: pre-copy (forced stop-and-copy) %s, post-copy %s, hybrid %s, auto %s",
		link>>20, downtime[ModePreCopy], downtime[ModePostCopy], downtime[ModeHybrid], downtime[ModeAuto])
	if len(downtime) == 4 && (downtime[ModePostCopy] >= downtime[ModePreCopy] || downtime[ModeHybrid] >= downtime[ModePreCopy] ||
		downtime[ModeAuto] > DefaultDowntimeLimit) {
		t.Fatal("post-copy, hybrid or auto stopped the guest longer than pre-copy's forced stop-and-copy, or auto broke its downtime limit")
	}
}

// logDegradation prints the guest workload's pace before the migration
// and at the destination during post-copy, from its own heartbeats.
func logDegradation(t *testing.T, src *guest, res migrateResult) {
	p := res.rep.Postcopy
	if p == nil {
		return
	}
	sw := time.Unix(0, res.rep.SwitchUnixNano)
	before := guestlog.WorkRate(src.con.Lines(), sw.Add(-5*time.Second), sw)
	// At least a second: shorter windows hold too few heartbeats.
	during := guestlog.WorkRate(res.dst.con.Lines(), sw, sw.Add(max(p.Duration, time.Second)))
	if before > 0 {
		t.Logf("guest workload: %.0f pages/s before, %.0f during the first %s of post-copy (%.0f%% of its pace)",
			before, during, max(p.Duration, time.Second), 100*during/before)
	}
}

// netSwitch stands between the source and the destination like a network
// path that can fail: it forwards every connection to dst until cut.
type netSwitch struct {
	t   *testing.T
	ln  net.Listener
	dst string
	mu  sync.Mutex
	// down: new connections are dropped; blackhole: bytes stop flowing
	// but nothing is closed (as when a cable is pulled).
	down, blackhole bool
	conns           []net.Conn
}

func newNetSwitch(t *testing.T) *netSwitch {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &netSwitch{t: t, ln: ln}
	t.Cleanup(func() { ln.Close(); s.cut(false) })
	return s
}

// via is a migrateSetup.via: the source dials the switch, which forwards
// to dst.
func (s *netSwitch) via(dst string) string {
	s.dst = dst
	go s.serve()
	return s.ln.Addr().String()
}

func (s *netSwitch) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		down := s.down
		s.mu.Unlock()
		if down {
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", s.dst)
		if err != nil {
			c.Close()
			continue
		}
		s.mu.Lock()
		s.conns = append(s.conns, c, up)
		s.mu.Unlock()
		go s.pipe(c, up)
		go s.pipe(up, c)
	}
}

func (s *netSwitch) pipe(from, to net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := from.Read(buf)
		for {
			s.mu.Lock()
			hole := s.blackhole
			s.mu.Unlock()
			if !hole {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := to.Write(buf[:n]); werr != nil {
				from.Close()
				return
			}
		}
		if err != nil {
			to.Close()
			return
		}
	}
}

// cut breaks the path: with reset, every connection is reset at once;
// without, they hang (blackhole). New connections fail either way until
// restore.
func (s *netSwitch) cut(reset bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = true
	if !reset {
		s.blackhole = true
		return
	}
	for _, c := range s.conns {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	s.conns = nil
}

// restore lets new connections through again; hung ones stay dead (their
// ends gave up on them).
func (s *netSwitch) restore() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
	s.down, s.blackhole = false, false
}

// onPostcopy runs f once the migration enters post-copy.
func onPostcopy(f func()) func(*Source) {
	return func(s *Source) {
		var once sync.Once
		s.Progress = func(p Progress) {
			if p.Phase == PhasePostCopy {
				once.Do(func() { go f() })
			}
		}
	}
}

// TestPostcopyLinkCut cuts the path mid post-copy for several seconds:
// the guest waits (vCPUs block on missing pages), the source re-opens the
// link on its own, post-copy completes and the guest verifies clean.
func TestPostcopyLinkCut(t *testing.T) {
	for _, c := range []struct {
		name  string
		reset bool
	}{{"reset", true}, {"blackhole", false}} {
		t.Run(c.name, func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
			g.beats(t, 3)
			sw := newNetSwitch(t)
			const outage = 4 * time.Second
			res := migrateWith(t, g, Options{Mode: ModePostCopy, Bandwidth: 20 << 20, LinkTimeout: time.Second}, migrateSetup{
				via: sw.via,
				hook: onPostcopy(func() {
					time.Sleep(500 * time.Millisecond)
					t.Logf("cutting the link (%s) for %s", c.name, outage)
					sw.cut(c.reset)
					time.Sleep(outage)
					sw.restore()
					t.Log("link restored")
				}),
				dest: func(d *Destination) { d.LinkTimeout = time.Second },
			})
			if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
				t.Fatalf("source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
			}
			logReport(t, res.rep)
			p := res.rep.Postcopy
			if p.LinkBreaks == 0 || p.LinkDownFor < outage/2 {
				t.Fatalf("report shows %d link breaks, down %s; the link was cut for %s", p.LinkBreaks, p.LinkDownFor, outage)
			}
			res.dst.beats(t, 20)
			res.dst.clean(t, "destination after the cut")
		})
	}
}

// TestPostcopySourceDies: the source goes away for good mid post-copy.
// The destination must not run the guest on with missing memory: after
// its recovery timeout it stops the guest and says why.
func TestPostcopySourceDies(t *testing.T) {
	g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
	g.beats(t, 3)
	sw := newNetSwitch(t)
	ctx, kill := context.WithCancel(context.Background())
	defer kill()
	res := migrateWith(t, g, Options{Mode: ModePostCopy, Bandwidth: 10 << 20}, migrateSetup{
		via: sw.via, ctx: ctx,
		hook: onPostcopy(func() {
			time.Sleep(300 * time.Millisecond)
			kill() // the source process is gone: its context ends and it never comes back
			sw.cut(true)
		}),
		dest: func(d *Destination) { d.RecoveryTimeout = 2 * time.Second; d.LinkTimeout = time.Second },
	})
	if res.err == nil || res.dstErr != nil {
		t.Fatalf("source %v, destination %v: want the source to fail after the switch", res.err, res.dstErr)
	}
	t.Logf("source: %v", res.err)
	if res.dstEnd == nil || !strings.Contains(res.dstEnd.Error(), "post-copy cannot complete") {
		t.Fatalf("destination end %v: want it to say post-copy cannot complete", res.dstEnd)
	}
	t.Logf("destination: %v", res.dstEnd)
	_, err := res.dst.vm.Wait()
	if err == nil || !strings.Contains(err.Error(), "guest was stopped") {
		t.Fatalf("destination VM ended with %v, want the post-copy failure", err)
	}
	res.dst.clean(t, "destination") // stopped, never ran on corrupt memory
}

// TestPostcopyPageTouchedDuringRestore: restoring a machine can write to
// pages the source still holds (KVM updates the kvmclock page when its
// MSR is set). Such pages must still get the source's data: here the
// test scribbles over part of the working set between restore and
// resume, and the guest must verify clean.
func TestPostcopyPageTouchedDuringRestore(t *testing.T) {
	g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
	g.beats(t, 3)
	res := migrateWith(t, g, Options{Mode: ModePostCopy}, migrateSetup{
		dest: func(d *Destination) {
			d.onRestored = func(vm *vmm.VM) {
				ram, err := vm.Memory().Slice(0x400000, 64*4096) // the start of the working set
				if err != nil {
					t.Error(err)
					return
				}
				for i := range ram {
					ram[i] = 0xAA
				}
			}
		},
	})
	if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
		t.Fatalf("source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
	}
	res.dst.beats(t, 30)
	res.dst.clean(t, "destination")
}

// TestTimeBoundsCutThePass: a first pass far longer than hybrid's
// pre-copy time (or the forced switch) is cut where the bound falls, not
// run to its end; the pages it did not reach still arrive (post-copy's
// push, or the stop-and-copy), which the guest proves by checking its
// untouched fill area at exit.
func TestTimeBoundsCutThePass(t *testing.T) {
	for _, c := range []struct {
		name   string
		opts   Options
		reason string
	}{
		{"hybrid", Options{Mode: ModeHybrid, PrecopyTime: 300 * time.Millisecond, Bandwidth: 32 << 20}, SwitchHybridTime},
		{"precopy-forced", Options{Mode: ModePreCopy, PrecopyTimeout: 300 * time.Millisecond, Bandwidth: 32 << 20}, SwitchTimeout},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=verify size=32M fill=96M content=mixed fill_check=1 exit_after=8s")
			g.beats(t, 3)
			res := migrate(t, g, c.opts, nil, nil)
			if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
				t.Fatalf("migration failed: source %v, destination %v, destination end %v", res.err, res.dstErr, res.dstEnd)
			}
			logReport(t, res.rep)
			first := res.rep.Iterations[0]
			// 128 MiB at 32 MiB/s is a 4 s pass: cut at 0.3 s.
			if !first.Cut || res.rep.SwitchReason != c.reason || res.rep.PrecopyTime > 2*time.Second {
				t.Fatalf("first pass cut %v after %s, switch %q: want a cut near 300ms and %q", first.Cut, res.rep.PrecopyTime, res.rep.SwitchReason, c.reason)
			}
			exit, err := res.dst.vm.Wait()
			if err != nil || exit.Status != 0 {
				t.Fatalf("guest ended with %v status %d\n%s", err, exit.Status, res.dst.raw.String())
			}
			res.dst.clean(t, "destination")
			checks := 0
			for _, tl := range res.dst.con.Lines() {
				if tl.Line.Kind == guestlog.KindFillCheck {
					checks++
				}
			}
			if checks != 2 {
				t.Fatalf("%d fillcheck lines, want one per CPU\n%s", checks, res.dst.raw.String())
			}
		})
	}
}
