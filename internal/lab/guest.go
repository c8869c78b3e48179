package lab

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// LinuxSpec is a stock Linux guest (Debian's cloud kernel and the
// busybox initramfs of scripts/linux-guest.sh) running the checker
// (guest/linux/ferry-check, docs/linux-guests.md).
type LinuxSpec struct {
	Name  string
	CPUs  int
	MemMB int
	// Check holds the checker's arguments ("size=16M rate=4M"); empty
	// runs no checker (the guest reports and reboots).
	Check string
	// Cmdline is added to the kernel command line.
	Cmdline string
	// RNG gives the guest virtio-rng (ferry run --rng); with HWRNGRounds
	// its init reads 4096 bytes from it every second that many times,
	// beside the checker ("ferry-linux: hwrng round=N read=4096").
	RNG         bool
	HWRNGRounds int
}

// Cmdline is the guest kernel's command line for s.
func (s LinuxSpec) cmdline() string {
	// watchdog_thresh=60 (the kernel's maximum) moves the soft-lockup
	// report from 20 s to 120 s without a CPU: every instruction of a lab
	// host is emulated and its link carries a few MiB/s, a few hundred
	// times less than a server's, so post-copy blocks a vCPU on remote
	// pages for about as many times longer. The checker still measures
	// and reports every stall it sees (gap_us, worst_us); docs/lab.md.
	parts := []string{"console=ttyS0", "panic=-1", "reboot=k", "watchdog_thresh=60"}
	if s.Check != "" {
		parts = append(parts, "ferry.check="+strings.Join(strings.Fields(s.Check), ","))
	}
	if s.HWRNGRounds > 0 {
		parts = append(parts, "ferry.hwrng_rounds="+strconv.Itoa(s.HWRNGRounds))
	}
	if s.Cmdline != "" {
		parts = append(parts, s.Cmdline)
	}
	return strings.Join(parts, " ")
}

// RunLinux starts a Linux guest under h's daemon.
func (h *Host) RunLinux(ctx context.Context, s LinuxSpec) error {
	args := []string{"run", "--detach", "--name", s.Name,
		"--kernel", HostLinux, "--initrd", HostInitrd,
		"--mem", strconv.Itoa(s.MemMB) + "M", "--cpus", strconv.Itoa(s.CPUs),
		"--cmdline", s.cmdline()}
	if s.RNG {
		args = append(args, "--rng")
	}
	_, err := h.Ferry(ctx, args...)
	return err
}

// LastHWRNGRound is the last whole "ferry-linux: hwrng round=N read=B"
// line of a console: N, and whether B was the 4096 bytes asked for.
func LastHWRNGRound(con string) (round int, full bool) {
	lines := strings.Split(con, "\n")
	for _, l := range lines[:len(lines)-1] { // the last may be still coming
		var n, b int
		if _, err := fmt.Sscanf(strings.TrimSpace(l), "ferry-linux: hwrng round=%d read=%d", &n, &b); err == nil {
			round, full = n, b == 4096
		}
	}
	return round, full
}

// RunTestGuest starts the bundled test guest under h's daemon.
func (h *Host) RunTestGuest(ctx context.Context, name string, cpus, memMB int, cmdline string) error {
	_, err := h.Ferry(ctx, "run", "--detach", "--name", name, "--guest", "test",
		"--mem", strconv.Itoa(memMB)+"M", "--cpus", strconv.Itoa(cpus), "--cmdline", cmdline)
	return err
}

// Migrate moves vm from h to the daemon of to with `ferry migrate`,
// returning the report it printed.
func (h *Host) Migrate(ctx context.Context, vm string, to *Host, args ...string) (string, error) {
	return h.Ferry(ctx, append([]string{"migrate", vm, "--to", to.DaemonAddr()}, args...)...)
}

// GuestCheck is what a guest's console says about its health.
type GuestCheck struct {
	Summary guestlog.Summary
	Beats   map[uint64]int // heartbeats per CPU
	Console string
}

// CheckGuest reads vm's console on h and fails if the guest reported any
// failure or exception, or if a kernel panic shows.
func (h *Host) CheckGuest(ctx context.Context, vm string) (GuestCheck, error) {
	con, err := h.VMConsole(ctx, vm)
	if err != nil {
		return GuestCheck{}, err
	}
	return checkConsole(con)
}

func checkConsole(con string) (GuestCheck, error) {
	complete := con[:strings.LastIndex(con, "\n")+1]
	lines, _ := guestlog.ParseAll(strings.NewReader(complete))
	gc := GuestCheck{Summary: guestlog.Summarize(lines), Beats: map[uint64]int{}, Console: con}
	for _, l := range lines {
		if l.Kind == guestlog.KindHeartbeat || l.Kind == guestlog.KindVerify {
			gc.Beats[l.MustUint("cpu")]++
		}
	}
	s := gc.Summary
	switch {
	case len(s.Exceptions) > 0:
		return gc, fmt.Errorf("guest exception: %s", s.Exceptions[0].Raw)
	case len(s.Failures) > 0:
		return gc, fmt.Errorf("guest found %d failures, first: %s", len(s.Failures), s.Failures[0].Raw)
	case s.BeatErrors > 0:
		return gc, fmt.Errorf("guest heartbeats report %d errors", s.BeatErrors)
	case s.Exited && s.ExitErrors > 0:
		return gc, fmt.Errorf("guest exited reporting %d errors", s.ExitErrors)
	}
	for _, bad := range []string{"Kernel panic", "ferry-linux: check exit=1", "ferry-linux: check exit=2"} {
		if i := strings.Index(con, bad); i >= 0 {
			line, _, _ := strings.Cut(con[i:], "\n")
			return gc, fmt.Errorf("guest: %s", line)
		}
	}
	return gc, nil
}

// WaitBeats waits until every one of cpus CPUs of vm on h has printed at
// least n more heartbeats than it had when called, checking the guest's
// health all the while.
func (h *Host) WaitBeats(ctx context.Context, vm string, cpus, n int, timeout time.Duration) (GuestCheck, error) {
	return h.WaitBeatsIn(ctx, HostDataDir+"/vms/"+vm+".console", cpus, n, timeout)
}

// WaitBeatsIn is WaitBeats for a console written to path in h (a VM that
// `ferry restore` runs in the foreground, say).
func (h *Host) WaitBeatsIn(ctx context.Context, path string, cpus, n int, timeout time.Duration) (GuestCheck, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	vm := path
	read := func() (GuestCheck, error) {
		b, err := h.Agent.Get(ctx, path, 64<<20)
		if err != nil {
			return GuestCheck{}, err
		}
		return checkConsole(string(b))
	}
	start, _ := read()
	for {
		gc, err := read()
		if err != nil && gc.Console != "" {
			return gc, fmt.Errorf("%s: %s: %w", h.Name, vm, err)
		}
		done := err == nil
		for c := 0; c < cpus && done; c++ {
			done = gc.Beats[uint64(c)]-start.Beats[uint64(c)] >= n
		}
		if done {
			return gc, nil
		}
		select {
		case <-ctx.Done():
			return gc, fmt.Errorf("%s: %s: fewer than %d new heartbeats on each of %d CPUs within %v (now %v, before %v); console ends:\n%s",
				h.Name, vm, n, cpus, timeout, gc.Beats, start.Beats, tail([]byte(gc.Console), 3000))
		case <-time.After(300 * time.Millisecond):
		}
	}
}
