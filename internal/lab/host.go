package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Host is one emulated host: a qemu-system-x86_64 process under TCG with
// SVM and nested paging, running Debian's kernel with KVM, and the agent
// inside it.
type Host struct {
	Name    string
	Index   int    // 1-based
	IP      string // on the link, e.g. 10.77.0.1
	Console string // the host's serial console, a file
	Agent   *Client

	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error
	qlog    bytes.Buffer
}

// hostSpec is what starting one host needs.
type hostSpec struct {
	name, ip     string
	index        int
	memMB, cpus  int
	cpu          string
	accel        string // QEMU -accel
	kernel       string
	initrd       string
	hub          string
	dir          string
	token        string
	extraCmdline string
	tscKHz       int // this machine's TSC rate, given to every host (0: unknown)
}

// MAC addresses by which the host's /init tells its NICs apart.
func ctlMAC(i int) string  { return fmt.Sprintf("52:54:00:fe:00:%02x", i) }
func linkMAC(i int) string { return fmt.Sprintf("52:54:00:77:00:%02x", i) }

// freePort returns a port of 127.0.0.1 that was free a moment ago. QEMU's
// hostfwd needs a number; startHost retries if another process took it.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s hostSpec) args(agentPort int) []string {
	parts := []string{"console=ttyS0", "quiet", "panic=-1",
		"ferry.lab.name=" + s.name, "ferry.lab.addr=" + s.ip + "/24",
		"ferry.lab.token=" + s.token}
	// The emulated TSC runs at this machine's rate; each host's own
	// calibration under TCG can be ~1000 ppm off (more than KVM's 250 ppm
	// tolerance between hosts). Telling every host the rate makes them
	// agree; a 1-CPU host's refined calibration still lands within ~10 ppm.
	if s.tscKHz > 0 {
		parts = append(parts, "tsc_early_khz="+strconv.Itoa(s.tscKHz))
	}
	cmdline := strings.Join(append(parts, s.extraCmdline), " ")
	return []string{
		"-accel", s.accel, "-cpu", s.cpu, "-m", strconv.Itoa(s.memMB), "-smp", strconv.Itoa(s.cpus),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", s.kernel, "-initrd", s.initrd, "-append", strings.TrimSpace(cmdline),
		"-chardev", "file,id=con,path=" + filepath.Join(s.dir, s.name+".console"),
		"-serial", "chardev:con",
		"-netdev", fmt.Sprintf("user,id=ctl,restrict=on,hostfwd=tcp:127.0.0.1:%d-10.0.2.15:7000", agentPort),
		"-device", "virtio-net-pci,netdev=ctl,mac=" + ctlMAC(s.index),
		"-netdev", "socket,id=link,connect=" + s.hub,
		"-device", "virtio-net-pci,netdev=link,mac=" + linkMAC(s.index),
	}
}

// startHost starts the QEMU process and waits until the agent answers.
func startHost(ctx context.Context, qemu string, s hostSpec, bootTimeout time.Duration) (*Host, error) {
	h := &Host{Name: s.name, Index: s.index, IP: s.ip, Console: filepath.Join(s.dir, s.name+".console")}
	var port int
	for try := 0; ; try++ {
		var err error
		if port, err = freePort(); err != nil {
			return nil, fmt.Errorf("lab: %s: %w", s.name, err)
		}
		os.Remove(h.Console)
		h.cmd = exec.Command(qemu, s.args(port)...)
		h.qlog.Reset()
		h.cmd.Stdout, h.cmd.Stderr = &h.qlog, &h.qlog
		h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		if err := h.cmd.Start(); err != nil {
			return nil, fmt.Errorf("lab: starting %s: %w", qemu, err)
		}
		h.exited = make(chan struct{})
		go func() { h.exitErr = h.cmd.Wait(); close(h.exited) }()
		// A port taken in the meantime makes QEMU exit at once.
		select {
		case <-h.exited:
			if try < 3 && strings.Contains(h.qlog.String(), "hostfwd") {
				continue
			}
			return nil, fmt.Errorf("lab: %s: QEMU exited at start (%v): %s", s.name, h.exitErr, strings.TrimSpace(h.qlog.String()))
		case <-time.After(300 * time.Millisecond):
		}
		break
	}
	h.Agent = NewClient(fmt.Sprintf("127.0.0.1:%d", port), s.token)
	if err := h.waitReady(ctx, bootTimeout); err != nil {
		h.Kill()
		return nil, err
	}
	return h, nil
}

// waitReady waits for the host's /init to say it is ready and for the
// agent to answer, failing at once if QEMU exits or the host reports a
// failure.
func (h *Host) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		con, _ := os.ReadFile(h.Console)
		if i := bytes.Index(con, []byte("ferry-lab: FAIL")); i >= 0 {
			line, _, _ := bytes.Cut(con[i:], []byte("\n"))
			return fmt.Errorf("lab: %s: %s (console: %s)", h.Name, line, h.Console)
		}
		// The whole line: the console file may hold half of it.
		if i := bytes.Index(con, []byte("ferry-lab: ready")); i >= 0 && bytes.IndexByte(con[i:], '\n') > 0 {
			line, _, _ := bytes.Cut(con[i:], []byte("\n"))
			if !bytes.Contains(line, []byte("kvm=yes")) {
				return fmt.Errorf("lab: %s booted without /dev/kvm (SVM not emulated?); console: %s\n%s", h.Name, h.Console, tail(con, 2000))
			}
			return h.Agent.WaitReady(ctx)
		}
		select {
		case <-h.exited:
			return fmt.Errorf("lab: %s: QEMU exited while booting (%v): %s\nconsole:\n%s", h.Name, h.exitErr,
				strings.TrimSpace(h.qlog.String()), tail(con, 2000))
		case <-ctx.Done():
			return fmt.Errorf("lab: %s not ready after %v (%w); console:\n%s", h.Name, timeout, ctx.Err(), tail(con, 2000))
		case <-tick.C:
		}
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// Kill stops the host's QEMU at once.
func (h *Host) Kill() {
	if h.cmd == nil || h.cmd.Process == nil {
		return
	}
	syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
	<-h.exited
}

// Alive reports whether the host's QEMU is still running.
func (h *Host) Alive() bool {
	select {
	case <-h.exited:
		return false
	default:
		return true
	}
}

// Exited is closed when the host's QEMU has exited.
func (h *Host) Exited() <-chan struct{} { return h.exited }

// Run runs argv in the host and returns its stdout; stderr goes into the
// error when it fails.
func (h *Host) Run(ctx context.Context, argv ...string) (string, error) {
	var out, errb bytes.Buffer
	res, err := h.Agent.Exec(ctx, ExecRequest{Argv: argv}, &out, &errb)
	if err != nil {
		return out.String(), fmt.Errorf("%s: %w", h.Name, err)
	}
	if res.Code != 0 {
		return out.String(), &ExitError{Host: h.Name, Argv: argv, Result: res, Stderr: errb.String(), Stdout: out.String()}
	}
	return out.String(), nil
}

// Sh runs a shell command line in the host (busybox sh -c).
func (h *Host) Sh(ctx context.Context, script string) (string, error) {
	return h.Run(ctx, "sh", "-c", script)
}

// Stream runs argv in the host with its output going to w as it comes.
func (h *Host) Stream(ctx context.Context, w io.Writer, argv ...string) error {
	res, err := h.Agent.Exec(ctx, ExecRequest{Argv: argv}, w, w)
	if err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	if res.Code != 0 {
		return &ExitError{Host: h.Name, Argv: argv, Result: res}
	}
	return nil
}

// ExitError is a command in a host that ran and failed.
type ExitError struct {
	Host           string
	Argv           []string
	Result         ExecResult
	Stdout, Stderr string
}

func (e *ExitError) Error() string {
	msg := fmt.Sprintf("%s: %s: exit %d", e.Host, strings.Join(e.Argv, " "), e.Result.Code)
	if e.Result.Error != "" {
		msg += " (" + e.Result.Error + ")"
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + tail([]byte(s), 2000)
	}
	return msg
}

// IsExit reports whether err is a command that ran and failed.
func IsExit(err error) bool {
	var e *ExitError
	return errors.As(err, &e)
}
