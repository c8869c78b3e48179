package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// Hub is the wire between the lab's hosts: an Ethernet hub in this
// process that every host's link NIC reaches through QEMU's stream socket
// netdev (`-netdev socket,connect=127.0.0.1:PORT`), whose frames are a
// 4-byte big-endian length and the Ethernet frame. Each frame from one
// port goes to every other port. Cut drops frames in both directions
// until Restore: the hosts see their link go silent, as when a cable is
// pulled, while their NICs stay up. Shaping (rate, delay) is done inside
// the hosts with tc, as on real machines.
type Hub struct {
	l       net.Listener
	mu      sync.Mutex
	ports   []net.Conn
	cut     atomic.Bool
	frames  atomic.Uint64
	dropped atomic.Uint64
	bytes   atomic.Uint64
	wg      sync.WaitGroup
}

// maxEthFrame bounds a frame: QEMU's largest (64 KiB of GSO data and
// headers) with room to spare.
const maxEthFrame = 128 << 10

// NewHub listens on a free port of 127.0.0.1.
func NewHub() (*Hub, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("lab hub: %w", err)
	}
	h := &Hub{l: l}
	h.wg.Add(1)
	go h.accept()
	return h, nil
}

// Addr is where hosts connect.
func (h *Hub) Addr() string { return h.l.Addr().String() }

// Cut stops (true) or restores (false) every frame on the link.
func (h *Hub) Cut(on bool) { h.cut.Store(on) }

// Stats returns frames forwarded, frames dropped by a cut, and bytes
// forwarded.
func (h *Hub) Stats() (frames, dropped, bytes uint64) {
	return h.frames.Load(), h.dropped.Load(), h.bytes.Load()
}

// Close stops the hub and drops every port.
func (h *Hub) Close() error {
	err := h.l.Close()
	h.mu.Lock()
	for _, c := range h.ports {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
	return err
}

func (h *Hub) accept() {
	defer h.wg.Done()
	for {
		c, err := h.l.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		h.ports = append(h.ports, c)
		h.mu.Unlock()
		h.wg.Add(1)
		go h.serve(c)
	}
}

func (h *Hub) serve(c net.Conn) {
	defer h.wg.Done()
	defer h.drop(c)
	buf := make([]byte, 4+maxEthFrame)
	for {
		n, err := readEthFrame(c, buf)
		if err != nil {
			return
		}
		if h.cut.Load() {
			h.dropped.Add(1)
			continue
		}
		h.frames.Add(1)
		h.bytes.Add(uint64(n))
		h.mu.Lock()
		for _, o := range h.ports {
			if o != c {
				o.Write(buf[:4+n]) // a dead port is dropped by its own reader
			}
		}
		h.mu.Unlock()
	}
}

func (h *Hub) drop(c net.Conn) {
	c.Close()
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, o := range h.ports {
		if o == c {
			h.ports = append(h.ports[:i], h.ports[i+1:]...)
			return
		}
	}
}

// readEthFrame reads one length-prefixed frame into buf (length prefix
// included, at buf[:4]) and returns the frame's length.
func readEthFrame(r io.Reader, buf []byte) (int, error) {
	if _, err := io.ReadFull(r, buf[:4]); err != nil {
		return 0, err
	}
	n := binary.BigEndian.Uint32(buf[:4])
	if n == 0 || n > maxEthFrame || int(n) > len(buf)-4 {
		return 0, errors.New("lab hub: frame length out of range")
	}
	if _, err := io.ReadFull(r, buf[4:4+n]); err != nil {
		return 0, err
	}
	return int(n), nil
}
