package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// maxMessage bounds one QMP message (one line). The largest replies ferry
// asks for (query-migrate, query-migrate-parameters) are a few KiB; the
// bound only keeps a broken peer from making the client buffer without end.
const maxMessage = 16 << 20

// ErrClosed is returned by commands on a client that was closed.
var ErrClosed = errors.New("qmp: client closed")

// Error is an error QEMU returned for a command: its class (GenericError,
// CommandNotFound, DeviceNotActive, ...) and its human-readable desc.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Version is QEMU's version from the QMP greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string // distribution build, e.g. "Debian 1:7.2+dfsg-7"
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	if v.Package != "" {
		s += " (" + v.Package + ")"
	}
	return s
}

// Event is an asynchronous QMP event (MIGRATION, STOP, RESUME, SHUTDOWN,
// MIGRATION_PASS, ...).
type Event struct {
	Seq  int    // position in the client's event log, from 0
	Name string // "STOP", "MIGRATION", ...
	Data json.RawMessage
	// Time is QEMU's own timestamp (host wall clock when QEMU emitted the
	// event). It is what migration timings use: the client may read the
	// event later than it happened when it is busy.
	Time time.Time
	// Arrived is when the client read the event.
	Arrived time.Time
}

// MigrationStatus is the status carried by a MIGRATION event ("" for
// other events).
func (e Event) MigrationStatus() MigrationStatus {
	if e.Name != "MIGRATION" {
		return ""
	}
	var d struct {
		Status MigrationStatus `json:"status"`
	}
	_ = json.Unmarshal(e.Data, &d) // a malformed payload simply has no status
	return d.Status
}

// Client is a QMP connection to one QEMU. Commands may be issued from
// several goroutines; QEMU answers them in order and the client matches
// answers to commands by id. Events that arrive in between are kept in a
// log, in order, with their arrival time.
type Client struct {
	conn    net.Conn
	version Version

	writeMu sync.Mutex // one command on the wire at a time

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan message
	events  []Event
	signal  chan struct{} // closed and replaced on every event
	err     error         // why the connection ended; set once
	done    chan struct{} // closed when the read loop ends
}

// Dial connects to the QMP unix socket at path, retrying until it accepts
// (QEMU creates the socket shortly after it starts) or ctx ends, then
// reads the greeting and leaves capabilities negotiation mode.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	delay := 5 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			c, err := NewClient(ctx, conn)
			if err != nil {
				return nil, fmt.Errorf("qmp %s: %w", path, err)
			}
			return c, nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last attempt: %v)", path, ctx.Err(), err)
		case <-t.C:
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

// NewClient runs the QMP handshake on conn (greeting, qmp_capabilities)
// and returns a client that owns conn. ctx bounds the handshake only.
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	r := bufio.NewReaderSize(conn, 64<<10)
	// The greeting is read here rather than by the read loop so that a peer
	// that is not QMP fails the handshake instead of the first command.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	line, err := readMessage(r)
	if !stop() || ctx.Err() != nil {
		conn.Close()
		return nil, fmt.Errorf("reading the QMP greeting: %w", ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading the QMP greeting: %w", err)
	}
	m, err := parseMessage(line)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading the QMP greeting: %w", err)
	}
	if m.kind != kindGreeting {
		conn.Close()
		return nil, fmt.Errorf("expected the QMP greeting, got a %s", m.kind)
	}
	c := &Client{
		conn:    conn,
		version: m.version,
		pending: map[uint64]chan message{},
		signal:  make(chan struct{}),
		done:    make(chan struct{}),
	}
	go c.readLoop(r)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Version is the QEMU version the greeting announced.
func (c *Client) Version() Version { return c.version }

// Close closes the connection. Commands in flight fail with ErrClosed.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	<-c.done
	return nil
}

// Done is closed when the connection has ended (closed, QEMU gone, or a
// malformed message); Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended, nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// fail ends the connection with err (the first reason wins).
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close() // unblocks the read loop, which closes done
}

func (c *Client) readLoop(r *bufio.Reader) {
	defer close(c.done)
	for {
		line, err := readMessage(r)
		now := time.Now()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("qmp: connection closed by QEMU: %w", err)
			} else {
				err = fmt.Errorf("qmp: reading: %w", err)
			}
			c.fail(err)
			return
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		m, err := parseMessage(line)
		if err != nil {
			// The stream cannot be trusted past a message we do not
			// understand: answers could be matched to the wrong command.
			c.fail(err)
			return
		}
		switch m.kind {
		case kindEvent:
			c.mu.Lock()
			m.event.Seq = len(c.events)
			m.event.Arrived = now
			c.events = append(c.events, m.event)
			close(c.signal)
			c.signal = make(chan struct{})
			c.mu.Unlock()
		case kindReturn, kindError:
			c.deliver(m)
		default:
			c.fail(fmt.Errorf("qmp: unexpected %s in the middle of a session", m.kind))
			return
		}
	}
}

// deliver hands an answer to the command waiting for it. An answer whose
// command gave up (its context ended) is dropped; one without an id (QEMU
// could not even parse the command) goes to the oldest command, since
// QEMU answers in order.
func (c *Client) deliver(m message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id, ok := m.id, m.hasID
	if !ok {
		first := true
		for k := range c.pending {
			if first || k < id {
				id, first = k, false
			}
		}
		if first {
			return
		}
	}
	if ch, ok := c.pending[id]; ok {
		delete(c.pending, id)
		ch <- m
	}
}

// Execute runs a QMP command. args (may be nil) is marshalled as the
// command's arguments; the reply's "return" value is unmarshalled into
// result when result is not nil. A QEMU error comes back as *Error. When
// ctx ends first, Execute returns ctx's error, but QEMU may still carry
// the command out.
func (c *Client) Execute(ctx context.Context, command string, args any, result any) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	c.nextID++
	id := c.nextID
	ch := make(chan message, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("qmp %s: encoding arguments: %w", command, err)
	}
	if err := c.write(ctx, append(b, '\n')); err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", command, err)
	}

	select {
	case m := <-ch:
		return decodeReply(command, m, result)
	case <-ctx.Done():
		forget()
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	case <-c.done:
		forget()
		// The answer may have been delivered just before the loop ended.
		select {
		case m := <-ch:
			return decodeReply(command, m, result)
		default:
		}
		return fmt.Errorf("qmp %s: %w", command, c.Err())
	}
}

func decodeReply(command string, m message, result any) error {
	if m.kind == kindError {
		return &Error{Command: command, Class: m.errClass, Desc: m.errDesc}
	}
	if result != nil {
		if err := json.Unmarshal(m.ret, result); err != nil {
			return fmt.Errorf("qmp %s: decoding the reply %.200s: %w", command, m.ret, err)
		}
	}
	return nil
}

// write sends one command. A write cut short by ctx leaves half a command
// on the wire, so it ends the connection.
func (c *Client) write(ctx context.Context, b []byte) error {
	if err := ctx.Err(); err != nil {
		return err // nothing written: the connection stays usable
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = c.conn.SetWriteDeadline(time.Now())
		close(fired)
	})
	_, err := c.conn.Write(b)
	if !stop() {
		<-fired
		if err == nil {
			// The whole command went out before the deadline bit: keep
			// the connection, without the deadline.
			_ = c.conn.SetWriteDeadline(time.Time{})
		}
	}
	if err != nil {
		c.fail(fmt.Errorf("qmp: writing a command: %w", err))
		return fmt.Errorf("writing: %w", err)
	}
	return nil
}

// Events returns the events received so far, in order of arrival.
func (c *Client) Events() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Event(nil), c.events...)
}

// EventCount is the number of events received so far: a mark to pass to
// WaitEvent so that only later events count.
func (c *Client) EventCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.events)
}

// WaitEvent returns the first event with Seq >= from for which match
// returns true, waiting for it until ctx ends or the connection does.
func (c *Client) WaitEvent(ctx context.Context, from int, match func(Event) bool) (Event, error) {
	for {
		c.mu.Lock()
		for i := max(from, 0); i < len(c.events); i++ {
			if match(c.events[i]) {
				ev := c.events[i]
				c.mu.Unlock()
				return ev, nil
			}
		}
		from = len(c.events)
		signal, err := c.signal, c.err
		c.mu.Unlock()
		if err != nil {
			return Event{}, fmt.Errorf("qmp: waiting for an event: %w", err)
		}
		select {
		case <-signal:
		case <-c.done:
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: waiting for an event: %w", ctx.Err())
		}
	}
}

// Named matches events by name, for WaitEvent.
func Named(name string) func(Event) bool {
	return func(e Event) bool { return e.Name == name }
}

// nextEvent is closed when the next event arrives (or the connection
// ends): lets a poll loop wake up at once on a state change.
func (c *Client) nextEvent() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.done
	}
	return c.signal
}

// findEvent is the first event in the log with Seq >= from that matches.
func (c *Client) findEvent(from int, match func(Event) bool) (Event, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := max(from, 0); i < len(c.events); i++ {
		if match(c.events[i]) {
			return c.events[i], true
		}
	}
	return Event{}, false
}

// readMessage reads one line. QEMU ends every QMP message with a newline
// and never puts one inside (it does not pretty-print on QMP sockets).
func readMessage(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(line)+len(frag) > maxMessage {
			return nil, fmt.Errorf("qmp: message longer than %d bytes", maxMessage)
		}
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(bytes.TrimSpace(line)) > 0:
			return nil, fmt.Errorf("qmp: connection closed in the middle of a message %.200q: %w", line, io.ErrUnexpectedEOF)
		default:
			return nil, err
		}
	}
}

type messageKind int

const (
	kindGreeting messageKind = iota + 1
	kindReturn
	kindError
	kindEvent
)

func (k messageKind) String() string {
	switch k {
	case kindGreeting:
		return "greeting"
	case kindReturn:
		return "reply"
	case kindError:
		return "error reply"
	case kindEvent:
		return "event"
	}
	return "unknown message"
}

// message is one parsed QMP message.
type message struct {
	kind     messageKind
	version  Version         // greeting
	ret      json.RawMessage // reply
	errClass string          // error reply
	errDesc  string
	id       uint64 // reply or error reply, when hasID
	hasID    bool
	event    Event // Name, Data, Time
}

// parseMessage parses one QMP message: a JSON object with exactly one of
// "QMP" (greeting), "return", "error" or "event".
func parseMessage(line []byte) (message, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(line, &top); err != nil {
		return message{}, fmt.Errorf("qmp: malformed message %.200q: %w", line, err)
	}
	if top == nil {
		return message{}, fmt.Errorf("qmp: malformed message %.200q: not a JSON object", line)
	}
	var kinds []string
	for _, k := range []string{"QMP", "return", "error", "event"} {
		if _, ok := top[k]; ok {
			kinds = append(kinds, k)
		}
	}
	if len(kinds) != 1 {
		return message{}, fmt.Errorf("qmp: malformed message %.200q: want exactly one of QMP, return, error, event; got %v", line, kinds)
	}
	bad := func(what string, err error) (message, error) {
		return message{}, fmt.Errorf("qmp: malformed %s %.200q: %w", what, line, err)
	}
	var m message
	switch kinds[0] {
	case "QMP":
		var g struct {
			Version struct {
				QEMU struct {
					Major, Minor, Micro int
				} `json:"qemu"`
				Package string `json:"package"`
			} `json:"version"`
		}
		if err := strictObject(top["QMP"], &g); err != nil {
			return bad("greeting", err)
		}
		m.kind = kindGreeting
		v := g.Version
		m.version = Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}
		return m, nil
	case "return":
		m.kind = kindReturn
		m.ret = top["return"]
	case "error":
		var e struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		}
		if err := strictObject(top["error"], &e); err != nil {
			return bad("error reply", err)
		}
		m.kind, m.errClass, m.errDesc = kindError, e.Class, e.Desc
	case "event":
		m.kind = kindEvent
		if err := json.Unmarshal(top["event"], &m.event.Name); err != nil {
			return bad("event name", err)
		}
		m.event.Data = top["data"]
		if ts, ok := top["timestamp"]; ok {
			var t struct {
				Seconds      int64 `json:"seconds"`
				Microseconds int64 `json:"microseconds"`
			}
			if err := strictObject(ts, &t); err != nil {
				return bad("event timestamp", err)
			}
			m.event.Time = time.Unix(t.Seconds, t.Microseconds*1000)
		}
		return m, nil
	}
	if raw, ok := top["id"]; ok {
		// ferry only sends numeric ids; anything else was not ours and
		// matches no command.
		if err := json.Unmarshal(raw, &m.id); err != nil {
			m.id = 0
		}
		m.hasID = true
	}
	return m, nil
}

// strictObject unmarshals a JSON object into v, rejecting null and
// non-objects, which json.Unmarshal would accept into a struct silently
// (null) or report in terms of Go types.
func strictObject(raw json.RawMessage, v any) error {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || t[0] != '{' {
		return fmt.Errorf("not a JSON object")
	}
	return json.Unmarshal(raw, v)
}
