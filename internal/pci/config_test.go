package pci

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestHeaderDefaults(t *testing.T) {
	c := NewConfigSpace(testHeader)
	for _, tc := range []struct {
		name   string
		off, n int
		want   uint32
	}{
		{"vendor", RegVendorID, 2, 0x1af4},
		{"device", RegDeviceID, 2, 0x1041},
		{"command", RegCommand, 2, 0},
		{"status (no capabilities)", RegStatus, 2, 0},
		{"revision", RegRevision, 1, 1},
		{"class", RegRevision, 4, 0x020000<<8 | 1},
		{"header type", RegHeaderType, 1, 0},
		{"BAR0", RegBAR0, 4, 0},
		{"subsystem vendor", RegSubsystemVendorID, 2, 0x1af4},
		{"subsystem", RegSubsystemID, 2, 1},
		{"expansion ROM", RegExpansionROM, 4, 0},
		{"capability pointer", RegCapabilities, 1, 0},
		{"interrupt pin", RegInterruptPin, 1, 0},
		{"extended space", 0x100, 4, 0},
		{"last dword", ConfigSize - 4, 4, 0},
	} {
		if got := cfgRead(c, tc.off, tc.n); got != tc.want {
			t.Errorf("%s (%#x/%d) = %#x, want %#x", tc.name, tc.off, tc.n, got, tc.want)
		}
	}
	if h := c.Header(); h != testHeader {
		t.Errorf("Header() = %+v, want %+v", h, testHeader)
	}
	if _, err := c.AddCapability(0x09, []byte{4, 0}, nil); err != nil {
		t.Fatal(err)
	}
	if got := cfgRead(c, RegStatus, 2); got != StatusCapList {
		t.Errorf("status with a capability = %#x, want %#x", got, StatusCapList)
	}
}

func TestReadOnlyBits(t *testing.T) {
	c := NewConfigSpace(testHeader)
	before := c.Bytes(0, ConfigSize)
	for off := 0; off < ConfigSize; off += 4 {
		cfgWrite(c, off, 4, 0xffffffff)
	}
	after := c.Bytes(0, ConfigSize)
	writable := map[int]byte{ // offset -> bits that may change
		RegCommand: 0x47, RegCommand + 1: 0x05, RegCacheLineSize: 0xff, RegInterruptLine: 0xff,
	}
	for off := range after {
		if diff := before[off] ^ after[off]; diff&^writable[off] != 0 {
			t.Errorf("offset %#x changed %#02x -> %#02x", off, before[off], after[off])
		}
	}
	if got := c.Command(); got != commandWritable {
		t.Errorf("command after writing ones = %#x, want %#x", got, commandWritable)
	}
}

func TestStatusW1C(t *testing.T) {
	c := NewConfigSpace(testHeader)
	if _, err := c.AddCapability(0x09, []byte{4, 0}, nil); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.data[RegStatus+1] = 0xf9 // every error bit, as a device would set them
	c.mu.Unlock()
	cfgWrite(c, RegStatus, 2, 1<<11|1<<15|StatusCapList)
	if got, want := cfgRead(c, RegStatus, 2), uint32(0xf9&^0x88)<<8|StatusCapList; got != want {
		t.Errorf("status after W1C = %#x, want %#x", got, want)
	}
	cfgWrite(c, RegStatus, 2, 0) // writing zeros clears nothing
	if got, want := cfgRead(c, RegStatus, 2), uint32(0xf9&^0x88)<<8|StatusCapList; got != want {
		t.Errorf("status after writing 0 = %#x, want %#x", got, want)
	}
	cfgWrite(c, RegStatus, 2, 0xffff)
	if got := cfgRead(c, RegStatus, 2); got != StatusCapList {
		t.Errorf("status after clearing all = %#x, want only the capability bit", got)
	}
}

// sizeBAR does what Linux's __pci_read_base does for one register.
func sizeBAR(c *ConfigSpace, reg int) uint32 {
	orig := cfgRead(c, reg, 4)
	cfgWrite(c, reg, 4, 0xffffffff)
	sz := cfgRead(c, reg, 4)
	cfgWrite(c, reg, 4, orig)
	return sz
}

func TestBARSizing(t *testing.T) {
	c := NewConfigSpace(testHeader)
	must(t, c.DefineBAR(0, 0x4000, BARMem64, true))
	must(t, c.DefineBAR(2, 32, BARIO, false))
	must(t, c.DefineBAR(3, 0x1000, BARMem32, false))
	must(t, c.DefineBAR(4, 1<<33, BARMem64, false))
	for _, tc := range []struct {
		reg  int
		want uint32
	}{
		{RegBAR0, 0xffffc000 | 0xc},   // 64-bit prefetchable
		{RegBAR0 + 4, 0xffffffff},     // upper half of a 16 KiB BAR
		{RegBAR0 + 8, 0xffffffe0 | 1}, // I/O
		{RegBAR0 + 12, 0xfffff000},    // 32-bit
		{RegBAR0 + 16, 0x4},           // 8 GiB: no low address bits
		{RegBAR0 + 20, 0xfffffffe},    // ... high half gives the size
	} {
		orig := cfgRead(c, tc.reg, 4)
		if got := sizeBAR(c, tc.reg); got != tc.want {
			t.Errorf("sizing register %#x read %#x, want %#x", tc.reg, got, tc.want)
		}
		if got := cfgRead(c, tc.reg, 4); got != orig {
			t.Errorf("register %#x after sizing = %#x, want %#x back", tc.reg, got, orig)
		}
	}
	// Linux's pci_size on a 64-bit BAR: combine the halves.
	if sz := uint64(sizeBAR(c, RegBAR0+4))<<32 | uint64(sizeBAR(c, RegBAR0)&^0xf); ^sz+1 != 0x4000 {
		t.Errorf("64-bit size %#x", ^sz+1)
	}
	for i := range NumBARs {
		if got := c.BARAddress(i); got != 0 {
			t.Errorf("BARAddress(%d) after sizing = %#x", i, got)
		}
	}
}

func Test64BitBARHalves(t *testing.T) {
	c := NewConfigSpace(testHeader)
	must(t, c.DefineBAR(0, 0x4000, BARMem64, false))
	cfgWrite(c, RegBAR0, 4, 0x1234_5678)
	cfgWrite(c, RegBAR0+4, 4, 0x0000_0042)
	if got, want := c.BARAddress(0), uint64(0x42_1234_4000); got != want {
		t.Errorf("BARAddress(0) = %#x, want %#x", got, want)
	}
	if got := c.BARAddress(1); got != 0 {
		t.Errorf("BARAddress of the upper half = %#x, want 0", got)
	}
	c.SetBARAddress(0, 0x1_0000_8000)
	if lo, hi := cfgRead(c, RegBAR0, 4), cfgRead(c, RegBAR0+4, 4); lo != 0x8004 || hi != 1 {
		t.Errorf("after SetBARAddress registers are %#x %#x, want 0x8004 0x1", lo, hi)
	}
	c.SetBARAddress(0, 0x1_0000_8fff) // misaligned bits are dropped
	if got := c.BARAddress(0); got != 0x1_0000_8000 {
		t.Errorf("BARAddress after a misaligned SetBARAddress = %#x", got)
	}
	c.SetBARAddress(1, 0xdead_0000) // upper half: ignored
	c.SetBARAddress(5, 0xdead_0000) // undefined: ignored
	c.SetBARAddress(-1, 1)
	c.SetBARAddress(99, 1)
	if got := c.BARAddress(0); got != 0x1_0000_8000 || cfgRead(c, RegBAR0+20, 4) != 0 {
		t.Errorf("SetBARAddress on an upper half or undefined BAR changed something")
	}
	bars := c.BARs()
	if len(bars) != 1 || bars[0].Kind != BARMem64 || bars[0].Size != 0x4000 || bars[0].Address != 0x1_0000_8000 {
		t.Errorf("BARs() = %+v", bars)
	}
}

func TestDefineBARErrors(t *testing.T) {
	for _, tc := range []struct {
		i    int
		size uint64
		kind BARKind
		pf   bool
	}{
		{-1, 0x1000, BARMem32, false},
		{6, 0x1000, BARMem32, false},
		{5, 0x1000, BARMem64, false}, // needs two registers
		{0, 0x1800, BARMem32, false}, // not a power of two
		{0, 0, BARMem32, false},
		{0, 0x800, BARMem32, false}, // below 4 KiB
		{0, 1 << 32, BARMem32, false},
		{0, 8, BARIO, false},
		{0, 1 << 17, BARIO, false},
		{0, 16, BARIO, true},
		{0, 0x1000, BARKind(7), false},
	} {
		c := NewConfigSpace(testHeader)
		if err := c.DefineBAR(tc.i, tc.size, tc.kind, tc.pf); err == nil {
			t.Errorf("DefineBAR(%d, %#x, %v, %v) succeeded", tc.i, tc.size, tc.kind, tc.pf)
		}
	}
	c := NewConfigSpace(testHeader)
	must(t, c.DefineBAR(1, 0x1000, BARMem64, false))
	for _, i := range []int{0, 1, 2} {
		if err := c.DefineBAR(i, 0x1000, BARMem64, false); err == nil {
			t.Errorf("DefineBAR(%d) over a 64-bit BAR at 1 succeeded", i)
		}
	}
	if err := c.DefineBAR(3, 0x1000, BARMem32, false); err != nil {
		t.Errorf("DefineBAR(3) next to it: %v", err)
	}
}

// walkCaps reads the capability list as Linux's __pci_find_next_cap_ttl
// does, through reads of 1 byte.
func walkCaps(read func(off, n int) uint32) (ids []uint8, offs []int) {
	if read(RegStatus, 2)&StatusCapList == 0 {
		return nil, nil
	}
	pos := int(read(RegCapabilities, 1))
	for ttl := 48; ttl > 0 && pos >= 0x40; ttl-- {
		pos &^= 3
		ent := read(pos, 2)
		id := uint8(ent)
		if id == 0xff {
			break
		}
		ids = append(ids, id)
		offs = append(offs, pos)
		pos = int(ent >> 8)
	}
	return ids, offs
}

func TestCapabilityChain(t *testing.T) {
	c := NewConfigSpace(testHeader)
	var wantOffs []int
	for _, cp := range []struct {
		id   uint8
		body []byte
	}{
		{0x09, []byte{3}}, // 3 bytes in all: next one is aligned up
		{0x09, make([]byte, 14)},
		{0x01, make([]byte, 6)},
	} {
		off, err := c.AddCapability(cp.id, cp.body, nil)
		must(t, err)
		wantOffs = append(wantOffs, off)
	}
	if want := []int{0x40, 0x44, 0x54}; !slices.Equal(wantOffs, want) {
		t.Errorf("capabilities at %#x, want %#x", wantOffs, want)
	}
	ids, offs := walkCaps(func(off, n int) uint32 { return cfgRead(c, off, n) })
	if !bytes.Equal(ids, []byte{0x09, 0x09, 0x01}) || !slices.Equal(offs, wantOffs) {
		t.Errorf("walk found ids %x at %#x", ids, offs)
	}
	if _, err := c.AddCapability(0x09, make([]byte, 200), nil); err == nil {
		t.Error("a capability past 0x100 was accepted")
	}
	if _, err := c.AddCapability(0x09, []byte{1, 2}, []byte{1}); err == nil {
		t.Error("a writable mask of the wrong length was accepted")
	}
	// The failed calls left the list alone.
	if ids2, _ := walkCaps(func(off, n int) uint32 { return cfgRead(c, off, n) }); !bytes.Equal(ids2, ids) {
		t.Errorf("list after failed adds: %x", ids2)
	}
}

func TestCapabilityWritableMask(t *testing.T) {
	c := NewConfigSpace(testHeader)
	off, err := c.AddCapability(0x09, []byte{0x11, 0x22, 0x33, 0x44}, []byte{0xff, 0x0f, 0, 0})
	must(t, err)
	cfgWrite(c, off, 4, 0xffffffff) // id and next are read-only
	cfgWrite(c, off+4, 2, 0)        // read-only body bytes
	if got := c.Bytes(off, 6); !bytes.Equal(got, []byte{0x09, 0, 0xff, 0x2f, 0x33, 0x44}) {
		t.Errorf("capability after writing ones: % x", got)
	}
	cfgWrite(c, off+2, 2, 0)
	if got := c.Bytes(off+2, 2); !bytes.Equal(got, []byte{0x00, 0x20}) {
		t.Errorf("capability after writing zeros: % x", got)
	}
}

type recordingInterceptor struct {
	log  []string
	fill byte
}

func (r *recordingInterceptor) Read(off int, data []byte) {
	r.log = append(r.log, fmt.Sprintf("r %d/%d", off, len(data)))
	fill(data, r.fill)
}

func (r *recordingInterceptor) Write(off int, data []byte) {
	r.log = append(r.log, fmt.Sprintf("w %d/%d", off, len(data)))
}

func TestIntercept(t *testing.T) {
	c := NewConfigSpace(testHeader)
	off, err := c.AddCapability(0x09, make([]byte, 18), append(make([]byte, 14), 0xff, 0xff, 0xff, 0xff))
	must(t, err)
	r := &recordingInterceptor{fill: 0xab}
	c.Intercept(off+16, 4, r)

	if got := cfgRead(c, off+16, 4); got != 0xabababab {
		t.Errorf("intercepted read = %#x", got)
	}
	if got := cfgRead(c, off+14, 4); got != 0xabab0000 {
		t.Errorf("read straddling the range start = %#x, want 0xabab0000", got)
	}
	if got := cfgRead(c, off+12, 4); got != 0 {
		t.Errorf("read before the range = %#x", got)
	}
	cfgWrite(c, off+18, 2, 0xbeef)
	if got := c.Bytes(off+16, 4); !bytes.Equal(got, []byte{0, 0, 0xef, 0xbe}) {
		t.Errorf("generic store before the interceptor: % x", got)
	}
	want := []string{"r 0/4", "r 0/2", "w 2/2"}
	if strings.Join(r.log, ",") != strings.Join(want, ",") {
		t.Errorf("interceptor saw %v, want %v", r.log, want)
	}
	for _, bad := range []struct{ off, n int }{{-1, 4}, {0, 0}, {ConfigSize - 2, 4}, {0, ConfigSize + 1}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Intercept(%d, %d) did not panic", bad.off, bad.n)
				}
			}()
			c.Intercept(bad.off, bad.n, r)
		}()
	}
}

func TestBadAccesses(t *testing.T) {
	c := NewConfigSpace(testHeader)
	before := c.Bytes(0, ConfigSize)
	for _, tc := range []struct{ off, n int }{
		{-1, 1}, {ConfigSize, 1}, {ConfigSize - 1, 2}, {ConfigSize - 3, 4}, {0, 3}, {0, 8}, {0, 0}, {1 << 62, 4},
	} {
		data := make([]byte, tc.n)
		c.Read(tc.off, data)
		for _, v := range data {
			if v != 0xff {
				t.Errorf("Read(%d, %d bytes) = % x, want all ones", tc.off, tc.n, data)
				break
			}
		}
		c.Write(tc.off, make([]byte, tc.n))
	}
	if !bytes.Equal(before, c.Bytes(0, ConfigSize)) {
		t.Error("bad writes changed configuration space")
	}
	for _, tc := range []struct{ off, n int }{{-1, 1}, {0, -1}, {ConfigSize, 1}, {1, ConfigSize}} {
		if b := c.Bytes(tc.off, tc.n); b != nil {
			t.Errorf("Bytes(%d, %d) = %d bytes, want nil", tc.off, tc.n, len(b))
		}
	}
	if b := c.Bytes(ConfigSize, 0); b == nil || len(b) != 0 {
		t.Errorf("Bytes(end, 0) = %v", b)
	}
}

func TestConfigStateRoundTrip(t *testing.T) {
	src := newTestFunc(t, &fakeSender{}).cfg
	cfgWrite(src, RegCommand, 2, CommandMemory|CommandBusMaster)
	src.SetBARAddress(0, 0xc000_4000)
	cfgWrite(src, RegInterruptLine, 1, 11)
	st := src.State()

	dst := newTestFunc(t, &fakeSender{}).cfg
	must(t, dst.SetState(st))
	if !bytes.Equal(dst.Bytes(0, ConfigSize), src.Bytes(0, ConfigSize)) {
		t.Error("restored configuration space differs")
	}
	st.Data[0] = 0x55 // the state is a copy
	if cfgRead(src, 0, 1) != 0xf4 {
		t.Error("State shares memory with the config space")
	}
}

func TestConfigSetStateGarbage(t *testing.T) {
	c := newTestFunc(t, &fakeSender{}).cfg
	before := c.Bytes(0, ConfigSize)
	good := c.State()
	for name, st := range map[string]ConfigState{
		"nil":        {},
		"short":      {Data: good.Data[:100]},
		"long":       {Data: append(append([]byte(nil), good.Data...), 0)},
		"vendor":     {Data: patch(good.Data, RegVendorID, 0x12)},
		"BAR flags":  {Data: patch(good.Data, RegBAR0, 0x00)},
		"cap chain":  {Data: patch(good.Data, RegCapabilities, 0x80)},
		"MSI-X size": {Data: patch(good.Data, 0x42, 0x07)},
		"extended":   {Data: patch(good.Data, 0x800, 1)},
		"all ones":   {Data: bytes.Repeat([]byte{0xff}, ConfigSize)},
	} {
		if err := c.SetState(st); err == nil {
			t.Errorf("%s: SetState accepted it", name)
		}
	}
	if !bytes.Equal(before, c.Bytes(0, ConfigSize)) {
		t.Error("a refused SetState changed configuration space")
	}
	// Writable bits may differ.
	must(t, c.SetState(ConfigState{Data: patch(good.Data, RegCommand, 0x07)}))
}

func patch(b []byte, off int, v byte) []byte {
	c := append([]byte(nil), b...)
	c[off] = v
	return c
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
