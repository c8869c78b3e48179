package daemon

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ferry-vmm/ferry/internal/control"
	"github.com/ferry-vmm/ferry/internal/trust"
)

// Config configures a daemon.
type Config struct {
	Listen  string // TCP address for peer daemons, e.g. 127.0.0.1:7700
	DataDir string // identity, trust pool, VM sockets and logs
	Socket  string // the CLI's unix socket; default DataDir/api.sock
	Exe     string // the ferry binary to run VMM processes with; default this one
	Log     *slog.Logger
}

// Daemon is a running host daemon.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	id      *trust.Identity
	created bool
	pool    *trust.Pool
	api     net.Listener
	peer    net.Listener

	mu      sync.Mutex
	vms     map[string]*vmProc
	commits map[string]string // migration id -> "committed" | "aborted"
	wg      sync.WaitGroup
}

// vmProc is one VMM child process.
type vmProc struct {
	info    VMInfo
	cmd     *exec.Cmd
	control string // its control socket
	console string // its console log file
	done    chan struct{}
}

// New prepares a daemon: identity (created on first start), trust pool and
// listeners.
func New(cfg Config) (*Daemon, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("daemon: no data directory")
	}
	if cfg.Socket == "" {
		cfg.Socket = filepath.Join(cfg.DataDir, "api.sock")
	}
	if cfg.Exe == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		cfg.Exe = exe
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "vms"), 0o700); err != nil {
		return nil, fmt.Errorf("daemon: %w", err)
	}
	d := &Daemon{cfg: cfg, log: cfg.Log, vms: map[string]*vmProc{}, commits: map[string]string{}}
	var err error
	if d.id, d.created, err = trust.LoadOrCreate(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("daemon identity: %w", err)
	}
	if d.pool, err = trust.OpenPool(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("daemon trust pool: %w", err)
	}
	if c, err := net.Dial("unix", cfg.Socket); err == nil {
		c.Close()
		return nil, fmt.Errorf("daemon: %s is in use: another daemon runs with this data directory", cfg.Socket)
	}
	os.Remove(cfg.Socket)
	if d.api, err = net.Listen("unix", cfg.Socket); err != nil {
		return nil, fmt.Errorf("daemon: API socket: %w", err)
	}
	os.Chmod(cfg.Socket, 0o600)
	if d.peer, err = trust.Listen("tcp", cfg.Listen, d.id, d.pool, d.log); err != nil {
		d.api.Close()
		return nil, fmt.Errorf("daemon: listening for peers on %s: %w", cfg.Listen, err)
	}
	return d, nil
}

// Identity is this host's identity; Created says it was made just now.
func (d *Daemon) Identity() (Identity, bool) {
	return Identity{Name: d.id.Name(), Fingerprint: d.id.Fingerprint(), Listen: d.peer.Addr().String()}, d.created
}

// SocketPath is the CLI socket.
func (d *Daemon) SocketPath() string { return d.cfg.Socket }

// Serve answers the CLI and peers until ctx ends, then stops every VM.
func (d *Daemon) Serve(ctx context.Context) error {
	d.wg.Add(2)
	go d.acceptLoop(d.api, false)
	go d.acceptLoop(d.peer, true)
	<-ctx.Done()
	d.api.Close()
	d.peer.Close()
	d.mu.Lock()
	procs := make([]*vmProc, 0, len(d.vms))
	for _, p := range d.vms {
		procs = append(procs, p)
	}
	d.mu.Unlock()
	for _, p := range procs {
		if p.cmd.Process != nil {
			p.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, p := range procs {
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
		}
	}
	d.wg.Wait()
	os.Remove(d.cfg.Socket)
	return nil
}

func (d *Daemon) acceptLoop(ln net.Listener, peer bool) {
	defer d.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go d.serveConn(c, peer)
	}
}

func (d *Daemon) serveConn(c net.Conn, peer bool) {
	defer c.Close()
	line, err := bufio.NewReader(io.LimitReader(c, 1<<20)).ReadBytes('\n')
	if err != nil {
		return
	}
	var req Request
	send := func(r Response) {
		b, _ := json.Marshal(r)
		c.Write(append(b, '\n'))
	}
	if err := json.Unmarshal(line, &req); err != nil {
		send(Response{Error: fmt.Sprintf("malformed request: %v", err)})
		return
	}
	var resp Response
	if peer {
		resp = d.handlePeer(req, c)
	} else {
		resp = d.handleLocal(req, send)
	}
	send(resp)
}

func fail(format string, a ...any) Response { return Response{Error: fmt.Sprintf(format, a...)} }

// handlePeer serves another daemon: only what migrations need.
func (d *Daemon) handlePeer(req Request, c net.Conn) Response {
	fp := ""
	if tc, ok := c.(*tls.Conn); ok {
		fp = trust.PeerFingerprint(tc)
	}
	d.log.Info("peer request", "op", req.Op, "remote", c.RemoteAddr().String(), "peer", fp)
	switch req.Op {
	case "identity":
		id, _ := d.Identity()
		return Response{OK: true, Identity: &id}
	case "incoming":
		return d.incoming(req, c)
	case "probe":
		return probe(req, c)
	case "vm-status":
		p, err := d.find(req.Name)
		if err != nil {
			return fail("%v", err)
		}
		r, err := control.Call(p.control, control.Request{Op: "status", WindowFrom: req.WindowFrom, WindowTo: req.WindowTo}, 5*time.Second)
		if err != nil {
			return fail("%s: %v", req.Name, err)
		}
		return Response{OK: true, Beat: r.Status.FirstBeatUnixNano, WorkRate: r.Status.WorkRate}
	case "resolve":
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.commits[req.ID] == "committed" {
			return Response{OK: true, Running: true}
		}
		d.commits[req.ID] = "aborted" // it will never start here now
		return Response{OK: true, Running: false}
	}
	return fail("unknown peer operation %q", req.Op)
}

// handleLocal serves the CLI and local VMM processes.
func (d *Daemon) handleLocal(req Request, send func(Response)) Response {
	switch req.Op {
	case "identity":
		id, _ := d.Identity()
		return Response{OK: true, Identity: &id}
	case "ps":
		return Response{OK: true, VMs: d.list()}
	case "run":
		return d.run(req)
	case "stop":
		return d.stop(req.Name)
	case "console":
		return d.console(req, send)
	case "console-input":
		p, err := d.find(req.Name)
		if err != nil {
			return fail("%v", err)
		}
		if _, err := control.Call(p.control, control.Request{Op: "input", Input: req.Input}, 5*time.Second); err != nil {
			return fail("%s: %v", req.Name, err)
		}
		return Response{OK: true}
	case "migrate":
		return d.migrate(req, send)
	case "cancel", "set", "finish", "retry-link":
		p, err := d.find(req.Name)
		if err != nil {
			return fail("%v", err)
		}
		creq := control.Request{Op: req.Op}
		creq.Bandwidth = req.Bandwidth
		if _, err := control.Call(p.control, creq, 10*time.Second); err != nil {
			return fail("%s: %v", req.Name, err)
		}
		return Response{OK: true}
	case "commit":
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.commits[req.ID] == "aborted" {
			return fail("migration %s was aborted: the source resumes the guest", req.ID)
		}
		d.commits[req.ID] = "committed"
		if p, ok := d.vms[req.Name]; ok {
			p.info.State = "running"
		}
		return Response{OK: true}
	case "nodes-ls":
		return Response{OK: true, Nodes: d.pool.List()}
	case "nodes-trust":
		return d.trustNode(req)
	case "nodes-rm":
		e, err := d.pool.Remove(req.Fingerprint)
		if err != nil {
			return fail("%v", err)
		}
		return Response{OK: true, Nodes: []trust.Entry{e}}
	}
	return fail("unknown operation %q", req.Op)
}

func (d *Daemon) list() []VMInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []VMInfo
	for _, p := range d.vms {
		out = append(out, p.info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (d *Daemon) find(name string) (*vmProc, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.vms[name]
	if !ok {
		return nil, fmt.Errorf("no VM named %q on this host", name)
	}
	return p, nil
}

func validName(n string) error {
	if n == "" || len(n) > 64 || strings.ContainsAny(n, "/\\ \t\n") || n[0] == '.' || n[0] == '-' {
		return fmt.Errorf("invalid VM name %q (1-64 characters, no slashes or spaces)", n)
	}
	return nil
}

// spawn starts a VMM child. extra are its mode-specific flags.
func (d *Daemon) spawn(name string, info VMInfo, extra []string) (*vmProc, *os.File, error) {
	if err := validName(name); err != nil {
		return nil, nil, err
	}
	d.mu.Lock()
	if p, ok := d.vms[name]; ok && p.info.State != "exited" {
		d.mu.Unlock()
		return nil, nil, fmt.Errorf("a VM named %q already exists on this host", name)
	}
	base := filepath.Join(d.cfg.DataDir, "vms", name)
	p := &vmProc{info: info, control: base + ".sock", console: base + ".console", done: make(chan struct{})}
	p.info.Name = name
	p.info.Started = time.Now()
	d.vms[name] = p
	d.mu.Unlock()
	logf, err := os.OpenFile(base+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		d.forget(name, p)
		return nil, nil, err
	}
	defer logf.Close()
	args := append([]string{"vmm", "--name", name, "--data-dir", d.cfg.DataDir, "--control", p.control,
		"--console-log", p.console, "--daemon-socket", d.cfg.Socket}, extra...)
	p.cmd = exec.Command(d.cfg.Exe, args...)
	p.cmd.Stderr = logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // a Ctrl-C at the daemon's terminal is not the VM's
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		d.forget(name, p)
		return nil, nil, err
	}
	if err := p.cmd.Start(); err != nil {
		d.forget(name, p)
		return nil, nil, fmt.Errorf("starting the VMM process: %w", err)
	}
	p.info.PID = p.cmd.Process.Pid
	go func() {
		err := p.cmd.Wait()
		d.mu.Lock()
		p.info.State = "exited"
		if err != nil {
			p.info.Exit = err.Error()
		} else {
			p.info.Exit = "ok"
		}
		if d.vms[name] == p {
			delete(d.vms, name)
		}
		d.mu.Unlock()
		close(p.done)
		d.log.Info("VMM process ended", "vm", name, "exit", p.info.Exit)
	}()
	return p, out.(*os.File), nil
}

func (d *Daemon) forget(name string, p *vmProc) {
	d.mu.Lock()
	if d.vms[name] == p {
		delete(d.vms, name)
	}
	d.mu.Unlock()
}

// readReady waits for the child's first stdout line: "READY" (run) or
// "LISTEN addr" (incoming), or its early death.
func readReady(p *vmProc, out *os.File) (string, error) {
	type res struct {
		line string
		err  error
	}
	ch := make(chan res, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		ch <- res{strings.TrimSpace(line), err}
		io.Copy(io.Discard, out)
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			<-p.done
			return "", fmt.Errorf("the VMM process failed: %s (see %s)", p.info.Exit, strings.TrimSuffix(p.console, ".console")+".log")
		}
		return r.line, nil
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		return "", errors.New("the VMM process did not get ready within 60 s")
	}
}

func (d *Daemon) run(req Request) Response {
	extra := []string{"--mem", req.Mem, "--cpus", fmt.Sprint(req.CPUs), "--cmdline", req.Cmdline}
	if req.RNG {
		extra = append(extra, "--rng")
	}
	switch {
	case req.Guest != "":
		extra = append(extra, "--guest", req.Guest)
	case req.Kernel != "":
		extra = append(extra, "--kernel", req.Kernel)
		if req.Initrd != "" {
			extra = append(extra, "--initrd", req.Initrd)
		}
	default:
		return fail("nothing to run: give a guest or a kernel")
	}
	p, out, err := d.spawn(req.Name, VMInfo{State: "starting", Mem: req.Mem, CPUs: req.CPUs}, extra)
	if err != nil {
		return fail("%v", err)
	}
	line, err := readReady(p, out)
	if err != nil {
		return fail("VM %s: %v", req.Name, err)
	}
	if line != "READY" {
		return fail("VM %s: unexpected start-up line %q", req.Name, line)
	}
	d.mu.Lock()
	p.info.State = "running"
	info := p.info
	d.mu.Unlock()
	return Response{OK: true, VM: &info}
}

func (d *Daemon) stop(name string) Response {
	p, err := d.find(name)
	if err != nil {
		return fail("%v", err)
	}
	if _, err := control.Call(p.control, control.Request{Op: "stop"}, 10*time.Second); err != nil {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	return Response{OK: true}
}

// console streams a VM's console log: what is there, then (Follow) what
// comes, until the VM ends or the client goes away.
func (d *Daemon) console(req Request, send func(Response)) Response {
	p, err := d.find(req.Name)
	if err != nil {
		return fail("%v", err)
	}
	f, err := os.Open(p.console)
	if err != nil {
		return fail("console of %s: %v", req.Name, err)
	}
	defer f.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			send(Response{OK: true, More: true, Console: string(buf[:n])})
			continue
		}
		if err != nil && err != io.EOF {
			return fail("console of %s: %v", req.Name, err)
		}
		if !req.Follow {
			return Response{OK: true}
		}
		select {
		case <-p.done:
			return Response{OK: true}
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// trustNode verifies a peer's fingerprint on the wire, then trusts it.
func (d *Daemon) trustNode(req Request) Response {
	fp, err := trust.ParseFingerprint(req.Fingerprint)
	if err != nil {
		return fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := trust.DialPinned(ctx, "tcp", req.Addr, d.id, fp)
	if err != nil {
		return fail("verifying %s: %v", req.Addr, err)
	}
	c.Close()
	e := trust.Entry{Fingerprint: fp, Name: req.Name, Address: req.Addr, Added: time.Now()}
	if err := d.pool.Add(e); err != nil {
		return fail("%v", err)
	}
	return Response{OK: true, Nodes: []trust.Entry{e}}
}
