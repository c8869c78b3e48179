package trust

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// logBuffer collects JSON log records from concurrent goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) records(t *testing.T, msg string) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		if line == "" {
			continue
		}
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

func newLogger() (*slog.Logger, *logBuffer) {
	b := new(logBuffer)
	return slog.New(slog.NewJSONHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}

// host is one side of a test: an identity, its pool and its log.
type host struct {
	id   *Identity
	dir  string
	pool *Pool
	log  *slog.Logger
	logs *logBuffer
}

func newHost(t *testing.T) *host {
	t.Helper()
	id, dir := newIdentity(t)
	log, logs := newLogger()
	return &host{id: id, dir: dir, pool: openPool(t, dir), log: log, logs: logs}
}

func (h *host) trust(t *testing.T, other *host, addr string) {
	t.Helper()
	if err := h.pool.Add(Entry{Fingerprint: other.id.Fingerprint(), Name: other.id.Name(), Address: addr}); err != nil {
		t.Fatal(err)
	}
}

// serve listens on a loopback port and delivers accepted connections.
func (h *host) serve(t *testing.T) (net.Listener, <-chan net.Conn) {
	t.Helper()
	ln, err := Listen("tcp", "127.0.0.1:0", h.id, h.pool, h.log)
	if err != nil {
		t.Fatal(err)
	}
	return ln, acceptAll(t, ln)
}

func acceptAll(t *testing.T, ln net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept: %v", err)
				}
				return
			}
			ch <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(ch)
		for c := range ch {
			c.Close()
		}
	})
	return ch
}

func receive(t *testing.T, ch <-chan net.Conn) *tls.Conn {
	t.Helper()
	select {
	case c := <-ch:
		return c.(*tls.Conn)
	case <-time.After(5 * time.Second):
		t.Fatal("Accept returned nothing")
		return nil
	}
}

func expectNoAccept(t *testing.T, ch <-chan net.Conn) {
	t.Helper()
	select {
	case c := <-ch:
		t.Fatalf("Accept returned a connection from %v", c.RemoteAddr())
	case <-time.After(100 * time.Millisecond):
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

// mutualHosts returns a server and a client that trust each other, and
// the server's listener.
func mutualHosts(t *testing.T) (srv, cli *host, ln net.Listener, accepted <-chan net.Conn) {
	srv, cli = newHost(t), newHost(t)
	ln, accepted = srv.serve(t)
	srv.trust(t, cli, "")
	cli.trust(t, srv, ln.Addr().String())
	return srv, cli, ln, accepted
}

func exchange(t *testing.T, c, s *tls.Conn) {
	t.Helper()
	go func() {
		c.Write([]byte("ping"))
	}()
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("server read %q, %v", buf, err)
	}
	if _, err := s.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q, %v", buf, err)
	}
}

func TestMutualTLS(t *testing.T) {
	srv, cli, ln, accepted := mutualHosts(t)

	c, err := Dial(ctx(t), "tcp", ln.Addr().String(), cli.id, cli.pool, cli.log)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := receive(t, accepted)
	defer s.Close()
	exchange(t, c, s)

	for side, conn := range map[string]*tls.Conn{"client": c, "server": s} {
		if v := conn.ConnectionState().Version; v != tls.VersionTLS13 {
			t.Errorf("%s: version %#x, want TLS 1.3", side, v)
		}
	}
	if got := PeerFingerprint(c); got != srv.id.Fingerprint() {
		t.Errorf("client sees %s, want %s", got, srv.id.Fingerprint())
	}
	if got := PeerFingerprint(s); got != cli.id.Fingerprint() {
		t.Errorf("server sees %s, want %s", got, cli.id.Fingerprint())
	}
	if n := len(srv.logs.records(t, "refused untrusted peer")) + len(cli.logs.records(t, "refused untrusted peer")); n != 0 {
		t.Errorf("%d refusals logged", n)
	}
}

// The configurations work on their own, with crypto/tls's Listen and Dial.
func TestConfigsWithoutHelpers(t *testing.T) {
	srv, cli := newHost(t), newHost(t)
	srv.trust(t, cli, "")
	cli.trust(t, srv, "")
	cfg := ServerConfig(srv.id, srv.pool, srv.log)
	if cfg.MinVersion != tls.VersionTLS13 || cfg.MaxVersion != tls.VersionTLS13 || cfg.ClientAuth != tls.RequireAnyClientCert {
		t.Errorf("server config: versions %#x-%#x, client auth %v", cfg.MinVersion, cfg.MaxVersion, cfg.ClientAuth)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	// tls.Listen hands connections out before their handshake.
	type result struct {
		c   *tls.Conn
		err error
	}
	results := make(chan result, 4)
	hctx := ctx(t)
	go func() {
		var wg sync.WaitGroup
		defer func() {
			wg.Wait()
			close(results)
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := c.(*tls.Conn)
			wg.Go(func() { results <- result{tc, tc.HandshakeContext(hctx)} })
		}
	}()
	defer func() {
		ln.Close()
		for r := range results {
			r.c.Close()
		}
	}()
	next := func() result {
		select {
		case r := <-results:
			return r
		case <-time.After(5 * time.Second):
			t.Fatal("no server handshake")
			return result{}
		}
	}

	c, err := tls.Dial("tcp", ln.Addr().String(), ClientConfig(cli.id, cli.pool, cli.log))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := next()
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()
	exchange(t, c, r.c)

	// An untrusted client: the server's log has its address although
	// ServerConfig was used without Listen.
	stranger := newHost(t)
	c2, err := tls.Dial("tcp", ln.Addr().String(), ClientConfig(stranger.id, cli.pool, stranger.log))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	r = next()
	defer r.c.Close()
	var ue *UntrustedPeerError
	if !errors.As(r.err, &ue) || ue.Fingerprint != stranger.id.Fingerprint() || ue.Addr != c2.LocalAddr().String() {
		t.Fatalf("server handshake: %v", r.err)
	}
	recs := srv.logs.records(t, "refused untrusted peer")
	if len(recs) != 1 || recs[0]["remote"] != c2.LocalAddr().String() || recs[0]["fingerprint"] != stranger.id.Fingerprint() {
		t.Errorf("refusal log: %v", recs)
	}
}

func TestServerRefusesUntrustedClient(t *testing.T) {
	srv, cli := newHost(t), newHost(t)
	ln, accepted := srv.serve(t)
	cli.trust(t, srv, ln.Addr().String()) // but srv does not trust cli

	c, err := Dial(ctx(t), "tcp", ln.Addr().String(), cli.id, cli.pool, cli.log)
	if err != nil {
		// TLS 1.3: the client finishes its handshake before the server
		// has judged its certificate.
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	_, err = c.Read(make([]byte, 1))
	if err == nil || !RefusedByPeer(err) {
		t.Fatalf("client Read: %v, want a refusal alert", err)
	}
	expectNoAccept(t, accepted)

	recs := srv.logs.records(t, "refused untrusted peer")
	if len(recs) != 1 {
		t.Fatalf("server logged %d refusals: %s", len(recs), srv.logs.buf.String())
	}
	r := recs[0]
	if r["level"] != "WARN" || r["fingerprint"] != cli.id.Fingerprint() || r["remote"] != c.LocalAddr().String() ||
		r["role"] != "server" || r["peer_cn"] != cli.id.Name() || r["reason"] != reasonNotInPool {
		t.Errorf("refusal record: %v (client %s at %s)", r, cli.id.Fingerprint(), c.LocalAddr())
	}
	if RefusedByPeer(errors.New("tls: bad certificate")) || RefusedByPeer(nil) {
		t.Error("RefusedByPeer accepts a plain error")
	}
}

func TestClientRefusesUntrustedServer(t *testing.T) {
	srv, cli := newHost(t), newHost(t)
	ln, accepted := srv.serve(t)
	srv.trust(t, cli, "") // but cli does not trust srv

	_, err := Dial(ctx(t), "tcp", ln.Addr().String(), cli.id, cli.pool, cli.log)
	var ue *UntrustedPeerError
	if !errors.As(err, &ue) {
		t.Fatalf("Dial: %v, want *UntrustedPeerError", err)
	}
	if ue.Fingerprint != srv.id.Fingerprint() || ue.Addr != ln.Addr().String() || ue.Expected != "" {
		t.Errorf("error %+v, want fingerprint %s at %s", ue, srv.id.Fingerprint(), ln.Addr())
	}
	if !strings.Contains(err.Error(), srv.id.Fingerprint()) {
		t.Errorf("message %q lacks the fingerprint", err)
	}
	expectNoAccept(t, accepted)
	recs := cli.logs.records(t, "refused untrusted peer")
	if len(recs) != 1 || recs[0]["fingerprint"] != srv.id.Fingerprint() || recs[0]["remote"] != ln.Addr().String() || recs[0]["role"] != "client" {
		t.Errorf("client refusal log: %v", recs)
	}
	// The server sees the client's alert as an ordinary failed handshake.
	if n := len(srv.logs.records(t, "refused untrusted peer")); n != 0 {
		t.Errorf("server logged %d refusals", n)
	}
}

func TestPinnedClient(t *testing.T) {
	srv, cli := newHost(t), newHost(t)
	ln, accepted := srv.serve(t)
	srv.trust(t, cli, "")
	// cli's pool is empty: only the pin can make it accept srv.

	c, err := DialPinned(ctx(t), "tcp", ln.Addr().String(), cli.id, srv.id.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	s := receive(t, accepted)
	exchange(t, c, s)
	c.Close()
	s.Close()

	wrong := newHost(t).id.Fingerprint()
	_, err = DialPinned(ctx(t), "tcp", ln.Addr().String(), cli.id, wrong)
	var ue *UntrustedPeerError
	if !errors.As(err, &ue) || ue.Fingerprint != srv.id.Fingerprint() || ue.Expected != wrong {
		t.Fatalf("DialPinned(wrong): %v", err)
	}
	if !strings.Contains(err.Error(), "does not match the expected "+wrong) {
		t.Errorf("message %q", err)
	}
	if _, err := DialPinned(ctx(t), "tcp", ln.Addr().String(), cli.id, "SHA256:short"); err == nil {
		t.Error("DialPinned with an invalid fingerprint succeeded")
	}

	// The configuration alone.
	cfg, err := ClientConfigPinned(cli.id, srv.id.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	c, err = tls.Dial("tcp", ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	s = receive(t, accepted)
	exchange(t, c, s)
	c.Close()
	s.Close()
	cfg, err = ClientConfigPinned(cli.id, wrong)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tls.Dial("tcp", ln.Addr().String(), cfg); !errors.As(err, &ue) {
		t.Errorf("tls.Dial with the wrong pin: %v", err)
	}
	if _, err := ClientConfigPinned(cli.id, "nope"); err == nil {
		t.Error("ClientConfigPinned with an invalid fingerprint succeeded")
	}
}

func TestTLS12ClientRefused(t *testing.T) {
	_, cli, ln, accepted := mutualHosts(t)
	cfg := ClientConfig(cli.id, cli.pool, cli.log)
	cfg.MinVersion = tls.VersionTLS12
	cfg.MaxVersion = tls.VersionTLS12
	c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
	if err == nil {
		c.Close()
		t.Fatal("a TLS 1.2 client connected")
	}
	if !strings.Contains(err.Error(), "protocol version") {
		t.Errorf("error %v, want a protocol version alert", err)
	}
	expectNoAccept(t, accepted)
}

func TestSilentClientDoesNotBlockAccept(t *testing.T) {
	srv, cli := newHost(t), newHost(t)
	srv.trust(t, cli, "")
	cli.trust(t, srv, "")
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := newListener(inner, ServerConfig(srv.id, srv.pool, srv.log), srv.log, 500*time.Millisecond)
	accepted := acceptAll(t, ln)

	// Clients that connect and never say anything.
	var silent []net.Conn
	for range 3 {
		raw, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		silent = append(silent, raw)
	}
	time.Sleep(50 * time.Millisecond) // let the listener pick them up

	start := time.Now()
	c, err := Dial(ctx(t), "tcp", ln.Addr().String(), cli.id, cli.pool, cli.log)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := receive(t, accepted)
	defer s.Close()
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("trusted client waited %v behind silent ones", d)
	}
	exchange(t, c, s)

	// The silent clients are dropped after the handshake timeout.
	for _, raw := range silent {
		raw.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := raw.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			t.Errorf("silent client: read %v, want the connection closed", err)
		}
	}
	// The log record follows the close.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		n := len(srv.logs.records(t, "tls handshake failed"))
		if n == len(silent) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d failed handshakes logged, want %d", n, len(silent))
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestRemoveThenRefused(t *testing.T) {
	srv, cli, ln, accepted := mutualHosts(t)
	// Resumption would skip the certificate exchange: make sure it cannot
	// be used to get in after a removal.
	cfg := ClientConfig(cli.id, cli.pool, cli.log)
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)

	c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := receive(t, accepted)
	exchange(t, c, s)
	c.Close()
	s.Close()

	// `ferry nodes rm` edits the pool file from another process.
	cliProcess := openPool(t, srv.dir)
	if _, err := cliProcess.Remove(cli.id.Name()); err != nil {
		t.Fatal(err)
	}

	c, err = tls.Dial("tcp", ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.ConnectionState().DidResume {
		t.Error("session resumed")
	}
	if _, err := c.Read(make([]byte, 1)); !RefusedByPeer(err) {
		t.Fatalf("client Read after removal: %v", err)
	}
	expectNoAccept(t, accepted)
	recs := srv.logs.records(t, "refused untrusted peer")
	if len(recs) != 1 || recs[0]["fingerprint"] != cli.id.Fingerprint() {
		t.Errorf("refusal log: %v", recs)
	}
}

func TestClientWithCertificateChainRefused(t *testing.T) {
	srv, cli, ln, accepted := mutualHosts(t)
	cfg := ClientConfig(cli.id, cli.pool, cli.log)
	leaf := cli.id.TLSCertificate()
	leaf.Certificate = append(leaf.Certificate, srv.id.Certificate().Raw)
	cfg.Certificates = []tls.Certificate{leaf}
	c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Read(make([]byte, 1)); !RefusedByPeer(err) {
		t.Fatalf("client Read: %v", err)
	}
	expectNoAccept(t, accepted)
	recs := srv.logs.records(t, "refused untrusted peer")
	if len(recs) != 1 || recs[0]["fingerprint"] != cli.id.Fingerprint() || !strings.Contains(recs[0]["reason"].(string), "presented 2 certificates") {
		t.Errorf("refusal log: %v", recs)
	}
}

func TestListenerClose(t *testing.T) {
	srv := newHost(t)
	ln, err := Listen("tcp", "127.0.0.1:0", srv.id, srv.pool, srv.log)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Dial("tcp", ln.Addr().String()) // a handshake in progress
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	time.Sleep(20 * time.Millisecond)
	done := make(chan error)
	go func() {
		_, err := ln.Accept()
		done <- err
	}()
	start := time.Now()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Accept after Close: %v", err)
	}
	if err := ln.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
}
