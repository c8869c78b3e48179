package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Instance is one running QEMU process with its QMP connection.
type Instance struct {
	cmd    *exec.Cmd
	qmp    *Client // nil for Run's instances
	dir    string  // holds the QMP socket; removed by Close
	stderr *tail

	exited   chan struct{} // closed once the process is reaped
	waitErr  error         // cmd.Wait's result, valid after exited
	exitedAt time.Time     // when it was reaped, valid after exited

	closeOnce sync.Once
}

// Start launches QEMU for o with a QMP socket and connects to it. ctx
// bounds the start only (launch and QMP handshake); the instance runs
// until it exits or Close kills it.
//
// QEMU is killed if the OS thread that started it exits (so that no QEMU
// outlives a crashed caller): do not call Start from a goroutine locked
// to a thread that is then let go (such as one that entered a network
// namespace); use Options.Wrapper for namespaces.
func Start(ctx context.Context, o Options) (*Instance, error) {
	return start(ctx, o, true)
}

func start(ctx context.Context, o Options, withQMP bool) (*Instance, error) {
	args := Args(o)
	var dir, sock string
	if withQMP {
		// A private directory: the socket name cannot clash, and nobody
		// else can connect to the guest's monitor.
		var err error
		if dir, err = os.MkdirTemp("", "ferry-qemu-"); err != nil {
			return nil, fmt.Errorf("qemu: socket directory: %w", err)
		}
		sock = filepath.Join(dir, "qmp.sock")
		args = append(args, "-qmp", "unix:"+sock+",server=on,wait=off")
	}
	argv := append(append([]string(nil), o.Wrapper...), Binary)
	argv = append(argv, args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = o.Console
	if cmd.Stdout == nil {
		cmd.Stdout = io.Discard
	}
	t := &tail{}
	cmd.Stderr = t
	if o.Stderr != nil {
		cmd.Stderr = io.MultiWriter(t, o.Stderr)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so that Kill also reaches whatever a
		// Wrapper forks; and SIGKILL if this process dies first, so that a
		// crashed or timed-out test leaves no QEMU behind.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	// Console copying ends when QEMU's stdout closes; a grandchild holding
	// it open must not hang Wait forever.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		if dir != "" {
			os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("qemu: starting %s: %w", strings.Join(argv, " "), err)
	}
	i := &Instance{cmd: cmd, dir: dir, stderr: t, exited: make(chan struct{})}
	go func() {
		i.waitErr = cmd.Wait()
		i.exitedAt = time.Now()
		close(i.exited)
	}()
	if !withQMP {
		return i, nil
	}

	// A QEMU that exits during start (bad option, KVM error) should fail
	// Start with its message at once, not when ctx expires.
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-i.exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	c, err := Dial(dctx, sock)
	if err != nil {
		select {
		case <-i.exited:
			err = fmt.Errorf("qemu exited during start: %w", i.exitError())
		default:
		}
		i.Close()
		return nil, fmt.Errorf("qemu: %w", err)
	}
	i.qmp = c
	return i, nil
}

// QMP is the instance's QMP client.
func (i *Instance) QMP() *Client { return i.qmp }

// Pid is the process id of the started command (QEMU, or the Wrapper's
// first program).
func (i *Instance) Pid() int { return i.cmd.Process.Pid }

// Exited is closed when the QEMU process has exited and been reaped.
func (i *Instance) Exited() <-chan struct{} { return i.exited }

// Stderr is the tail of QEMU's own messages.
func (i *Instance) Stderr() string { return i.stderr.String() }

// Wait waits for QEMU to exit and returns the guest's exit status as
// written to isa-debug-exit. Any other way out (QEMU error, signal, quit)
// is an error. When ctx ends first, Wait returns ctx's error and leaves
// QEMU running.
func (i *Instance) Wait(ctx context.Context) (int, error) {
	select {
	case <-i.exited:
	case <-ctx.Done():
		return -1, fmt.Errorf("qemu: waiting for the guest to exit: %w", ctx.Err())
	}
	return i.status()
}

// status decodes the exit of a reaped QEMU.
func (i *Instance) status() (int, error) {
	var ee *exec.ExitError
	if !errors.As(i.waitErr, &ee) {
		if i.waitErr != nil {
			return -1, fmt.Errorf("qemu: %w", i.waitErr)
		}
		return -1, fmt.Errorf("qemu exited with status 0 without the guest's exit status%s", i.stderrNote())
	}
	code := ee.ExitCode()
	// isa-debug-exit makes QEMU exit((value << 1) | 1) without a word.
	// QEMU's own fatal errors (a failed incoming migration, say) exit 1 too,
	// which would read as guest status 0, but print their message just
	// before. An older message (a failed outgoing migration, which QEMU
	// survives) says nothing about this exit.
	if code >= 0 && code%2 == 1 {
		msg, at := i.stderr.lastError()
		if code != 1 || msg == "" || i.exitedAt.Sub(at) > fatalWindow {
			return code / 2, nil
		}
		return -1, fmt.Errorf("qemu exited: %v: %s", i.waitErr, msg)
	}
	return -1, i.exitError()
}

// fatalWindow is how long before its exit QEMU's last error message must
// have come to count as the reason for an exit status of 1.
const fatalWindow = time.Second

// exitError describes how a reaped QEMU ended, with its last message.
func (i *Instance) exitError() error {
	return fmt.Errorf("qemu exited: %v%s", i.waitErr, i.stderrNote())
}

func (i *Instance) stderrNote() string {
	if msg, _ := i.stderr.lastError(); msg != "" {
		return ": " + msg
	}
	if s := strings.TrimSpace(i.stderr.String()); s != "" {
		return "; stderr: " + s
	}
	return ""
}

// Kill sends SIGKILL to QEMU (and its process group) if it still runs.
// It does not wait: Close and Wait reap.
func (i *Instance) Kill() error {
	select {
	case <-i.exited:
		return nil
	default:
	}
	// The group id is the leader's pid, which cannot be reused while the
	// leader is not yet reaped, so this cannot hit a stranger.
	if err := syscall.Kill(-i.cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("qemu: killing pid %d: %w", i.cmd.Process.Pid, err)
	}
	return nil
}

// Close kills QEMU if it still runs, reaps it, closes the QMP connection
// and removes the socket directory. It is safe to call more than once.
func (i *Instance) Close() error {
	var err error
	i.closeOnce.Do(func() {
		// The client first, so that commands in flight fail with
		// ErrClosed rather than with QEMU's disappearance.
		if i.qmp != nil {
			i.qmp.Close()
		}
		err = i.Kill()
		<-i.exited
		if i.dir == "" {
			return
		}
		if rerr := os.RemoveAll(i.dir); rerr != nil && err == nil {
			err = fmt.Errorf("qemu: removing %s: %w", i.dir, rerr)
		}
	})
	return err
}

// tail keeps the last few KiB of QEMU's stderr, and QEMU's last error
// message ("qemu-system-x86_64: ..." lines that are not warnings) with the
// time it was written.
type tail struct {
	mu      sync.Mutex
	b       []byte
	partial []byte
	lastErr string
	errAt   time.Time
}

const tailSize = 8 << 10

func (t *tail) Write(p []byte) (int, error) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > tailSize {
		t.b = append(t.b[:0], t.b[len(t.b)-tailSize:]...)
	}
	// QEMU writes a message in pieces: judge whole lines.
	t.partial = append(t.partial, p...)
	for {
		line, rest, ok := bytes.Cut(t.partial, []byte("\n"))
		if !ok {
			break
		}
		l := strings.TrimSpace(string(line))
		if msg, ok := strings.CutPrefix(l, Binary+": "); ok && !strings.HasPrefix(msg, "warning:") {
			t.lastErr, t.errAt = l, now
		}
		t.partial = rest
	}
	if len(t.partial) > tailSize {
		t.partial = t.partial[:0]
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

func (t *tail) lastError() (string, time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastErr, t.errAt
}
