package state

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/pci"
	"github.com/ferry-vmm/ferry/internal/virtio"
)

// testConfig is a type-0 configuration space with the given IDs, class
// and command register.
func testConfig(vendor, device uint16, class uint32, command uint16) []byte {
	c := make([]byte, pci.ConfigSize)
	binary.LittleEndian.PutUint16(c[pci.RegVendorID:], vendor)
	binary.LittleEndian.PutUint16(c[pci.RegDeviceID:], device)
	binary.LittleEndian.PutUint16(c[pci.RegCommand:], command)
	c[pci.RegRevision] = 1
	c[pci.RegClassCode] = byte(class)
	c[pci.RegClassCode+1] = byte(class >> 8)
	c[pci.RegClassCode+2] = byte(class >> 16)
	return c
}

// testPCI is a host bridge and a virtio-rng-like function at slot 1 with
// one queue and a two-vector MSI-X table.
func testPCI() *PCI {
	rng := testConfig(virtio.VendorID, virtio.DeviceIDBase+uint16(virtio.TypeEntropy), 0x00ff00,
		pci.CommandMemory|pci.CommandBusMaster)
	// BAR 4: 64-bit memory at 0xc000_0000.
	binary.LittleEndian.PutUint32(rng[pci.RegBAR0+4*4:], 0xc000_0004)
	rng[0x100] = 0x5a // something beyond the legacy 256 bytes
	table := make([]byte, 2*16)
	for v := range 2 {
		binary.LittleEndian.PutUint32(table[v*16:], 0xfee0_0000)
		binary.LittleEndian.PutUint32(table[v*16+8:], uint32(0x40+v))
	}
	return &PCI{
		Bus: pci.BusState{
			Conf1Address: 0x8000_0804,
			Slots: []pci.SlotState{
				{Slot: 0, Name: pci.HostBridgeName, Config: pci.ConfigState{Data: testConfig(pci.HostBridgeVendorID,
					pci.HostBridgeDeviceID, pci.HostBridgeClass, 0)}},
				{Slot: 1, Name: "virtio-rng", Config: pci.ConfigState{Data: rng}},
			},
		},
		Virtio: []VirtioFunction{{
			Slot: 1,
			Type: uint16(virtio.TypeEntropy),
			State: virtio.State{
				Status:          virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK,
				OfferedFeatures: virtio.FeatureVersion1 | virtio.FeatureIndirectDesc | virtio.FeatureEventIdx,
				DriverFeatures:  virtio.FeatureVersion1 | virtio.FeatureEventIdx,
				MSIXConfig:      0, ConfigGeneration: 1, QueueSelect: 0, DriverFeatureSelect: 1,
				Queues: []virtio.QueueState{{
					Size: 256, Enabled: true, Vector: 1,
					Desc: 0x10_0000, Driver: 0x10_1000, Device: 0x10_2000,
					NextAvail: 17, NextUsed: 16, SignalledUsed: 15, SignalledValid: true,
				}},
				Config: pci.ConfigState{Data: bytes.Clone(rng)},
				MSIX:   pci.MSIXState{Table: table, PBA: []byte{0x02, 0, 0, 0, 0, 0, 0, 0}},
				Device: []byte{1, 2, 3},
			},
		}},
	}
}

func pciMachine(seed uint64) *Machine {
	m := randomMachine(rand.New(rand.NewPCG(seed, seed+1)), 1, 512)
	m.PCI = testPCI()
	return m
}

func TestPCIRoundTrip(t *testing.T) {
	m := pciMachine(61)
	data := encode(t, m, nil, WriterOptions{})
	_, spans := layoutOf(t, data)
	var types []uint16
	for _, sp := range spans {
		types = append(types, sp.typ)
		if sp.typ == SectionPCI && binary.LittleEndian.Uint16(data[sp.start+2:]) != SectionRequired {
			t.Errorf("pci section flags %#x, want required", binary.LittleEndian.Uint16(data[sp.start+2:]))
		}
	}
	want := []uint16{SectionVCPU, SectionIRQChip, SectionPIT, SectionClock, SectionDevices, SectionPCI, SectionEnd}
	if !reflect.DeepEqual(types, want) {
		t.Errorf("sections %#x, want %#x", types, want)
	}
	// The record lengths docs/state-format.md gives.
	tags, values := splitAll(rawPCIPayload(m.PCI))
	var lens []int
	for _, v := range values {
		lens = append(lens, len(v))
	}
	wantLens := []int{8, 7 + len("host-bridge") + 4096, 7 + len("virtio-rng") + 4096, 53 + 36*1 + 4096 + 2*16 + 8 + 3}
	if !reflect.DeepEqual(tags, []uint16{TagPCIBus, TagPCISlot, TagPCISlot, TagPCIVirtio}) || !reflect.DeepEqual(lens, wantLens) {
		t.Errorf("records %#x of %d bytes, want lengths %d", tags, lens, wantLens)
	}
	got, err := decode(data, ReaderOptions{RequireEOF: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.warnings) != 0 {
		t.Errorf("warnings %q", got.warnings)
	}
	m.Header.FormatVersion = FormatVersion
	if !reflect.DeepEqual(&got.m, m) {
		t.Fatalf("round trip changed the machine: %v", Diff(m, &got.m, true))
	}

	// The wire carries the same section.
	b, err := EncodeMachine(m)
	if err != nil {
		t.Fatal(err)
	}
	wm, _, err := DecodeMachine(b, m.Header)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(wm, m) {
		t.Fatalf("wire round trip changed the machine: %v", Diff(m, wm, true))
	}
}

// A machine without PCI writes no PCI section, and reads back with PCI nil
// (as do streams written before the section existed).
func TestPCIAbsent(t *testing.T) {
	m := randomMachine(rand.New(rand.NewPCG(62, 63)), 1, 0)
	data := encode(t, m, nil, WriterOptions{})
	_, spans := layoutOf(t, data)
	for _, sp := range spans {
		if sp.typ == SectionPCI {
			t.Fatal("a machine without PCI wrote a pci section")
		}
	}
	got, err := decode(data, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.m.PCI != nil {
		t.Errorf("PCI %+v, want nil", got.m.PCI)
	}
	if d := Diff(m, &got.m, true); len(d) != 1 || d[0].Path != "header.format_version" {
		t.Errorf("diff %v", d)
	}
}

// encodeWithPCIPayload writes m's sections with the PCI section's payload
// replaced by p.
func encodeWithPCIPayload(t *testing.T, m *Machine, p []byte) []byte {
	t.Helper()
	c := *m
	c.PCI = nil
	return withSection(t, &c, SectionPCI, SectionRequired, p)
}

// rawPCIPayload encodes p without checking it, as a writer that does not
// validate (or a corrupted stream) might.
func rawPCIPayload(p *PCI) []byte { return appendPCIRecords(nil, p) }

// splitAll splits a record sequence into its tags and values.
func splitAll(p []byte) (tags []uint16, values [][]byte) {
	for len(p) >= 6 {
		n := int(le.Uint32(p[2:]))
		tags = append(tags, le.Uint16(p))
		values = append(values, p[6:6+n])
		p = p[6+n:]
	}
	return tags, values
}

// Every bound is refused, by the writer and by the reader, with a message
// that names what is wrong.
func TestPCIBounds(t *testing.T) {
	m := pciMachine(64)
	for _, c := range []struct {
		name   string
		change func(p *PCI)
		want   string // in the reader's error
	}{
		{"config not 4096 bytes", func(p *PCI) { p.Bus.Slots[1].Config.Data = p.Bus.Slots[1].Config.Data[:256] },
			"record 0x0002 (slot) for slot 1: configuration space of 256 bytes, expected 4096"},
		{"virtio config not 4096 bytes", func(p *PCI) { p.Virtio[0].State.Config.Data = make([]byte, 4100) },
			"record 0x0003 (virtio) for slot 1: configuration space of 4100 bytes, expected 4096"},
		{"too many queues", func(p *PCI) { p.Virtio[0].State.Queues = make([]virtio.QueueState, 1025) },
			"record 0x0003 (virtio) for slot 1: 1025 queues, at most 1024"},
		{"duplicate slot", func(p *PCI) { p.Bus.Slots = append(p.Bus.Slots, p.Bus.Slots[1]) },
			"slot 1 appears twice"},
		{"slots out of order", func(p *PCI) { p.Bus.Slots[0], p.Bus.Slots[1] = p.Bus.Slots[1], p.Bus.Slots[0] },
			"slot 0 follows slot 1: slots must be in ascending order"},
		{"slot number out of range", func(p *PCI) { p.Bus.Slots[1].Slot = 32 },
			"record 0x0002 (slot) for slot 32: slot number out of range 0-31"},
		{"empty name", func(p *PCI) { p.Bus.Slots[1].Name = "" },
			"record 0x0002 (slot) for slot 1: name of 0 bytes, 1 to 256 allowed"},
		{"virtio slot not on the bus", func(p *PCI) { p.Virtio[0].Slot = 5 },
			"virtio function at slot 5: the bus has no slot 5"},
		{"virtio slot 0", func(p *PCI) { p.Virtio[0].Slot = 0 },
			"record 0x0003 (virtio) for slot 0: slot number out of range 1-31"},
		{"duplicate virtio slot", func(p *PCI) { p.Virtio = append(p.Virtio, p.Virtio[0]) },
			"virtio function at slot 1 appears twice"},
		{"oversize device bytes", func(p *PCI) { p.Virtio[0].State.Device = make([]byte, 64<<10+1) },
			"record 0x0003 (virtio) for slot 1: device state of 65537 bytes, at most 65536"},
		{"oversize MSI-X table", func(p *PCI) { p.Virtio[0].State.MSIX.Table = make([]byte, 2049*16) },
			"record 0x0003 (virtio) for slot 1: MSI-X table of 32784 bytes, at most 32768"},
		{"MSI-X table not in entries", func(p *PCI) { p.Virtio[0].State.MSIX.Table = make([]byte, 20) },
			"record 0x0003 (virtio) for slot 1: MSI-X table of 20 bytes is not a whole number of 16-byte entries"},
		{"oversize PBA", func(p *PCI) { p.Virtio[0].State.MSIX.PBA = make([]byte, 257) },
			"record 0x0003 (virtio) for slot 1: MSI-X PBA of 257 bytes, at most 256"},
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := *m
			bad.PCI = testPCI()
			c.change(bad.PCI)
			var buf bytes.Buffer
			w, err := NewWriter(&buf, bad.Header, WriterOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := w.WriteMachine(&bad); err == nil {
				t.Error("writer accepted it")
			} else {
				t.Logf("writer: %v", err)
			}
			if _, err := EncodeMachine(&bad); err == nil {
				t.Error("EncodeMachine accepted it")
			}
			_, err = decode(encodeWithPCIPayload(t, m, rawPCIPayload(bad.PCI)), ReaderOptions{})
			var fe *FormatError
			if err == nil || !errors.As(err, &fe) {
				t.Fatalf("reader: %v", err)
			}
			if fe.Name != "pci" || !strings.Contains(err.Error(), c.want) {
				t.Errorf("reader: %v\nwant it to contain %q", err, c.want)
			}
		})
	}
}

// Structural errors of the section's records.
func TestPCIRecordErrors(t *testing.T) {
	m := pciMachine(65)
	valid := rawPCIPayload(m.PCI)
	tags, values := splitAll(valid)
	join := func(tags []uint16, values [][]byte) []byte {
		var b []byte
		for i, tag := range tags {
			b = appendRecord(b, tag, func(b []byte) []byte { return append(b, values[i]...) })
		}
		return b
	}
	bus := func(addr, n uint32) []byte {
		return le.AppendUint32(le.AppendUint32(nil, addr), n)
	}
	for _, c := range []struct {
		name    string
		payload []byte
		want    string
	}{
		{"no bus record", join(tags[1:], values[1:]), "required record 0x0001 (bus) missing"},
		{"bus record twice", join(append([]uint16{TagPCIBus}, tags...), append([][]byte{values[0]}, values...)),
			"record 0x0001 (bus) appears twice"},
		{"bus record short", join(tags, append([][]byte{values[0][:7]}, values[1:]...)),
			"record 0x0001 (bus): length 7, expected 8"},
		{"slot count mismatch", join(tags, append([][]byte{bus(0, 3)}, values[1:]...)),
			"record 0x0001 (bus) counts 3 slots, the section has 2 slot records"},
		{"slot count too large", join(tags, append([][]byte{bus(0, 33)}, values[1:]...)),
			"record 0x0001 (bus): 33 slots, at most 32"},
		{"truncated slot", join(tags, [][]byte{values[0], values[1][:100], values[2], values[3]}),
			"record 0x0002 (slot) for slot 0: configuration space of 4096 bytes, 82 bytes of record left"},
		{"empty virtio", join(tags, [][]byte{values[0], values[1], values[2], nil}),
			"record 0x0003 (virtio): 1 bytes needed, 0 left"},
		{"virtio trailing bytes", join(tags, [][]byte{values[0], values[1], values[2], append(bytes.Clone(values[3]), 0)}),
			"record 0x0003 (virtio) for slot 1: 1 unexpected bytes at the end"},
		{"queue count beyond record", join(tags, [][]byte{values[0], values[1], values[2], values[3][:40]}),
			"record 0x0003 (virtio) for slot 1: 1 queues need 36 bytes, 3 bytes of record left"},
		{"critical unknown tag", append(bytes.Clone(valid), appendRecord(nil, 0x8005, func(b []byte) []byte { return b })...),
			"critical record tag 0x8005 unknown"},
		{"record longer than the section", valid[:len(valid)-1], "record 0x0003 (virtio): length"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := decode(encodeWithPCIPayload(t, m, c.payload), ReaderOptions{})
			if err == nil || !strings.Contains(err.Error(), "(pci): "+c.want) {
				t.Errorf("got %v\nwant it to contain %q", err, c.want)
			}
		})
	}

	// An unknown optional tag is skipped with a warning.
	got, err := decode(encodeWithPCIPayload(t, m, append(bytes.Clone(valid), appendRecord(nil, 0x0077, func(b []byte) []byte { return append(b, 1) })...)), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.warnings) != 1 || !strings.Contains(got.warnings[0], "(pci): skipped unknown record tag 0x0077") {
		t.Errorf("warnings %q", got.warnings)
	}
	if !reflect.DeepEqual(got.m.PCI, m.PCI) {
		t.Error("PCI with an extra optional record decoded differently")
	}

	// The section may appear once.
	data := encode(t, m, nil, WriterOptions{})
	_, spans := layoutOf(t, data)
	end := spans[len(spans)-1]
	pciSpan := spans[len(spans)-2]
	twice := append(append(bytes.Clone(data[:end.start]), data[pciSpan.start:pciSpan.end]...), data[end.start:]...)
	if _, err := decode(twice, ReaderOptions{}); err == nil || !strings.Contains(err.Error(), "(pci): appears twice") {
		t.Errorf("pci section twice: %v", err)
	}
}

// A reader that does not know a required section refuses it; a reader
// that knows SectionPCI still refuses other unknown required sections.
func TestPCIUnknownRequiredSection(t *testing.T) {
	m := pciMachine(66)
	_, err := decode(withSection(t, m, 0x0007, SectionRequired, []byte("future")), ReaderOptions{})
	if err == nil || !strings.Contains(err.Error(), "required section type 0x0007 unknown") {
		t.Errorf("unknown required section: %v", err)
	}
}

func TestPCIDescribe(t *testing.T) {
	m := pciMachine(67)
	rep := Describe(m)
	r := rep.PCI
	if r == nil || r.Conf1Address != 0x8000_0804 || len(r.Slots) != 2 || len(r.Virtio) != 1 {
		t.Fatalf("pci report %+v", r)
	}
	hb, rng := r.Slots[0], r.Slots[1]
	if hb.Name != "host-bridge" || hb.VendorID != 0x1b36 || hb.DeviceID != 0x0008 || hb.Class != 0x060000 || len(hb.BARs) != 0 {
		t.Errorf("host bridge %+v", hb)
	}
	if rng.VendorID != 0x1af4 || rng.DeviceID != 0x1044 || rng.Command != 6 ||
		!reflect.DeepEqual(rng.CommandBits, []string{"memory", "bus_master"}) ||
		!reflect.DeepEqual(rng.BARs, []BARReport{{Index: 4, Kind: "mem64", Address: 0xc000_0000}}) {
		t.Errorf("virtio-rng slot %+v", rng)
	}
	v := r.Virtio[0]
	if v.TypeName != "entropy" || !reflect.DeepEqual(v.StatusBits, []string{"ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"}) ||
		!reflect.DeepEqual(v.OfferedNames, []string{"INDIRECT_DESC", "EVENT_IDX", "VERSION_1"}) ||
		!reflect.DeepEqual(v.DriverNames, []string{"EVENT_IDX", "VERSION_1"}) ||
		v.MSIXVectors != 2 || !reflect.DeepEqual(v.MSIXPending, []int{1}) || v.DeviceStateBytes != 3 {
		t.Errorf("virtio %+v", v)
	}
	want := VirtioQueueReport{Index: 0, Size: 256, Enabled: true, Vector: 1, Desc: 0x10_0000, Driver: 0x10_1000,
		Device: 0x10_2000, NextAvail: 17, NextUsed: 16, SignalledUsed: 15, SignalledValid: true}
	if len(v.Queues) != 1 || v.Queues[0] != want {
		t.Errorf("queues %+v", v.Queues)
	}

	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js, &back); err != nil || !reflect.DeepEqual(&back, rep) {
		t.Errorf("JSON does not round-trip: %v", err)
	}
	if !strings.Contains(string(js), `"next_avail":17`) {
		t.Error("JSON lacks the queue's next_avail")
	}
	var buf bytes.Buffer
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	text := buf.String()
	for _, w := range []string{
		"pci: conf1 address 0x80000804, 2 slots, 1 virtio functions",
		`slot 0 "host-bridge": 1b36:0008 class 060000 command 0x0`,
		`slot 1 "virtio-rng": 1af4:1044 class 00ff00 command 0x6 [memory bus_master]`,
		"bar 4: mem64 at 0xc0000000",
		"virtio at slot 1: entropy, status 0xf [ACKNOWLEDGE DRIVER DRIVER_OK FEATURES_OK]",
		"features offered 0x130000000 [INDIRECT_DESC EVENT_IDX VERSION_1]",
		"features accepted 0x120000000 [EVENT_IDX VERSION_1]",
		"msi-x: 2 vectors, config vector 0, masked none, pending 1; device state 3 bytes",
		"queue 0: size 256 enabled vector 1 desc 0x100000 driver 0x101000 device 0x102000 next avail 17 used 16 signalled 15",
	} {
		if !strings.Contains(text, w) {
			t.Errorf("text lacks %q", w)
		}
	}
	if testing.Verbose() {
		t.Log("\n" + text)
	}

	// No PCI: no report part.
	m.PCI = nil
	if js, _ := json.Marshal(Describe(m)); strings.Contains(string(js), `"pci"`) {
		t.Error("a machine without PCI has a pci report")
	}
}

func TestPCIDiff(t *testing.T) {
	a := pciMachine(68)
	b := pciMachine(68)
	if d := Diff(a, b, false); len(d) != 0 {
		t.Fatalf("identical machines differ: %v", d)
	}
	b.PCI.Virtio[0].State.Queues[0].NextAvail = 18
	b.PCI.Bus.Slots[1].Config.Data[pci.RegCommand] = 0 // command register cleared
	b.PCI.Bus.Conf1Address = 0
	want := []Difference{
		{Path: "pci.conf1_address", A: "0x80000804", B: "0x0"},
		{Path: "pci.slot[1].config[0x0:0x10]",
			A: hex.EncodeToString(a.PCI.Bus.Slots[1].Config.Data[:16]), B: hex.EncodeToString(b.PCI.Bus.Slots[1].Config.Data[:16])},
		{Path: "pci.virtio[1].queues[0].next_avail", A: "0x11", B: "0x12"},
	}
	if d := Diff(a, b, false); !reflect.DeepEqual(d, want) {
		t.Errorf("diff\n%v\nwant\n%v", d, want)
	}

	// Functions are matched by slot, not by position.
	c := pciMachine(68)
	c.PCI.Virtio[0].Slot = 2
	c.PCI.Bus.Slots = append(c.PCI.Bus.Slots, pci.SlotState{Slot: 2, Name: "virtio-net",
		Config: pci.ConfigState{Data: make([]byte, pci.ConfigSize)}})
	want = []Difference{
		{Path: "pci.slot[2]", A: absent, B: "(present)"},
		{Path: "pci.virtio[1]", A: "(present)", B: absent},
		{Path: "pci.virtio[2]", A: absent, B: "(present)"},
	}
	if d := Diff(a, c, false); !reflect.DeepEqual(d, want) {
		t.Errorf("diff\n%v\nwant\n%v", d, want)
	}

	c.PCI = nil
	if d := Diff(a, c, false); !reflect.DeepEqual(d, []Difference{{Path: "pci", A: "(present)", B: absent}}) {
		t.Errorf("diff %v", d)
	}
}
