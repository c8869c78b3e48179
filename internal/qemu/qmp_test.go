package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// These tests check the client's framing and parsing against a scripted
// peer; the real QEMU is exercised by the KVM tests in migrate_test.go.

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}`

// request is a command as the fake peer sees it.
type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// peer is the fake QEMU side of one connection.
type peer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func (p *peer) send(lines ...string) {
	for _, l := range lines {
		if _, err := p.conn.Write([]byte(l + "\r\n")); err != nil {
			p.t.Errorf("fake QMP: write: %v", err)
			return
		}
	}
}

func (p *peer) next() (request, bool) {
	line, err := p.r.ReadBytes('\n')
	if err != nil {
		return request{}, false
	}
	var req request
	if err := json.Unmarshal(line, &req); err != nil {
		p.t.Errorf("fake QMP: client sent %q: %v", line, err)
		return request{}, false
	}
	return req, true
}

// handshake answers the greeting and qmp_capabilities.
func (p *peer) handshake() bool {
	p.send(greeting)
	req, ok := p.next()
	if !ok || req.Execute != "qmp_capabilities" {
		p.t.Errorf("fake QMP: first command %+v", req)
		return false
	}
	p.send(fmt.Sprintf(`{"return": {}, "id": %s}`, req.ID))
	return true
}

// fakeQMP listens on a unix socket and runs script for the first
// connection. It returns the socket path.
func fakeQMP(t *testing.T, script func(p *peer)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		script(&peer{t: t, conn: conn, r: bufio.NewReader(conn)})
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return path
}

func dialTest(t *testing.T, path string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestClientExecuteAndEvents(t *testing.T) {
	path := fakeQMP(t, func(p *peer) {
		if !p.handshake() {
			return
		}
		req, _ := p.next()
		if req.Execute != "query-status" || req.Arguments != nil {
			t.Errorf("got %+v", req)
		}
		// Events may come before the answer to a command.
		p.send(`{"timestamp": {"seconds": 1795449576, "microseconds": 629751}, "event": "STOP"}`,
			`{"timestamp": {"seconds": 1795449576, "microseconds": 630281}, "event": "MIGRATION", "data": {"status": "active"}}`,
			fmt.Sprintf(`{"return": {"status": "running", "singlestep": false, "running": true}, "id": %s}`, req.ID))
		req, _ = p.next()
		if req.Execute != "migrate" || string(req.Arguments) != `{"uri":"tcp:127.0.0.1:4444"}` {
			t.Errorf("got %+v", req)
		}
		p.send(fmt.Sprintf(`{"return": {}, "id": %s}`, req.ID))
		time.Sleep(50 * time.Millisecond)
		p.send(`{"timestamp": {"seconds": 1795449577, "microseconds": 1}, "event": "RESUME"}`)
		p.next() // until the client closes
	})
	c := dialTest(t, path)
	if v := c.Version(); v.Major != 7 || v.Minor != 2 || v.Micro != 22 || !strings.HasPrefix(v.String(), "7.2.22 (Debian") {
		t.Fatalf("version %+v", v)
	}
	ctx := context.Background()
	st, err := c.QueryStatus(ctx)
	if err != nil || st.Status != "running" || !st.Running {
		t.Fatalf("QueryStatus = %+v, %v", st, err)
	}
	mark := c.EventCount()
	if mark != 2 {
		t.Fatalf("%d events before the answer, want 2", mark)
	}
	evs := c.Events()
	if evs[0].Name != "STOP" || evs[1].MigrationStatus() != StatusActive || evs[0].MigrationStatus() != "" {
		t.Fatalf("events %+v", evs)
	}
	if want := time.Unix(1795449576, 629751000); !evs[0].Time.Equal(want) || evs[0].Arrived.IsZero() || evs[1].Seq != 1 {
		t.Fatalf("event 0 at %v (want %v), arrived %v", evs[0].Time, want, evs[0].Arrived)
	}
	if err := c.Migrate(ctx, "tcp:127.0.0.1:4444"); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ev, err := c.WaitEvent(wctx, mark, Named("RESUME"))
	if err != nil || ev.Seq != 2 {
		t.Fatalf("WaitEvent = %+v, %v", ev, err)
	}
	// An event already in the log is found at once; a mark past it is not.
	if ev, err := c.WaitEvent(wctx, 0, Named("STOP")); err != nil || ev.Seq != 0 {
		t.Fatalf("WaitEvent(STOP) = %+v, %v", ev, err)
	}
	short, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := c.WaitEvent(short, 1, Named("STOP")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitEvent for a STOP after the mark: %v", err)
	}
}

func TestClientQMPError(t *testing.T) {
	path := fakeQMP(t, func(p *peer) {
		if !p.handshake() {
			return
		}
		req, _ := p.next()
		p.send(fmt.Sprintf(`{"error": {"class": "GenericError", "desc": "Parameter 'downtime-limit' expects uint64"}, "id": %s}`, req.ID))
		req, _ = p.next()
		p.send(fmt.Sprintf(`{"return": [{"state": false, "capability": "xbzrle"}, {"state": true, "capability": "events"}], "id": %s}`, req.ID))
		p.next()
	})
	c := dialTest(t, path)
	ctx := context.Background()
	err := c.SetParameters(ctx, map[string]any{"downtime-limit": "x"})
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Command != "migrate-set-parameters" || !strings.Contains(err.Error(), "expects uint64") {
		t.Fatalf("err = %v (%#v)", err, qe)
	}
	caps, err := c.QueryCapabilities(ctx)
	if err != nil || len(caps) != 2 || caps["xbzrle"] || !caps["events"] {
		t.Fatalf("caps %v, %v", caps, err)
	}
}

// A command whose context ends gives up; its late answer must not be
// taken for the next command's.
func TestClientLateAnswerDropped(t *testing.T) {
	path := fakeQMP(t, func(p *peer) {
		if !p.handshake() {
			return
		}
		first, _ := p.next()
		second, _ := p.next()
		p.send(fmt.Sprintf(`{"return": {"status": "paused", "running": false}, "id": %s}`, first.ID),
			fmt.Sprintf(`{"return": {"status": "running", "running": true}, "id": %s}`, second.ID))
		third, _ := p.next()
		// No id (QEMU could not parse the command): goes to the oldest
		// command waiting.
		_ = third
		p.send(`{"error": {"class": "GenericError", "desc": "JSON parse error"}}`)
		p.next()
	})
	c := dialTest(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.QueryStatus(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("first command: %v", err)
	}
	st, err := c.QueryStatus(context.Background())
	if err != nil || st.Status != "running" {
		t.Fatalf("second command got %+v, %v", st, err)
	}
	err = c.Stop(context.Background())
	if err == nil || !strings.Contains(err.Error(), "JSON parse error") {
		t.Fatalf("id-less error: %v", err)
	}
}

func TestClientBrokenPeer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply string // after the command; "" closes the connection
		want  string
	}{
		{"not JSON", "hello, I am not QMP", "malformed message"},
		{"array", `[1, 2]`, "malformed message"},
		{"two kinds", `{"return": {}, "event": "STOP"}`, "exactly one of"},
		{"bad error", `{"error": "nope"}`, "malformed error reply"},
		{"bad timestamp", `{"event": "STOP", "timestamp": 3}`, "malformed event timestamp"},
		{"second greeting", greeting, "unexpected greeting"},
		{"half a message", `{"return": {"status": `, "middle of a message"},
		{"closed", "", "connection closed by QEMU"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeQMP(t, func(p *peer) {
				if !p.handshake() {
					return
				}
				if _, ok := p.next(); !ok {
					return
				}
				if tc.reply == "" {
					return
				}
				if strings.HasSuffix(tc.reply, " ") {
					p.conn.Write([]byte(tc.reply)) // no newline, then close
					return
				}
				p.send(tc.reply)
				p.next()
			})
			c := dialTest(t, path)
			_, err := c.QueryMigrate(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("client still up after a broken stream")
			}
			if _, err := c.QueryStatus(context.Background()); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("after the failure: %v", err)
			}
		})
	}
}

func TestClientNotQMP(t *testing.T) {
	path := fakeQMP(t, func(p *peer) {
		p.send(`{"return": {}}`)
		p.next()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := Dial(ctx, path); err == nil || !strings.Contains(err.Error(), "expected the QMP greeting") {
		t.Fatalf("Dial = %v", err)
	}
}

func TestClientSilentPeer(t *testing.T) {
	path := fakeQMP(t, func(p *peer) { p.next() })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := Dial(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial = %v", err)
	}
}

func TestDialWaitsForSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "late.sock")
	served := make(chan struct{})
	go func() {
		defer close(served)
		time.Sleep(150 * time.Millisecond)
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		p := &peer{t: t, conn: conn, r: bufio.NewReader(conn)}
		if p.handshake() {
			p.next()
		}
	}()
	c := dialTest(t, path)
	c.Close()
	<-served

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, filepath.Join(t.TempDir(), "never.sock"))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "never.sock") {
		t.Fatalf("Dial to a missing socket: %v", err)
	}
}

func TestClientConcurrentCommands(t *testing.T) {
	const n = 20
	path := fakeQMP(t, func(p *peer) {
		if !p.handshake() {
			return
		}
		for {
			req, ok := p.next()
			if !ok {
				return
			}
			var args struct {
				URI string `json:"uri"`
			}
			json.Unmarshal(req.Arguments, &args)
			p.send(`{"event": "MIGRATION_PASS", "data": {"pass": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}`)
			p.send(fmt.Sprintf(`{"return": {"status": %q}, "id": %s}`, args.URI, req.ID))
		}
	})
	c := dialTest(t, path)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var info MigrationInfo
			want := fmt.Sprintf("s%d", i)
			if err := c.Execute(context.Background(), "echo", map[string]string{"uri": want}, &info); err != nil || string(info.Status) != want {
				t.Errorf("command %d: %+v, %v", i, info, err)
			}
		})
	}
	wg.Wait()
	if got := c.EventCount(); got != n {
		t.Fatalf("%d events, want %d", got, n)
	}
}

func FuzzParseMessage(f *testing.F) {
	for _, s := range []string{
		greeting,
		`{"return": {}}`,
		`{"return": {}, "id": 7}`,
		`{"return": {"status": "completed", "setup-time": 1, "downtime": 29, "total-time": 333, "ram": {"total": 268513280, "mbps": 2702.27}}, "id": 3}`,
		`{"error": {"class": "CommandNotFound", "desc": "The command bogus-cmd has not been found"}, "id": "x"}`,
		`{"timestamp": {"seconds": 1795449576, "microseconds": 318480}, "event": "MIGRATION", "data": {"status": "setup"}}`,
		`{"event": "STOP"}`,
		`{"event": 3}`,
		`{"QMP": null}`,
		`null`,
		`[]`,
		``,
		`{"return": {}, "event": "x"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMessage(b)
		if err != nil {
			if m.kind != 0 {
				t.Fatalf("error %v with a message kind %v", err, m.kind)
			}
			return
		}
		switch m.kind {
		case kindGreeting, kindError:
		case kindReturn:
			if !json.Valid(m.ret) {
				t.Fatalf("reply value %q is not JSON", m.ret)
			}
		case kindEvent:
			_ = m.event.MigrationStatus()
		default:
			t.Fatalf("parsed %q as kind %v", b, m.kind)
		}
		if !json.Valid(b) {
			t.Fatalf("accepted invalid JSON %q", b)
		}
	})
}

// FuzzClientStream feeds arbitrary bytes to a client as QEMU's side of
// the session: a command must end with an answer or an error, never a
// panic or a hang.
func FuzzClientStream(f *testing.F) {
	f.Add([]byte(`{"return": {"status": "running", "running": true}, "id": 2}` + "\n"))
	f.Add([]byte(`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}` + "\n" + `{"return": {}, "id": 2}` + "\n"))
	f.Add([]byte(`{"error": {"class": "GenericError", "desc": "no"}}` + "\n"))
	f.Add([]byte("\n\n{\"return\": 1, \"id\": 2}\r\n"))
	f.Add([]byte(`{"return": {"status": 5}, "id": 2}` + "\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, stream []byte) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			defer b.Close()
			r := bufio.NewReader(b)
			b.Write([]byte(greeting + "\n"))
			r.ReadBytes('\n')
			b.Write([]byte(`{"return": {}, "id": 1}` + "\n"))
			r.ReadBytes('\n')
			b.Write(stream)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := NewClient(ctx, a)
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		_, err = c.QueryStatus(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("client hung on %q", stream)
		}
	})
}

// QEMU writes a message in pieces; only whole non-warning lines count as
// its last error.
func TestStderrTail(t *testing.T) {
	var tl tail
	for _, p := range []string{"qemu-system-x86_64: warning: host doesn't support requested feature\n", "qemu-system-x86_64: ", "Failed to connect", ": Connection refused\nqemu-system-x86_64: warning: later\n", "partial"} {
		tl.Write([]byte(p))
	}
	msg, at := tl.lastError()
	if msg != "qemu-system-x86_64: Failed to connect: Connection refused" || at.IsZero() {
		t.Fatalf("last error %q at %v", msg, at)
	}
	tl.Write([]byte(strings.Repeat("x", 3*tailSize)))
	if got := tl.String(); len(got) != tailSize {
		t.Fatalf("tail keeps %d bytes", len(got))
	}
}
