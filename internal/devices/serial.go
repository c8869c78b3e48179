package devices

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// Serial is a National Semiconductor 16550A UART as found at the PC's COM
// ports. The VMM registers it on the port I/O bus with 8 registers:
//
//	COM1: bus.Register("com1", 0x3f8, 8, serial)  // IRQ 4
//	COM2: bus.Register("com2", 0x2f8, 8, serial)  // IRQ 3
//
// Register map (offset from the base port):
//
//	0  read: RBR (receive buffer)   write: THR (transmit holding)   DLAB=1: DLL
//	1  IER (interrupt enable, 4 bits)                               DLAB=1: DLM
//	2  read: IIR (interrupt identification)   write: FCR (FIFO control)
//	3  LCR (line control; bit 7 is DLAB)
//	4  MCR (modem control; bit 4 is loopback)
//	5  LSR (line status)
//	6  MSR (modem status)
//	7  SCR (scratch)
//
// Transmission is instantaneous: a byte written to THR is handed to the
// output writer at once (or, in loopback mode, to the receiver), so THRE and
// TEMT are always set. Input from the host arrives through Enqueue into a
// 16-byte receive FIFO (1 byte when FIFOs are disabled, as on a 16450), behind
// which a bounded backlog holds input that has not "arrived" yet.
//
// Interrupts: the UART's INTR output is presented on the IRQLine: it is high
// exactly while an enabled interrupt condition is pending (what IIR bit 0 = 0
// reports), as on a real 16550. It is not gated by MCR OUT2 (on PC boards
// OUT2 gates the ISA IRQ line externally; Linux sets OUT2 anyway). The
// character-timeout interrupt of FIFO mode fires without delay: whenever the
// FIFO holds fewer bytes than the trigger level, IIR reports a timeout
// (0xCC) instead of waiting four character times.
//
// The THRE interrupt follows the behaviour drivers rely on: it becomes
// pending when IER.ETBEI goes from 0 to 1 (the transmitter is always empty)
// and after every THR write, and it is cleared by reading IIR while THRE is
// the reported source, by clearing ETBEI, or by a THR write (which re-arms
// it at once because the byte is gone immediately).
//
// All methods are safe for concurrent use by vCPU threads and host goroutines.
// IRQLine.SetLevel is called with the Serial's internal lock held, so that
// level changes reach the interrupt controller in the order they happened;
// it must not call back into the Serial. The output writer is called without
// that lock (under a separate one that keeps output in order), so a slow
// writer does not block host input; a writer that blocks forever does stall
// the vCPU that wrote THR, so the VMM should give it one that does not.
type Serial struct {
	mu    sync.Mutex
	outMu sync.Mutex // held while writing to out; acquired before mu is released
	out   io.Writer
	irq   IRQLine

	ier, fcr, lcr, mcr, scr uint8
	dll, dlm                uint8
	lsrErr                  uint8 // OE/PE/FE/BI, latched until LSR is read
	msrDelta                uint8 // DCTS/DDSR/TERI/DDCD, cleared by reading MSR
	thrPending              bool  // THRE interrupt pending
	rx                      []byte
	backlog                 byteQueue
	irqHigh                 bool

	dropped     atomic.Uint64
	writeErrors atomic.Uint64
}

// Where the VMM places the PC's serial ports on the port I/O bus, and the
// ISA IRQ each one drives.
const (
	COM1Base    = 0x3f8
	COM1IRQ     = 4
	COM2Base    = 0x2f8
	COM2IRQ     = 3
	SerialPorts = 8 // size of each UART's port range
)

// Sizes of the receive path.
const (
	// SerialFIFOSize is the depth of the 16550A's receive FIFO.
	SerialFIFOSize = 16
	// SerialBacklogSize bounds host input queued behind a full receive
	// FIFO; input beyond it is dropped (see Serial.Dropped).
	SerialBacklogSize = 64 << 10
)

// Register offsets.
const (
	uartRX  = 0 // RBR / THR / DLL
	uartIER = 1 // IER / DLM
	uartIIR = 2 // IIR / FCR
	uartLCR = 3
	uartMCR = 4
	uartLSR = 5
	uartMSR = 6
	uartSCR = 7
)

// Register bits (16550A datasheet).
const (
	ierRDI  = 0x01 // received data available (ERBFI)
	ierTHRI = 0x02 // transmitter holding register empty (ETBEI)
	ierRLSI = 0x04 // receiver line status (ELSI)
	ierMSI  = 0x08 // modem status (EDSSI)
	ierMask = 0x0f

	iirNoInt   = 0x01
	iirMSI     = 0x00
	iirTHRI    = 0x02
	iirRDI     = 0x04
	iirRLSI    = 0x06
	iirTimeout = 0x0c
	iirFIFOs   = 0xc0 // both bits set when FIFOs are enabled

	fcrEnable  = 0x01
	fcrClearRX = 0x02 // 0x04 clears the transmit FIFO, which is always empty
	fcrDMA     = 0x08
	fcrTrigger = 0xc0

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLoop = 0x10
	mcrMask = 0x1f

	lsrDR     = 0x01
	lsrOE     = 0x02
	lsrPE     = 0x04
	lsrFE     = 0x08
	lsrBI     = 0x10
	lsrTHRE   = 0x20
	lsrTEMT   = 0x40
	lsrErrors = lsrOE | lsrPE | lsrFE | lsrBI

	msrDCTS   = 0x01
	msrDDSR   = 0x02
	msrTERI   = 0x04
	msrDDCD   = 0x08
	msrCTS    = 0x10
	msrDSR    = 0x20
	msrRI     = 0x40
	msrDCD    = 0x80
	msrDeltas = msrDCTS | msrDDSR | msrTERI | msrDDCD
)

// rxTriggerLevels maps FCR bits 7:6 to the receive FIFO trigger level.
var rxTriggerLevels = [4]int{1, 4, 8, 14}

// NewSerial returns a UART in its power-on state that writes transmitted
// bytes to out (nil discards them) and drives irq (nil: no interrupts).
func NewSerial(out io.Writer, irq IRQLine) *Serial {
	if out == nil {
		out = io.Discard
	}
	return &Serial{
		out: out,
		irq: irq,
		dll: 12, // 9600 baud from the PC's 1.8432 MHz clock
		rx:  make([]byte, 0, SerialFIFOSize),
	}
}

// Dropped reports how many input bytes were lost: host input that did not
// fit in the backlog, and loopback bytes that overran the receiver.
func (s *Serial) Dropped() uint64 { return s.dropped.Load() }

// WriteErrors reports how many writes to the output writer failed. Failed
// output is discarded; the guest never sees an error.
func (s *Serial) WriteErrors() uint64 { return s.writeErrors.Load() }

// Enqueue queues console input from the host for the guest to receive. Bytes
// that do not fit in the receive FIFO wait in the backlog; bytes beyond the
// backlog's SerialBacklogSize are dropped, counted, and reported to the
// guest as an overrun (LSR.OE). The receive interrupt is raised if enabled.
// Enqueue never blocks on the guest.
func (s *Serial) Enqueue(b []byte) {
	if len(b) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.loopback() && s.backlog.len() == 0 {
		n := min(s.rxDepth()-len(s.rx), len(b))
		s.rx = append(s.rx, b[:n]...)
		b = b[n:]
	}
	room := SerialBacklogSize - s.backlog.len()
	if len(b) > room {
		s.dropped.Add(uint64(len(b) - room))
		s.lsrErr |= lsrOE
		b = b[:room]
	}
	s.backlog.push(b)
	s.refill()
	s.updateIRQ()
}

// Read implements Device. Accesses wider than a byte touch consecutive
// registers, as an ISA bus splits them.
func (s *Serial) Read(offset uint64, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range data {
		data[i] = s.readReg(offset + uint64(i))
	}
	s.updateIRQ()
}

// Write implements Device. Accesses wider than a byte touch consecutive
// registers.
func (s *Serial) Write(offset uint64, data []byte) {
	var buf [8]byte
	out := buf[:0]
	s.mu.Lock()
	for i, v := range data {
		if b, ok := s.writeReg(offset+uint64(i), v); ok {
			out = append(out, b)
		}
	}
	s.updateIRQ()
	if len(out) == 0 {
		s.mu.Unlock()
		return
	}
	// Take the output lock before dropping the state lock so that bytes
	// reach the writer in the order the guest wrote them.
	s.outMu.Lock()
	s.mu.Unlock()
	defer s.outMu.Unlock()
	if _, err := s.out.Write(out); err != nil {
		s.writeErrors.Add(1)
	}
}

func (s *Serial) dlab() bool     { return s.lcr&lcrDLAB != 0 }
func (s *Serial) fifoOn() bool   { return s.fcr&fcrEnable != 0 }
func (s *Serial) loopback() bool { return s.mcr&mcrLoop != 0 }
func (s *Serial) rxTrigger() int { return rxTriggerLevels[s.fcr>>6] }
func (s *Serial) rxDepth() int   { return depthFor(s.fcr) }
func depthFor(fcr uint8) int {
	if fcr&fcrEnable != 0 {
		return SerialFIFOSize
	}
	return 1
}

func (s *Serial) readReg(off uint64) uint8 {
	switch off {
	case uartRX:
		if s.dlab() {
			return s.dll
		}
		return s.popRX()
	case uartIER:
		if s.dlab() {
			return s.dlm
		}
		return s.ier
	case uartIIR:
		return s.iir(true)
	case uartLCR:
		return s.lcr
	case uartMCR:
		return s.mcr
	case uartLSR:
		v := s.lsr()
		s.lsrErr = 0
		return v
	case uartMSR:
		v := s.msr()
		s.msrDelta = 0
		return v
	case uartSCR:
		return s.scr
	}
	return 0xff
}

// writeReg applies a register write; it returns a byte to transmit, if any.
func (s *Serial) writeReg(off uint64, v uint8) (uint8, bool) {
	switch off {
	case uartRX:
		if s.dlab() {
			s.dll = v
			return 0, false
		}
		return s.transmit(v)
	case uartIER:
		if s.dlab() {
			s.dlm = v
			return 0, false
		}
		s.setIER(v)
	case uartIIR:
		s.setFCR(v)
	case uartLCR:
		s.lcr = v
	case uartMCR:
		s.setMCR(v)
	case uartSCR:
		s.scr = v
	}
	// LSR and MSR are read-only; writes (factory test on some parts) are
	// ignored.
	return 0, false
}

func (s *Serial) transmit(v uint8) (uint8, bool) {
	// The byte leaves THR at once, so THR is empty again and the THRE
	// interrupt is re-armed (if enabled).
	s.thrPending = s.ier&ierTHRI != 0
	if s.loopback() {
		if len(s.rx) < s.rxDepth() {
			s.rx = append(s.rx, v)
		} else {
			s.lsrErr |= lsrOE
			s.dropped.Add(1)
		}
		return 0, false
	}
	return v, true
}

func (s *Serial) setIER(v uint8) {
	v &= ierMask
	rising := v &^ s.ier
	s.ier = v
	switch {
	case v&ierTHRI == 0:
		s.thrPending = false
	case rising&ierTHRI != 0:
		// THR is always empty: enabling ETBEI raises THRE at once.
		s.thrPending = true
	}
}

func (s *Serial) setFCR(v uint8) {
	if (v^s.fcr)&fcrEnable != 0 {
		// Switching FIFO mode on or off resets both FIFOs.
		s.rx = s.rx[:0]
	}
	if v&fcrEnable == 0 {
		// The other bits are only programmed while FCR0 is set.
		s.fcr = 0
	} else {
		if v&fcrClearRX != 0 {
			s.rx = s.rx[:0]
		}
		s.fcr = v & (fcrEnable | fcrDMA | fcrTrigger)
	}
	s.refill()
}

func (s *Serial) setMCR(v uint8) {
	old := s.msrLines()
	s.mcr = v & mcrMask
	s.noteLineChange(old, s.msrLines())
	s.refill() // leaving loopback reconnects the host input
}

// noteLineChange latches MSR delta bits for a change of the modem lines.
func (s *Serial) noteLineChange(old, cur uint8) {
	changed := old ^ cur
	if changed&msrCTS != 0 {
		s.msrDelta |= msrDCTS
	}
	if changed&msrDSR != 0 {
		s.msrDelta |= msrDDSR
	}
	if changed&msrDCD != 0 {
		s.msrDelta |= msrDDCD
	}
	if old&msrRI != 0 && cur&msrRI == 0 {
		s.msrDelta |= msrTERI
	}
}

// msrLines returns the MSR's line-state bits (7:4). Outside loopback the
// host side is "always ready": CTS, DSR and DCD are asserted, RI is not. In
// loopback they mirror RTS, DTR, OUT1 and OUT2.
func (s *Serial) msrLines() uint8 {
	if !s.loopback() {
		return msrCTS | msrDSR | msrDCD
	}
	var v uint8
	if s.mcr&mcrRTS != 0 {
		v |= msrCTS
	}
	if s.mcr&mcrDTR != 0 {
		v |= msrDSR
	}
	if s.mcr&mcrOUT1 != 0 {
		v |= msrRI
	}
	if s.mcr&mcrOUT2 != 0 {
		v |= msrDCD
	}
	return v
}

func (s *Serial) msr() uint8 { return s.msrLines() | s.msrDelta }

func (s *Serial) lsr() uint8 {
	v := s.lsrErr | lsrTHRE | lsrTEMT
	if len(s.rx) > 0 {
		v |= lsrDR
	}
	return v
}

func (s *Serial) popRX() uint8 {
	if len(s.rx) == 0 {
		return 0
	}
	b := s.rx[0]
	s.rx = s.rx[:copy(s.rx, s.rx[1:])]
	s.refill()
	return b
}

// refill moves backlog bytes into the receive FIFO while it has room. In
// loopback mode the receiver is disconnected from the host input.
func (s *Serial) refill() {
	if s.loopback() {
		return
	}
	for len(s.rx) < s.rxDepth() && s.backlog.len() > 0 {
		s.rx = append(s.rx, s.backlog.pop())
	}
}

// iir computes the interrupt identification. If ack is set, reading it
// acknowledges a THRE interrupt that it reports, as a real IIR read does.
func (s *Serial) iir(ack bool) uint8 {
	id := s.pendingID()
	if id == iirTHRI && ack {
		s.thrPending = false
	}
	if s.fifoOn() {
		id |= iirFIFOs
	}
	return id
}

// pendingID returns the highest-priority enabled pending interrupt, as IIR
// bits 3:0, or iirNoInt.
func (s *Serial) pendingID() uint8 {
	switch {
	case s.ier&ierRLSI != 0 && s.lsrErr != 0:
		return iirRLSI
	case s.ier&ierRDI != 0 && len(s.rx) > 0:
		if s.fifoOn() && len(s.rx) < s.rxTrigger() {
			return iirTimeout
		}
		return iirRDI
	case s.ier&ierTHRI != 0 && s.thrPending:
		return iirTHRI
	case s.ier&ierMSI != 0 && s.msrDelta != 0:
		return iirMSI
	}
	return iirNoInt
}

func (s *Serial) updateIRQ() {
	level := s.pendingID() != iirNoInt
	if level == s.irqHigh {
		return
	}
	s.irqHigh = level
	if s.irq != nil {
		s.irq.SetLevel(level)
	}
}

// SerialState is a Serial's complete guest-visible state, for save/restore.
// IIR and the IRQ line level are not stored: they follow from the rest.
type SerialState struct {
	IER uint8 // interrupt enable (bits 3:0)
	FCR uint8 // FIFO control as programmed: enable, DMA mode, trigger level
	LCR uint8 // line control, including DLAB
	MCR uint8 // modem control (bits 4:0)
	// LSR is the line status as a read would return it; SetState takes the
	// latched error bits (OE, PE, FE, BI) from it and derives DR, THRE and
	// TEMT.
	LSR uint8
	// MSR is the modem status as a read would return it; SetState takes the
	// delta bits (3:0) from it and derives the line bits from MCR.
	MSR uint8
	SCR uint8 // scratch
	DLL uint8 // divisor latch, low byte
	DLM uint8 // divisor latch, high byte

	// THREPending reports a pending THRE interrupt (only meaningful while
	// IER.ETBEI is set).
	THREPending bool
	// RXFIFO is the receive FIFO, oldest byte first: at most
	// SerialFIFOSize bytes, or 1 when FIFOs are disabled.
	RXFIFO []byte
	// Backlog is host input waiting behind the FIFO, oldest first: at most
	// SerialBacklogSize bytes.
	Backlog []byte

	Dropped     uint64 // see Serial.Dropped
	WriteErrors uint64 // see Serial.WriteErrors
}

// State returns a copy of the UART's state. It has no side effects on the
// device.
func (s *Serial) State() SerialState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return SerialState{
		IER:         s.ier,
		FCR:         s.fcr,
		LCR:         s.lcr,
		MCR:         s.mcr,
		LSR:         s.lsr(),
		MSR:         s.msr(),
		SCR:         s.scr,
		DLL:         s.dll,
		DLM:         s.dlm,
		THREPending: s.thrPending,
		RXFIFO:      append([]byte(nil), s.rx...),
		Backlog:     s.backlog.bytes(),
		Dropped:     s.dropped.Load(),
		WriteErrors: s.writeErrors.Load(),
	}
}

// SetState replaces the UART's state with st and drives the IRQ line to the
// level st implies (unconditionally, so that a fresh interrupt controller
// learns it). It fails, changing nothing, if st cannot describe a 16550A.
func (s *Serial) SetState(st SerialState) error {
	fcr := st.FCR
	if fcr&fcrEnable == 0 {
		fcr = 0
	} else {
		fcr &= fcrEnable | fcrDMA | fcrTrigger
	}
	if n, limit := len(st.RXFIFO), depthFor(fcr); n > limit {
		return fmt.Errorf("serial state: %d bytes in receive FIFO, at most %d with FCR %#02x", n, limit, st.FCR)
	}
	if n := len(st.Backlog); n > SerialBacklogSize {
		return fmt.Errorf("serial state: %d bytes of backlog, at most %d", n, SerialBacklogSize)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ier = st.IER & ierMask
	s.fcr = fcr
	s.lcr = st.LCR
	s.mcr = st.MCR & mcrMask
	s.lsrErr = st.LSR & lsrErrors
	s.msrDelta = st.MSR & msrDeltas
	s.scr = st.SCR
	s.dll = st.DLL
	s.dlm = st.DLM
	s.thrPending = st.THREPending && s.ier&ierTHRI != 0
	s.rx = append(make([]byte, 0, SerialFIFOSize), st.RXFIFO...)
	s.backlog.reset()
	s.backlog.push(st.Backlog)
	s.refill() // a no-op for states that State produced
	s.dropped.Store(st.Dropped)
	s.writeErrors.Store(st.WriteErrors)
	s.irqHigh = s.pendingID() != iirNoInt
	if s.irq != nil {
		s.irq.SetLevel(s.irqHigh)
	}
	return nil
}

// byteQueue is a FIFO of bytes backed by a slice that is compacted as it
// drains.
type byteQueue struct {
	buf  []byte
	head int
}

func (q *byteQueue) len() int { return len(q.buf) - q.head }

func (q *byteQueue) push(b []byte) {
	if len(b) == 0 {
		return
	}
	if q.head > 0 && len(q.buf)+len(b) > cap(q.buf) {
		n := copy(q.buf, q.buf[q.head:])
		q.buf = q.buf[:n]
		q.head = 0
	}
	q.buf = append(q.buf, b...)
}

func (q *byteQueue) pop() byte {
	b := q.buf[q.head]
	q.head++
	if q.head == len(q.buf) {
		q.reset()
	}
	return b
}

func (q *byteQueue) reset() {
	q.buf = q.buf[:0]
	q.head = 0
}

func (q *byteQueue) bytes() []byte {
	return append([]byte(nil), q.buf[q.head:]...)
}
