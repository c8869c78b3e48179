// Package wire owns the framing and the message types of ferry's migration
// protocol between two VMM processes: the source, which runs the guest, and
// the destination, which receives it.
//
// The package knows nothing about VMs, KVM or TLS: it reads and writes
// messages on any io.Reader/io.Writer (a TCP or TLS connection in
// practice; a net.Pipe in tests), and leaves deadlines and cancellation to
// the caller, who holds the connection. What the messages carry is
// produced and checked by internal/state: a Hello's header is
// state.EncodeHeader's, a Pages message carries one state.EncodePageChunk
// chunk, a MachineState message state.EncodeMachine's sections, so the
// migration stream and a save file share one encoding.
//
// Every message travels in one or more frames: a 16-byte header (magic,
// framing version, message type, flags, stream, payload length, sequence
// number), the payload, and a CRC32C over both. Lengths are bounded before
// anything is allocated; a message larger than a frame continues in
// following frames. Unknown message types are skipped when the sender
// marked them optional and refused otherwise. The byte layouts, the version
// negotiation and the message sequences are specified in docs/protocol.md.
package wire

import (
	"fmt"
	"hash/crc32"
)

// Framing constants (docs/protocol.md, "Frames").
const (
	// Magic opens every frame: the ASCII bytes "FM".
	Magic = "FM"
	// FrameVersion is the version of the framing this package writes and
	// the only one it reads. It changes only when the frame layout does;
	// message semantics are versioned by the negotiated protocol version.
	FrameVersion = 1

	// FrameHeaderSize is the size of a frame header, FrameCRCSize that of
	// the CRC32C after the payload.
	FrameHeaderSize = 16
	FrameCRCSize    = 4

	// MaxFramePayload bounds a frame's payload: a reader refuses a larger
	// length before it allocates anything.
	MaxFramePayload = 8 << 20
	// MaxMessage bounds a message's payload reassembled from several
	// frames (a reader's default; Config.MaxMessage may lower it).
	MaxMessage = 512 << 20
)

// Frame flags.
const (
	// FlagOptional marks a message the receiver may ignore: a receiver
	// that does not know its type skips it (and counts it) instead of
	// failing. Known types are decoded whether or not it is set.
	FlagOptional uint16 = 1 << 0
	// FlagMore says the message continues in the next frame, which has
	// the same type and stream. The last frame of a message has it clear.
	FlagMore uint16 = 1 << 1

	flagsKnown = FlagOptional | FlagMore
)

// Protocol versions this package speaks (negotiated by Hello and Welcome).
const (
	ProtocolVersion    = 3
	MinProtocolVersion = 1
)

// Type is a message type, the frame header's type byte.
type Type uint8

// Message types. 0x00 is never assigned; 0xF0-0xFF are never assigned
// either (tests use them as unknown types).
const (
	TypeHello         Type = 0x01 // source → destination, first message
	TypeWelcome       Type = 0x02 // destination → source: accepted
	TypeRefuse        Type = 0x03 // destination → source: refused
	TypeNotice        Type = 0x04 // destination → source: a warning before the Welcome (optional)
	TypePages         Type = 0x10 // source → destination: one memory chunk
	TypeIterationDone Type = 0x11 // source → destination: end of a round
	TypeIterationAck  Type = 0x12 // destination → source
	TypeMachineState  Type = 0x13 // source → destination: non-memory state
	TypeComplete      Type = 0x14 // source → destination: totals, all sent
	TypeResumed       Type = 0x15 // destination → source: guest running
	TypeError         Type = 0x20 // either way: the sender gives up
	TypeCancel        Type = 0x21 // source → destination: migration cancelled
	TypePageRequest   Type = 0x30 // destination → source: pages the guest faulted on (v2)
	TypePing          Type = 0x31 // either way (optional)
	TypePong          Type = 0x32 // either way (optional)
	TypeAttach        Type = 0x40 // source → destination: first message of a further connection (v2)
	TypeAttached      Type = 0x41 // destination → source: the answer to Attach (v2)
	TypePostcopy      Type = 0x42 // source → destination: switch to post-copy (v2)
	TypePostcopyDone  Type = 0x43 // destination → source: every needed page arrived (v2)
)

var typeNames = map[Type]string{
	TypeHello: "hello", TypeWelcome: "welcome", TypeRefuse: "refuse", TypeNotice: "notice",
	TypePages: "pages", TypeIterationDone: "iteration-done", TypeIterationAck: "iteration-ack",
	TypeMachineState: "machine-state", TypeComplete: "complete", TypeResumed: "resumed",
	TypeError: "error", TypeCancel: "cancel",
	TypePageRequest: "page-request", TypePing: "ping", TypePong: "pong",
	TypeAttach: "attach", TypeAttached: "attached", TypePostcopy: "postcopy",
	TypePostcopyDone: "postcopy-done",
}

// String names the type as docs/protocol.md does.
func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type %#02x", uint8(t))
}

// Known reports whether this package defines the type.
func (t Type) Known() bool {
	_, ok := typeNames[t]
	return ok
}

// optional reports whether messages of type t are sent with FlagOptional:
// the informational ones a receiver may ignore.
func (t Type) optional() bool { return t == TypePing || t == TypePong || t == TypeNotice }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// FrameError reports a frame or message that is not valid: corrupt,
// truncated, out of sequence, of an unknown required type, or with a
// payload its type does not allow. Seq is the frame's sequence number on
// the connection (the number of frames read before it); for a message in
// several frames, that of its last frame.
type FrameError struct {
	Seq uint64
	// Type is the message type as the frame header gives it (when the
	// header was read: HaveType).
	Type     Type
	HaveType bool
	// Truncated is set when the input ended inside a frame or inside a
	// message split over several frames.
	Truncated bool
	Msg       string
	// Err is the underlying error, if any (io.ErrUnexpectedEOF for a
	// truncation, the reader's error for an I/O failure).
	Err error
}

func (e *FrameError) Error() string {
	if e.HaveType {
		return fmt.Sprintf("wire: frame %d (%s): %s", e.Seq, e.Type, e.Msg)
	}
	return fmt.Sprintf("wire: frame %d: %s", e.Seq, e.Msg)
}

func (e *FrameError) Unwrap() error { return e.Err }
