package migration

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/ferry-vmm/ferry/internal/wire"
)

// liveConn is a connection whose reads fail when nothing arrives for its
// timeout (once one is set): every read call pushes the deadline on, so a
// large message that is still arriving on a slow link is not taken for a
// dead link, while a silent one is.
type liveConn struct {
	net.Conn
	timeout atomic.Int64 // ns; 0: no liveness check
}

func (c *liveConn) Read(p []byte) (int, error) {
	if t := c.timeout.Load(); t > 0 {
		c.Conn.SetReadDeadline(time.Now().Add(time.Duration(t)))
	}
	return c.Conn.Read(p)
}

// link is one connection of a migration: the main connection or the
// post-copy request channel.
type link struct {
	nc   *liveConn
	conn *wire.Conn
}

func newLink(nc net.Conn) *link {
	lc := &liveConn{Conn: nc}
	return &link{nc: lc, conn: wire.NewConn(lc)}
}

// watch turns the liveness check on (timeout > 0) or off.
func (l *link) watch(timeout time.Duration) {
	if l != nil {
		l.nc.timeout.Store(int64(timeout))
	}
}

func (l *link) close() {
	if l != nil {
		l.nc.Close()
	}
}

// linkError names a channel's failure; a read deadline that passed means
// the peer's pings stopped arriving.
func linkError(channel string, err error, timeout time.Duration) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%s: nothing received for %s (link timeout): %w", channel, timeout, err)
	}
	return fmt.Errorf("%s: %w", channel, err)
}
