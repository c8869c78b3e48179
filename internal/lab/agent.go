package lab

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The agent runs inside a lab host (`ferry lab-agent`, started by the
// host's /init) and is the lab's only way in: HTTP/1.1 on the host's
// control NIC, reached from outside through QEMU's user-mode network
// (hostfwd on 127.0.0.1, restrict=on: the host cannot reach out). Every
// request carries the per-run token the host got on its kernel command
// line.
//
//	GET  /ping                     → 200 "ok"
//	POST /exec   ExecRequest JSON  → 200, frames (frame.go) until the end
//	PUT  /file?path=P&mode=0755    ← body: the file's bytes (≤ maxPut)
//	GET  /file?path=P              → the file's bytes
//
// A command runs in its own process group; when the request goes away
// (client cancelled, link died) or its timeout passes, the whole group is
// killed. Output is streamed as it comes.

// ExecRequest is one command to run in a lab host.
type ExecRequest struct {
	Argv    []string `json:"argv"`
	Env     []string `json:"env,omitempty"` // added to the agent's environment
	Dir     string   `json:"dir,omitempty"`
	Stdin   []byte   `json:"stdin,omitempty"`
	Timeout Duration `json:"timeout,omitempty"` // 0 = until the request ends
}

// ExecResult is the end of an exec stream.
type ExecResult struct {
	Code  int    `json:"code"`            // exit status; -1 if killed by a signal or not started
	Error string `json:"error,omitempty"` // why it did not start, or the signal
}

// Duration is a time.Duration that reads and writes as "1.5s" in JSON.
type Duration time.Duration

// MarshalJSON writes d as a Go duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

const (
	maxRequest = 1 << 20  // an ExecRequest, stdin included
	maxPut     = 1 << 30  // one uploaded file
	tokenMin   = 16       // bytes of token the agent insists on
	chunk      = 64 << 10 // output read size
)

// Agent serves the lab's requests inside a host.
type Agent struct {
	token []byte
	log   *slog.Logger
}

// NewAgent returns an agent that accepts requests bearing token.
func NewAgent(token string, log *slog.Logger) (*Agent, error) {
	token = strings.TrimSpace(token)
	if len(token) < tokenMin {
		return nil, fmt.Errorf("lab agent: token of %d bytes, need at least %d", len(token), tokenMin)
	}
	return &Agent{token: []byte(token), log: log}, nil
}

// Serve answers requests on l until ctx ends.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("POST /exec", a.exec)
	mux.HandleFunc("PUT /file", a.put)
	mux.HandleFunc("GET /file", a.get)
	srv := &http.Server{Handler: a.auth(mux), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (a *Agent) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "))
		if subtle.ConstantTimeCompare(got, a.token) != 1 {
			http.Error(w, "lab agent: wrong or missing token", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (a *Agent) exec(w http.ResponseWriter, r *http.Request) {
	var req ExecRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, maxRequest)).Decode(&req); err != nil {
		http.Error(w, "lab agent: bad exec request: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(req.Argv) == 0 || req.Argv[0] == "" {
		http.Error(w, "lab agent: empty argv", http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.Timeout))
		defer cancel()
	}
	w.Header().Set("Content-Type", "application/x-ferry-lab-frames")
	w.WriteHeader(http.StatusOK)
	out := &frameSink{w: w, rc: http.NewResponseController(w)}
	res := runCommand(ctx, req, out)
	a.log.Info("exec", "argv", req.Argv, "code", res.Code, "error", res.Error)
	b, _ := json.Marshal(res)
	out.frame(frameExit, b)
}

// frameSink serialises frames from the stdout and stderr copiers.
type frameSink struct {
	mu  sync.Mutex
	w   io.Writer
	rc  *http.ResponseController
	err error
}

func (s *frameSink) frame(kind byte, p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return
	}
	if s.err = writeFrame(s.w, kind, p); s.err == nil {
		s.err = s.rc.Flush()
	}
}

type streamWriter struct {
	s    *frameSink
	kind byte
}

func (sw streamWriter) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		n := min(len(p), chunk)
		sw.s.frame(sw.kind, p[:n])
		p = p[n:]
	}
	return total, nil
}

// runCommand runs req in its own process group, streaming its output,
// and kills the group when ctx ends.
func runCommand(ctx context.Context, req ExecRequest, out *frameSink) ExecResult {
	cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.Dir = req.Dir
	cmd.Stdin = strings.NewReader(string(req.Stdin))
	cmd.Stdout = streamWriter{out, frameStdout}
	cmd.Stderr = streamWriter{out, frameStderr}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Output copiers stop waiting for pipes a background child still holds
	// once the command itself has ended.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return ExecResult{Code: -1, Error: err.Error()}
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		case <-done:
		}
	}()
	err := cmd.Wait()
	close(done)
	if ctx.Err() != nil {
		return ExecResult{Code: -1, Error: "killed: " + ctx.Err().Error()}
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		return ExecResult{Code: 0}
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return ExecResult{Code: -1, Error: "signal: " + ws.Signal().String()}
		}
		return ExecResult{Code: ee.ExitCode()}
	case errors.Is(err, exec.ErrWaitDelay):
		return ExecResult{Code: cmd.ProcessState.ExitCode()}
	default:
		return ExecResult{Code: -1, Error: err.Error()}
	}
}

func filePath(r *http.Request) (string, error) {
	p := r.URL.Query().Get("path")
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("lab agent: path %q is not absolute", p)
	}
	return filepath.Clean(p), nil
}

func (a *Agent) put(w http.ResponseWriter, r *http.Request) {
	p, err := filePath(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	mode := uint64(0o644)
	if m := r.URL.Query().Get("mode"); m != "" {
		if mode, err = strconv.ParseUint(m, 8, 32); err != nil || mode > 0o7777 {
			http.Error(w, "lab agent: bad mode "+m, http.StatusBadRequest)
			return
		}
	}
	if r.ContentLength > maxPut {
		http.Error(w, fmt.Sprintf("lab agent: %d bytes exceed the %d-byte limit", r.ContentLength, maxPut), http.StatusRequestEntityTooLarge)
		return
	}
	if err := writeFileAtomic(p, io.LimitReader(r.Body, maxPut+1), os.FileMode(mode)); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	a.log.Info("put", "path", p)
}

func writeFileAtomic(p string, r io.Reader, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	n, err := io.Copy(f, r)
	if err == nil && n > maxPut {
		err = fmt.Errorf("lab agent: upload exceeds %d bytes", maxPut)
	}
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("lab agent: writing %s: %w", p, err)
	}
	return os.Rename(f.Name(), p)
}

func (a *Agent) get(w http.ResponseWriter, r *http.Request) {
	p, err := filePath(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f, err := os.Open(p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	io.Copy(w, f)
}
