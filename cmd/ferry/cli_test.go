package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// ferryBinary builds cmd/ferry once per test run.
func ferryBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("FERRY_TEST_BINARY"); p != "" {
		return p // prebuilt: inside a lab host there is no Go toolchain
	}
	bin := filepath.Join(t.TempDir(), "ferry")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("building ferry: %v\n%s", err, out)
	}
	return bin
}

type cli struct {
	t   *testing.T
	bin string
	env []string
	dir string
}

func (c *cli) run(args ...string) (string, error) {
	cmd := exec.Command(c.bin, args...)
	cmd.Env, cmd.Dir = c.env, c.dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// start runs a long-lived ferry command with its console in a Console.
func (c *cli) start(args ...string) (*exec.Cmd, *testguest.Console) {
	con := &testguest.Console{}
	cmd := exec.Command(c.bin, args...)
	cmd.Env, cmd.Dir = c.env, c.dir
	cmd.Stdout, cmd.Stderr = con, con
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, con
}

func waitFor(t *testing.T, con *testguest.Console, what string, ok func([]guestlog.Line) bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if ok(con.Lines()) {
			return
		}
	}
	t.Fatalf("timed out waiting for %s\n%s", what, con.String())
}

func verifyBeats(n int) func([]guestlog.Line) bool {
	return func(ls []guestlog.Line) bool {
		c := 0
		for _, l := range ls {
			if l.Kind == guestlog.KindVerify {
				c++
			}
		}
		return c >= n
	}
}

// TestSaveInspectRestoreCLI drives the commands a user types: run a verify
// guest, save it, inspect the file, restore it in a new process, save it
// again and compare the two states.
func TestSaveInspectRestoreCLI(t *testing.T) {
	testguest.RequireKVM(t)
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &cli{t: t, bin: ferryBinary(t), dir: dir,
		env: append(os.Environ(), "FERRY_RUN_DIR="+filepath.Join(dir, "run"), "FERRY_GUEST="+img)}

	run, con := c.start("run", "--guest", "test", "--name", "src", "--mem", "256M", "--cpus", "2", "--cmdline", "workload=verify size=64M")
	waitFor(t, con, "verify heartbeats", verifyBeats(6))
	out, err := c.run("save", "--vm", "src", "--out", "a.ferry")
	if err != nil {
		t.Fatalf("ferry save: %v\n%s", err, out)
	}
	t.Logf("ferry save:\n%s", out)
	for _, want := range []string{"guest paused", "bytes written", "zero pages skipped", "VM stopped"} {
		if !strings.Contains(out, want) {
			t.Fatalf("save output lacks %q", want)
		}
	}
	if err := run.Wait(); err != nil {
		t.Fatalf("ferry run did not end cleanly after save: %v\n%s", err, con.String())
	}

	out, err = c.run("inspect", "a.ferry")
	if err != nil {
		t.Fatalf("ferry inspect: %v\n%s", err, out)
	}
	for _, want := range []string{"rip", "EFER", "LAPIC", "IOAPIC", "PIT", "non-zero pages"} {
		if !strings.Contains(strings.ToLower(out), strings.ToLower(want)) {
			t.Errorf("inspect output lacks %q", want)
		}
	}
	out, err = c.run("inspect", "--json", "a.ferry")
	if err != nil {
		t.Fatalf("ferry inspect --json: %v\n%s", err, out)
	}
	var rep struct {
		VCPUs  []json.RawMessage `json:"vcpus"`
		Memory struct {
			NonZeroPages uint64 `json:"non_zero_pages"`
		} `json:"memory"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil || len(rep.VCPUs) != 2 || rep.Memory.NonZeroPages == 0 {
		t.Fatalf("inspect --json: %v, %d vCPUs, %d pages", err, len(rep.VCPUs), rep.Memory.NonZeroPages)
	}

	restored, rcon := c.start("restore", "--name", "dst", "a.ferry")
	waitFor(t, rcon, "restored heartbeats", verifyBeats(10))
	out, err = c.run("save", "--vm", "dst", "--out", "b.ferry", "--compress")
	if err != nil {
		t.Fatalf("second save: %v\n%s", err, out)
	}
	if err := restored.Wait(); err != nil {
		t.Fatalf("ferry restore did not end cleanly: %v\n%s", err, rcon.String())
	}
	if s := rcon.Summary(); len(s.Failures) > 0 || len(s.Exceptions) > 0 || s.Heartbeats < 10 {
		t.Fatalf("restored guest unhealthy:\n%s", rcon.String())
	}
	if !strings.Contains(rcon.String(), "restored") {
		t.Fatalf("restore did not report Δr:\n%s", rcon.String())
	}

	if out, err := c.run("state", "diff", "a.ferry", "a.ferry"); err != nil || !strings.Contains(out, "equal") {
		t.Fatalf("diff of a file with itself: %v\n%s", err, out)
	}
	out, err = c.run("state", "diff", "a.ferry", "b.ferry")
	if err == nil || !strings.Contains(out, "].regs.") || !strings.Contains(out, "memory:") {
		t.Fatalf("diff of two moments of a running guest found nothing: %v\n%s", err, out)
	}
	t.Logf("state diff a b (first lines):\n%s", firstLines(out, 5))
}

func firstLines(s string, n int) string {
	l := strings.SplitN(s, "\n", n+1)
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, "\n")
}

// TestRunStopsOnInterrupt: Ctrl-C (SIGINT) stops a foreground VM cleanly.
func TestRunStopsOnInterrupt(t *testing.T) {
	testguest.RequireKVM(t)
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &cli{t: t, bin: ferryBinary(t), dir: dir, env: append(os.Environ(), "FERRY_RUN_DIR="+dir, "FERRY_GUEST="+img)}
	run, con := c.start("run", "--guest", "test", "--mem", "128M", "--cpus", "2", "--cmdline", "workload=dirty size=32M rate=50M")
	waitFor(t, con, "heartbeats", func(ls []guestlog.Line) bool { return len(ls) > 4 })
	if err := run.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- run.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ferry run after Ctrl-C: %v\n%s", err, con.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ferry run did not stop within 10 s of Ctrl-C")
	}
	if !strings.Contains(con.String(), "stopped by host") {
		t.Fatalf("no clean-stop report:\n%s", con.String())
	}
}

// TestRunRejectsBadKernels: malformed kernel files get a clear message and
// no VM.
func TestRunRejectsBadKernels(t *testing.T) {
	testguest.RequireKVM(t)
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &cli{t: t, bin: ferryBinary(t), dir: dir, env: append(os.Environ(), "FERRY_RUN_DIR="+dir)}
	cases := map[string][]byte{
		"empty":     {},
		"garbage":   []byte(strings.Repeat("not a kernel ", 100)),
		"truncated": good[:len(good)/3],
		"elf-no-note": func() []byte {
			b := append([]byte(nil), good...)
			i := strings.Index(string(b), "Xen\x00")
			b[i] = 'Y' // the PVH note's name no longer says Xen
			return b
		}(),
	}
	for name, data := range cases {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := c.run("run", "--kernel", p, "--mem", "64M")
		if err == nil {
			t.Fatalf("%s: ferry run accepted it\n%s", name, out)
		}
		if !strings.Contains(out, "kernel") || strings.Contains(out, "panic") || strings.Contains(out, "goroutine") {
			t.Fatalf("%s: unclear error:\n%s", name, out)
		}
		t.Logf("%s: %s", name, strings.TrimSpace(out))
	}
}
