package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-vmm/ferry/internal/units"
)

// nsPrefix names every namespace the harness creates, so that a later run
// can remove what a killed one left behind.
const nsPrefix = "ferry-bench-"

// LinkConfig is the link between the two hosts.
type LinkConfig struct {
	// Rate is "unlimited" or a rate such as "1Gbit", "10Gbit", "500Mbit".
	Rate string
	// Latency is added one way on each side (needs the kernel's netem).
	Latency time.Duration
}

// Host is one end of the lab: a network namespace with one veth end.
type Host struct {
	Name string // "source" or "destination"
	NS   string
	Dev  string
	IP   string
}

// Lab is two network namespaces joined by a veth pair, each end shaped
// with tc: two hosts on one machine whose link the harness controls and
// whose traffic it counts from the kernel's own counters.
type Lab struct {
	Source, Dest Host
	Link         LinkConfig
}

// RequireRoot says why the benchmarks cannot run without root.
func RequireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("ferry bench needs root: it creates network namespaces, a veth pair and tc qdiscs (run it with sudo)")
	}
	return nil
}

// NewLab builds the two hosts and shapes the link. Close removes them.
func NewLab(ctx context.Context, cfg LinkConfig) (*Lab, error) {
	if err := RequireRoot(); err != nil {
		return nil, err
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found (Debian package iproute2): %w", tool, err)
		}
	}
	removeStaleNamespaces(ctx)
	id := os.Getpid()
	subnet := 16 + id%200
	l := &Lab{
		Source: Host{Name: "source", NS: fmt.Sprintf("%s%d-src", nsPrefix, id), Dev: fmt.Sprintf("fbs%d", id%1000000), IP: fmt.Sprintf("10.213.%d.1", subnet)},
		Dest:   Host{Name: "destination", NS: fmt.Sprintf("%s%d-dst", nsPrefix, id), Dev: fmt.Sprintf("fbd%d", id%1000000), IP: fmt.Sprintf("10.213.%d.2", subnet)},
		Link:   cfg,
	}
	if err := l.build(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func (l *Lab) build(ctx context.Context) error {
	steps := [][]string{
		{"ip", "netns", "add", l.Source.NS},
		{"ip", "netns", "add", l.Dest.NS},
		{"ip", "link", "add", l.Source.Dev, "netns", l.Source.NS, "type", "veth", "peer", "name", l.Dest.Dev, "netns", l.Dest.NS},
	}
	for _, h := range []Host{l.Source, l.Dest} {
		steps = append(steps,
			[]string{"ip", "-n", h.NS, "addr", "add", h.IP + "/24", "dev", h.Dev},
			[]string{"ip", "-n", h.NS, "link", "set", h.Dev, "up"},
			[]string{"ip", "-n", h.NS, "link", "set", "lo", "up"})
	}
	for _, s := range steps {
		if err := run(ctx, s...); err != nil {
			return err
		}
	}
	for _, h := range []Host{l.Source, l.Dest} {
		if err := l.shape(ctx, h); err != nil {
			return err
		}
	}
	return nil
}

// shape puts a token bucket on a host's egress: both directions of the
// link carry the rate. Latency needs netem, which some kernels lack.
func (l *Lab) shape(ctx context.Context, h Host) error {
	rate, err := LinkRate(l.Link.Rate)
	if err != nil {
		return err
	}
	if l.Link.Latency > 0 {
		args := []string{"tc", "-n", h.NS, "qdisc", "add", "dev", h.Dev, "root", "netem",
			"delay", fmt.Sprintf("%dus", l.Link.Latency.Microseconds()), "limit", "100000"}
		if rate > 0 {
			args = append(args, "rate", fmt.Sprintf("%dbit", rate*8))
		}
		if err := run(ctx, args...); err != nil {
			return fmt.Errorf("adding latency needs the netem qdisc (CONFIG_NET_SCH_NETEM), which this kernel may lack; run without --latency: %w", err)
		}
		return nil
	}
	if rate == 0 {
		return nil
	}
	// The bucket holds 10 ms at the rate (at least 1 MiB): enough for the
	// 64 KiB segments veth passes with GSO, and for the kernel's timer.
	burst := max(rate/100, 1<<20)
	return run(ctx, "tc", "-n", h.NS, "qdisc", "add", "dev", h.Dev, "root", "tbf",
		"rate", fmt.Sprintf("%dbit", rate*8), "burst", strconv.FormatInt(burst, 10), "latency", "100ms")
}

// LinkRate parses a link rate into bytes per second; 0 means unlimited.
// Units are bits per second ("1Gbit", "100Mbit") or bytes ("100MB").
func LinkRate(s string) (int64, error) {
	if s == "" || s == "unlimited" {
		return 0, nil
	}
	r, err := units.ParseRate(s)
	if err != nil || r <= 0 {
		return 0, fmt.Errorf("link rate %q: want e.g. 1Gbit, 10Gbit or unlimited", s)
	}
	return r, nil
}

// Close removes both namespaces (the veth pair goes with them).
func (l *Lab) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, h := range []Host{l.Source, l.Dest} {
		_ = run(ctx, "ip", "netns", "del", h.NS)
	}
}

// Counters are the bytes each host sent through its veth end since the
// lab was built: forward (source → destination) and back.
func (l *Lab) Counters(ctx context.Context) (forward, back uint64, err error) {
	if forward, err = txBytes(ctx, l.Source); err != nil {
		return 0, 0, err
	}
	if back, err = txBytes(ctx, l.Dest); err != nil {
		return 0, 0, err
	}
	return forward, back, nil
}

func txBytes(ctx context.Context, h Host) (uint64, error) {
	out, err := exec.CommandContext(ctx, "ip", "-n", h.NS, "-j", "-s", "link", "show", "dev", h.Dev).Output()
	if err != nil {
		return 0, fmt.Errorf("reading the %s's veth counters: %w", h.Name, err)
	}
	var links []struct {
		Stats struct {
			TX struct {
				Bytes uint64 `json:"bytes"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("reading the %s's veth counters: unexpected output %q", h.Name, out)
	}
	return links[0].Stats.TX.Bytes, nil
}

// Command runs a program inside a host's namespace.
func (l *Lab) Command(ctx context.Context, h Host, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Wrapper is the command prefix that runs a program in h's namespace.
func (h Host) Wrapper() []string { return []string{"ip", "netns", "exec", h.NS} }

// Listen opens a TCP listener inside h's namespace. A socket belongs to the
// namespace it was created in, so only the creating thread switches.
func (l *Lab) Listen(h Host, port int) (net.Listener, error) {
	var ln net.Listener
	err := inNamespace(h.NS, func() error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(h.IP, strconv.Itoa(port)))
		return err
	})
	return ln, err
}

// Dial connects from inside h's namespace.
func (l *Lab) Dial(ctx context.Context, h Host, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNamespace(h.NS, func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// inNamespace runs fn on an OS thread switched into the named namespace.
// The thread is not given back to the runtime afterwards (it stays locked
// and exits), so no other goroutine ever runs in the wrong namespace.
func inNamespace(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		f, err := os.Open(filepath.Join("/var/run/netns", ns))
		if err != nil {
			errc <- fmt.Errorf("network namespace %s: %w", ns, err)
			return
		}
		defer f.Close()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("entering network namespace %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// removeStaleNamespaces deletes namespaces of harness runs whose process
// is gone: a killed run must not block or confuse the next one.
func removeStaleNamespaces(ctx context.Context) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		rest, ok := strings.CutPrefix(name, nsPrefix)
		if !ok {
			continue
		}
		pidText, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid == os.Getpid() || unix.Kill(pid, 0) == nil {
			continue
		}
		_ = run(ctx, "ip", "netns", "del", name)
	}
}

// run runs a set-up command and says which one failed and why.
func run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
