package wire

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/ferry-vmm/ferry/internal/state"
)

// FuzzReadMsg feeds arbitrary streams to a Conn: it must never panic nor
// allocate beyond its bounds, its errors are io.EOF or FrameErrors, and
// every message it accepts re-encodes to a stream that reads back the same.
// Each input is read as is and with its frames' sequence numbers and CRCs
// repaired, so that mutations reach the message decoders.
func FuzzReadMsg(f *testing.F) {
	for _, m := range allMessages(f) {
		f.Add(stream(f, Config{}, m))
	}
	f.Add(stream(f, Config{FramePayload: 40}, &MachineState{Data: bytes.Repeat([]byte("state"), 30)}, &Ping{Nonce: 9}))
	var buf bytes.Buffer
	w := NewConnConfig(rw{nil, &buf}, Config{})
	w.writeRawFrame(0xf4, FlagOptional|FlagMore, []byte("future"))
	w.writeRawFrame(0xf4, FlagOptional, []byte("!"))
	w.WriteMsg(&Cancel{Reason: "stop"})
	f.Add(buf.Bytes())

	h := randomMachine(rand.New(rand.NewPCG(5, 6)), 2, 512).Header
	read := func(t *testing.T, data []byte) {
		c := readConn(data, Config{MaxMessage: 4 << 20})
		var got []Msg
		for {
			m, err := c.ReadMsg()
			if err != nil {
				var fe *FrameError
				if err != io.EOF && !errors.As(err, &fe) {
					t.Fatalf("error of type %T: %v", err, err)
				}
				break
			}
			if p, ok := m.(*Pages); ok {
				p.Decode(h, func(gpa uint64, data []byte) error {
					if len(data) != state.PageSize {
						t.Fatalf("page %#x of %d bytes", gpa, len(data))
					}
					return nil
				})
			}
			got = append(got, m)
		}
		if len(got) == 0 {
			return
		}
		re := stream(t, Config{}, got...)
		c2 := readConn(re, Config{})
		for i, want := range got {
			m, err := c2.ReadMsg()
			if err != nil {
				t.Fatalf("message %d (%s) re-encoded does not read: %v", i, want.Type(), err)
			}
			if !reflect.DeepEqual(m, want) {
				t.Fatalf("message %d (%s) changed on re-encoding", i, want.Type())
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		read(t, data)
		fixed := bytes.Clone(data)
		fixFrames(fixed)
		read(t, fixed)
	})
}
