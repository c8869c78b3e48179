package devices

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
)

// irqRecorder is an IRQLine that remembers every level it was driven to.
type irqRecorder struct {
	mu     sync.Mutex
	level  bool
	events []bool
}

func (r *irqRecorder) SetLevel(high bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.level = high
	r.events = append(r.events, high)
}

func (r *irqRecorder) Level() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.level
}

// take returns and forgets the recorded events.
func (r *irqRecorder) take() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	ev := r.events
	r.events = nil
	return ev
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// uart is a test "driver": it accesses a Serial at COM1 through a Bus, as
// the VMM would.
type uart struct {
	t   *testing.T
	bus *Bus
	s   *Serial
	irq *irqRecorder
	out *syncBuffer
}

func newUART(t *testing.T) *uart {
	t.Helper()
	u := &uart{t: t, bus: &Bus{}, irq: &irqRecorder{}, out: &syncBuffer{}}
	u.s = NewSerial(u.out, u.irq)
	if err := u.bus.Register("com1", COM1Base, SerialPorts, u.s); err != nil {
		t.Fatal(err)
	}
	return u
}

func (u *uart) in(off uint64) uint8 {
	var b [1]byte
	u.bus.Read(COM1Base+off, b[:])
	return b[0]
}

func (u *uart) outb(off uint64, v uint8) { u.bus.Write(COM1Base+off, []byte{v}) }

func (u *uart) expect(off uint64, want uint8, what string) {
	u.t.Helper()
	if got := u.in(off); got != want {
		u.t.Errorf("%s: read offset %d = %#02x, want %#02x", what, off, got, want)
	}
}

func (u *uart) expectIRQ(want bool, what string) {
	u.t.Helper()
	if got := u.irq.Level(); got != want {
		u.t.Errorf("%s: IRQ line high = %v, want %v", what, got, want)
	}
}

func TestSerialPowerOnRegisters(t *testing.T) {
	u := newUART(t)
	for _, tc := range []struct {
		name string
		off  uint64
		want uint8
	}{
		{"IER", uartIER, 0x00},
		{"IIR", uartIIR, 0x01},
		{"LCR", uartLCR, 0x00},
		{"MCR", uartMCR, 0x00},
		{"LSR", uartLSR, lsrTHRE | lsrTEMT},
		{"MSR", uartMSR, msrCTS | msrDSR | msrDCD},
		{"SCR", uartSCR, 0x00},
		{"RBR", uartRX, 0x00},
	} {
		u.expect(tc.off, tc.want, tc.name)
	}
	u.expectIRQ(false, "power-on")
	if ev := u.irq.take(); len(ev) != 0 {
		t.Errorf("IRQ driven at power-on: %v", ev)
	}
}

// A trivial polling driver: program the line, wait for THRE, write THR.
func TestSerialPollingDriver(t *testing.T) {
	u := newUART(t)
	u.outb(uartIER, 0)
	u.outb(uartLCR, lcrDLAB)
	u.outb(uartRX, 1) // 115200 baud
	u.outb(uartIER, 0)
	u.outb(uartLCR, 0x03) // 8N1
	u.outb(uartIIR, 0xc7) // FIFOs on, cleared, trigger 14
	u.outb(uartMCR, mcrDTR|mcrRTS|mcrOUT2)

	const msg = "Hello from a polling driver!\r\n"
	for i := 0; i < len(msg); i++ {
		spins := 0
		for u.in(uartLSR)&lsrTHRE == 0 {
			if spins++; spins > 1000 {
				t.Fatal("THRE never set")
			}
		}
		u.outb(uartRX, msg[i])
	}
	if got := u.out.String(); got != msg {
		t.Errorf("output %q, want %q", got, msg)
	}
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "LSR after transmit")
	if ev := u.irq.take(); len(ev) != 0 {
		t.Errorf("polling driver with IER=0 saw IRQ events %v", ev)
	}
}

// The probe Linux's 8250 driver runs (autoconfig, autoconfig_16550a, and the
// interrupt tests of serial8250_do_startup) must identify a working 16550A.
func TestSerialLinuxProbe(t *testing.T) {
	u := newUART(t)

	// IER is there: the scratch test.
	scratch := u.in(uartIER)
	u.outb(uartIER, 0)
	scratch2 := u.in(uartIER) & 0x0f
	u.outb(uartIER, 0x0f)
	scratch3 := u.in(uartIER) & 0x0f
	u.outb(uartIER, scratch)
	if scratch2 != 0 || scratch3 != 0x0f {
		t.Fatalf("IER test: %#x, %#x", scratch2, scratch3)
	}

	saveLCR, saveMCR := u.in(uartLCR), u.in(uartMCR)

	// Loopback test: MSR must mirror RTS and OUT2 as CTS and DCD.
	u.outb(uartMCR, mcrLoop|mcrRTS|mcrOUT2)
	if status := u.in(uartMSR) & 0xf0; status != 0x90 {
		t.Fatalf("loopback MSR = %#x, want 0x90", status)
	}
	u.outb(uartMCR, saveMCR)

	u.outb(uartLCR, 0xbf) // EFR access mode on 16650s
	u.outb(uartIIR, 0)    // EFR := 0 there; FCR here
	u.outb(uartLCR, 0)
	u.outb(uartIIR, fcrEnable)
	if typ := u.in(uartIIR) >> 6; typ != 3 {
		t.Fatalf("IIR>>6 after enabling FIFOs = %d, want 3 (16550A)", typ)
	}

	// autoconfig_16550a: no EFR in either configuration mode...
	u.outb(uartLCR, lcrDLAB)
	if u.in(uartIIR) == 0 {
		t.Fatal("looks like an ST16C650V1 (EFR reads 0 with DLAB)")
	}
	u.outb(uartLCR, 0xbf)
	if u.in(uartIIR) == 0 {
		t.Fatal("looks like a 16850 (EFR reads 0 in mode B)")
	}
	// ...not a National Semiconductor SuperIO...
	u.outb(uartLCR, 0)
	status1 := u.in(uartMCR)
	u.outb(uartLCR, 0xe0)
	status2 := u.in(uartIIR)
	if (status2^status1)&mcrLoop == 0 {
		u.outb(uartLCR, 0)
		u.outb(uartMCR, status1^mcrLoop)
		u.outb(uartLCR, 0xe0)
		status2 = u.in(uartIIR)
		u.outb(uartLCR, 0)
		u.outb(uartMCR, status1)
		if (status2^status1)&mcrLoop != 0 {
			t.Fatal("looks like an NS16550A SuperIO")
		}
	}
	// ...not a 16750...
	u.outb(uartLCR, 0)
	u.outb(uartIIR, fcrEnable|0x20)
	s1 := u.in(uartIIR) & 0xe0
	u.outb(uartIIR, fcrEnable)
	u.outb(uartLCR, lcrDLAB)
	u.outb(uartIIR, fcrEnable|0x20)
	s2 := u.in(uartIIR) & 0xe0
	u.outb(uartIIR, fcrEnable)
	u.outb(uartLCR, 0)
	if s1 == 0xc0 && s2 == 0xe0 {
		t.Fatal("looks like a 16750")
	}
	// ...and not an XScale (IER bit 6 does not stick).
	ierSave := u.in(uartIER)
	u.outb(uartIER, ierSave&^0x40)
	if u.in(uartIER)&0x40 == 0 {
		u.outb(uartIER, ierSave|0x40)
		if u.in(uartIER)&0x40 != 0 {
			t.Fatal("looks like an XScale UART")
		}
	}
	u.outb(uartIER, ierSave)

	u.outb(uartLCR, saveLCR)
	u.outb(uartMCR, saveMCR)
	u.outb(uartIIR, fcrEnable)
	u.outb(uartIIR, fcrEnable|fcrClearRX|0x04)
	u.outb(uartIIR, 0)
	u.in(uartRX)
	u.outb(uartIER, 0)

	// serial8250_do_startup.
	if u.in(uartLSR) == 0xff {
		t.Fatal("LSR safety check")
	}
	u.in(uartLSR)
	u.in(uartRX)
	u.in(uartIIR)
	u.in(uartMSR)
	u.outb(uartLCR, 0x03)
	u.outb(uartMCR, mcrDTR|mcrRTS|mcrOUT2)

	// UART_BUG_THRE test: THRE must be re-asserted after IER is toggled.
	u.outb(uartIER, ierTHRI)
	iir1 := u.in(uartIIR)
	u.outb(uartIER, 0)
	u.outb(uartIER, ierTHRI)
	iir := u.in(uartIIR)
	u.outb(uartIER, 0)
	if iir1 != iirTHRI || iir != iirTHRI {
		t.Errorf("THRE test: IIR %#x then %#x, want %#x twice", iir1, iir, iirTHRI)
	}

	// UART_BUG_TXEN test: enabling THRI must raise an interrupt.
	u.outb(uartIER, ierTHRI)
	lsr := u.in(uartLSR)
	iir = u.in(uartIIR)
	u.outb(uartIER, 0)
	if lsr&lsrTEMT != 0 && iir&iirNoInt != 0 {
		t.Error("TXEN test: no interrupt after enabling THRI")
	}
	u.expectIRQ(false, "after probe")
}

// Interrupt-driven transmit exactly as Linux's 8250 driver does it.
func TestSerialInterruptTransmit(t *testing.T) {
	u := newUART(t)
	u.outb(uartLCR, 0x03)
	u.outb(uartIIR, fcrEnable|0x80) // Linux: FIFO enable, RX trigger 8
	u.outb(uartMCR, mcrDTR|mcrRTS|mcrOUT2)
	u.outb(uartIER, ierRLSI|ierRDI) // startup
	u.expectIRQ(false, "RX interrupts enabled, no input")
	u.irq.take()

	// start_tx: enable ETBEI; THR is empty, so THRE is pending at once.
	u.outb(uartIER, ierRLSI|ierRDI|ierTHRI)
	u.expectIRQ(true, "ETBEI enabled")

	// The interrupt handler.
	u.expect(uartIIR, 0xc2, "IIR in handler")
	u.expectIRQ(false, "after IIR read acknowledged THRE")
	if lsr := u.in(uartLSR); lsr&lsrTHRE == 0 {
		t.Fatalf("LSR %#x without THRE", lsr)
	}
	for _, c := range []byte("abc") { // tx_chars
		u.outb(uartRX, c)
		u.expectIRQ(true, "after THR write")
	}
	// Handler loops: the THRE interrupt was re-armed by the writes.
	u.expect(uartIIR, 0xc2, "IIR after THR writes")
	u.expectIRQ(false, "after second IIR read")
	// Nothing left to send: stop_tx clears ETBEI.
	u.outb(uartIER, ierRLSI|ierRDI)
	u.expect(uartIIR, 0xc1, "IIR after stop_tx")

	if got := u.out.String(); got != "abc" {
		t.Errorf("output %q, want %q", got, "abc")
	}
	if ev := u.irq.take(); !reflect.DeepEqual(ev, []bool{true, false, true, false}) {
		t.Errorf("IRQ events %v, want [true false true false]", ev)
	}

	// Enabling and disabling ETBEI without servicing: high, then low.
	u.outb(uartIER, ierTHRI)
	u.expectIRQ(true, "ETBEI enabled again")
	u.outb(uartIER, 0)
	u.expectIRQ(false, "ETBEI disabled")
	u.expect(uartIIR, 0xc1, "IIR with ETBEI disabled")

	// Re-writing IER with ETBEI already set does not re-arm THRE once it
	// has been acknowledged (only a rising edge does).
	u.outb(uartIER, ierTHRI)
	u.expect(uartIIR, 0xc2, "IIR")
	u.outb(uartIER, ierTHRI)
	u.expect(uartIIR, 0xc1, "IIR after rewriting the same IER")
}

// IIR reports the highest-priority source; each is cleared its own way.
func TestSerialInterruptPriority(t *testing.T) {
	u := newUART(t)
	// FIFOs off (a one-byte receiver), loopback on: the lines drop, which
	// latches delta bits, and a second looped byte overruns.
	u.outb(uartMCR, mcrLoop)
	u.outb(uartRX, 'x')
	u.outb(uartRX, 'y')
	u.outb(uartIER, ierMask)
	u.expectIRQ(true, "all sources pending")

	steps := []struct {
		iir  uint8
		off  uint64 // register read that clears the source
		want uint8  // its value
	}{
		{iirRLSI, uartLSR, lsrDR | lsrOE | lsrTHRE | lsrTEMT},
		{iirRDI, uartRX, 'x'},
		{iirTHRI, uartIIR, iirNoInt}, // reading IIR cleared THRE already
		{iirMSI, uartMSR, msrDCTS | msrDDSR | msrDDCD},
	}
	for _, st := range steps {
		u.expect(uartIIR, st.iir, "IIR")
		if st.off != uartIIR {
			u.expect(st.off, st.want, "clearing read")
		}
	}
	u.expect(uartIIR, iirNoInt, "IIR when all sources are cleared")
	u.expectIRQ(false, "all sources cleared")
	if got := u.s.Dropped(); got != 1 {
		t.Errorf("Dropped = %d, want 1 (loopback overrun)", got)
	}
}

func TestSerialReceiveTriggerLevels(t *testing.T) {
	for _, tc := range []struct {
		fcr  uint8
		n    int
		want uint8
	}{
		{0, 1, iirRDI},
		{fcrEnable, 1, 0xc0 | iirRDI},
		{fcrEnable | 0x40, 3, 0xc0 | iirTimeout},
		{fcrEnable | 0x40, 4, 0xc0 | iirRDI},
		{fcrEnable | 0x80, 7, 0xc0 | iirTimeout},
		{fcrEnable | 0x80, 8, 0xc0 | iirRDI},
		{fcrEnable | 0xc0, 13, 0xc0 | iirTimeout},
		{fcrEnable | 0xc0, 14, 0xc0 | iirRDI},
		{fcrEnable | 0xc0, 40, 0xc0 | iirRDI},
	} {
		t.Run(fmt.Sprintf("fcr=%#x/n=%d", tc.fcr, tc.n), func(t *testing.T) {
			u := newUART(t)
			u.outb(uartIIR, tc.fcr)
			u.outb(uartIER, ierRDI)
			u.expectIRQ(false, "no input")
			u.s.Enqueue(bytes.Repeat([]byte{'z'}, tc.n))
			u.expectIRQ(true, "input queued")
			u.expect(uartIIR, tc.want, "IIR")
		})
	}
}

func TestSerialReceiveInterrupt(t *testing.T) {
	u := newUART(t)
	u.outb(uartIIR, fcrEnable|0x80)
	u.outb(uartIER, ierRDI|ierRLSI)
	u.irq.take()

	const input = "typed on the host console, longer than one FIFO"
	u.s.Enqueue([]byte(input))
	u.expectIRQ(true, "after Enqueue")
	var got []byte
	for u.in(uartIIR)&iirNoInt == 0 { // handler loop
		for u.in(uartLSR)&lsrDR != 0 {
			got = append(got, u.in(uartRX))
		}
	}
	if string(got) != input {
		t.Errorf("received %q, want %q", got, input)
	}
	u.expectIRQ(false, "after draining")
	if ev := u.irq.take(); !reflect.DeepEqual(ev, []bool{true, false}) {
		t.Errorf("IRQ events %v, want [true false]", ev)
	}

	// Without FIFOs the receiver holds one byte; the rest waits.
	u.outb(uartIIR, 0)
	u.s.Enqueue([]byte("ab"))
	u.expect(uartIIR, iirRDI, "IIR, 16450 mode")
	u.expect(uartRX, 'a', "first byte")
	u.expect(uartLSR, lsrDR|lsrTHRE|lsrTEMT, "LSR with the second byte in")
	u.expect(uartRX, 'b', "second byte")
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "LSR drained")
}

func TestSerialBacklogOverflow(t *testing.T) {
	u := newUART(t)
	u.outb(uartIIR, fcrEnable)
	u.outb(uartIER, ierRLSI)
	const extra = 10
	in := make([]byte, SerialFIFOSize+SerialBacklogSize+extra)
	for i := range in {
		in[i] = byte(i * 7)
	}
	u.s.Enqueue(in[:100])
	u.s.Enqueue(in[100:])
	if got := u.s.Dropped(); got != extra {
		t.Errorf("Dropped = %d, want %d", got, extra)
	}
	u.expectIRQ(true, "overrun with ELSI")
	u.expect(uartIIR, 0xc0|iirRLSI, "IIR")
	u.expect(uartLSR, lsrDR|lsrOE|lsrTHRE|lsrTEMT, "LSR reports the overrun")
	u.expect(uartLSR, lsrDR|lsrTHRE|lsrTEMT, "reading LSR cleared OE")
	u.expectIRQ(false, "after LSR read")

	kept := len(in) - extra
	for i := 0; i < kept; i++ {
		if b := u.in(uartRX); b != in[i] {
			t.Fatalf("byte %d = %#x, want %#x", i, b, in[i])
		}
	}
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "LSR after draining")
}

func TestSerialFIFOControl(t *testing.T) {
	u := newUART(t)
	u.outb(uartIIR, fcrEnable)
	u.expect(uartIIR, 0xc1, "FIFOs on")
	u.s.Enqueue([]byte("0123456789abcdefXYZ")) // 16 in the FIFO, 3 behind
	u.outb(uartIIR, fcrEnable|fcrClearRX)
	u.expect(uartRX, 'X', "after clearing the RX FIFO the backlog moves up")
	u.outb(uartIIR, 0) // FIFOs off: cleared again
	u.expect(uartIIR, 0x01, "FIFOs off")
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "nothing left")

	u.s.Enqueue([]byte("pq"))
	u.outb(uartIIR, fcrClearRX) // ignored without FCR0
	u.expect(uartRX, 'p', "FCR write without enable leaves the receiver alone")
	u.expect(uartRX, 'q', "second byte")
}

func TestSerialLoopback(t *testing.T) {
	u := newUART(t)
	u.outb(uartIIR, fcrEnable)
	u.in(uartMSR)

	for _, tc := range []struct {
		mcr   uint8
		lines uint8
	}{
		{mcrLoop, 0},
		{mcrLoop | mcrDTR, msrDSR},
		{mcrLoop | mcrRTS, msrCTS},
		{mcrLoop | mcrOUT1, msrRI},
		{mcrLoop | mcrOUT2, msrDCD},
		{mcrLoop | 0x0f, msrCTS | msrDSR | msrRI | msrDCD},
	} {
		u.outb(uartMCR, tc.mcr)
		if got := u.in(uartMSR) & 0xf0; got != tc.lines {
			t.Errorf("MCR %#x: MSR lines %#x, want %#x", tc.mcr, got, tc.lines)
		}
	}

	// Host input waits while the receiver is looped back.
	u.s.Enqueue([]byte("host"))
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "host input does not arrive in loopback")

	msg := []byte("0123456789abcdefg") // one more than the FIFO holds
	for _, c := range msg {
		u.outb(uartRX, c)
	}
	if out := u.out.String(); out != "" {
		t.Errorf("loopback bytes leaked to output: %q", out)
	}
	u.expect(uartLSR, lsrDR|lsrOE|lsrTHRE|lsrTEMT, "17th byte overran")
	for i := 0; i < SerialFIFOSize; i++ {
		u.expect(uartRX, msg[i], "looped byte")
	}
	u.expect(uartLSR, lsrTHRE|lsrTEMT, "drained")

	u.outb(uartMCR, mcrDTR|mcrRTS|mcrOUT2)
	u.expect(uartMSR, msrCTS|msrDSR|msrDCD|msrTERI, "leaving loopback with all lines up: only RI falls")
	u.outb(uartRX, '!')
	if out := u.out.String(); out != "!" {
		t.Errorf("output after loopback %q, want %q", out, "!")
	}
	for _, c := range []byte("host") {
		u.expect(uartRX, c, "host input after loopback")
	}
}

func TestSerialModemStatusInterrupt(t *testing.T) {
	u := newUART(t)
	u.outb(uartIER, ierMSI)
	u.expectIRQ(false, "no modem change")
	u.outb(uartMCR, mcrLoop|mcrOUT1)
	u.expectIRQ(true, "lines changed")
	u.expect(uartIIR, iirMSI, "IIR")
	u.expect(uartMSR, msrRI|msrDCTS|msrDDSR|msrDDCD, "MSR")
	u.expectIRQ(false, "MSR read")
	u.outb(uartMCR, mcrLoop)
	u.expect(uartMSR, msrTERI, "trailing edge of RI")
	u.outb(uartMCR, mcrLoop)
	u.expect(uartMSR, 0, "no change, no delta")
}

func TestSerialDivisorLatch(t *testing.T) {
	u := newUART(t)
	u.outb(uartIER, ierRDI|ierRLSI)
	u.outb(uartLCR, lcrDLAB|0x03)
	u.expect(uartRX, 12, "DLL at power-on (9600 baud)")
	u.expect(uartIER, 0, "DLM at power-on")
	u.outb(uartRX, 0x34)
	u.outb(uartIER, 0x12)
	u.expect(uartRX, 0x34, "DLL")
	u.expect(uartIER, 0x12, "DLM")
	u.expect(uartLCR, lcrDLAB|0x03, "LCR")
	if out := u.out.String(); out != "" {
		t.Errorf("DLL write transmitted %q", out)
	}
	u.outb(uartLCR, 0x03)
	u.expect(uartIER, ierRDI|ierRLSI, "IER survives DLAB")
	u.s.Enqueue([]byte{'k'})
	u.outb(uartLCR, lcrDLAB|0x03)
	u.expect(uartRX, 0x34, "DLL, not RBR, while DLAB")
	u.outb(uartLCR, 0x03)
	u.expect(uartRX, 'k', "RBR after DLAB")
	st := u.s.State()
	if st.DLL != 0x34 || st.DLM != 0x12 {
		t.Errorf("state divisor %#x/%#x", st.DLL, st.DLM)
	}
}

func TestSerialScratchAndWideAccess(t *testing.T) {
	u := newUART(t)
	u.outb(uartSCR, 0xa5)
	u.expect(uartSCR, 0xa5, "SCR")
	// A 16-bit write at LCR writes LCR and MCR.
	u.bus.Write(COM1Base+uartLCR, []byte{0x03, 0x0b})
	u.expect(uartLCR, 0x03, "LCR")
	u.expect(uartMCR, 0x0b, "MCR")
	var b [2]byte
	u.bus.Read(COM1Base+uartLSR, b[:])
	if b != [2]byte{lsrTHRE | lsrTEMT, msrCTS | msrDSR | msrDCD} {
		t.Errorf("16-bit read of LSR/MSR = % x", b)
	}
	// Bytes beyond the UART read as all ones, writes there are dropped.
	u.s.Read(7, b[:])
	if b != [2]byte{0xa5, 0xff} {
		t.Errorf("read past the end = % x", b)
	}
	u.s.Write(8, []byte{1})
}

type failingWriter struct{ calls int }

func (w *failingWriter) Write(p []byte) (int, error) {
	w.calls++
	return 0, errors.New("console gone")
}

func TestSerialWriteErrors(t *testing.T) {
	w := &failingWriter{}
	s := NewSerial(w, nil)
	for _, c := range []byte("xyz") {
		s.Write(uartRX, []byte{c})
	}
	if s.WriteErrors() != 3 || w.calls != 3 {
		t.Errorf("WriteErrors = %d, calls = %d, want 3", s.WriteErrors(), w.calls)
	}
	var b [1]byte
	s.Read(uartLSR, b[:])
	if b[0] != lsrTHRE|lsrTEMT {
		t.Errorf("LSR %#x after failed writes", b[0])
	}
	// A nil writer discards.
	NewSerial(nil, nil).Write(uartRX, []byte{'x'})
}

// serialOp is one step of a scripted session with a UART.
type serialOp struct {
	read  bool
	off   uint64
	val   uint8
	input string // Enqueue this instead
}

func rd(off uint64) serialOp          { return serialOp{read: true, off: off} }
func wr(off uint64, v uint8) serialOp { return serialOp{off: off, val: v} }
func enq(s string) serialOp           { return serialOp{input: s} }

// runSerialOps applies ops, recording each read and the IRQ level after
// each step.
func runSerialOps(s *Serial, irq *irqRecorder, ops []serialOp) []string {
	var log []string
	for _, op := range ops {
		switch {
		case op.input != "":
			s.Enqueue([]byte(op.input))
			log = append(log, fmt.Sprintf("enq irq=%v", irq.Level()))
		case op.read:
			var b [1]byte
			s.Read(op.off, b[:])
			log = append(log, fmt.Sprintf("r%d=%#02x irq=%v", op.off, b[0], irq.Level()))
		default:
			s.Write(op.off, []byte{op.val})
			log = append(log, fmt.Sprintf("w%d irq=%v", op.off, irq.Level()))
		}
	}
	return log
}

// Saving the state at any point of a session and restoring it into a fresh
// UART must not change what the guest and the host observe.
func TestSerialStateSaveRestore(t *testing.T) {
	long := "0123456789abcdefghijklmnopqrstuvwxyz" // more than the FIFO holds
	ops := []serialOp{
		wr(uartLCR, lcrDLAB), wr(uartRX, 3), wr(uartIER, 0), wr(uartLCR, 0x03),
		wr(uartIIR, fcrEnable|0x80), wr(uartMCR, mcrDTR|mcrRTS|mcrOUT2), wr(uartSCR, 0x5a),
		enq(long), wr(uartIER, ierRDI|ierRLSI),
		rd(uartIIR), rd(uartRX), rd(uartRX), rd(uartLSR),
		wr(uartIER, ierRDI|ierRLSI|ierTHRI), rd(uartIIR), rd(uartRX),
		wr(uartRX, 'A'), wr(uartRX, 'B'), rd(uartIIR),
		rd(uartRX), rd(uartRX), rd(uartRX), rd(uartRX), rd(uartRX), rd(uartIIR),
		wr(uartIER, ierRDI|ierRLSI|ierTHRI|ierMSI), wr(uartMCR, mcrLoop|mcrRTS), rd(uartIIR),
		wr(uartRX, 'L'), rd(uartIIR), enq("during loopback"), rd(uartMSR), rd(uartIIR),
		wr(uartIIR, 0), wr(uartRX, 'M'), wr(uartRX, 'N'), rd(uartLSR), rd(uartIIR),
		wr(uartMCR, mcrDTR|mcrRTS|mcrOUT2), rd(uartMSR), rd(uartIIR), rd(uartRX),
		wr(uartIIR, fcrEnable|0xc0|fcrClearRX), rd(uartIIR), rd(uartRX), rd(uartRX),
		wr(uartLCR, lcrDLAB|0x03), rd(uartRX), rd(uartIER), wr(uartLCR, 0x03),
		rd(uartSCR), wr(uartRX, 'C'), rd(uartIIR), rd(uartIIR),
		wr(uartIER, 0), rd(uartIIR),
	}
	for i := 0; i < 60; i++ {
		ops = append(ops, rd(uartLSR), rd(uartRX))
	}
	ops = append(ops, rd(uartIIR), rd(uartLSR))

	refIRQ, refOut := &irqRecorder{}, &syncBuffer{}
	ref := runSerialOps(NewSerial(refOut, refIRQ), refIRQ, ops)

	for split := 0; split <= len(ops); split++ {
		irq1, out1 := &irqRecorder{}, &syncBuffer{}
		s1 := NewSerial(out1, irq1)
		log := runSerialOps(s1, irq1, ops[:split])
		st := s1.State()

		irq2, out2 := &irqRecorder{}, &syncBuffer{}
		s2 := NewSerial(out2, irq2)
		if err := s2.SetState(st); err != nil {
			t.Fatalf("split %d: SetState: %v", split, err)
		}
		if ev := irq2.take(); !reflect.DeepEqual(ev, []bool{irq1.Level()}) {
			t.Fatalf("split %d: SetState drove IRQ %v, want [%v]", split, ev, irq1.Level())
		}
		if st2 := s2.State(); !reflect.DeepEqual(normalizeSerialState(st2), normalizeSerialState(st)) {
			t.Fatalf("split %d: state after restore\n%+v\nwant\n%+v", split, st2, st)
		}
		log = append(log, runSerialOps(s2, irq2, ops[split:])...)
		if !reflect.DeepEqual(log, ref) {
			for i := range ref {
				if log[i] != ref[i] {
					t.Fatalf("split %d: step %d: %s, want %s", split, i, log[i], ref[i])
				}
			}
		}
		if got := out1.String() + out2.String(); got != refOut.String() {
			t.Fatalf("split %d: output %q, want %q", split, got, refOut.String())
		}
	}
}

func normalizeSerialState(st SerialState) SerialState {
	if len(st.RXFIFO) == 0 {
		st.RXFIFO = nil
	}
	if len(st.Backlog) == 0 {
		st.Backlog = nil
	}
	return st
}

func TestSerialSetStateRejects(t *testing.T) {
	s := NewSerial(nil, nil)
	for _, tc := range []struct {
		name string
		st   SerialState
	}{
		{"two bytes without FIFO", SerialState{RXFIFO: []byte("ab")}},
		{"overfull FIFO", SerialState{FCR: fcrEnable, RXFIFO: make([]byte, SerialFIFOSize+1)}},
		{"huge backlog", SerialState{Backlog: make([]byte, SerialBacklogSize+1)}},
	} {
		if err := s.SetState(tc.st); err == nil {
			t.Errorf("%s: SetState accepted it", tc.name)
		}
	}
	// The device is unchanged by the failures.
	if st := s.State(); st.DLL != 12 || len(st.RXFIFO) != 0 {
		t.Errorf("state changed by rejected SetState: %+v", st)
	}
}

// Host input, guest vCPUs and state snapshots all at once (run with -race).
func TestSerialConcurrent(t *testing.T) {
	irq := &irqRecorder{}
	out := &syncBuffer{}
	s := NewSerial(out, irq)
	s.Write(uartIIR, []byte{fcrEnable | 0x80})
	s.Write(uartIER, []byte{ierRDI | ierRLSI})

	const total = 20000 // fits in the backlog: nothing may be lost
	input := make([]byte, total)
	for i := range input {
		input[i] = byte(i % 251)
	}
	const txPerWriter = 2000

	var wg sync.WaitGroup
	wg.Add(4)
	go func() { // host console
		defer wg.Done()
		for i := 0; i < total; i += 97 {
			s.Enqueue(input[i:min(i+97, total)])
		}
	}()
	received := make([]byte, 0, total)
	go func() { // vCPU 0: the receive path of the guest driver
		defer wg.Done()
		var b [1]byte
		for len(received) < total {
			s.Read(uartLSR, b[:])
			if b[0]&lsrDR == 0 {
				continue
			}
			s.Read(uartRX, b[:])
			received = append(received, b[0])
		}
	}()
	for w := 0; w < 2; w++ { // vCPUs 1 and 2: transmit, poke IIR and MSR
		go func(c byte) {
			defer wg.Done()
			var b [1]byte
			for i := 0; i < txPerWriter; i++ {
				s.Write(uartRX, []byte{c})
				s.Read(uartIIR, b[:])
				s.Read(uartMSR, b[:])
				if i%100 == 0 {
					_ = s.State()
				}
			}
		}(byte('a' + w))
	}
	wg.Wait()

	if !bytes.Equal(received, input) {
		t.Error("received bytes differ from the input")
	}
	if got := out.String(); len(got) != 2*txPerWriter ||
		bytes.Count([]byte(got), []byte{'a'}) != txPerWriter {
		t.Errorf("output has %d bytes, want %d of each writer", len(got), txPerWriter)
	}
	if s.Dropped() != 0 {
		t.Errorf("Dropped = %d", s.Dropped())
	}
}
