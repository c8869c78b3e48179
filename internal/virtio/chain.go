package virtio

import (
	"encoding/binary"
	"fmt"
	"io"
)

// Buffer is one guest buffer of a chain: Len bytes at guest-physical GPA.
type Buffer struct {
	GPA uint64
	Len uint32
}

// Chain is one descriptor chain popped from a queue: its head (to Push
// back) and its buffers, device-readable ones first. Every buffer was in
// guest RAM when the chain was popped; zero-length descriptors are
// dropped. Its copy helpers touch only these buffers and report every
// byte they write to the queue's dirty hook.
type Chain struct {
	Head     uint16
	Readable []Buffer
	Writable []Buffer
	g        guest
}

// ReadableLen is the total length of the device-readable buffers.
func (c *Chain) ReadableLen() uint64 { return totalLen(c.Readable) }

// WritableLen is the total length of the device-writable buffers.
func (c *Chain) WritableLen() uint64 { return totalLen(c.Writable) }

func totalLen(bufs []Buffer) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(b.Len)
	}
	return n
}

// ReadAt copies the readable part, from byte off on, into p (io.ReaderAt:
// io.EOF when fewer than len(p) bytes remain).
func (c *Chain) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("chain %d: negative offset %d", c.Head, off)
	}
	n, err := c.each(c.Readable, uint64(off), uint64(len(p)), func(gpa uint64, b []byte, done uint64) error {
		copy(p[done:], b)
		return nil
	})
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// WriteAt copies p into the writable part from byte off on, reporting the
// bytes written dirty (io.WriterAt: io.ErrShortWrite when the writable part
// ends first).
func (c *Chain) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("chain %d: negative offset %d", c.Head, off)
	}
	n, err := c.each(c.Writable, uint64(off), uint64(len(p)), func(gpa uint64, b []byte, done uint64) error {
		copy(b, p[done:])
		c.g.dirty(gpa, uint64(len(b)))
		return nil
	})
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	return n, err
}

// Fill reads from r straight into the writable part, from its start, up to
// limit bytes, reporting what it wrote dirty. It returns the number of
// bytes placed; r's error (io.EOF included) ends the fill.
func (c *Chain) Fill(r io.Reader, limit uint32) (uint32, error) {
	n, err := c.each(c.Writable, 0, uint64(limit), func(gpa uint64, b []byte, done uint64) error {
		k, err := io.ReadFull(r, b)
		c.g.dirty(gpa, uint64(k))
		if err != nil {
			return fmt.Errorf("filling [%#x, +%#x): %w", gpa, len(b), err)
		}
		return nil
	})
	return uint32(n), err
}

// each maps up to n bytes of bufs from byte off on, piece by piece, and
// calls f with each piece's address, host view and the count already
// handled. It returns how many bytes f handled.
func (c *Chain) each(bufs []Buffer, off, n uint64, f func(gpa uint64, b []byte, done uint64) error) (int, error) {
	var done uint64
	for _, buf := range bufs {
		if done == n {
			break
		}
		if off >= uint64(buf.Len) {
			off -= uint64(buf.Len)
			continue
		}
		k := min(uint64(buf.Len)-off, n-done)
		b, err := c.g.slice(buf.GPA+off, k)
		if err != nil {
			return int(done), fmt.Errorf("chain %d: %w", c.Head, err)
		}
		if err := f(buf.GPA+off, b, done); err != nil {
			return int(done), fmt.Errorf("chain %d: %w", c.Head, err)
		}
		done += k
		off = 0
	}
	return int(done), nil
}

// desc is one descriptor, copied out of guest memory once so that a
// driver rewriting the table cannot change it between check and use.
type desc struct {
	addr  uint64
	len   uint32
	flags uint16
	next  uint16
}

func readDesc(table []byte, i uint16) desc {
	b := table[int(i)*descSize:][:descSize]
	return desc{
		addr:  binary.LittleEndian.Uint64(b[0:]),
		len:   binary.LittleEndian.Uint32(b[8:]),
		flags: binary.LittleEndian.Uint16(b[12:]),
		next:  binary.LittleEndian.Uint16(b[14:]),
	}
}

// walker builds one chain, checking everything the driver controls: the
// walker is where a hostile guest is kept out. Its work is bounded by the
// queue size: it visits at most size descriptors of the ring's table and
// at most size of an indirect table, and allocates one Buffer per
// descriptor visited.
type walker struct {
	q           *Queue
	chain       *Chain
	total       uint64 // bytes named so far
	count       int    // buffer descriptors visited, direct and indirect
	sawWritable bool
}

// walk builds the chain starting at head (< size).
func (q *Queue) walk(head uint16) (*Chain, error) {
	table, err := q.g.slice(q.addrs.Desc, descSize*uint64(q.size))
	if err != nil {
		return nil, fmt.Errorf("mapping the descriptor table: %w", err)
	}
	w := walker{q: q, chain: &Chain{Head: head, g: q.g}}
	if err := w.walkTable(table, head, false); err != nil {
		return nil, err
	}
	return w.chain, nil
}

// walkTable follows NEXT links from idx through table (the ring's table,
// or an indirect one).
func (w *walker) walkTable(table []byte, idx uint16, indirect bool) error {
	what, entries := "descriptor", len(table)/descSize
	if indirect {
		what = "indirect descriptor"
	}
	for steps := 0; ; steps++ {
		if int(idx) >= entries {
			return fmt.Errorf("%s %d: %w (%d entries)", what, idx, ErrDescIndex, entries)
		}
		if steps >= entries {
			return fmt.Errorf("%s %d: %w (%d entries)", what, idx, ErrChainLoop, entries)
		}
		d := readDesc(table, idx)
		if d.flags&descFIndirect != 0 {
			if err := w.indirect(d, indirect); err != nil {
				return fmt.Errorf("%s %d: %w", what, idx, err)
			}
			return nil // an indirect descriptor ends the chain
		}
		if err := w.add(d); err != nil {
			return fmt.Errorf("%s %d: %w", what, idx, err)
		}
		if d.flags&descFNext == 0 {
			return nil
		}
		idx = d.next
	}
}

// indirect follows the indirect table d names. The spec has the device
// ignore d's WRITE flag.
func (w *walker) indirect(d desc, nested bool) error {
	switch {
	case nested:
		return ErrIndirectNested
	case !w.q.indirect:
		return ErrIndirectNotNegotiated
	case d.flags&descFNext != 0:
		return ErrIndirectNext
	case d.len == 0 || d.len%descSize != 0 || d.len/descSize > uint32(w.q.size):
		return fmt.Errorf("%w: %d bytes (size %d)", ErrIndirectLen, d.len, w.q.size)
	}
	if d.addr+uint64(d.len) < d.addr {
		return fmt.Errorf("indirect table [%#x, +%#x): %w", d.addr, d.len, ErrBufferWraps)
	}
	table, err := w.q.g.slice(d.addr, uint64(d.len))
	if err != nil {
		return fmt.Errorf("indirect table [%#x, +%#x): %w: %w", d.addr, d.len, ErrBufferNotRAM, err)
	}
	return w.walkTable(table, 0, true)
}

// add checks one buffer descriptor and appends its buffer.
func (w *walker) add(d desc) error {
	w.count++
	if w.count > int(w.q.size) {
		return fmt.Errorf("%w (size %d)", ErrChainLoop, w.q.size)
	}
	writable := d.flags&descFWrite != 0
	if !writable && w.sawWritable {
		return ErrWriteOrder
	}
	w.sawWritable = w.sawWritable || writable
	if d.addr+uint64(d.len) < d.addr {
		return fmt.Errorf("[%#x, +%#x): %w", d.addr, d.len, ErrBufferWraps)
	}
	if d.len == 0 {
		return nil // names no memory
	}
	if _, err := w.q.g.slice(d.addr, uint64(d.len)); err != nil {
		return fmt.Errorf("[%#x, +%#x): %w: %w", d.addr, d.len, ErrBufferNotRAM, err)
	}
	w.total += uint64(d.len)
	if w.total > MaxChainBytes {
		return fmt.Errorf("%w (%d bytes so far)", ErrChainTooBig, w.total)
	}
	b := Buffer{GPA: d.addr, Len: d.len}
	if writable {
		w.chain.Writable = append(w.chain.Writable, b)
	} else {
		w.chain.Readable = append(w.chain.Readable, b)
	}
	return nil
}
