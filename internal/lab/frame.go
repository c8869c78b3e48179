package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The agent answers an exec request with a stream of frames:
//
//	+--------+----------------+---------------------+
//	| kind 1 | length 4 (BE)  | payload (length)    |
//	+--------+----------------+---------------------+
//
// kind 1 = stdout bytes, 2 = stderr bytes, 3 = the end: a JSON ExecResult,
// always the last frame. A stream that ends without an end frame means the
// agent or the link died: the command's outcome is unknown.
const (
	frameStdout byte = 1
	frameStderr byte = 2
	frameExit   byte = 3

	// maxFrame bounds one frame's payload: the agent never writes more
	// than 64 KiB of output at once, and an ExecResult is far smaller.
	maxFrame = 1 << 20
)

// writeFrame writes one frame.
func writeFrame(w io.Writer, kind byte, p []byte) error {
	if len(p) > maxFrame {
		return fmt.Errorf("lab: frame of %d bytes exceeds %d", len(p), maxFrame)
	}
	var hdr [5]byte
	hdr[0] = kind
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(p)))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(p)
	return err
}

// errNoEnd is a stream that stopped before its end frame.
var errNoEnd = errors.New("lab: the agent's answer ended before the command did (agent or link died)")

// readFrame reads one frame; buf is reused when large enough.
func readFrame(r io.Reader, buf []byte) (kind byte, p []byte, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, errNoEnd
		}
		return 0, nil, err
	}
	kind = hdr[0]
	if kind < frameStdout || kind > frameExit {
		return 0, nil, fmt.Errorf("lab: unknown frame kind %d", kind)
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("lab: frame of %d bytes exceeds %d", n, maxFrame)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	p = buf[:n]
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, errNoEnd
		}
		return 0, nil, err
	}
	return kind, p, nil
}
