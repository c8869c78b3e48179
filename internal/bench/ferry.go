package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

const ferryPort = "7781"

// ferrySystem is two ferry daemons, one in each namespace, that trust each
// other; runs go through the ferry CLI exactly as an operator types it.
type ferrySystem struct {
	lab     *Lab
	bin     string // the ferry binary
	guest   string // the test guest image
	dir     string
	sockets map[string]string // host name → daemon API socket
	daemons []*exec.Cmd
}

func newFerrySystem(lab *Lab, bin, guest, dir string) *ferrySystem {
	return &ferrySystem{lab: lab, bin: bin, guest: guest, dir: dir, sockets: map[string]string{}}
}

func (f *ferrySystem) Name() string { return "ferry" }

func (f *ferrySystem) addr(h Host) string { return net.JoinHostPort(h.IP, ferryPort) }

func (f *ferrySystem) dataDir(h Host) string { return filepath.Join(f.dir, "ferry-"+h.Name) }

// Start runs a daemon in each namespace and makes them trust each other.
func (f *ferrySystem) Start(ctx context.Context) error {
	prints := map[string]string{}
	for _, h := range []Host{f.lab.Source, f.lab.Dest} {
		fp, err := f.startDaemon(ctx, h)
		if err != nil {
			return err
		}
		prints[h.Name] = fp
	}
	for _, pair := range [][2]Host{{f.lab.Source, f.lab.Dest}, {f.lab.Dest, f.lab.Source}} {
		if _, err := f.cli(ctx, pair[0], "nodes", "trust", f.addr(pair[1]), "--fingerprint", prints[pair[1].Name], "--name", pair[1].Name); err != nil {
			return err
		}
	}
	return nil
}

var fingerprintRE = regexp.MustCompile(`SHA256:[A-Za-z0-9+/=]+`)

func (f *ferrySystem) startDaemon(ctx context.Context, h Host) (string, error) {
	dir := f.dataDir(h)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	logPath := filepath.Join(f.dir, "ferry-"+h.Name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return "", err
	}
	defer logf.Close()
	cmd := f.lab.Command(context.WithoutCancel(ctx), h, f.bin, "daemon", "--listen", f.addr(h), "--data-dir", dir)
	cmd.Env = append(os.Environ(), "FERRY_GUEST="+f.guest)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("starting the ferry daemon on the %s: %w", h.Name, err)
	}
	f.daemons = append(f.daemons, cmd)
	sock := filepath.Join(dir, "api.sock")
	f.sockets[h.Name] = sock
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		log, _ := os.ReadFile(logPath)
		if fp := fingerprintRE.Find(log); fp != nil {
			if _, err := os.Stat(sock); err == nil {
				return string(fp), nil
			}
		}
		if cmd.ProcessState != nil {
			break
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	log, _ := os.ReadFile(logPath)
	return "", fmt.Errorf("the ferry daemon on the %s did not come up: %s", h.Name, lastLines(log, 5))
}

// cli runs `ferry --daemon SOCK args...` and returns its stdout.
func (f *ferrySystem) cli(ctx context.Context, h Host, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, f.bin, append([]string{"--daemon", f.sockets[h.Name]}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(string(out))
		}
		return out, fmt.Errorf("ferry %s (%s): %w: %s", args[0], h.Name, err, msg)
	}
	return out, nil
}

// Close stops the daemons and every VMM they started.
func (f *ferrySystem) Close() {
	for _, d := range f.daemons {
		if d.Process != nil {
			_ = d.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, d := range f.daemons {
		waitOrKill(d, 5*time.Second)
	}
	// VMM processes outlive their daemon by design; ours name our dirs.
	_ = exec.Command("pkill", "-KILL", "-f", "--", "--daemon-socket "+f.dir).Run()
}

func waitOrKill(cmd *exec.Cmd, grace time.Duration) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Migrate boots the guest on the source, lets it warm up, moves it with the
// technique of spec and leaves it running on the destination for the
// settle time.
func (f *ferrySystem) Migrate(ctx context.Context, s *Spec, obs *Observation) error {
	name := s.vmName()
	consoles, stopTail := context.WithCancel(ctx)
	defer stopTail()
	go tailFile(consoles, filepath.Join(f.dataDir(f.lab.Source), "vms", name+".console"), obs.Src)
	go tailFile(consoles, filepath.Join(f.dataDir(f.lab.Dest), "vms", name+".console"), obs.Dst)
	if _, err := f.cli(ctx, f.lab.Source, "run", "--detach", "--name", name, "--guest", "test",
		"--mem", fmt.Sprintf("%dM", s.Guest.MemMiB), "--cpus", fmt.Sprint(s.Guest.CPUs), "--cmdline", s.Guest.Cmdline); err != nil {
		return err
	}
	where := f.lab.Source
	defer func() { _, _ = f.cli(context.WithoutCancel(ctx), where, "stop", name) }()
	if err := s.warmUp(ctx, obs.Src); err != nil {
		return err
	}
	args := append([]string{"migrate", name, "--to", f.addr(f.lab.Dest), "--json"}, f.migrateFlags(s)...)
	obs.Begin(ctx)
	out, err := f.cli(ctx, f.lab.Source, args...)
	obs.End(ctx)
	var rep map[string]any
	if jerr := json.Unmarshal(out, &rep); jerr == nil {
		obs.SystemReport = rep
		reason, _ := rep["switch_reason"].(string)
		obs.ForcedStop = strings.HasPrefix(reason, "forced")
	}
	if err != nil {
		return err
	}
	where = f.lab.Dest
	return s.settle(ctx, obs.Dst)
}

// migrateFlags maps the technique and variant to `ferry migrate` flags.
func (f *ferrySystem) migrateFlags(s *Spec) []string {
	args := []string{"--downtime-limit", s.DowntimeLimit.String(), "--max-iterations", "100000"}
	switch s.Technique {
	case "precopy":
		args = append(args, "--mode", "precopy", "--precopy-timeout", s.ForceAfter.String())
	case "hybrid":
		args = append(args, "--mode", "hybrid", "--precopy-time", s.PrecopyFor.String())
	default:
		args = append(args, "--mode", s.Technique)
	}
	return append(args, ferryVariants[s.Variant]...)
}

// ferryVariants are the optimization sets of the optimizations scenario.
var ferryVariants = map[string][]string{
	"":         nil,
	"none":     nil,
	"zstd":     {"--compress", "zstd"},
	"lz4":      {"--compress", "lz4"},
	"delta":    {"--delta"},
	"dedup":    {"--dedup"},
	"streams4": {"--streams", "4"},
	"all":      {"--compress", "zstd", "--delta", "--dedup", "--streams", "4"},
}

// Offline saves the guest on the source, carries the file over the link
// and restores it on the destination: the offline migration sequence.
func (f *ferrySystem) Offline(ctx context.Context, s *Spec, obs *Observation) error {
	name := s.vmName()
	consoles, stopTail := context.WithCancel(ctx)
	defer stopTail()
	go tailFile(consoles, filepath.Join(f.dataDir(f.lab.Source), "vms", name+".console"), obs.Src)
	if _, err := f.cli(ctx, f.lab.Source, "run", "--detach", "--name", name, "--guest", "test",
		"--mem", fmt.Sprintf("%dM", s.Guest.MemMiB), "--cpus", fmt.Sprint(s.Guest.CPUs), "--cmdline", s.Guest.Cmdline); err != nil {
		return err
	}
	defer func() { _, _ = f.cli(context.WithoutCancel(ctx), f.lab.Source, "stop", name) }()
	if err := s.warmUp(ctx, obs.Src); err != nil {
		return err
	}
	saved := filepath.Join(f.dir, name+".src.ferry")
	moved := filepath.Join(f.dir, name+".dst.ferry")
	defer os.Remove(saved)
	defer os.Remove(moved)
	off := &Offline{Compressed: s.Variant == "zstd"}
	obs.Offline = off
	args := []string{"save", "--socket", filepath.Join(f.dataDir(f.lab.Source), "vms", name+".sock"), "--out", saved, "--json"}
	if off.Compressed {
		args = append(args, "--compress")
	}
	obs.Begin(ctx)
	t0 := time.Now()
	out, err := exec.CommandContext(ctx, f.bin, args...).CombinedOutput()
	off.SaveTime = time.Since(t0)
	if err != nil {
		return fmt.Errorf("ferry save: %w: %s", err, lastLines(out, 3))
	}
	var rep map[string]any
	if json.Unmarshal(out, &rep) == nil {
		obs.SystemReport = rep
	}
	if off.StateBytes, off.TransferTime, err = carry(ctx, f.lab, saved, moved); err != nil {
		return err
	}
	t1 := time.Now()
	restore := f.lab.Command(ctx, f.lab.Dest, f.bin, "restore", moved, "--name", name+"-restored")
	restore.Stdout = obs.Dst
	var stderr bytes.Buffer
	restore.Stderr = &stderr
	if err := restore.Start(); err != nil {
		return fmt.Errorf("ferry restore: %w", err)
	}
	defer func() {
		_ = restore.Process.Signal(os.Interrupt)
		waitOrKill(restore, 5*time.Second)
	}()
	if err := WaitBeats(ctx, obs.Dst, 1, "restored guest"); err != nil {
		return fmt.Errorf("%w: %s", err, lastLines(stderr.Bytes(), 3))
	}
	off.RestoreTime = time.Since(t1)
	obs.End(ctx)
	return s.settle(ctx, obs.Dst)
}

// carry copies a file from the source's namespace to the destination's
// over the lab link (plain TCP, as scp or a storage copy would move it).
func carry(ctx context.Context, lab *Lab, from, to string) (uint64, time.Duration, error) {
	ln, err := lab.Listen(lab.Dest, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("transfer: %w", err)
	}
	defer ln.Close()
	got := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		out, err := os.Create(to)
		if err != nil {
			got <- err
			return
		}
		_, err = io.Copy(out, c)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		got <- err
	}()
	in, err := os.Open(from)
	if err != nil {
		return 0, 0, err
	}
	defer in.Close()
	t0 := time.Now()
	c, err := lab.Dial(ctx, lab.Source, ln.Addr().String())
	if err != nil {
		return 0, 0, fmt.Errorf("transfer: %w", err)
	}
	n, err := io.Copy(c, in)
	c.Close()
	if err != nil {
		return 0, 0, fmt.Errorf("transfer: %w", err)
	}
	if err := <-got; err != nil {
		return 0, 0, fmt.Errorf("transfer: receiving: %w", err)
	}
	return uint64(n), time.Since(t0), nil
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
