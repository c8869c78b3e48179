package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/qemu"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if err := RequireRoot(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	if _, err := exec.LookPath("tc"); err != nil {
		t.Skipf("skipping: tc not installed (.ci/run installs iproute2)")
	}
}

// TestLabCountsWhatCrossesTheLink builds the two namespaces and checks
// that a transfer between them is counted by the veth counters in the
// right direction, and that Close leaves nothing behind.
func TestLabCountsWhatCrossesTheLink(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	lab, err := NewLab(ctx, LinkConfig{Rate: "1Gbit"})
	if err != nil {
		t.Fatal(err)
	}
	defer lab.Close()
	src := filepath.Join(t.TempDir(), "src")
	payload := make([]byte, 8<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	if err := os.WriteFile(src, payload, 0o644); err != nil {
		t.Fatal(err)
	}
	f0, b0, err := lab.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "dst")
	n, took, err := carry(ctx, lab, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	f1, b1, err := lab.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	if n != uint64(len(payload)) || string(got) != string(payload) {
		t.Fatalf("carried %d bytes, file differs: %v", n, string(got) != string(payload))
	}
	if fwd := f1 - f0; fwd < n || fwd > n+n/10 {
		t.Errorf("forward counter %d for %d bytes of payload", fwd, n)
	}
	if back := b1 - b0; back == 0 || back > n/10 {
		t.Errorf("back counter %d (acks only expected)", back)
	}
	t.Logf("8 MiB over the shaped link in %s; counters %d forward, %d back", took, f1-f0, b1-b0)
	lab.Close()
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), lab.Source.NS) || strings.Contains(string(out), lab.Dest.NS) {
		t.Fatalf("namespaces left behind:\n%s", out)
	}
}

// TestLatencyWithoutNetemSaysWhy: on a kernel without netem, asking for
// latency fails with the reason instead of running an unshaped link.
func TestLatencyWithoutNetemSaysWhy(t *testing.T) {
	requireRoot(t)
	lab, err := NewLab(context.Background(), LinkConfig{Rate: "1Gbit", Latency: time.Millisecond})
	if err == nil {
		lab.Close()
		t.Skip("this kernel has netem: latency works")
	}
	if !strings.Contains(err.Error(), "netem") {
		t.Fatalf("error does not say why: %v", err)
	}
}

// TestSmoke runs the smoke scenario on both systems end to end: the CI's
// guard that the harness keeps working. The guest checks the memory it
// rewrites after the move (dirty check=1); any error fails the run.
func TestSmoke(t *testing.T) {
	requireRoot(t)
	testguest.RequireKVM(t)
	systems := []string{"ferry", "qemu"}
	if err := qemu.Available(); err != nil {
		t.Logf("QEMU missing (%v): ferry only", err)
		systems = systems[:1]
	}
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "ferry")
	build := exec.Command("go", "build", "-o", bin, "github.com/ferry-vmm/ferry/cmd/ferry")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building ferry: %v\n%s", err, out)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	set, err := Run(ctx, Config{Scenarios: []string{"smoke"}, Profile: "quick", Out: out, Link: LinkConfig{Rate: "1Gbit"},
		Systems: systems, Ferry: bin, Guest: img, Log: testLog{t}})
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Results) != len(systems) {
		t.Fatalf("%d results for %d systems", len(set.Results), len(systems))
	}
	for _, r := range set.Results {
		if !r.Finished || r.Error != "" {
			t.Errorf("%s: %s", r.Label, r.Error)
		}
		if r.GuestErrors != 0 || r.GuestChecked == 0 {
			t.Errorf("%s: the guest saw %d errors in %d checked pages", r.Label, r.GuestErrors, r.GuestChecked)
		}
		// The guest rewrites its 32 MiB working set: all of it must cross.
		if r.BytesForward < 32<<20 || r.TotalTime <= 0 || r.HeartbeatGap <= 0 {
			t.Errorf("%s: %d bytes forward, total %s, gap %s", r.Label, r.BytesForward, r.TotalTime, r.HeartbeatGap)
		}
	}
	for _, f := range []string{"results.json", "summary.md"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Error(err)
		}
	}
	runs, _ := filepath.Glob(filepath.Join(out, "runs", "*.json"))
	if len(runs) != len(systems) {
		t.Errorf("%d run files", len(runs))
	}
	back, err := ReadSet(filepath.Join(out, "results.json"))
	if err != nil || len(back.Results) != len(set.Results) {
		t.Fatalf("results.json: %v", err)
	}
	summary, _ := os.ReadFile(filepath.Join(out, "summary.md"))
	t.Logf("summary.md:\n%s", summary)
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = testLog{}

// TestMeasurementsFromHeartbeats checks the downtime, degradation and
// switch point the harness derives from two consoles.
func TestMeasurementsFromHeartbeats(t *testing.T) {
	t0 := time.Unix(1000, 0)
	beat := func(at time.Duration, rate uint64) guestlog.TimedLine {
		l, ok := guestlog.Parse(fmt.Sprintf("ferry-guest: hb cpu=0 seq=1 tsc=1 ms=1 pages=%d rate=%d worst_us=1 checked=10 errors=0", rate/4096/50, rate))
		if !ok {
			t.Fatal("parse")
		}
		return guestlog.TimedLine{At: t0.Add(at), Line: l}
	}
	var src, dst []guestlog.TimedLine
	for at := -3 * time.Second; at <= 200*time.Millisecond; at += 20 * time.Millisecond {
		src = append(src, beat(at, 100<<20))
	}
	for at := 500 * time.Millisecond; at <= 2*time.Second; at += 20 * time.Millisecond {
		dst = append(dst, beat(at, 100<<20))
	}
	lines := mergeLines(src, dst)
	if gap := longestGap(lines, t0, t0.Add(time.Second)); gap != 300*time.Millisecond {
		t.Errorf("gap %s, want 300ms", gap)
	}
	if gap := longestGap(src, t0, t0.Add(time.Second)); gap != 800*time.Millisecond {
		t.Errorf("a guest silent to the end: gap %s, want 800ms", gap)
	}
	base := bytesRate(lines, t0.Add(-2*time.Second), t0)
	if base != 100<<20 {
		t.Errorf("baseline %f", base)
	}
	written := bytesWritten(lines, t0, t0.Add(time.Second))
	// 10 beats on the source and 26 on the destination in (0, 1 s].
	if want := float64(36 * (100 << 20) / 4096 / 50 * 4096); written != want {
		t.Errorf("written %f, want %f", written, want)
	}
	if n := guestFailures(lines); n != 0 {
		t.Errorf("%d failures", n)
	}
}

func TestScenarioNames(t *testing.T) {
	got, err := ResolveScenarios([]string{"scenario1", "all", "smoke"})
	if err != nil || got[0] != "dirty-rate" || got[len(got)-1] != "smoke" || len(got) != len(Scenarios) {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := ResolveScenarios([]string{"nope"}); err == nil || !strings.Contains(err.Error(), "dirty-rate") {
		t.Fatalf("unknown scenario: %v", err)
	}
	for name, p := range profiles {
		for _, sc := range Scenarios {
			if len(specs(sc, p)) == 0 {
				t.Errorf("%s %s: no runs", name, sc)
			}
		}
	}
	r, err := LinkRate("10Gbit")
	if err != nil || r != 1250000000 {
		t.Fatalf("%d %v", r, err)
	}
	if _, err := LinkRate("fast"); err == nil {
		t.Fatal("accepted a bad rate")
	}
}

// The JSON a run writes reads back the same.
func TestResultJSON(t *testing.T) {
	r := Result{Version: ResultVersion, Scenario: "smoke", System: "ferry", Downtime: time.Millisecond, Offline: &Offline{StateBytes: 7}}
	b, _ := json.Marshal(r)
	var back Result
	if err := json.Unmarshal(b, &back); err != nil || back.Downtime != r.Downtime || back.Offline.StateBytes != 7 {
		t.Fatalf("%v %+v", err, back)
	}
}
