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

	"github.com/ferry-vmm/ferry/internal/snapshot"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// Request is one command to a VM.
type Request struct {
	Op       string `json:"op"` // "status", "pause", "resume", "save", "stop"
	Path     string `json:"path,omitempty"`
	Compress bool   `json:"compress,omitempty"`
	Resume   bool   `json:"resume,omitempty"`
}

// Status describes a running VM.
type Status struct {
	Name        string `json:"name"`
	PID         int    `json:"pid"`
	VCPUs       int    `json:"vcpus"`
	MemoryBytes uint64 `json:"memory_bytes"`
	Paused      bool   `json:"paused"`
	Uptime      string `json:"uptime"`
}

// Response answers a Request.
type Response struct {
	OK     bool                 `json:"ok"`
	Error  string               `json:"error,omitempty"`
	Status *Status              `json:"status,omitempty"`
	Save   *snapshot.SaveReport `json:"save,omitempty"`
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
	mu      sync.Mutex // one command at a time
	wg      sync.WaitGroup
}

// Serve listens on path for commands to vm. A stale socket left by a dead
// process is replaced; a live one is an error (two VMs with one name).
func Serve(path, name string, vm *vmm.VM, log *slog.Logger) (*Server, error) {
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
	} else {
		resp = s.handle(req)
	}
	b, _ := json.Marshal(resp)
	c.Write(append(b, '\n'))
}

func (s *Server) handle(req Request) Response {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log.Info("control request", "op", req.Op)
	switch req.Op {
	case "status":
		return Response{OK: true, Status: s.status()}
	case "pause":
		if err := s.vm.Pause(); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true, Status: s.status()}
	case "resume":
		s.vm.Resume()
		return Response{OK: true, Status: s.status()}
	case "stop":
		s.vm.Stop()
		return Response{OK: true}
	case "save":
		if req.Path == "" {
			return Response{Error: "save: no output path"}
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
	return &Status{
		Name: s.name, PID: os.Getpid(), VCPUs: s.vm.NumCPUs(), MemoryBytes: s.vm.Memory().Size(),
		Paused: s.vm.Paused(), Uptime: time.Since(s.started).Round(time.Millisecond).String(),
	}
}

// Call sends one request to the control socket at path.
func Call(path string, req Request, timeout time.Duration) (*Response, error) {
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
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("control socket %s: no answer: %w", path, err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("control socket %s: malformed answer: %w", path, err)
	}
	if !resp.OK {
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}
