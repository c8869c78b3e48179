package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// host is one daemon of a two-host test.
type host struct {
	c    *cli
	dir  string
	addr string
	fp   string
	log  *testguest.Console
}

func (h *host) ferry(args ...string) (string, error) {
	return h.c.run(append([]string{"--daemon", filepath.Join(h.dir, "api.sock")}, args...)...)
}

func (h *host) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := h.ferry(args...)
	if err != nil {
		t.Fatalf("ferry %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// console returns the VM's console log on this host.
func (h *host) console(name string) *testguest.Console {
	con := &testguest.Console{}
	b, _ := os.ReadFile(filepath.Join(h.dir, "vms", name+".console"))
	con.Write(b)
	return con
}

var fpRE = regexp.MustCompile(`SHA256:[A-Za-z0-9+/]+`)

func startHosts(t *testing.T, n int) []*host {
	t.Helper()
	testguest.RequireKVM(t)
	img, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	bin := ferryBinary(t)
	var hosts []*host
	for i := 0; i < n; i++ {
		dir := t.TempDir()
		c := &cli{t: t, bin: bin, dir: dir, env: append(os.Environ(), "FERRY_GUEST="+img)}
		h := &host{c: c, dir: dir, addr: fmt.Sprintf("127.0.0.1:%d", 17700+i+10*(os.Getpid()%500))}
		cmd, log := c.start("daemon", "--listen", h.addr, "--data-dir", dir)
		h.log = log
		deadline := time.Now().Add(10 * time.Second)
		for h.fp == "" && time.Now().Before(deadline) {
			h.fp = fpRE.FindString(log.String())
			time.Sleep(20 * time.Millisecond)
		}
		for time.Now().Before(deadline) {
			if _, err := os.Stat(filepath.Join(dir, "api.sock")); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if h.fp == "" {
			t.Fatalf("daemon did not print its fingerprint\n%s", log.String())
		}
		t.Cleanup(func() { stopDaemon(cmd.Process, dir) })
		hosts = append(hosts, h)
	}
	return hosts
}

func trustEachOther(t *testing.T, a, b *host) {
	t.Helper()
	a.must(t, "nodes", "trust", b.addr, "--fingerprint", b.fp)
	b.must(t, "nodes", "trust", a.addr, "--fingerprint", a.fp)
}

func waitBeats(t *testing.T, h *host, name string, n int) {
	t.Helper()
	wait := 30 * time.Second
	if os.Getenv("FERRY_IN_LAB") != "" {
		wait *= 3 // every instruction of the host is emulated
	}
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if h.console(name).Summary().Heartbeats >= n {
			return
		}
	}
	vmmLog, _ := os.ReadFile(filepath.Join(h.dir, "vms", name+".log"))
	ps, _ := h.c.run("ps")
	t.Fatalf("VM %s on %s: fewer than %d heartbeats in %s\n%s\n--- ferry ps ---\n%s\n--- VMM log ---\n%s",
		name, h.addr, n, wait, h.console(name).String(), ps, vmmLog)
}

func requireClean(t *testing.T, h *host, name string) {
	t.Helper()
	s := h.console(name).Summary()
	if len(s.Failures) > 0 || len(s.Exceptions) > 0 {
		t.Fatalf("VM %s on %s reported problems:\n%s", name, h.addr, h.console(name).String())
	}
}

// TestDaemonsMigrateBothWays: a verify guest moves from host 1 to host 2
// (pre-copy) and back (stop-and-copy) through the daemons' API and mutual
// TLS; its own checks stay clean and the JSON report is complete.
func TestDaemonsMigrateBothWays(t *testing.T) {
	hs := startHosts(t, 2)
	h1, h2 := hs[0], hs[1]
	trustEachOther(t, h1, h2)
	h1.must(t, "run", "--detach", "--name", "vm", "--guest", "test", "--mem", "256M", "--cpus", "2", "--cmdline", "workload=verify size=64M")
	waitBeats(t, h1, "vm", 6)
	// Every transfer option on the way there: they go through the CLI,
	// both daemons and mutual TLS on every stream.
	out := h1.must(t, "migrate", "vm", "--to", h2.addr, "--mode", "precopy", "--json",
		"--compress", "lz4", "--dedup", "--delta", "--streams", "3", "--workers", "2")
	var rep migration.Report
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &rep); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out)
	}
	if rep.Result != "completed" || rep.Downtime <= 0 || rep.GuestDowntime <= 0 || rep.BytesTotal == 0 || len(rep.Iterations) < 2 || rep.SwitchReason == "" {
		t.Fatalf("incomplete report: %+v", rep)
	}
	t.Logf("host1 -> host2: downtime %s (guest view %s), %d bytes, %d iterations, %s", rep.Downtime, rep.GuestDowntime, rep.BytesTotal, len(rep.Iterations), rep.SwitchReason)
	if rep.Transfer.Codec != "lz4" || rep.Transfer.Chunks == 0 {
		t.Fatalf("transfer options not applied: %+v", rep.Transfer)
	}
	if ps := h2.must(t, "ps"); !strings.Contains(ps, "vm") || !strings.Contains(ps, "running") {
		t.Fatalf("host 2 does not run the VM:\n%s", ps)
	}
	waitBeats(t, h2, "vm", 10)
	requireClean(t, h2, "vm")
	out = h2.must(t, "migrate", "vm", "--to", h1.addr, "--mode", "stopcopy")
	if !strings.Contains(out, "completed") || !strings.Contains(out, "stop-and-copy mode") {
		t.Fatalf("second migration:\n%s", out)
	}
	before := h1.console("vm").Summary().Heartbeats
	waitBeats(t, h1, "vm", before+10)
	requireClean(t, h1, "vm")
	// `ferry console` follows the console through the daemon (and sends
	// what is typed to the serial port; the test guest does not read it).
	cmd := exec.Command(h1.c.bin, "--daemon", filepath.Join(h1.dir, "api.sock"), "console", "vm")
	cmd.Stdin = strings.NewReader("hello guest\n")
	con := &testguest.Console{}
	cmd.Stdout = con
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	if !strings.Contains(con.String(), "ferry-guest: verify") {
		t.Fatalf("console shows nothing:\n%s", con.String())
	}
	h1.must(t, "stop", "vm")
}

// TestUntrustedPeerCannotMigrate: host 2 does not trust host 1, so host 1
// cannot reach it; the refusal is logged on host 2 with host 1's
// fingerprint and the guest keeps running on host 1.
func TestUntrustedPeerCannotMigrate(t *testing.T) {
	hs := startHosts(t, 2)
	h1, h2 := hs[0], hs[1]
	h1.must(t, "nodes", "trust", h2.addr, "--fingerprint", h2.fp) // one way only
	h1.must(t, "run", "--detach", "--name", "vm", "--guest", "test", "--mem", "128M", "--cpus", "1", "--cmdline", "workload=verify size=16M")
	waitBeats(t, h1, "vm", 2)
	out, err := h1.ferry("migrate", "vm", "--to", h2.addr)
	if err == nil || !strings.Contains(out, "does not trust this host") {
		t.Fatalf("migration to an untrusting host: %v\n%s", err, out)
	}
	time.Sleep(200 * time.Millisecond)
	if !strings.Contains(h2.log.String(), "refused untrusted peer") || !strings.Contains(h2.log.String(), h1.fp) {
		t.Fatalf("host 2 did not log the refusal with host 1's fingerprint:\n%s", h2.log.String())
	}
	// An unknown fingerprint cannot be trusted by mistake either.
	if out, err := h1.ferry("nodes", "trust", h2.addr, "--fingerprint", h1.fp); err == nil {
		t.Fatalf("trusted %s with the wrong fingerprint:\n%s", h2.addr, out)
	}
	n := h1.console("vm").Summary().Heartbeats
	waitBeats(t, h1, "vm", n+3)
	requireClean(t, h1, "vm")
}

// TestDestinationKilledDuringPrecopy kills the destination's VMM process
// in the middle of pre-copy: the migration fails naming the lost
// connection and the guest runs on at the source, verifying clean.
func TestDestinationKilledDuringPrecopy(t *testing.T) {
	h1, h2, done := startSlowMigration(t)
	pid := 0
	for deadline := time.Now().Add(20 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		ps, _ := h2.ferry("ps")
		for _, l := range strings.Split(ps, "\n") {
			if f := strings.Fields(l); len(f) > 2 && f[0] == "vm" && f[1] == "incoming" {
				pid, _ = strconv.Atoi(f[2])
			}
		}
	}
	if pid == 0 {
		t.Fatal("no incoming VMM process appeared on host 2")
	}
	time.Sleep(time.Second)
	syscall.Kill(pid, syscall.SIGKILL)
	out := <-done
	t.Logf("migrate output:\n%s", out)
	if !strings.Contains(out, "failed") || !strings.Contains(out, "lost") || !strings.Contains(out, "kept running on the source") {
		t.Fatalf("migration did not fail cleanly with the cause")
	}
	requireRunsOn(t, h1)
	if ps := h1.must(t, "ps"); !strings.Contains(ps, "running") {
		t.Fatalf("source VM not running:\n%s", ps)
	}
}

// TestCancelMigration: `ferry migrate --cancel` stops a running migration;
// the guest stays on the source.
func TestCancelMigration(t *testing.T) {
	h1, h2, done := startSlowMigration(t)
	time.Sleep(1500 * time.Millisecond)
	h1.must(t, "migrate", "--cancel", "vm")
	out := <-done
	if !strings.Contains(out, "cancelled") {
		t.Fatalf("migration not cancelled:\n%s", out)
	}
	requireRunsOn(t, h1)
	if ps := h2.must(t, "ps"); strings.Contains(ps, "vm ") {
		t.Fatalf("destination kept the VM after a cancel:\n%s", ps)
	}
}

// startSlowMigration runs a verify guest on host 1 and starts migrating it
// to host 2 over a link capped at 160 Mbit/s, so that there is time to
// interfere; done delivers the output of `ferry migrate`.
func startSlowMigration(t *testing.T) (h1, h2 *host, done chan string) {
	t.Helper()
	hs := startHosts(t, 2)
	h1, h2 = hs[0], hs[1]
	trustEachOther(t, h1, h2)
	h1.must(t, "run", "--detach", "--name", "vm", "--guest", "test", "--mem", "256M", "--cpus", "2", "--cmdline", "workload=verify size=128M")
	waitBeats(t, h1, "vm", 4)
	done = make(chan string, 1)
	go func() {
		out, _ := h1.ferry("migrate", "vm", "--to", h2.addr, "--bandwidth", "160Mbit")
		done <- out
	}()
	return h1, h2, done
}

// requireRunsOn checks the guest goes on beating on h and stays clean.
func requireRunsOn(t *testing.T, h *host) {
	t.Helper()
	n := h.console("vm").Summary().Heartbeats
	waitBeats(t, h, "vm", n+5)
	requireClean(t, h, "vm")
}

// stopDaemon ends a test daemon the way an operator would (SIGTERM: it
// stops its VMs, then removes its socket) and waits for that, so that no
// VMM process outlives the test. Registered after the process's own
// cleanup, it runs before it.
func stopDaemon(p *os.Process, dir string) {
	p.Signal(syscall.SIGTERM)
	sock := filepath.Join(dir, "api.sock")
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); os.IsNotExist(err) {
			return
		}
	}
	// It did not stop in time: make sure its VMs do not run on.
	exec.Command("pkill", "-KILL", "-f", "--data-dir "+dir).Run()
}

// TestDaemonsPostcopy: predictions by --dry-run (nothing moves); then a
// verify guest moves by hybrid migration through
// the daemons (post-copy after one pre-copy pass), then back by demand
// paging, whose source VMM process is killed while the guest still needs
// pages from it: the destination stops the guest after its recovery
// timeout and says why, instead of running it with missing memory.
func TestDaemonsPostcopy(t *testing.T) {
	hs := startHosts(t, 2)
	h1, h2 := hs[0], hs[1]
	trustEachOther(t, h1, h2)
	h1.must(t, "run", "--detach", "--name", "vm", "--guest", "test", "--mem", "256M", "--cpus", "2", "--cmdline", "workload=verify size=32M fill=64M")
	waitBeats(t, h1, "vm", 4)
	// Predictions first: nothing moves.
	out := h1.must(t, "migrate", "vm", "--to", h2.addr, "--dry-run", "--json")
	var pr migration.Prediction
	if err := json.Unmarshal([]byte(out), &pr); err != nil {
		t.Fatalf("dry run is not JSON: %v\n%s", err, out)
	}
	if pr.Bandwidth <= 0 || len(pr.Estimates) < 6 || pr.Choice == "" || pr.Profile.DataPages == 0 {
		t.Fatalf("incomplete prediction: %s", out)
	}
	t.Logf("dry run: link %.0f MiB/s, auto picks %s (%s)", pr.Bandwidth/(1<<20), pr.Choice, pr.Reason)
	if ps := h2.must(t, "ps"); strings.Contains(ps, "vm ") {
		t.Fatalf("a dry run started a VM on the destination:\n%s", ps)
	}
	out = h1.must(t, "migrate", "vm", "--to", h2.addr, "--mode", "hybrid", "--precopy-passes", "1", "--downtime-limit", "1ms", "--json")
	var rep migration.Report
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &rep); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out)
	}
	if rep.Result != "completed" || rep.Postcopy == nil || rep.Postcopy.End != "resident" || rep.SwitchReason != migration.SwitchHybridPasses {
		t.Fatalf("hybrid migration: %s", out)
	}
	t.Logf("hybrid: downtime %s (guest view %s), post-copy %s, %d faults (p99 %s)", rep.Downtime, rep.GuestDowntime,
		rep.Postcopy.Duration, rep.Postcopy.Faults, rep.Postcopy.FaultP99)
	waitBeats(t, h2, "vm", 10)
	requireClean(t, h2, "vm")

	// Back by demand paging; kill the source process once the guest
	// runs on host 1.
	done := make(chan string, 1)
	go func() {
		out, _ := h2.ferry("migrate", "vm", "--to", h1.addr, "--mode", "demand", "--recovery-timeout", "3s")
		done <- out
	}()
	// The source VMM is "migrating" from the hand-over until the guest
	// holds all its memory, so it is found after the guest runs on host 1
	// too (where every ferry command is slow, the switch may come between
	// two polls).
	srcPID, running := 0, false
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline) && (srcPID == 0 || !running); time.Sleep(50 * time.Millisecond) {
		if pid := vmPID(h2.must(t, "ps"), "migrating"); pid != 0 {
			srcPID = pid
		}
		ps, _ := h1.ferry("ps")
		running = strings.Contains(ps, "running")
	}
	if srcPID == 0 || !running {
		t.Fatalf("no migrating VMM process on host 2 (found pid %d) while the guest runs on host 1 (%v)", srcPID, running)
	}
	syscall.Kill(srcPID, syscall.SIGKILL)
	out = <-done
	t.Logf("migrate output after the source was killed:\n%s", out)
	// Host 1 stops the guest within its recovery timeout and says why.
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if ps, _ := h1.ferry("ps"); !strings.Contains(ps, "vm ") {
			break
		}
	}
	if ps := h1.must(t, "ps"); strings.Contains(ps, "vm ") {
		t.Fatalf("host 1 still runs the guest without its memory:\n%s", ps)
	}
	vmlog, _ := os.ReadFile(filepath.Join(h1.dir, "vms", "vm.log"))
	if !strings.Contains(string(vmlog), "post-copy cannot complete") {
		t.Fatalf("host 1's VMM log does not say why the guest stopped:\n%s", vmlog)
	}
	requireClean(t, h1, "vm")
}

// vmPID finds the pid of VM "vm" in state in `ferry ps` output.
func vmPID(ps, state string) int {
	for _, l := range strings.Split(ps, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[0] == "vm" && f[1] == state {
			pid, _ := strconv.Atoi(f[2])
			return pid
		}
	}
	return 0
}
