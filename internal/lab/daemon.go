package lab

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Ferry runs the ferry CLI in the host against its daemon and returns
// its standard output.
func (h *Host) Ferry(ctx context.Context, args ...string) (string, error) {
	return h.Run(ctx, append([]string{HostFerry, "--daemon", HostDataDir + "/api.sock"}, args...)...)
}

// DaemonAddr is the host's daemon address on the link.
func (h *Host) DaemonAddr() string { return fmt.Sprintf("%s:%d", h.IP, DaemonPort) }

var fingerprintRE = regexp.MustCompile(`fingerprint (SHA256:\S+)`)

// StartDaemon starts ferry's host daemon in h, listening on the link, and
// returns its fingerprint.
func (h *Host) StartDaemon(ctx context.Context) (string, error) {
	script := fmt.Sprintf(`mkdir -p %[1]s && %[2]s daemon --listen %[3]s --data-dir %[1]s >/var/log-ferry-daemon 2>&1 &
i=0; while [ ! -S %[1]s/api.sock ] || ! grep -q fingerprint /var/log-ferry-daemon; do i=$((i+1)); [ $i -lt 600 ] || { cat /var/log-ferry-daemon; exit 1; }; sleep 0.1; done
cat /var/log-ferry-daemon`, HostDataDir, HostFerry, h.DaemonAddr())
	out, err := h.Sh(ctx, script)
	if err != nil {
		return "", fmt.Errorf("%s: starting the daemon: %w", h.Name, err)
	}
	m := fingerprintRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("%s: the daemon printed no fingerprint: %q", h.Name, out)
	}
	return m[1], nil
}

// DaemonLog returns the host daemon's log.
func (h *Host) DaemonLog(ctx context.Context) string {
	b, err := h.Agent.Get(ctx, "/var/log-ferry-daemon", 1<<20)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return string(b)
}

// StartDaemons starts a daemon on every host and makes every pair trust
// each other, checking fingerprints on the wire as an operator would.
func (l *Lab) StartDaemons(ctx context.Context) error {
	fps := make([]string, len(l.Hosts))
	for i, h := range l.Hosts {
		fp, err := h.StartDaemon(ctx)
		if err != nil {
			return err
		}
		fps[i] = fp
		l.logf("%s: ferry daemon on %s, fingerprint %s", h.Name, h.DaemonAddr(), fp)
	}
	for i, h := range l.Hosts {
		for j, o := range l.Hosts {
			if i == j {
				continue
			}
			if _, err := h.Ferry(ctx, "nodes", "trust", o.DaemonAddr(), "--fingerprint", fps[j], "--name", o.Name); err != nil {
				return err
			}
		}
	}
	l.logf("every host trusts every other")
	return nil
}

// VMConsole returns what a VM's console has printed on h so far.
func (h *Host) VMConsole(ctx context.Context, vm string) (string, error) {
	b, err := h.Agent.Get(ctx, HostDataDir+"/vms/"+vm+".console", 64<<20)
	return string(b), err
}

// WaitConsole waits until the VM's console on h holds want, failing at
// once when it shows any of fail.
func (h *Host) WaitConsole(ctx context.Context, vm, want string, timeout time.Duration, fail ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		con, _ := h.VMConsole(ctx, vm)
		for _, f := range fail {
			if i := strings.Index(con, f); i >= 0 {
				line, _, _ := strings.Cut(con[i:], "\n")
				return con, fmt.Errorf("%s: VM %s: %s", h.Name, vm, line)
			}
		}
		if strings.Contains(con, want) {
			return con, nil
		}
		select {
		case <-ctx.Done():
			return con, fmt.Errorf("%s: VM %s: %q not seen after %v; console ends:\n%s", h.Name, vm, want, timeout, tail([]byte(con), 2000))
		case <-time.After(250 * time.Millisecond):
		}
	}
}
