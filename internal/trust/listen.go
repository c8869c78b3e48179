package trust

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"
)

// HandshakeTimeout bounds a TLS handshake in Listen's Accept and in Dial.
const HandshakeTimeout = 10 * time.Second

// maxPendingHandshakes bounds the handshakes a listener runs at once; when
// they are all in progress, new connections wait in the kernel's backlog.
const maxPendingHandshakes = 128

// Listen listens on network and addr (as net.Listen) and returns a listener
// whose Accept returns only *tls.Conn connections that completed a TLS 1.3
// handshake with a peer in pool (see ServerConfig).
func Listen(network, addr string, id *Identity, pool *Pool, log *slog.Logger) (net.Listener, error) {
	inner, err := net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	return NewListener(inner, id, pool, log), nil
}

// NewListener wraps inner like Listen does. Closing the returned listener
// closes inner.
//
// Handshakes run concurrently, each in its own goroutine and bounded by
// HandshakeTimeout, so a slow or silent client cannot hold up the others;
// Accept only hands out connections whose handshake succeeded. Refused
// peers are logged at Warn level ("refused untrusted peer"), other failed
// handshakes (timeouts, TLS 1.2 clients, scanners) at Debug level.
func NewListener(inner net.Listener, id *Identity, pool *Pool, log *slog.Logger) net.Listener {
	return newListener(inner, ServerConfig(id, pool, log), orDiscard(log), HandshakeTimeout)
}

type listener struct {
	inner   net.Listener
	cfg     *tls.Config
	log     *slog.Logger
	timeout time.Duration

	ctx    context.Context // canceled by Close: aborts handshakes
	cancel context.CancelFunc
	conns  chan *tls.Conn
	sem    chan struct{}
	failed chan struct{} // closed when the inner listener failed for good
	err    error         // why; written before failed is closed
	once   sync.Once
	wg     sync.WaitGroup
}

func newListener(inner net.Listener, cfg *tls.Config, log *slog.Logger, timeout time.Duration) *listener {
	ctx, cancel := context.WithCancel(context.Background())
	l := &listener{
		inner:   inner,
		cfg:     cfg,
		log:     log,
		timeout: timeout,
		ctx:     ctx,
		cancel:  cancel,
		conns:   make(chan *tls.Conn),
		sem:     make(chan struct{}, maxPendingHandshakes),
		failed:  make(chan struct{}),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l
}

func (l *listener) acceptLoop() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		select {
		case l.sem <- struct{}{}:
		case <-l.ctx.Done():
			return
		}
		raw, err := l.inner.Accept()
		if err != nil {
			<-l.sem
			if l.ctx.Err() != nil {
				return
			}
			if transientAcceptError(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				l.log.Warn("accept failed; retrying", "err", err, "delay", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-l.ctx.Done():
					return
				}
			}
			l.err = err
			close(l.failed)
			return
		}
		backoff = 0
		l.wg.Add(1)
		go l.handshake(raw)
	}
}

// transientAcceptError reports whether Accept may succeed if retried (out of
// file descriptors or memory, as net/http also assumes).
func transientAcceptError(err error) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (l *listener) handshake(raw net.Conn) {
	defer l.wg.Done()
	ctx, cancel := context.WithTimeout(l.ctx, l.timeout)
	c := tls.Server(raw, l.cfg)
	err := c.HandshakeContext(ctx)
	cancel()
	<-l.sem
	if err != nil {
		var ue *UntrustedPeerError
		if !errors.As(err, &ue) { // refusals are already logged
			l.log.Debug("tls handshake failed", "remote", raw.RemoteAddr().String(), "err", err)
		}
		raw.Close()
		return
	}
	select {
	case l.conns <- c:
	case <-l.ctx.Done():
		c.Close()
	}
}

// Accept returns the next connection that completed a trusted handshake.
// The net.Conn is a *tls.Conn.
func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.ctx.Done():
		return nil, &net.OpError{Op: "accept", Net: l.inner.Addr().Network(), Addr: l.inner.Addr(), Err: net.ErrClosed}
	case <-l.failed:
		return nil, l.err
	}
}

// Close stops listening, aborts handshakes in progress, closes connections
// not yet accepted and waits for its goroutines to finish.
func (l *listener) Close() error {
	err := net.ErrClosed
	l.once.Do(func() {
		l.cancel()
		err = l.inner.Close()
		l.wg.Wait()
	})
	return err
}

func (l *listener) Addr() net.Addr { return l.inner.Addr() }

// Dial connects to addr and completes a TLS 1.3 handshake (see
// ClientConfig), within ctx and at most HandshakeTimeout. If the server is
// not in pool the refusal is logged and the error is an
// *UntrustedPeerError.
//
// Whether the server accepted our certificate is known only at the first
// Read: if it refused, that Read fails with an error RefusedByPeer reports.
func Dial(ctx context.Context, network, addr string, id *Identity, pool *Pool, log *slog.Logger) (*tls.Conn, error) {
	return dial(ctx, network, addr, func(remote string) *tls.Config {
		return clientConfig(id, poolCheck(pool), "", remote, orDiscard(log))
	})
}

// DialPinned is Dial trusting only the server whose fingerprint is
// expectedFingerprint, whatever the pool says (see ClientConfigPinned). A
// mismatch is an *UntrustedPeerError with Expected set. It is not logged:
// the caller reports it to the operator.
func DialPinned(ctx context.Context, network, addr string, id *Identity, expectedFingerprint string) (*tls.Conn, error) {
	fp, err := ParseFingerprint(expectedFingerprint)
	if err != nil {
		return nil, err
	}
	return dial(ctx, network, addr, func(remote string) *tls.Config {
		return clientConfig(id, pinCheck(fp), fp, remote, orDiscard(nil))
	})
}

func dial(ctx context.Context, network, addr string, config func(remote string) *tls.Config) (*tls.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	remote := addr
	if ra := raw.RemoteAddr(); ra != nil {
		remote = ra.String()
	}
	c := tls.Client(raw, config(remote))
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}
