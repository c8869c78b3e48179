// Package control is the per-VM control socket: a running VMM process
// (`ferry run`) serves it, the CLI (`ferry save`, ...) talks to it. The
// protocol is one JSON request and one JSON response per line over a unix
// socket (see docs/control.md).
//
// It drives internal/vmm and internal/snapshot; it must not know about the
// daemon, migration or cobra.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/snapshot"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// Request is one command to a VM.
type Request struct {
	// "status", "pause", "resume", "save", "stop", "input", "migrate",
	// and for a running migration "cancel", "set" (bandwidth), "finish"
	// (end demand paging) and "retry-link" (re-open a broken post-copy
	// link now).
	Op     string `json:"op"`
	Path   string `json:"path,omitempty"`
	Resume bool   `json:"resume,omitempty"`
	// Migrate: where to (the destination VMM process's address), how, and
	// which daemon to ask if the outcome is ambiguous. Save uses Compress,
	// set uses Bandwidth.
	To          string `json:"to,omitempty"`
	ResolveAddr string `json:"resolve_addr,omitempty"`
	migration.Params
	// Status: the window (host clock, ns since the epoch) over which to
	// measure the guest's workload rate (Status.WorkRate).
	WindowFrom int64 `json:"window_from,omitempty"`
	WindowTo   int64 `json:"window_to,omitempty"`
	// Input: bytes for the guest's serial console.
	Input []byte `json:"input,omitempty"`
}

// Status describes a running VM.
type Status struct {
	Name        string `json:"name"`
	PID         int    `json:"pid"`
	VCPUs       int    `json:"vcpus"`
	MemoryBytes uint64 `json:"memory_bytes"`
	Paused      bool   `json:"paused"`
	Uptime      string `json:"uptime"`
	// Arrival times (host clock, ns since the epoch) of the first and the
	// latest heartbeat line the guest printed in this process; 0 if none.
	FirstBeatUnixNano int64 `json:"first_beat_unix_nano,omitempty"`
	LastBeatUnixNano  int64 `json:"last_beat_unix_nano,omitempty"`
	// WorkRate is the guest workload's progress in pages/s over the
	// requested window (guestlog.WorkRate).
	WorkRate float64 `json:"work_rate,omitempty"`
}

// Response answers a Request.
type Response struct {
	OK     bool                 `json:"ok"`
	Error  string               `json:"error,omitempty"`
	Status *Status              `json:"status,omitempty"`
	Save   *snapshot.SaveReport `json:"save,omitempty"`
	// Prediction answers "predict".
	Prediction *migration.Prediction `json:"prediction,omitempty"`
	Progress   *migration.Progress   `json:"progress,omitempty"` // a streamed update; more lines follow
	Migration  *migration.Report     `json:"migration,omitempty"`
}

// RunDir is where control sockets live: $FERRY_RUN_DIR, else /run/ferry for
// root, else $XDG_RUNTIME_DIR/ferry, else the temp dir.
func RunDir() string {
	if d := os.Getenv("FERRY_RUN_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/ferry"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "ferry")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("ferry-%d", os.Geteuid()))
}

// SocketPath is the control socket of the VM called name.
func SocketPath(name string) string { return filepath.Join(RunDir(), name+".sock") }

// Server serves one VM's control socket.
type Server struct {
	name    string
	vm      *vmm.VM
	log     *slog.Logger
	ln      net.Listener
	started time.Time
	mu      sync.Mutex // one command at a time (migrations excepted)
	wg      sync.WaitGroup

	env       *MigrationEnv
	console   *guestlog.Recorder
	migMu     sync.Mutex
	migrating *migration.Source
	// held, while set, refuses the operations that read all of guest
	// memory (save, migrate): an incoming post-copy migration still
	// fills it, and Go code that touches a missing page could stall the
	// whole process (userfaultfd).
	held string
}

// Hold refuses save and migrate, giving reason, until release is called.
func (s *Server) Hold(reason string) (release func()) {
	s.migMu.Lock()
	s.held = reason
	s.migMu.Unlock()
	return func() {
		s.migMu.Lock()
		s.held = ""
		s.migMu.Unlock()
	}
}

func (s *Server) heldReason() string {
	s.migMu.Lock()
	defer s.migMu.Unlock()
	return s.held
}

// MigrationEnv is what a VMM process needs to send its VM away: how to
// reach the destination (mutually authenticated TLS, from the daemon's
// identity) and how to settle an ambiguous outcome with the destination's
// daemon.
type MigrationEnv struct {
	Dial    func(ctx context.Context, addr string) (net.Conn, error)
	Resolve func(ctx context.Context, daemonAddr, id string) (bool, error)
	// Done is called after a successful migration (the VM is released).
	Done func(*migration.Report)
}

// SetConsole lets status report the guest's heartbeat times.
func (s *Server) SetConsole(r *guestlog.Recorder) { s.console = r }

func (s *Server) beats() (first, last int64) {
	if s.console == nil {
		return 0, 0
	}
	for _, l := range s.console.Lines() {
		if guestlog.IsBeat(l.Line) {
			if first == 0 {
				first = l.At.UnixNano()
			}
			last = l.At.UnixNano()
		}
	}
	return first, last
}

// EnableMigration lets the socket accept "migrate", "cancel" and "set".
func (s *Server) EnableMigration(env *MigrationEnv) { s.env = env }

// Serve listens on path for commands to vm. A stale socket left by a dead
// process is replaced; a live one is an error (two VMs with one name).
// held, if not empty, is Hold's reason from the first request on.
func Serve(path, name string, vm *vmm.VM, log *slog.Logger, held ...string) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: is a VM named %q already running?", path, name)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	s := &Server{name: name, vm: vm, log: log, ln: ln, started: time.Now()}
	if len(held) > 0 {
		s.held = held[0]
	}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveConn(c)
		}()
	}
}

func (s *Server) serveConn(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(io.LimitReader(c, 1<<20))
	line, err := r.ReadBytes('\n')
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		return
	}
	var req Request
	var resp Response
	if err := json.Unmarshal(line, &req); err != nil {
		resp = Response{Error: fmt.Sprintf("malformed request: %v", err)}
	} else if req.Op == "migrate" {
		resp = s.migrate(req, func(r Response) {
			b, _ := json.Marshal(r)
			c.Write(append(b, '\n'))
		})
	} else {
		resp = s.handle(req)
	}
	b, _ := json.Marshal(resp)
	c.Write(append(b, '\n'))
}

// migrate runs a migration, streaming progress lines to send.
func (s *Server) migrate(req Request, send func(Response)) Response {
	if s.env == nil {
		return Response{Error: "this VM process cannot migrate (not run by a daemon)"}
	}
	opts, err := req.Params.Options()
	if err != nil {
		return Response{Error: err.Error()}
	}
	src := &migration.Source{VM: s.vm, Name: s.name, Log: s.log, Opts: opts}
	var last time.Time
	var lastPhase migration.Phase
	src.Progress = func(p migration.Progress) {
		// At most five lines a second, but every change of phase.
		if time.Since(last) < 200*time.Millisecond && p.Phase == lastPhase {
			return
		}
		last, lastPhase = time.Now(), p.Phase
		send(Response{OK: true, Progress: &p})
	}
	if req.ResolveAddr != "" && s.env.Resolve != nil {
		src.Resolve = func(ctx context.Context, id string) (bool, error) { return s.env.Resolve(ctx, req.ResolveAddr, id) }
	}
	s.migMu.Lock()
	if s.held != "" {
		s.migMu.Unlock()
		return Response{Error: "cannot migrate now: " + s.held}
	}
	if s.migrating != nil {
		s.migMu.Unlock()
		return Response{Error: "a migration of this VM is already running"}
	}
	s.migrating = src
	s.migMu.Unlock()
	defer func() {
		s.migMu.Lock()
		s.migrating = nil
		s.migMu.Unlock()
	}()
	dial := func(ctx context.Context) (net.Conn, error) { return s.env.Dial(ctx, req.To) }
	start := time.Now()
	rep, err := src.Run(context.Background(), dial)
	if s.console != nil && rep != nil {
		rep.GuestWorkBefore = guestlog.WorkRate(s.console.Lines(), start.Add(-5*time.Second), start)
	}
	if err != nil {
		return Response{Error: err.Error(), Migration: rep}
	}
	if s.env.Done != nil {
		s.env.Done(rep)
	}
	// The guest's last heartbeat here, for the guest-observed downtime.
	_, lastBeat := s.beats()
	return Response{OK: true, Migration: rep, Status: &Status{Name: s.name, LastBeatUnixNano: lastBeat}}
}

func (s *Server) handle(req Request) Response {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log.Info("control request", "op", req.Op)
	switch req.Op {
	case "status":
		st := s.status()
		if req.WindowTo > req.WindowFrom && s.console != nil {
			st.WorkRate = guestlog.WorkRate(s.console.Lines(), time.Unix(0, req.WindowFrom), time.Unix(0, req.WindowTo))
		}
		return Response{OK: true, Status: st}
	case "pause":
		if err := s.vm.Pause(); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true, Status: s.status()}
	case "resume":
		s.migMu.Lock()
		migrating := s.migrating != nil
		s.migMu.Unlock()
		if migrating {
			return Response{Error: "a migration of this VM is running: it decides whether the guest resumes here"}
		}
		s.vm.Resume()
		return Response{OK: true, Status: s.status()}
	case "stop":
		s.vm.Stop()
		return Response{OK: true}
	case "input":
		s.vm.Serial.Enqueue(req.Input)
		return Response{OK: true}
	case "cancel":
		s.migMu.Lock()
		defer s.migMu.Unlock()
		if s.migrating == nil {
			return Response{Error: "no migration is running"}
		}
		if err := s.migrating.Cancel(); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true}
	case "predict":
		return s.predict(req)
	case "finish", "retry-link":
		s.migMu.Lock()
		defer s.migMu.Unlock()
		if s.migrating == nil {
			return Response{Error: "no migration is running"}
		}
		do := s.migrating.Finish
		if req.Op == "retry-link" {
			do = s.migrating.RetryLink
		}
		if err := do(); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true}
	case "set":
		s.migMu.Lock()
		defer s.migMu.Unlock()
		if s.migrating == nil {
			return Response{Error: "no migration is running"}
		}
		s.migrating.SetBandwidth(req.Bandwidth)
		return Response{OK: true}
	case "save":
		if req.Path == "" {
			return Response{Error: "save: no output path"}
		}
		if h := s.heldReason(); h != "" {
			return Response{Error: "cannot save now: " + h}
		}
		rep, err := snapshot.SaveFile(s.vm, req.Path, snapshot.SaveOptions{Compress: req.Compress, Resume: req.Resume})
		if err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true, Save: &rep}
	}
	return Response{Error: fmt.Sprintf("unknown operation %q", req.Op)}
}

func (s *Server) status() *Status {
	first, last := s.beats()
	return &Status{
		Name: s.name, PID: os.Getpid(), VCPUs: s.vm.NumCPUs(), MemoryBytes: s.vm.Memory().Size(),
		Paused: s.vm.Paused(), Uptime: time.Since(s.started).Round(time.Millisecond).String(),
		FirstBeatUnixNano: first, LastBeatUnixNano: last,
	}
}

// Call sends one request to the control socket at path.
func Call(path string, req Request, timeout time.Duration) (*Response, error) {
	return CallStream(path, req, timeout, nil)
}

// CallStream is Call for requests answered with several lines (migrate):
// every line but the last goes to onProgress.
func CallStream(path string, req Request, timeout time.Duration, onProgress func(Response)) (*Response, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("no VM answers on %s: %w", path, err)
	}
	defer c.Close()
	if timeout > 0 {
		c.SetDeadline(time.Now().Add(timeout))
	}
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("control socket %s: no answer: %w", path, err)
		}
		var resp Response
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("control socket %s: malformed answer: %w", path, err)
		}
		if resp.Progress != nil {
			if onProgress != nil {
				onProgress(resp)
			}
			continue
		}
		if !resp.OK {
			return &resp, errors.New(resp.Error)
		}
		return &resp, nil
	}
}

// predict samples the guest's writes and predicts every technique for a
// link of req.Bandwidth bytes/s (the daemon measured it or the user gave
// it). It needs dirty logging, so not while a migration runs.
func (s *Server) predict(req Request) Response {
	opts, err := req.Params.Options()
	if err != nil {
		return Response{Error: err.Error()}
	}
	s.migMu.Lock()
	busy := s.migrating != nil
	s.migMu.Unlock()
	if busy {
		return Response{Error: "a migration of this VM is running"}
	}
	sample := opts.SampleTime
	if sample < 2*time.Second {
		sample = 2 * time.Second // a dry run can afford a longer look
	}
	profile, err := migration.SampleDirty(context.Background(), s.vm, sample, 100*time.Millisecond)
	if err != nil {
		return Response{Error: fmt.Sprintf("sampling the guest's writes: %v", err)}
	}
	return Response{OK: true, Prediction: migration.Predict(profile, float64(req.Bandwidth), opts)}
}
