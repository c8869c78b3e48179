package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/testguest"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// guest is a VM under test with its console.
type guest struct {
	vm  *vmm.VM
	con *guestlog.Recorder
	raw *testguest.Console
}

func bootGuest(t testing.TB, mem uint64, cpus int, cmdline string) *guest {
	t.Helper()
	testguest.RequireKVM(t)
	raw := &testguest.Console{}
	rec := guestlog.NewRecorder(raw)
	vm, err := vmm.New(vmm.Config{MemSize: mem, CPUs: cpus, Kernel: testguest.Image(t), Cmdline: cmdline, Console: rec})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	return &guest{vm: vm, con: rec, raw: raw}
}

// beats waits until the guest printed n more heartbeats per CPU.
func (g *guest) beats(t testing.TB, n int) {
	t.Helper()
	start := map[uint64]int{}
	for _, l := range g.con.Lines() {
		if guestlog.IsBeat(l.Line) {
			start[l.Line.MustUint("cpu")]++
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		per := map[uint64]int{}
		for _, l := range g.con.Lines() {
			if guestlog.IsBeat(l.Line) {
				per[l.Line.MustUint("cpu")]++
			}
		}
		ok := len(per) > 0
		for cpu := 0; cpu < g.vm.NumCPUs(); cpu++ {
			ok = ok && per[uint64(cpu)]-start[uint64(cpu)] >= n
		}
		if ok {
			return
		}
		select {
		case <-g.vm.Done():
			testguest.FreezeKernelTrace()
			_, err := g.vm.Wait()
			t.Fatalf("guest ended: %v\n%s", err, g.raw.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	testguest.FreezeKernelTrace()
	per := map[uint64]int{}
	for _, l := range g.con.Lines() {
		if guestlog.IsBeat(l.Line) {
			per[l.Line.MustUint("cpu")]++
		}
	}
	t.Fatalf("guest did not beat %d more times in 30 s (beats per vCPU before %v, now %v)\n%s\n%s", n, start, per, g.vm.Diagnose(), g.raw.String())
}

// clean fails the test if the guest reported any corruption.
func (g *guest) clean(t testing.TB, what string) {
	t.Helper()
	s := g.raw.Summary()
	if len(s.Failures) > 0 || len(s.Exceptions) > 0 || s.ExitErrors > 0 {
		t.Fatalf("%s: guest reported problems\n%s", what, g.raw.String())
	}
}

// migrateResult is what one in-process migration produced.
type migrateResult struct {
	rep      *Report
	err      error
	dst      *guest
	dstRep   *DestReport
	dstErr   error
	dstEnd   error          // the destination's end (post-copy included)
	srcLast  *state.Machine // what the source sent
	dstFirst *state.Machine // what the destination restored, read back before it ran
}

// migrate moves g over TCP loopback (through proxy if given) to a new VM.
func migrate(t testing.TB, g *guest, opts Options, proxy func(client, server net.Conn), hook func(*Source)) migrateResult {
	return migrateWith(t, g, opts, migrateSetup{proxy: proxy, hook: hook})
}

// migrateSetup shapes one test migration.
type migrateSetup struct {
	// proxy carries each connection the source opens (client) to the
	// destination (server).
	proxy func(client, server net.Conn)
	// hook sees the source before it runs.
	hook func(*Source)
	// dstConn wraps the destination's side of each connection (to make
	// the destination fail).
	dstConn func(net.Conn) net.Conn
	// via, if set, is the address the source dials instead of the
	// destination's (a netSwitch in front of it); it gets the real one.
	via func(dst string) string
	// dest adjusts the destination before it runs.
	dest func(*Destination)
	// ctx is the source's context (default: background).
	ctx context.Context
}

// wrapListener applies f to every accepted connection.
type wrapListener struct {
	net.Listener
	f func(net.Conn) net.Conn
}

func (w wrapListener) Accept() (net.Conn, error) {
	c, err := w.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return w.f(c), nil
}

// migrateWith moves g to a new VM as setup says, and waits until both
// sides are done (post-copy included).
func migrateWith(t testing.TB, g *guest, opts Options, setup migrateSetup) migrateResult {
	t.Helper()
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener = tcp
	if setup.dstConn != nil {
		ln = wrapListener{tcp, setup.dstConn}
	}
	var res migrateResult
	raw := &testguest.Console{}
	rec := guestlog.NewRecorder(raw)
	d := &Destination{Config: vmm.Config{Console: rec}, Commit: func(string) error { return nil }, Log: testLog(t, "destination")}
	d.onRestored = func(vm *vmm.VM) {
		m, err := vm.Capture()
		if err == nil {
			res.dstFirst = m
		}
	}
	if setup.dest != nil {
		setup.dest(d)
	}
	dctx, dcancel := context.WithCancel(context.Background())
	defer dcancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		vm, rep, err := d.Run(dctx, ln)
		res.dstRep, res.dstErr = rep, err
		if vm != nil {
			t.Cleanup(func() { vm.Close() })
			res.dst = &guest{vm: vm, con: rec, raw: raw}
		}
	}()
	addr := tcp.Addr().String()
	if setup.via != nil {
		addr = setup.via(addr)
	}
	dial := func(ctx context.Context) (net.Conn, error) {
		up, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil || setup.proxy == nil {
			return up, err
		}
		a, b := net.Pipe()
		go setup.proxy(b, up)
		return a, nil
	}
	src := &Source{VM: g.vm, Name: "test", Opts: opts, Log: testLog(t, "source")}
	src.onFinalState = func(m *state.Machine) { res.srcLast = m }
	if setup.hook != nil {
		setup.hook(src)
	}
	ctx := setup.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	res.rep, res.err = src.Run(ctx, dial)
	if res.err != nil {
		// A source that failed before its hello leaves the destination
		// waiting for one.
		stop := time.AfterFunc(5*time.Second, dcancel)
		defer stop.Stop()
	}
	wg.Wait()
	if res.dstErr == nil {
		res.dstEnd = d.Wait()
	} else {
		d.Wait()
	}
	return res
}

// testLog sends a side's log to the test's.
func testLog(t testing.TB, side string) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("side", side)
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func logReport(t testing.TB, r *Report) {
	var b strings.Builder
	r.WriteTable(&b)
	t.Log("\n" + b.String())
}

func TestMigrateVerifyGuest(t *testing.T) {
	for _, mode := range []Mode{ModePreCopy, ModeStopCopy} {
		t.Run(string(mode), func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
			g.beats(t, 3)
			res := migrate(t, g, Options{Mode: mode}, nil, nil)
			if res.err != nil || res.dstErr != nil {
				t.Fatalf("migration failed: source %v, destination %v", res.err, res.dstErr)
			}
			logReport(t, res.rep)
			checkMoved(t, g, res)
		})
	}
}

// checkMoved checks a completed migration of g: the guest runs on at the
// destination and verifies clean, the destination's machine equals what
// the source sent, and the source VM was released.
func checkMoved(t testing.TB, g *guest, res migrateResult) {
	t.Helper()
	res.dst.beats(t, 20)
	res.dst.clean(t, "destination")
	g.clean(t, "source before the switch")
	if diffs := state.Diff(res.srcLast, res.dstFirst, false); len(diffs) > 0 {
		t.Fatalf("destination state differs from the source's: %v", diffs)
	}
	gap := guestlog.HeartbeatGap(append(g.con.Lines(), res.dst.con.Lines()...), time.Unix(0, res.rep.SwitchUnixNano))
	t.Logf("guest-observed downtime (heartbeat gap): %s; VMM downtime %s", gap, res.rep.Downtime)
	select {
	case <-g.vm.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("source VM still running after a completed migration")
	}
}

func TestPingPong(t *testing.T) {
	const trips = 20
	g := bootGuest(t, 128<<20, 2, "workload=verify size=32M")
	g.beats(t, 2)
	var down time.Duration
	for i := 0; i < trips; i++ {
		mode := ModePreCopy
		if i%5 == 4 {
			mode = ModeStopCopy
		}
		res := migrate(t, g, Options{Mode: mode}, nil, nil)
		if res.err != nil || res.dstErr != nil {
			t.Fatalf("trip %d: source %v, destination %v", i, res.err, res.dstErr)
		}
		t.Logf("trip %d (%s): downtime %s", i, mode, res.rep.Downtime)
		down += res.rep.Downtime
		g.clean(t, fmt.Sprintf("trip %d source", i))
		g = res.dst
		g.beats(t, 2)
		g.clean(t, fmt.Sprintf("trip %d destination", i))
	}
	t.Logf("%d migrations, mean VMM downtime %s", trips, down/trips)
}

// TestForcedStopCopy: a guest dirtying memory faster than the link forces
// pre-copy to stop-and-copy at the iteration limit; it still completes.
func TestForcedStopCopy(t *testing.T) {
	g := bootGuest(t, 256<<20, 2, "workload=dirty size=64M pattern=random")
	g.beats(t, 3)
	res := migrate(t, g, Options{Mode: ModePreCopy, MaxIterations: 4, Bandwidth: 40 << 20, DowntimeLimit: time.Millisecond}, nil, nil)
	if res.err != nil || res.dstErr != nil {
		t.Fatalf("source %v, destination %v", res.err, res.dstErr)
	}
	logReport(t, res.rep)
	if res.rep.SwitchReason != SwitchMaxIterations {
		t.Fatalf("switch reason %q, want %q", res.rep.SwitchReason, SwitchMaxIterations)
	}
	res.dst.beats(t, 5)
	res.dst.clean(t, "destination")
}

// faultProxy forwards client<->server and applies f to the client->server
// stream: it returns how many bytes to forward and whether to then cut.
func faultProxy(f func(total int64, b []byte) (n int, cut bool)) func(client, server net.Conn) {
	return func(client, server net.Conn) {
		go io.Copy(client, server)
		var total int64
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if n > 0 {
				k, cut := f(total, buf[:n])
				server.Write(buf[:k])
				total += int64(n)
				if cut {
					client.Close()
					server.Close()
					return
				}
			}
			if err != nil {
				server.Close()
				return
			}
		}
	}
}

func requireRollback(t *testing.T, g *guest, res migrateResult, want string) {
	t.Helper()
	if res.err == nil {
		t.Fatal("migration succeeded despite the fault")
	}
	if !res.rep.RolledBack {
		t.Fatalf("not rolled back: %v", res.err)
	}
	if res.dst != nil {
		t.Fatal("destination kept a VM")
	}
	if want != "" && !strings.Contains(res.err.Error(), want) {
		t.Fatalf("error %q does not name the cause (%q)", res.err, want)
	}
	t.Logf("source error: %v; destination: %v", res.err, res.dstErr)
	g.beats(t, 5) // the guest runs on at the source
	g.clean(t, "source after rollback")
}

func TestFaultsRollBack(t *testing.T) {
	slow := Options{Mode: ModePreCopy, Bandwidth: 60 << 20}
	t.Run("connection-cut", func(t *testing.T) {
		g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
		g.beats(t, 2)
		res := migrate(t, g, slow, faultProxy(func(total int64, b []byte) (int, bool) {
			return len(b), total > 8<<20
		}), nil)
		requireRollback(t, g, res, "lost")
	})
	t.Run("corrupt-frame", func(t *testing.T) {
		g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
		g.beats(t, 2)
		var done atomic.Bool
		res := migrate(t, g, slow, faultProxy(func(total int64, b []byte) (int, bool) {
			if total > 4<<20 && !done.Load() {
				b[len(b)/2] ^= 0x40
				done.Store(true)
			}
			return len(b), false
		}), nil)
		requireRollback(t, g, res, "destination")
		if res.dstErr == nil || !strings.Contains(res.dstErr.Error(), "checksum") {
			t.Fatalf("destination error %v does not say the frame was corrupt", res.dstErr)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
		g.beats(t, 2)
		res := migrate(t, g, slow, nil, func(s *Source) {
			go func() { time.Sleep(300 * time.Millisecond); s.Cancel() }()
		})
		requireRollback(t, g, res, "cancelled")
		if res.rep.Result != "cancelled" {
			t.Fatalf("result %q", res.rep.Result)
		}
	})
	t.Run("destination-dies", func(t *testing.T) {
		g := bootGuest(t, 256<<20, 2, "workload=verify size=64M")
		g.beats(t, 2)
		// The destination dies mid pre-copy: after 16 MiB its side of the
		// connection is closed without a word, as when its process is killed.
		res := migrateWith(t, g, slow, migrateSetup{dstConn: func(c net.Conn) net.Conn { return &dyingConn{Conn: c, left: 16 << 20} }})
		requireRollback(t, g, res, "lost")
	})
}

// dyingConn closes itself after reading `left` bytes.
type dyingConn struct {
	net.Conn
	left int64
}

func (d *dyingConn) Read(p []byte) (int, error) {
	if d.left <= 0 {
		d.Conn.(*net.TCPConn).SetLinger(0) // reset, like a killed process
		d.Conn.Close()
		return 0, errors.New("destination died")
	}
	if int64(len(p)) > d.left {
		p = p[:d.left]
	}
	n, err := d.Conn.Read(p)
	d.left -= int64(n)
	return n, err
}
