package lab

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// The Linux guest's checker: a working set dirtied at a modest rate and
// verified, clocks, a file on tmpfs, the kernel log (docs/linux-guests.md).
const linuxCheck = "size=8M rate=512K pattern=random files=2M hb=200ms"

// TestLinuxBoots boots the stock Debian kernel in ferry on emulated SVM
// with 1 and 2 vCPUs, to its init and through a short checker run that
// must end clean. The host has one CPU, as every lab host that runs Linux
// guests for a while: a 2-CPU host under multi-threaded TCG once stalled
// its own CPU inside KVM_RUN here for minutes (docs/lab.md, "Lab host
// shapes").
func TestLinuxBoots(t *testing.T) {
	l := startLab(t, Config{Hosts: 1})
	ctx := context.Background()
	if err := l.StartDaemons(ctx); err != nil {
		t.Fatal(err)
	}
	h := l.Hosts[0]
	for _, cpus := range []int{1, 2} {
		name := fmt.Sprintf("boot%d", cpus)
		t0 := time.Now()
		if err := h.RunLinux(ctx, LinuxSpec{Name: name, CPUs: cpus, MemMB: 256, Check: "size=8M rate=2M exit_after=8s"}); err != nil {
			t.Fatal(err)
		}
		if _, err := h.WaitConsole(ctx, name, "ferry-linux: init started", 3*time.Minute, "Kernel panic"); err != nil {
			t.Fatal(err)
		}
		boot := time.Since(t0)
		con, err := h.WaitConsole(ctx, name, "ferry-linux: check exit=", 3*time.Minute, "Kernel panic")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := checkConsole(con); err != nil || !strings.Contains(con, "ferry-linux: check exit=0") {
			t.Fatalf("%d vCPUs: checker not clean (%v); console:\n%s", cpus, err, tail([]byte(con), 3000))
		}
		gc, _ := checkConsole(con)
		if len(gc.Beats) != cpus {
			t.Fatalf("%d vCPUs: heartbeats from %d checker threads", cpus, len(gc.Beats))
		}
		t.Logf("%d vCPUs: init after %.1fs, checker clean (%d heartbeats)", cpus, boot.Seconds(), gc.Summary.Heartbeats)
	}
}

// TestLinuxSaveRestore saves a running 2-vCPU Linux guest to a file and
// restores it in a new process; the checker goes on clean.
func TestLinuxSaveRestore(t *testing.T) {
	l := startLab(t, Config{Hosts: 1, CPUs: 2})
	ctx := context.Background()
	if err := l.StartDaemons(ctx); err != nil {
		t.Fatal(err)
	}
	h := l.Hosts[0]
	if err := h.RunLinux(ctx, LinuxSpec{Name: "sr", CPUs: 2, MemMB: 256, Check: linuxCheck}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WaitBeats(ctx, "sr", 2, 5, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	out, err := h.Ferry(ctx, "save", "--socket", HostDataDir+"/vms/sr.sock", "--out", "/var/sr.ferry")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("save: %s", out)
	insp, err := h.Ferry(ctx, "inspect", "/var/sr.ferry")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("inspect (start):\n%s", tail([]byte(insp), 1500))
	// The restored VM runs in the foreground of its own process, console
	// to a file.
	if _, err := h.Sh(ctx, HostFerry+" restore --name sr2 /var/sr.ferry >/var/sr2.console 2>/var/sr2.err &"); err != nil {
		t.Fatal(err)
	}
	gc, err := h.WaitBeatsIn(ctx, "/var/sr2.console", 2, 10, 3*time.Minute)
	if err != nil {
		errs, _ := h.Agent.Get(ctx, "/var/sr2.err", 1<<20)
		t.Fatalf("%v\nrestore's stderr: %s", err, errs)
	}
	t.Logf("restored guest beats on: %d heartbeats, %d pages checked, clean", gc.Summary.Heartbeats, gc.Summary.Checked)
	h.Sh(ctx, "kill $(pidof ferry | tr ' ' '\\n' | head -0) 2>/dev/null; true")
}

// TestLinuxMigrate moves one 2-vCPU Linux guest between two hosts, there
// and back twice: each live mode once, then the automatic mode; after each
// move the guest must beat on at the destination with its checks clean.
func TestLinuxMigrate(t *testing.T) {
	l := startLab(t, Config{Hosts: 2})
	ctx := context.Background()
	if err := l.StartDaemons(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := l.Hosts[0], l.Hosts[1]
	// The guest reads its virtio-rng every second beside the checker, so
	// that the device is in use, its state in flight, at every move.
	if err := a.RunLinux(ctx, LinuxSpec{Name: "lx", CPUs: 2, MemMB: 256, Check: linuxCheck, RNG: true, HWRNGRounds: 100000}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WaitBeats(ctx, "lx", 2, 5, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	// Four moves, there and back twice: pre-copy, post-copy, hybrid, then
	// auto. Every instruction of the hosts is emulated and the link
	// carries a few MiB/s, so pre-copy gets a downtime limit to match
	// (docs/lab.md).
	moves := [][]string{
		append([]string{"--mode", "precopy"}, ModeArgs("precopy")...),
		{"--mode", "postcopy"},
		append([]string{"--mode", "hybrid"}, ModeArgs("hybrid")...),
		{}, // auto, the default
	}
	for i, args := range moves {
		mode := "auto"
		if len(args) > 1 {
			mode = args[1]
		}
		t0 := time.Now()
		con, _ := a.VMConsole(ctx, "lx")
		before, _ := LastHWRNGRound(con)
		rep, err := a.Migrate(ctx, "lx", b, args...)
		if err != nil {
			t.Fatalf("move %d (%s) %s → %s: %v\n%s", i+1, mode, a.Name, b.Name, err, rep)
		}
		gc, err := b.WaitBeats(ctx, "lx", 2, 5, 2*time.Minute)
		if err != nil {
			t.Fatalf("move %d (%s) %s → %s: after the move: %v\nreport:\n%s", i+1, mode, a.Name, b.Name, err, rep)
		}
		after := waitHWRNG(t, b, "lx", before)
		t.Logf("move %d (%s) %s → %s in %.1fs: %s; guest clean (%d pages checked on %s); virtio-rng read %d before the move, %d after",
			i+1, mode, a.Name, b.Name, time.Since(t0).Seconds(), reportLine(rep), gc.Summary.Checked, b.Name, before, after)
		a, b = b, a
	}
}

// TestLinuxPostcopyLinkCut cuts the link between the hosts for a few
// seconds in the middle of post-copy; the migration recovers and the
// guest's checks stay clean.
func TestLinuxPostcopyLinkCut(t *testing.T) {
	l := startLab(t, Config{Hosts: 2})
	ctx := context.Background()
	if err := l.StartDaemons(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := l.Hosts[0], l.Hosts[1]
	// A larger working set keeps post-copy busy long enough to cut it.
	if err := a.RunLinux(ctx, LinuxSpec{Name: "pc", CPUs: 2, MemMB: 256, Check: "size=64M rate=2M pattern=random hb=200ms"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WaitBeats(ctx, "pc", 2, 5, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	type result struct {
		rep string
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := a.Migrate(ctx, "pc", b, "--mode", "postcopy", "--recovery-timeout", "2m")
		done <- result{rep, err}
	}()
	// The guest runs at the destination once post-copy has begun.
	if _, err := b.WaitConsole(ctx, "pc", "ferry-guest: hb", 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	l.Hub.Cut(true)
	time.Sleep(5 * time.Second)
	_, dropped, _ := l.Hub.Stats()
	l.Hub.Cut(false)
	r := <-done
	if r.err != nil {
		t.Fatalf("post-copy with the link cut for 5 s: %v\n%s", r.err, r.rep)
	}
	if dropped == 0 {
		t.Fatalf("the cut dropped no frame: post-copy had ended before it\n%s", r.rep)
	}
	gc, err := b.WaitBeats(ctx, "pc", 2, 5, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("link cut 5 s (%d frames dropped) during post-copy: recovered; %s; guest clean (%d pages checked)", dropped, reportLine(r.rep), gc.Summary.Checked)
	t.Logf("report:\n%s", r.rep)
}

// reportLine picks the headline numbers out of a migration report
// ("  key<spaces>value" lines).
func reportLine(rep string) string {
	var parts []string
	for _, l := range strings.Split(rep, "\n") {
		if !strings.HasPrefix(l, "  ") || len(l) < 25 {
			continue
		}
		key, val := strings.TrimSpace(l[:25]), strings.TrimSpace(l[25:])
		switch key {
		case "switch", "total time", "downtime (VMM)", "downtime (guest)", "bytes on the wire":
			val, _, _ = strings.Cut(val, "  (")
			val, _, _ = strings.Cut(val, " (")
			parts = append(parts, key+" "+val)
		}
	}
	return strings.Join(parts, ", ")
}

// waitHWRNG waits until the guest's virtio-rng reads go on on h past
// round before, each whole (4096 bytes), and returns the last round seen.
func waitHWRNG(t *testing.T, h *Host, vm string, before int) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		con, err := h.VMConsole(context.Background(), vm)
		if err != nil {
			t.Fatal(err)
		}
		round, full := LastHWRNGRound(con)
		if round > before {
			if !full {
				t.Fatalf("virtio-rng read %d on %s came short", round, h.Name)
			}
			return round
		}
		if time.Now().After(deadline) {
			t.Fatalf("virtio-rng: no read after round %d on %s in 2 min (last %d)", before, h.Name, round)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
