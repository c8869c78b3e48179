package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// These tests migrate the test guest between two real QEMUs on this host
// and take the guest's own verdict: the verify workload checks its memory
// and registers continuously, so a migration that loses or corrupts state
// shows up as FAIL lines or a non-zero error count in its exit line.

func requireQEMU(t *testing.T) string {
	t.Helper()
	testguest.RequireKVM(t)
	if err := Available(); err != nil {
		t.Skipf("skipping: %v (.ci/run installs qemu-system-x86)", err)
	}
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// guest is a QEMU with the test guest and its recorded console.
type guest struct {
	inst *Instance
	rec  *guestlog.Recorder
	con  *testguest.Console
}

const verifyCmdline = "workload=verify size=64M exit_after=5s"

func startGuest(t *testing.T, img, cmdline, incoming string) *guest {
	t.Helper()
	g := &guest{con: &testguest.Console{}}
	g.rec = guestlog.NewRecorder(g.con)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := Start(ctx, Options{Kernel: img, Cmdline: cmdline, MemMiB: 256, CPUs: 2, Console: g.rec, Incoming: incoming})
	if err != nil {
		t.Fatal(err)
	}
	g.inst = inst
	t.Cleanup(func() {
		if err := inst.Close(); err != nil {
			t.Error(err)
		}
	})
	return g
}

func (g *guest) beats() int {
	n := 0
	for _, l := range g.rec.Lines() {
		if guestlog.IsBeat(l.Line) {
			n++
		}
	}
	return n
}

// waitBeats waits until the guest has printed n heartbeats in all.
func (g *guest) waitBeats(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for g.beats() < n {
		if time.Now().After(deadline) {
			t.Fatalf("guest printed %d of %d heartbeats\n%s\nstderr: %s", g.beats(), n, g.con.String(), g.inst.Stderr())
		}
		select {
		case <-g.inst.Exited():
			t.Fatalf("guest exited early\n%s\nstderr: %s", g.con.String(), g.inst.Stderr())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// avxLossExpected reports whether QEMU on this host cannot carry the
// guest's AVX state (see DefaultCPU): the guest says it uses AVX while
// QEMU's vCPU has none.
func (g *guest) avxLossExpected(t *testing.T) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	has, err := g.inst.QMP().CPUFeature(ctx, "avx")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range g.con.Lines() {
		if l.Kind == guestlog.KindBoot {
			return l.MustUint("avx") == 1 && !has
		}
	}
	t.Fatalf("no boot line yet\n%s", g.con.String())
	return false
}

// verdict checks a guest's own report of a run that ended with status
// (from Wait): no failure, no exception, an exit line with 0 errors. With
// avxLoss, one failure is let through, and logged: soak rounds whose YMM
// upper halves all read zero (32 quadwords per round), which is QEMU under
// PVM losing the AVX state at a state sync, not memory or other registers.
func verdict(t *testing.T, who string, g *guest, status int, avxLoss bool) {
	t.Helper()
	text := g.con.String()
	sum := g.con.Summary()
	if len(sum.Exceptions) > 0 || !sum.Exited || sum.Heartbeats == 0 {
		t.Fatalf("%s: exceptions %d, exited %v, %d heartbeats\n%s", who, len(sum.Exceptions), sum.Exited, sum.Heartbeats, text)
	}
	if len(sum.Failures) == 0 && sum.ExitErrors == 0 && status == 0 {
		return
	}
	ymmLost := len(sum.Failures) > 0
	for _, f := range sum.Failures {
		reg := f.Fields["reg"]
		upper := strings.HasSuffix(reg, ".q2") || strings.HasSuffix(reg, ".q3")
		if f.Fields["what"] != "reg" || !strings.HasPrefix(reg, "ymm") || !upper || f.MustUint("found") != 0 {
			ymmLost = false
		}
	}
	if !avxLoss || !ymmLost || sum.ExitErrors%32 != 0 || status != 1 {
		t.Fatalf("%s: status %d, %d errors, %d FAIL lines\n%s", who, status, sum.ExitErrors, len(sum.Failures), text)
	}
	t.Logf("%s: QEMU zeroed the YMM upper halves in %d register soak rounds (%d errors): QEMU under PVM does not carry AVX state (see DefaultCPU); memory and all other registers verified clean",
		who, sum.ExitErrors/32, sum.ExitErrors)
}

// checkArrived checks the destination: the guest continued (no second
// boot), beat, verified clean and exited.
func checkArrived(t *testing.T, dst *guest, src *guest, avxLoss bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	status, err := dst.inst.Wait(ctx)
	text := dst.con.String()
	if err != nil {
		t.Fatalf("destination: %v\n%s\nstderr: %s", err, text, dst.inst.Stderr())
	}
	lines := dst.con.Lines()
	if sum := guestlog.Summarize(lines); sum.Booted {
		t.Fatalf("the guest booted again on the destination\n%s", text)
	}
	verdict(t, "destination", dst, status, avxLoss)
	// The first beat continues the source's sequence.
	for _, l := range lines {
		if guestlog.IsBeat(l) {
			if l.MustUint("seq") == 0 {
				t.Fatalf("destination beats start from seq 0: %s", l.Raw)
			}
			break
		}
	}
	if ss := src.con.Summary(); len(ss.Failures) > 0 || len(ss.Exceptions) > 0 {
		t.Fatalf("source saw failures\n%s", src.con.String())
	}
}

// jsonNames are the JSON names of a struct's fields.
func jsonNames(typ reflect.Type) map[string]reflect.Type {
	names := map[string]reflect.Type{}
	for f := range typ.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		names[name] = f.Type
	}
	return names
}

// unknownKeys lists the keys of a QEMU reply that typ (a struct) has no
// field for, nested objects included: QEMU 7.2's fields are all typed.
func unknownKeys(t *testing.T, prefix string, raw json.RawMessage, typ reflect.Type) []string {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		t.Fatalf("%s: %v", prefix, err)
	}
	names := jsonNames(typ)
	var out []string
	for k, v := range obj {
		ft, ok := names[k]
		if !ok {
			out = append(out, prefix+k)
			continue
		}
		if ft.Kind() == reflect.Pointer && ft.Elem().Kind() == reflect.Struct {
			out = append(out, unknownKeys(t, prefix+k+".", v, ft.Elem())...)
		}
	}
	slices.Sort(out)
	return out
}

func TestMigrateVerifyGuest(t *testing.T) {
	img := requireQEMU(t)
	for _, tc := range []struct {
		name string
		plan Plan
	}{
		{"precopy-xbzrle", Plan{Technique: Precopy, Capabilities: map[string]bool{"xbzrle": true}}},
		{"postcopy", Plan{Technique: Postcopy, Capabilities: map[string]bool{"postcopy-blocktime": true}}},
		// 64 MiB/s keeps the first pass (64 MiB of working set) running
		// past the switch.
		{"hybrid", Plan{Technique: Hybrid, PrecopyFor: 400 * time.Millisecond, MaxBandwidth: 64 << 20}},
		// At 16 MiB/s the verify workload (which rewrites its working set
		// many times a second) never converges within 300 ms.
		{"forced", Plan{Technique: Precopy, MaxBandwidth: 16 << 20, ForceAfter: time.Second}},
		{"multifd-zstd", Plan{Technique: Precopy, Capabilities: map[string]bool{"multifd": true},
			Parameters: map[string]any{"multifd-channels": 2, "multifd-compression": "zstd"}}},
		{"offline", Plan{Technique: Offline}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := startGuest(t, img, verifyCmdline, "")
			dst := startGuest(t, img, verifyCmdline, "defer")
			src.waitBeats(t, 10)
			avxLoss := src.avxLossExpected(t)

			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			plan := tc.plan
			plan.URI = "tcp:127.0.0.1:0"
			var mu sync.Mutex
			var activeRaw json.RawMessage
			var statuses []MigrationStatus
			plan.Progress = func(info MigrationInfo) {
				mu.Lock()
				defer mu.Unlock()
				if len(statuses) == 0 || statuses[len(statuses)-1] != info.Status {
					statuses = append(statuses, info.Status)
				}
				if info.Status == StatusActive && activeRaw == nil {
					if err := src.inst.QMP().Execute(ctx, "query-migrate", nil, &activeRaw); err != nil {
						t.Error(err)
					}
				}
			}
			start := time.Now()
			out, err := MigrateTo(ctx, src.inst, dst.inst, plan)
			took := time.Since(start)
			if err != nil {
				t.Fatalf("%v\noutcome %+v\nsource stderr: %s\ndestination stderr: %s", err, out, src.inst.Stderr(), dst.inst.Stderr())
			}
			if !out.Completed || out.Status != StatusCompleted || out.Error != "" || out.SourceState != "postmigrate" {
				t.Fatalf("outcome %+v", out)
			}
			ram := out.Source.RAM
			if ram == nil || ram.Transferred == 0 || ram.Total < 256<<20 || out.Source.TotalTimeMs <= 0 {
				t.Fatalf("source stats %+v %+v", out.Source, ram)
			}
			if plan.Technique != Offline && (out.Source.DowntimeMs <= 0 || ram.Mbps <= 0) {
				t.Fatalf("source stats %+v %+v", out.Source, ram)
			}
			if !strings.HasPrefix(out.URI, "tcp:127.0.0.1:") || strings.HasSuffix(out.URI, ":0") {
				t.Fatalf("URI %q", out.URI)
			}
			if out.SourceStopped.IsZero() || out.CompletedAt.Before(out.SourceStopped) || out.DestRunning.IsZero() {
				t.Fatalf("times: stopped %v completed %v dest running %v", out.SourceStopped, out.CompletedAt, out.DestRunning)
			}
			if bw, _ := strconv.ParseInt(string(out.Parameters["max-bandwidth"].(json.Number)), 10, 64); (plan.MaxBandwidth == 0 && bw != Unlimited) || (plan.MaxBandwidth != 0 && bw != plan.MaxBandwidth) {
				t.Fatalf("max-bandwidth %d", bw)
			}
			for c, on := range plan.Capabilities {
				if out.Capabilities[c] != on {
					t.Fatalf("capability %s is %v", c, out.Capabilities[c])
				}
			}
			postcopy := plan.Technique == Postcopy || plan.Technique == Hybrid
			if postcopy != !out.PostcopyStarted.IsZero() || postcopy != (ram.PostcopyBytes > 0) || postcopy != out.Capabilities["postcopy-ram"] {
				t.Fatalf("post-copy: started %v, %d bytes, capability %v", out.PostcopyStarted, ram.PostcopyBytes, out.Capabilities["postcopy-ram"])
			}
			if plan.Technique == Hybrid && ram.PrecopyBytes == 0 {
				t.Fatalf("hybrid without pre-copy bytes: %+v", ram)
			}
			completedEvent := slices.ContainsFunc(out.SourceEvents, func(e Event) bool { return e.MigrationStatus() == StatusCompleted })
			resumeEvent := slices.ContainsFunc(out.DestEvents, Named("RESUME"))
			if !completedEvent || !resumeEvent {
				t.Fatalf("events: source %+v, destination %+v", out.SourceEvents, out.DestEvents)
			}
			if out.ForcedStop != (plan.ForceAfter > 0) {
				t.Fatalf("forced stop %v", out.ForcedStop)
			}
			if plan.Capabilities["xbzrle"] && out.Source.XBZRLECache == nil {
				t.Fatalf("no xbzrle stats: %+v", out.Source)
			}
			if plan.Capabilities["multifd"] && ram.MultifdBytes == 0 {
				t.Fatalf("multifd sent nothing: %+v", ram)
			}
			if plan.Capabilities["postcopy-blocktime"] && out.Dest.PostcopyBlocktimeMs == 0 && len(out.Dest.PostcopyVCPUBlocktimeMs) == 0 {
				t.Logf("note: destination reported no post-copy blocktime: %+v", out.Dest)
			}

			// Every field QEMU gives is one MigrationInfo has.
			var doneRaw json.RawMessage
			if err := src.inst.QMP().Execute(ctx, "query-migrate", nil, &doneRaw); err != nil {
				t.Fatal(err)
			}
			var dstRaw json.RawMessage
			if err := dst.inst.QMP().Execute(ctx, "query-migrate", nil, &dstRaw); err != nil {
				t.Fatal(err)
			}
			typ := reflect.TypeFor[MigrationInfo]()
			mu.Lock()
			for _, raw := range []json.RawMessage{activeRaw, doneRaw, dstRaw} {
				if raw == nil {
					continue
				}
				if unknown := unknownKeys(t, "", raw, typ); len(unknown) > 0 {
					t.Errorf("query-migrate fields MigrationInfo lacks: %v in %s", unknown, raw)
				}
			}
			mu.Unlock()

			checkArrived(t, dst, src, avxLoss)
			merged := append(src.rec.Lines(), dst.rec.Lines()...)
			slices.SortStableFunc(merged, func(a, b guestlog.TimedLine) int { return a.At.Compare(b.At) })
			gap := guestlog.HeartbeatGap(merged, out.SourceStopped)
			t.Logf("%s: %v in all; QEMU: total %d ms, setup %d ms, downtime %d ms; stopped→running %v; heartbeat gap %v; %d MB sent (%d precopy, %d downtime, %d postcopy, %d multifd), %d postcopy requests, %.0f Mbit/s; statuses %v; forced %v",
				tc.name, took.Round(time.Millisecond), out.Source.TotalTimeMs, out.Source.SetupTimeMs, out.Source.DowntimeMs,
				out.DestRunning.Sub(out.SourceStopped).Round(time.Millisecond), gap.Round(time.Millisecond),
				ram.Transferred>>20, ram.PrecopyBytes>>20, ram.DowntimeBytes>>20, ram.PostcopyBytes>>20, ram.MultifdBytes>>20,
				ram.PostcopyRequests, ram.Mbps, statuses, out.ForcedStop)
		})
	}
}

// A migration to a port where nobody listens fails with QEMU's reason,
// and the guest keeps running on the source.
func TestMigrateNoListener(t *testing.T) {
	img := requireQEMU(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	src := startGuest(t, img, "workload=verify size=64M exit_after=3s", "")
	src.waitBeats(t, 6)
	avxLoss := src.avxLossExpected(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := MigrateTo(ctx, src.inst, nil, Plan{URI: "tcp:" + addr})
	if err == nil || !strings.Contains(err.Error(), "Connection refused") || !strings.Contains(err.Error(), "failed") {
		t.Fatalf("MigrateTo = %v", err)
	}
	if out.Completed || out.Status != StatusFailed || out.SourceState != "running" || out.Error != err.Error() {
		t.Fatalf("outcome %+v", out)
	}
	t.Logf("error: %v", err)
	st, err := src.inst.QMP().QueryStatus(ctx)
	if err != nil || !st.Running {
		t.Fatalf("source after the failure: %+v, %v", st, err)
	}
	before := src.beats()
	src.waitBeats(t, before+4)

	status, err := src.inst.Wait(ctx)
	if err != nil {
		t.Fatalf("%v\nstderr: %s", err, src.inst.Stderr())
	}
	verdict(t, "source", src, status, avxLoss)
}

// A destination that dies during pre-copy fails the migration; the
// source resumes.
func TestMigrateDestinationDies(t *testing.T) {
	img := requireQEMU(t)
	src := startGuest(t, img, "workload=verify size=64M exit_after=4s", "")
	dst := startGuest(t, img, "workload=verify size=64M exit_after=4s", "defer")
	src.waitBeats(t, 6)
	avxLoss := src.avxLossExpected(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	killed := false
	plan := Plan{URI: "tcp:127.0.0.1:0", MaxBandwidth: 8 << 20, Progress: func(info MigrationInfo) {
		if !killed && info.Status == StatusActive && info.RAM != nil && info.RAM.Transferred > 4<<20 {
			killed = true
			dst.inst.Kill()
		}
	}}
	out, err := MigrateTo(ctx, src.inst, dst.inst, plan)
	if err == nil || out.Status != StatusFailed || out.SourceState != "running" || !killed {
		t.Fatalf("MigrateTo = %v, outcome %+v", err, out)
	}
	t.Logf("error: %v", err)
	status, err := src.inst.Wait(ctx)
	if err != nil {
		t.Fatalf("%v\nstderr: %s", err, src.inst.Stderr())
	}
	verdict(t, "source", src, status, avxLoss)
}

// A migration whose context ends is cancelled; the source resumes.
func TestMigrateContextEnds(t *testing.T) {
	img := requireQEMU(t)
	src := startGuest(t, img, "workload=verify size=64M exit_after=4s", "")
	dst := startGuest(t, img, "workload=verify size=64M exit_after=4s", "defer")
	src.waitBeats(t, 6)
	avxLoss := src.avxLossExpected(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	// 8 MiB/s: 64 MiB cannot move in a second.
	out, err := MigrateTo(ctx, src.inst, dst.inst, Plan{URI: "tcp:127.0.0.1:0", MaxBandwidth: 8 << 20})
	if !errors.Is(err, context.DeadlineExceeded) || out.Status != StatusCancelled || out.SourceState != "running" {
		t.Fatalf("MigrateTo = %v, outcome %+v", err, out)
	}
	t.Logf("error: %v", err)
	wctx, wcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer wcancel()
	status, err := src.inst.Wait(wctx)
	if err != nil {
		t.Fatalf("%v\nstderr: %s", err, src.inst.Stderr())
	}
	verdict(t, "source", src, status, avxLoss)
}

// Start reports a QEMU that cannot start with its message, and Close
// leaves neither a process nor the socket directory behind.
func TestInstanceLifecycle(t *testing.T) {
	img := requireQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := Start(ctx, Options{Kernel: img, MemMiB: 256, CPUs: 1, Extra: []string{"-no-such-option"}})
	if err == nil || !strings.Contains(err.Error(), "-no-such-option") || ctx.Err() != nil {
		t.Fatalf("Start with a bad option: %v", err)
	}

	// A guest that exits at once with its own status (2: configuration
	// error) reports it through Run.
	var con testguest.Console
	if status, err := Run(ctx, Options{Kernel: img, Cmdline: "workload=verify size=200M fill=200M", MemMiB: 256, CPUs: 1, Console: &con}); status != 2 || err != nil {
		t.Fatalf("Run = %d, %v\n%s", status, err, con.String())
	}

	inst, err := Start(ctx, Options{Kernel: img, Cmdline: "workload=idle", MemMiB: 256, CPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	st, err := inst.QMP().QueryStatus(ctx)
	if err != nil || !st.Running {
		t.Fatalf("%+v, %v", st, err)
	}
	if v := inst.QMP().Version(); v.Major < 7 {
		t.Fatalf("QEMU %v", v)
	}
	pid, dir := inst.Pid(), inst.dir
	if err := inst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inst.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("pid %d after Close: %v", pid, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s after Close: %v", dir, err)
	}
	if _, err := inst.Wait(ctx); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("Wait after Close: %v", err)
	}
	if _, err := inst.QMP().QueryStatus(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("QMP after Close: %v", err)
	}

	// A Wrapper runs QEMU in another network namespace; QMP still works
	// through the socket's path.
	if _, err := os.Stat("/usr/bin/unshare"); err != nil || os.Geteuid() != 0 {
		t.Logf("skipping the Wrapper check: needs root and unshare")
		return
	}
	inst, err = Start(ctx, Options{Kernel: img, Cmdline: "workload=idle", MemMiB: 256, CPUs: 1, Wrapper: []string{"unshare", "--net"}})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	if st, err := inst.QMP().QueryStatus(ctx); err != nil || !st.Running {
		t.Fatalf("wrapped: %+v, %v", st, err)
	}
	ours, _ := os.Readlink("/proc/self/ns/net")
	theirs, err := os.Readlink("/proc/" + strconv.Itoa(inst.Pid()) + "/ns/net")
	comm, _ := os.ReadFile("/proc/" + strconv.Itoa(inst.Pid()) + "/comm")
	if err != nil || theirs == ours || !strings.HasPrefix(string(comm), "qemu") {
		t.Fatalf("wrapped QEMU: net ns %s (ours %s), comm %q, %v", theirs, ours, comm, err)
	}
}
