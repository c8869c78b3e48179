package wire

import (
	"bufio"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sync"
	"sync/atomic"
)

// Config configures a Conn. The zero value is right for protocol version 1.
type Config struct {
	// Stream is the stream number written in every frame; a received
	// frame must carry the same. Protocol version 1 uses stream 0 only.
	Stream uint16
	// FramePayload is the largest payload WriteMsg puts in one frame
	// before it continues the message in another: 0 means
	// MaxFramePayload, larger values are capped to it.
	FramePayload int
	// MaxMessage bounds the payload of a received message reassembled
	// from several frames: 0 means MaxMessage, larger values are capped
	// to it.
	MaxMessage int
}

// Stats counts what a Conn sent and received, framing included.
type Stats struct {
	BytesSent, FramesSent, MessagesSent             uint64
	BytesReceived, FramesReceived, MessagesReceived uint64
	// Skipped counts received messages of unknown types that were marked
	// optional and skipped.
	Skipped uint64
}

// Conn reads and writes messages on a stream. WriteMsg may be called by
// several goroutines at once: each message's frames are written together,
// in one Write call per frame. ReadMsg is meant for one reading goroutine
// (calls are serialized). Reading and writing are independent; a side that
// writes much (the source's pages) must keep reading in another goroutine
// so that the peer never blocks writing its replies.
//
// Conn buffers its reads; it does no buffering of writes beyond one frame.
// After a read error every ReadMsg returns that error, after a write error
// every WriteMsg returns that one: the stream is out of step and the
// migration over.
type Conn struct {
	stream       uint16
	framePayload int
	maxMessage   int

	wmu  sync.Mutex
	w    io.Writer
	wseq uint64
	werr error

	rmu  sync.Mutex
	r    *bufio.Reader
	rseq uint64
	rerr error

	bytesSent, framesSent, messagesSent             atomic.Uint64
	bytesReceived, framesReceived, messagesReceived atomic.Uint64
	skipped                                         atomic.Uint64
}

// readBufferSize is the size of a Conn's read buffer.
const readBufferSize = 64 << 10

// readStep is how much of a frame payload is read at a time beyond
// preallocLimit, growing the buffer only as data arrives.
const readStep = 64 << 10

// preallocLimit is how much of a frame's announced payload is allocated
// before any of it arrived: enough for a Pages message with a full
// memory chunk, so that the common frame is read into one allocation.
const preallocLimit = 1<<20 + 64<<10

// NewConn returns a Conn that reads and writes frames on rw, configured
// for protocol version 1 (stream 0, default limits).
func NewConn(rw io.ReadWriter) *Conn { return NewConnConfig(rw, Config{}) }

// NewConnConfig returns a Conn that reads and writes frames on rw.
func NewConnConfig(rw io.ReadWriter, cfg Config) *Conn {
	c := &Conn{
		stream:       cfg.Stream,
		framePayload: MaxFramePayload,
		maxMessage:   MaxMessage,
		w:            rw,
		r:            bufio.NewReaderSize(rw, readBufferSize),
	}
	if cfg.FramePayload > 0 && cfg.FramePayload < c.framePayload {
		c.framePayload = cfg.FramePayload
	}
	if cfg.MaxMessage > 0 && cfg.MaxMessage < c.maxMessage {
		c.maxMessage = cfg.MaxMessage
	}
	return c
}

// Stats returns the counters so far. It may be called at any time from
// any goroutine.
func (c *Conn) Stats() Stats {
	return Stats{
		BytesSent: c.bytesSent.Load(), FramesSent: c.framesSent.Load(), MessagesSent: c.messagesSent.Load(),
		BytesReceived: c.bytesReceived.Load(), FramesReceived: c.framesReceived.Load(),
		MessagesReceived: c.messagesReceived.Load(), Skipped: c.skipped.Load(),
	}
}

// BytesSent returns the bytes written so far, framing included.
func (c *Conn) BytesSent() uint64 { return c.bytesSent.Load() }

// BytesReceived returns the bytes read so far, framing included.
func (c *Conn) BytesReceived() uint64 { return c.bytesReceived.Load() }

// frameBufs recycles the buffers messages are encoded into.
var frameBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledBuffer is the largest encoding buffer kept for reuse.
const maxPooledBuffer = 2 << 20

// WriteMsg validates and encodes m and writes it as one frame, or as
// several when its payload exceeds the frame payload size. It is safe for
// concurrent use: the frames of one message are never interleaved with
// another's. Deadlines are the caller's business (set them on the
// connection).
func (c *Conn) WriteMsg(m Msg) error {
	bp := frameBufs.Get().(*[]byte)
	b, err := m.appendPayload(append((*bp)[:0], make([]byte, FrameHeaderSize)...))
	if err != nil {
		frameBufs.Put(bp)
		return fmt.Errorf("wire: encoding %s: %v", m.Type(), err)
	}
	var flags uint16
	if m.Type().optional() {
		flags |= FlagOptional
	}
	err = c.writeMessage(m.Type(), flags, b)
	if cap(b) <= maxPooledBuffer {
		*bp = b[:0]
		frameBufs.Put(bp)
	}
	return err
}

// writeMessage writes the payload in b (after FrameHeaderSize bytes of
// room) as a message of type t, in as many frames as it needs.
func (c *Conn) writeMessage(t Type, flags uint16, b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	payload := b[FrameHeaderSize:]
	if len(payload) <= c.framePayload {
		if err := c.writeFrame(t, flags, b); err != nil {
			return err
		}
	} else {
		var fb []byte
		for len(payload) > 0 {
			n := min(len(payload), c.framePayload)
			f := flags
			if n < len(payload) {
				f |= FlagMore
			}
			fb = append(append(fb[:0], b[:FrameHeaderSize]...), payload[:n]...)
			if err := c.writeFrame(t, f, fb); err != nil {
				return err
			}
			payload = payload[n:]
		}
	}
	c.messagesSent.Add(1)
	return nil
}

// writeFrame completes and writes the frame whose payload follows
// FrameHeaderSize bytes of room in b. The caller holds c.wmu.
func (c *Conn) writeFrame(t Type, flags uint16, b []byte) error {
	seq := c.wseq
	h := b[:FrameHeaderSize]
	copy(h, Magic)
	h[2] = FrameVersion
	h[3] = uint8(t)
	le.PutUint16(h[4:], flags)
	le.PutUint16(h[6:], c.stream)
	le.PutUint32(h[8:], uint32(len(b)-FrameHeaderSize))
	le.PutUint32(h[12:], uint32(seq))
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))
	n, err := c.w.Write(b)
	c.bytesSent.Add(uint64(n))
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		c.werr = fmt.Errorf("wire: writing frame %d (%s): %w", seq, t, err)
		return c.werr
	}
	c.wseq++
	c.framesSent.Add(1)
	return nil
}

// writeRawFrame writes one frame as given (tests use it for unknown types
// and malformed frames).
func (c *Conn) writeRawFrame(t Type, flags uint16, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeFrame(t, flags, append(make([]byte, FrameHeaderSize), payload...))
}

// frame is a frame as read: its header fields and payload.
type frame struct {
	seq     uint64
	typ     Type
	flags   uint16
	payload []byte
}

// ReadMsg reads the next message, reassembling it from several frames
// when it was split, and skipping messages of unknown types marked
// optional. A clean end of the input between messages is io.EOF;
// anything else that is wrong is a *FrameError naming the frame (by its
// sequence number) and its type, or an I/O error wrapped in one. The
// returned message may hold references to a buffer of its own (Pages'
// chunk, MachineState's data), never to the Conn's.
func (c *Conn) ReadMsg() (Msg, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.rerr != nil {
		return nil, c.rerr
	}
	m, err := c.readMsg()
	if err != nil {
		c.rerr = err
	}
	return m, err
}

func (c *Conn) readMsg() (Msg, error) {
	var (
		cont    bool   // inside a message split over several frames
		contTyp Type   // its type
		contOpt uint16 // its FlagOptional
		asm     []byte // its payload so far (not for skipped messages)
	)
	for {
		f, err := c.readFrame()
		if err != nil {
			if err == io.EOF && cont {
				return nil, &FrameError{Seq: c.rseq, Type: contTyp, HaveType: true, Truncated: true, Err: io.ErrUnexpectedEOF,
					Msg: fmt.Sprintf("input ended inside a message split over several frames (%d bytes so far)", len(asm))}
			}
			return nil, err
		}
		fail := func(format string, args ...any) error {
			return &FrameError{Seq: f.seq, Type: f.typ, HaveType: true, Msg: fmt.Sprintf(format, args...)}
		}
		more := f.flags&FlagMore != 0
		if cont && (f.typ != contTyp || f.flags&FlagOptional != contOpt) {
			return nil, fail("frame with flags %#04x inside a %s message split over several frames", f.flags, contTyp)
		}
		if more && len(f.payload) == 0 {
			return nil, fail("empty frame with the more flag")
		}
		if !f.typ.Known() {
			if f.flags&FlagOptional == 0 {
				return nil, fail("required message type %#02x unknown (sent by a newer ferry?)", uint8(f.typ))
			}
			cont, contTyp, contOpt = more, f.typ, f.flags&FlagOptional
			if !more {
				c.skipped.Add(1)
			}
			continue
		}
		payload := f.payload
		if cont || more {
			if uint64(len(asm))+uint64(len(f.payload)) > uint64(c.maxMessage) {
				return nil, fail("message of more than %d bytes", c.maxMessage)
			}
			asm = append(asm, f.payload...)
			payload = asm
		}
		if more {
			cont, contTyp, contOpt = true, f.typ, f.flags&FlagOptional
			continue
		}
		m := newMsg(f.typ)
		if err := m.decodePayload(payload); err != nil {
			return nil, fail("%v", err)
		}
		c.messagesReceived.Add(1)
		return m, nil
	}
}

// readFrame reads and checks one frame. The end of the input before its
// first byte is io.EOF.
func (c *Conn) readFrame() (frame, error) {
	seq := c.rseq
	var h [FrameHeaderSize]byte
	n, err := io.ReadFull(c.r, h[:])
	c.bytesReceived.Add(uint64(n))
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return frame{}, io.EOF
		}
		return frame{}, c.readError(&FrameError{Seq: seq}, n, FrameHeaderSize, err)
	}
	f := frame{seq: seq, typ: Type(h[3]), flags: le.Uint16(h[4:])}
	fe := &FrameError{Seq: seq, Type: f.typ, HaveType: true}
	fail := func(format string, args ...any) error {
		fe.Msg = fmt.Sprintf(format, args...)
		return fe
	}
	if string(h[:2]) != Magic {
		return f, &FrameError{Seq: seq, Msg: fmt.Sprintf("not a ferry migration stream (magic %q, want %q)", h[:2], Magic)}
	}
	if h[2] != FrameVersion {
		return f, &FrameError{Seq: seq, Msg: fmt.Sprintf("framing version %d not supported (this ferry speaks %d)", h[2], FrameVersion)}
	}
	length := le.Uint32(h[8:])
	if length > MaxFramePayload {
		return f, fail("payload length %d exceeds the limit of %d", length, MaxFramePayload)
	}
	total := FrameHeaderSize + int(length) + FrameCRCSize
	f.payload = make([]byte, 0, min(int(length), preallocLimit))
	for len(f.payload) < int(length) {
		step := min(int(length)-len(f.payload), readStep)
		f.payload = slices.Grow(f.payload, step)
		at := len(f.payload)
		n, err := io.ReadFull(c.r, f.payload[at:at+step])
		f.payload = f.payload[:at+n]
		c.bytesReceived.Add(uint64(n))
		if err != nil {
			return f, c.readError(fe, FrameHeaderSize+len(f.payload), total, err)
		}
	}
	var stored [FrameCRCSize]byte
	n, err = io.ReadFull(c.r, stored[:])
	c.bytesReceived.Add(uint64(n))
	if err != nil {
		return f, c.readError(fe, total-FrameCRCSize+n, total, err)
	}
	crc := crc32.Update(crc32.Checksum(h[:], castagnoli), castagnoli, f.payload)
	if s := le.Uint32(stored[:]); s != crc {
		return f, fail("checksum mismatch (stored %#08x, computed %#08x)", s, crc)
	}
	if s := le.Uint32(h[12:]); s != uint32(seq) {
		return f, fail("sequence number %d, expected %d (frames lost, repeated or reordered)", s, uint32(seq))
	}
	if s := le.Uint16(h[6:]); s != c.stream {
		return f, fail("stream %d, this connection carries stream %d", s, c.stream)
	}
	if u := f.flags &^ flagsKnown; u != 0 {
		return f, fail("unknown frame flags %#04x", u)
	}
	c.rseq++
	c.framesReceived.Add(1)
	return f, nil
}

// readError reports a read that failed after got of the frame's total
// bytes: a truncation when the input ended, the reader's error otherwise.
func (c *Conn) readError(fe *FrameError, got, total int, err error) error {
	what := fmt.Sprintf("%d bytes", total)
	if total == FrameHeaderSize && !fe.HaveType {
		what = "the frame header's 16 bytes"
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		fe.Truncated = true
		fe.Err = io.ErrUnexpectedEOF
		fe.Msg = fmt.Sprintf("truncated after %d of %s", got, what)
		return fe
	}
	fe.Err = err
	fe.Msg = fmt.Sprintf("reading after %d of %s: %v", got, what, err)
	return fe
}
