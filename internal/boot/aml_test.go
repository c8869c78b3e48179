package boot

import (
	"bytes"
	"testing"
)

// PkgLength counts its own bytes; the encodings switch at 63 and 4095
// bytes of total length (ACPI 6.3, 20.2.4).
func TestAMLPkgLength(t *testing.T) {
	for _, c := range []struct {
		body int
		want []byte
	}{
		{0, []byte{0x01}},
		{62, []byte{0x3f}},
		{63, []byte{0x41, 0x04}},         // total 65 = 0x41: two bytes
		{4093, []byte{0x4f, 0xff}},       // total 4095
		{4094, []byte{0x81, 0x00, 0x01}}, // total 4097 (no longer fits two bytes)
		{0x1231, []byte{0x84, 0x23, 0x01}},
	} {
		if got := amlPkgLength(c.body); !bytes.Equal(got, c.want) {
			t.Errorf("PkgLength for a body of %d bytes: % x, want % x", c.body, got, c.want)
		}
	}
}

// EISAID compresses as iasl does: PNP0A03 is 0x030AD041.
func TestAMLEISAID(t *testing.T) {
	if got, want := amlEISAID("PNP0A03"), []byte{amlDWordPrefix, 0x41, 0xd0, 0x0a, 0x03}; !bytes.Equal(got, want) {
		t.Errorf("EISAID(PNP0A03) = % x, want % x", got, want)
	}
}

func TestPCIConfigValidate(t *testing.T) {
	if err := testPCI.validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []PCIConfig{
		{ECAMBase: 0xE000_1000, MemBase: 1, MemEnd: 2, IOBase: 0xc000, IOEnd: 0x10000},
		{ECAMBase: 0xE000_0000, MemBase: 2, MemEnd: 2, IOBase: 0xc000, IOEnd: 0x10000},
		{ECAMBase: 0xE000_0000, MemBase: 1, MemEnd: 2, IOBase: 0xc000, IOEnd: 0x10001},
		{ECAMBase: 0xE000_0000, MemBase: 1, MemEnd: 2, IOBase: 0x100, IOEnd: 0x1000},
	} {
		if bad.validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}
