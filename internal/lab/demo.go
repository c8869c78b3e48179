package lab

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"
)

// DemoConfig is the scenario `ferry lab run` shows a person: a guest
// started on host1, moved live to host2 and back, with the reports and
// the guest's own view of each switch.
type DemoConfig struct {
	Lab   Config
	Guest string   // "linux" (stock Debian kernel with the checker) or "test"
	Modes []string // one move per mode, alternating direction
}

// Demo runs the scenario, writing what happens to w.
func Demo(ctx context.Context, dc DemoConfig, w io.Writer) error {
	say := func(format string, args ...any) { fmt.Fprintf(w, "\n\033[1m== "+format+"\033[0m\n", args...) }
	if len(dc.Modes) == 0 {
		dc.Modes = []string{"precopy", "postcopy"}
	}
	dc.Lab.Log = w
	say("starting %d emulated hosts: QEMU TCG with AMD SVM and nested paging, Debian's kernel with kvm-amd", max(dc.Lab.Hosts, 2))
	fmt.Fprintln(w, "   every instruction of these hosts is emulated: expect 10-50x real-hardware times;")
	fmt.Fprintln(w, "   what counts here is correctness and what the guest sees (docs/lab.md)")
	l, err := Start(ctx, dc.Lab)
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.StartDaemons(ctx); err != nil {
		return err
	}
	a, b := l.Hosts[0], l.Hosts[1]
	const vm = "demo"
	cpus := 2
	switch dc.Guest {
	case "linux":
		say("%s: run Debian's stock cloud kernel, 2 vCPUs, 256 MiB, the checker dirtying and verifying 8 MiB", a.Name)
		err = a.RunLinux(ctx, LinuxSpec{Name: vm, CPUs: cpus, MemMB: 256, Check: "size=8M rate=256K pattern=random files=2M hb=500ms"})
	case "test":
		say("%s: run the test guest, dirty workload (16 MiB, 256 KB/s, random pages, every page checked)", a.Name)
		err = a.RunTestGuest(ctx, vm, cpus, 256, "workload=dirty size=16M rate=256K pattern=random check=1 hb=500ms")
	default:
		return fmt.Errorf("lab demo: unknown guest %q (linux or test)", dc.Guest)
	}
	if err != nil {
		return err
	}
	if _, err := a.WaitBeats(ctx, vm, cpus, 3, 4*time.Minute); err != nil {
		return err
	}
	ps, _ := a.Ferry(ctx, "ps")
	fmt.Fprint(w, ps)
	for _, mode := range dc.Modes {
		say("live migration %s -> %s (%s)", a.Name, b.Name, mode)
		before, _ := a.VMConsole(ctx, vm)
		// A host the guest ran on before keeps its old console: show
		// only what comes after.
		old, _ := b.VMConsole(ctx, vm)
		args := append([]string{HostFerry, "--daemon", HostDataDir + "/api.sock", "migrate", vm, "--to", b.DaemonAddr(), "--mode", mode}, ModeArgs(mode)...)
		if err := a.Stream(ctx, w, args...); err != nil {
			return err
		}
		// The source's console up to the switch, if its daemon kept it.
		if after, err := a.VMConsole(ctx, vm); err == nil && len(after) >= len(before) {
			before = after
		}
		gc, err := b.WaitBeats(ctx, vm, cpus, 3, 2*time.Minute)
		if err != nil {
			return err
		}
		say("the guest's own view: last heartbeats on %s, first ones on %s", a.Name, b.Name)
		fmt.Fprint(w, lastBeats(before, 3))
		fmt.Fprintln(w, "   --- switch-over ---")
		fmt.Fprint(w, firstBeats(strings.TrimPrefix(gc.Console, old), 3))
		fmt.Fprintf(w, "   guest checks clean: %d pages verified so far, no failure\n", gc.Summary.Checked)
		a, b = b, a
	}
	if _, err := a.Ferry(ctx, "stop", vm); err != nil {
		return err
	}
	say("done: the guest moved %d times and its checks stayed clean", len(dc.Modes))
	return nil
}

// ModeArgs are the options a mode needs in the lab, beyond --mode. The
// hosts are emulated and their link carries a few MiB/s, so pre-copy gets
// limits to match: a 3 s downtime limit (the stop-and-copy of what a
// guest dirties in a pass) and 5 minutes for its passes.
func ModeArgs(mode string) []string {
	switch mode {
	case "precopy":
		return []string{"--downtime-limit", "3s", "--precopy-timeout", "5m"}
	case "hybrid":
		return []string{"--precopy-time", "3s"}
	}
	return nil
}

func beatLines(con string) []string {
	var out []string
	con = con[:strings.LastIndex(con, "\n")+1] // whole lines only
	for _, l := range strings.Split(con, "\n") {
		if strings.Contains(l, "ferry-guest: hb ") {
			out = append(out, "   "+strings.TrimSpace(l))
		}
	}
	return out
}

func lastBeats(con string, n int) string {
	b := beatLines(con)
	return strings.Join(b[max(0, len(b)-n):], "\n") + "\n"
}

func firstBeats(con string, n int) string {
	b := beatLines(con)
	return strings.Join(b[:min(n, len(b))], "\n") + "\n"
}
