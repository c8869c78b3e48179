package state

import (
	"fmt"
	"unicode/utf8"

	"github.com/ferry-vmm/ferry/internal/pci"
	"github.com/ferry-vmm/ferry/internal/virtio"
)

// This file encodes and decodes the PCI section (docs/state-format.md,
// "pci section"): a bus record, one record per slot and one per virtio
// function.

var pciTags = map[uint16]string{TagPCIBus: "bus", TagPCISlot: "slot", TagPCIVirtio: "virtio"}

const (
	pciBusSize       = 8  // conf1 address, slot count
	virtioQueueSize  = 36 // one queue in a virtio record
	msixEntrySize    = 16
	pciMaxSlotNumber = pci.NumSlots - 1
)

// checkPCI checks what the encoding requires of a PCI state, for writers
// and readers alike: slot numbers in range, ascending and unique, names
// and sizes within bounds, every virtio function on a slot of the bus.
func checkPCI(p *PCI) error {
	var onBus [pci.NumSlots]bool
	for i := range p.Bus.Slots {
		s := &p.Bus.Slots[i]
		if s.Slot < 0 || s.Slot > pciMaxSlotNumber {
			return fmt.Errorf("slot number %d out of range 0-%d", s.Slot, pciMaxSlotNumber)
		}
		if onBus[s.Slot] {
			return fmt.Errorf("slot %d appears twice", s.Slot)
		}
		onBus[s.Slot] = true
		if i > 0 && s.Slot < p.Bus.Slots[i-1].Slot {
			return fmt.Errorf("slot %d follows slot %d: slots must be in ascending order", s.Slot, p.Bus.Slots[i-1].Slot)
		}
		if err := checkSlotFields(s); err != nil {
			return fmt.Errorf("slot %d: %v", s.Slot, err)
		}
	}
	var seen [pci.NumSlots]bool
	for i := range p.Virtio {
		f := &p.Virtio[i]
		if f.Slot < 1 || f.Slot > pciMaxSlotNumber {
			return fmt.Errorf("virtio function slot number %d out of range 1-%d", f.Slot, pciMaxSlotNumber)
		}
		if seen[f.Slot] {
			return fmt.Errorf("virtio function at slot %d appears twice", f.Slot)
		}
		seen[f.Slot] = true
		if i > 0 && f.Slot < p.Virtio[i-1].Slot {
			return fmt.Errorf("virtio function at slot %d follows slot %d: functions must be in ascending slot order", f.Slot, p.Virtio[i-1].Slot)
		}
		if !onBus[f.Slot] {
			return fmt.Errorf("virtio function at slot %d: the bus has no slot %d", f.Slot, f.Slot)
		}
		if err := checkVirtioFields(&f.State); err != nil {
			return fmt.Errorf("virtio function at slot %d: %v", f.Slot, err)
		}
	}
	return nil
}

func checkSlotFields(s *pci.SlotState) error {
	if s.Name == "" || len(s.Name) > MaxPCINameLength || !utf8.ValidString(s.Name) {
		return fmt.Errorf("name must be UTF-8 of 1 to %d bytes", MaxPCINameLength)
	}
	if len(s.Config.Data) != pci.ConfigSize {
		return fmt.Errorf("configuration space of %d bytes, expected %d", len(s.Config.Data), pci.ConfigSize)
	}
	return nil
}

func checkVirtioFields(s *virtio.State) error {
	switch {
	case len(s.Queues) > MaxVirtioQueues:
		return fmt.Errorf("%d queues, at most %d", len(s.Queues), MaxVirtioQueues)
	case len(s.Config.Data) != pci.ConfigSize:
		return fmt.Errorf("configuration space of %d bytes, expected %d", len(s.Config.Data), pci.ConfigSize)
	case len(s.MSIX.Table) > MaxMSIXTableLength || len(s.MSIX.Table)%msixEntrySize != 0:
		return fmt.Errorf("MSI-X table of %d bytes, at most %d in %d-byte entries", len(s.MSIX.Table), MaxMSIXTableLength, msixEntrySize)
	case len(s.MSIX.PBA) > MaxMSIXPBALength:
		return fmt.Errorf("MSI-X PBA of %d bytes, at most %d", len(s.MSIX.PBA), MaxMSIXPBALength)
	case len(s.Device) > MaxVirtioDeviceLength:
		return fmt.Errorf("device state of %d bytes, at most %d", len(s.Device), MaxVirtioDeviceLength)
	}
	return nil
}

func appendBytes32(b, v []byte) []byte {
	b = le.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

// encodePCI appends the PCI section's records.
func encodePCI(b []byte, p *PCI) ([]byte, error) {
	if err := checkPCI(p); err != nil {
		return nil, fmt.Errorf("PCI state: %v", err)
	}
	return appendPCIRecords(b, p), nil
}

// appendPCIRecords appends the records of p, which checkPCI accepted.
func appendPCIRecords(b []byte, p *PCI) []byte {
	b = appendRecord(b, TagPCIBus, func(b []byte) []byte {
		b = le.AppendUint32(b, p.Bus.Conf1Address)
		return le.AppendUint32(b, uint32(len(p.Bus.Slots)))
	})
	for i := range p.Bus.Slots {
		s := &p.Bus.Slots[i]
		b = appendRecord(b, TagPCISlot, func(b []byte) []byte {
			b = append(b, uint8(s.Slot))
			b = le.AppendUint16(b, uint16(len(s.Name)))
			b = append(b, s.Name...)
			return appendBytes32(b, s.Config.Data)
		})
	}
	for i := range p.Virtio {
		f := &p.Virtio[i]
		s := &f.State
		b = appendRecord(b, TagPCIVirtio, func(b []byte) []byte {
			b = append(b, uint8(f.Slot))
			b = le.AppendUint16(b, f.Type)
			b = append(b, s.Status)
			b = le.AppendUint64(b, s.OfferedFeatures)
			b = le.AppendUint64(b, s.DriverFeatures)
			b = le.AppendUint32(b, s.DeviceFeatureSelect)
			b = le.AppendUint32(b, s.DriverFeatureSelect)
			b = le.AppendUint16(b, s.QueueSelect)
			b = le.AppendUint16(b, s.MSIXConfig)
			b = append(b, s.ConfigGeneration)
			b = appendBool(b, s.ConfigChanged)
			b = append(b, s.ISR)
			b = le.AppendUint16(b, uint16(len(s.Queues)))
			for _, q := range s.Queues {
				b = le.AppendUint16(b, q.Size)
				b = appendBool(b, q.Enabled)
				b = le.AppendUint16(b, q.Vector)
				b = le.AppendUint64(b, q.Desc)
				b = le.AppendUint64(b, q.Driver)
				b = le.AppendUint64(b, q.Device)
				b = le.AppendUint16(b, q.NextAvail)
				b = le.AppendUint16(b, q.NextUsed)
				b = le.AppendUint16(b, q.SignalledUsed)
				b = appendBool(b, q.SignalledValid)
			}
			b = appendBytes32(b, s.Config.Data)
			b = appendBytes32(b, s.MSIX.Table)
			b = appendBytes32(b, s.MSIX.PBA)
			return appendBytes32(b, s.Device)
		})
	}
	return b
}

func (r *fieldReader) u16() uint16 {
	if b := r.take(2); b != nil {
		return le.Uint16(b)
	}
	return 0
}

// bounded reads a uint32 length, checks it against max (and, with exact,
// that it equals max) before anything is allocated, and returns a copy of
// that many bytes (nil when empty).
func (r *fieldReader) bounded(what string, max int, exact bool) []byte {
	n := r.u32()
	if r.err != nil {
		return nil
	}
	switch {
	case exact && uint64(n) != uint64(max):
		r.err = fmt.Errorf("%s of %d bytes, expected %d", what, n, max)
		return nil
	case uint64(n) > uint64(max):
		r.err = fmt.Errorf("%s of %d bytes, at most %d", what, n, max)
		return nil
	case uint64(n) > uint64(len(r.p)):
		r.err = fmt.Errorf("%s of %d bytes, %d bytes of record left", what, n, len(r.p))
		return nil
	}
	if n == 0 {
		return nil
	}
	return append([]byte(nil), r.take(int(n))...)
}

// decodePCI parses the PCI section's records. Unlike the other sections,
// slot and virtio records repeat; the bus record appears exactly once.
func decodePCI(p []byte) (*PCI, []string, error) {
	out := &PCI{}
	var warnings []string
	haveBus := false
	var slots uint32
	for off := 0; off < len(p); {
		if len(p)-off < 6 {
			return nil, nil, fmt.Errorf("record at payload offset %d: %d bytes left, a record header needs 6", off, len(p)-off)
		}
		at := off
		tag := le.Uint16(p[off:])
		n := uint64(le.Uint32(p[off+2:]))
		off += 6
		if n > uint64(len(p)-off) {
			return nil, nil, fmt.Errorf("record %s: length %d exceeds the %d bytes left in the section", tagName(tag, pciTags), n, len(p)-off)
		}
		data := p[off : off+int(n)]
		off += int(n)
		switch tag {
		case TagPCIBus:
			if haveBus {
				return nil, nil, fmt.Errorf("record %s appears twice", tagName(tag, pciTags))
			}
			haveBus = true
			if len(data) != pciBusSize {
				return nil, nil, fmt.Errorf("record %s: length %d, expected %d", tagName(tag, pciTags), len(data), pciBusSize)
			}
			out.Bus.Conf1Address = le.Uint32(data)
			slots = le.Uint32(data[4:])
			if slots > pci.NumSlots {
				return nil, nil, fmt.Errorf("record %s: %d slots, at most %d", tagName(tag, pciTags), slots, pci.NumSlots)
			}
		case TagPCISlot:
			if len(out.Bus.Slots) >= pci.NumSlots {
				return nil, nil, fmt.Errorf("record %s at payload offset %d: more than %d slot records", tagName(tag, pciTags), at, pci.NumSlots)
			}
			s, err := decodePCISlot(data)
			if err != nil {
				return nil, nil, err
			}
			out.Bus.Slots = append(out.Bus.Slots, s)
		case TagPCIVirtio:
			if len(out.Virtio) >= pci.NumSlots {
				return nil, nil, fmt.Errorf("record %s at payload offset %d: more than %d virtio records", tagName(tag, pciTags), at, pci.NumSlots)
			}
			f, err := decodeVirtioFunction(data)
			if err != nil {
				return nil, nil, err
			}
			out.Virtio = append(out.Virtio, f)
		default:
			if tag&tagCritical != 0 {
				return nil, nil, fmt.Errorf("critical record tag %#04x unknown", tag)
			}
			warnings = append(warnings, fmt.Sprintf("skipped unknown record tag %#04x (%d bytes)", tag, n))
		}
	}
	if !haveBus {
		return nil, nil, fmt.Errorf("required record %s missing", tagName(TagPCIBus, pciTags))
	}
	if uint64(slots) != uint64(len(out.Bus.Slots)) {
		return nil, nil, fmt.Errorf("record %s counts %d slots, the section has %d slot records", tagName(TagPCIBus, pciTags), slots, len(out.Bus.Slots))
	}
	if err := checkPCI(out); err != nil {
		return nil, nil, err
	}
	return out, warnings, nil
}

func decodePCISlot(data []byte) (pci.SlotState, error) {
	var s pci.SlotState
	fail := func(err error) (pci.SlotState, error) {
		if len(data) == 0 {
			return s, fmt.Errorf("record %s: %v", tagName(TagPCISlot, pciTags), err)
		}
		return s, fmt.Errorf("record %s for slot %d: %v", tagName(TagPCISlot, pciTags), data[0], err)
	}
	r := fieldReader{p: data}
	s.Slot = int(r.u8())
	if r.err == nil && s.Slot > pciMaxSlotNumber {
		return fail(fmt.Errorf("slot number out of range 0-%d", pciMaxSlotNumber))
	}
	n := int(r.u16())
	if r.err == nil && (n == 0 || n > MaxPCINameLength) {
		return fail(fmt.Errorf("name of %d bytes, 1 to %d allowed", n, MaxPCINameLength))
	}
	s.Name = string(r.take(n))
	if r.err == nil && !utf8.ValidString(s.Name) {
		return fail(fmt.Errorf("name is not UTF-8"))
	}
	s.Config.Data = r.bounded("configuration space", pci.ConfigSize, true)
	if err := r.done(); err != nil {
		return fail(err)
	}
	return s, nil
}

func decodeVirtioFunction(data []byte) (VirtioFunction, error) {
	var f VirtioFunction
	fail := func(err error) (VirtioFunction, error) {
		if len(data) == 0 {
			return f, fmt.Errorf("record %s: %v", tagName(TagPCIVirtio, pciTags), err)
		}
		return f, fmt.Errorf("record %s for slot %d: %v", tagName(TagPCIVirtio, pciTags), data[0], err)
	}
	r := fieldReader{p: data}
	f.Slot = int(r.u8())
	if r.err == nil && (f.Slot < 1 || f.Slot > pciMaxSlotNumber) {
		return fail(fmt.Errorf("slot number out of range 1-%d", pciMaxSlotNumber))
	}
	f.Type = r.u16()
	s := &f.State
	s.Status = r.u8()
	s.OfferedFeatures = r.u64()
	s.DriverFeatures = r.u64()
	s.DeviceFeatureSelect = r.u32()
	s.DriverFeatureSelect = r.u32()
	s.QueueSelect = r.u16()
	s.MSIXConfig = r.u16()
	s.ConfigGeneration = r.u8()
	s.ConfigChanged = r.boolean()
	s.ISR = r.u8()
	nq := int(r.u16())
	if r.err == nil {
		switch {
		case nq > MaxVirtioQueues:
			return fail(fmt.Errorf("%d queues, at most %d", nq, MaxVirtioQueues))
		case nq*virtioQueueSize > len(r.p):
			return fail(fmt.Errorf("%d queues need %d bytes, %d bytes of record left", nq, nq*virtioQueueSize, len(r.p)))
		}
		if nq > 0 {
			s.Queues = make([]virtio.QueueState, nq)
		}
	}
	for i := range s.Queues {
		q := &s.Queues[i]
		q.Size = r.u16()
		q.Enabled = r.boolean()
		q.Vector = r.u16()
		q.Desc = r.u64()
		q.Driver = r.u64()
		q.Device = r.u64()
		q.NextAvail = r.u16()
		q.NextUsed = r.u16()
		q.SignalledUsed = r.u16()
		q.SignalledValid = r.boolean()
		if r.err != nil {
			return fail(fmt.Errorf("queue %d: %v", i, r.err))
		}
	}
	s.Config.Data = r.bounded("configuration space", pci.ConfigSize, true)
	s.MSIX.Table = r.bounded("MSI-X table", MaxMSIXTableLength, false)
	if r.err == nil && len(s.MSIX.Table)%msixEntrySize != 0 {
		return fail(fmt.Errorf("MSI-X table of %d bytes is not a whole number of %d-byte entries", len(s.MSIX.Table), msixEntrySize))
	}
	s.MSIX.PBA = r.bounded("MSI-X PBA", MaxMSIXPBALength, false)
	s.Device = r.bounded("device state", MaxVirtioDeviceLength, false)
	if err := r.done(); err != nil {
		return fail(err)
	}
	return f, nil
}
