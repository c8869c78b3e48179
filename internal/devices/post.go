package devices

import "sync"

// PostPort is the PC's POST diagnostic port. Firmware writes progress codes
// to it, and Linux writes to it (outb to 0x80) as an I/O delay.
const PostPort = 0x80

// Post is the POST/debug port. The VMM registers it with one byte:
//
//	bus.Register("post", PostPort, 1, post)
//
// Writes record the value (the first byte of a wider write); reads return
// the last value written (0 before any write).
type Post struct {
	mu     sync.Mutex
	last   uint8
	writes uint64
}

// NewPost returns a POST port that has not been written.
func NewPost() *Post { return &Post{} }

// Last returns the last value the guest wrote.
func (p *Post) Last() uint8 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

// Writes returns how many writes the guest made.
func (p *Post) Writes() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.writes
}

// Read implements Device.
func (p *Post) Read(offset uint64, data []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range data {
		if offset+uint64(i) == 0 {
			data[i] = p.last
		} else {
			data[i] = 0xff
		}
	}
}

// Write implements Device.
func (p *Post) Write(offset uint64, data []byte) {
	if offset != 0 || len(data) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last = data[0]
	p.writes++
}

// PostState is the POST port's state, for save/restore.
type PostState struct {
	Last   uint8
	Writes uint64
}

// State returns the port's state.
func (p *Post) State() PostState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PostState{Last: p.last, Writes: p.writes}
}

// SetState replaces the port's state.
func (p *Post) SetState(st PostState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last, p.writes = st.Last, st.Writes
	return nil
}
