package lab

import (
	"bytes"
	"encoding/binary"
	"net"
	"testing"
	"time"
)

func ethFrame(payload string) []byte {
	b := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)))
	copy(b[4:], payload)
	return b
}

func TestHubForwardsAndCuts(t *testing.T) {
	h, err := NewHub()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var ports []net.Conn
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", h.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ports = append(ports, c)
	}
	// Wait until the hub has all three ports.
	for i := 0; i < 100; i++ {
		h.mu.Lock()
		n := len(h.ports)
		h.mu.Unlock()
		if n == 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	ports[0].Write(ethFrame("frame-one"))
	buf := make([]byte, 4+maxEthFrame)
	for _, p := range ports[1:] {
		p.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := readEthFrame(p, buf)
		if err != nil || string(buf[4:4+n]) != "frame-one" {
			t.Fatalf("forward: %v %q", err, buf[4:4+n])
		}
	}
	h.Cut(true)
	ports[1].Write(ethFrame("lost"))
	time.Sleep(200 * time.Millisecond)
	h.Cut(false)
	ports[1].Write(ethFrame("after"))
	for _, i := range []int{0, 2} {
		ports[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := readEthFrame(ports[i], buf)
		if err != nil || !bytes.Equal(buf[4:4+n], []byte("after")) {
			t.Fatalf("after the cut, port %d got %v %q (a cut frame leaked?)", i, err, buf[4:4+n])
		}
	}
	if f, d, _ := h.Stats(); f != 2 || d != 1 {
		t.Fatalf("stats: %d forwarded %d dropped", f, d)
	}
	// A port sending a frame length out of range is dropped, the rest go on.
	ports[2].Write([]byte{0xff, 0xff, 0xff, 0xff})
	time.Sleep(100 * time.Millisecond)
	ports[0].Write(ethFrame("still"))
	ports[1].SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := readEthFrame(ports[1], buf); err != nil || string(buf[4:4+n]) != "still" {
		t.Fatalf("after a bad port: %v", err)
	}
}

func FuzzReadEthFrame(f *testing.F) {
	f.Add(ethFrame("x"))
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		buf := make([]byte, 4+maxEthFrame)
		n, err := readEthFrame(bytes.NewReader(data), buf)
		if err == nil && (n <= 0 || n > maxEthFrame) {
			t.Fatalf("frame length %d accepted", n)
		}
	})
}
