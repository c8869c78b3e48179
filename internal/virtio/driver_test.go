package virtio

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"testing"

	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/pci"
)

// This file is a guest: Linux's virtio_pci modern driver
// (drivers/virtio/virtio_pci_modern.c, virtio_pci_modern_dev.c,
// virtio_pci_common.c) and the split ring of drivers/virtio/virtio_ring.c,
// reduced to what virtio-rng needs, acting on a Transport only through a
// pci.Bus: configuration space through ECAM, BAR 4 through the MMIO bus.

// Offsets in struct virtio_pci_common_cfg (include/uapi/linux/virtio_pci.h).
const (
	commonDFSelect  = 0x00
	commonDF        = 0x04
	commonGFSelect  = 0x08
	commonGF        = 0x0c
	commonMSIX      = 0x10
	commonNumQ      = 0x12
	commonStatus    = 0x14
	commonCfgGen    = 0x15
	commonQSelect   = 0x16
	commonQSize     = 0x18
	commonQVector   = 0x1a
	commonQEnable   = 0x1c
	commonQNotifyOf = 0x1e
	commonQDescLo   = 0x20
	commonQDescHi   = 0x24
	commonQAvailLo  = 0x28
	commonQAvailHi  = 0x2c
	commonQUsedLo   = 0x30
	commonQUsedHi   = 0x34

	// Where the guest's BIOS would not have put BAR 4: the driver moves it.
	testBAR4 = 0xc800_0000
	// A queue's vring in guest RAM, laid out by vring_init (one block:
	// descriptors, available ring, used ring aligned to 64 bytes).
	testRingGPA = testBase + 0x20000
	// Buffers the driver posts: one page each, by descriptor index.
	testBufGPA = testBase + 0x40000
)

// machine is the PCI side of a test VM: a pci.Bus on its own MMIO and
// port buses.
type machine struct {
	mmio, pio devices.Bus
	bus       *pci.Bus
}

func newMachine(t testing.TB) *machine {
	t.Helper()
	mc := &machine{}
	b, err := pci.NewBus(pci.DefaultLayout(), &mc.mmio, &mc.pio, nil)
	if err != nil {
		t.Fatal(err)
	}
	mc.bus = b
	return mc
}

// rngRig is a virtio-rng Transport on a machine, with fake RAM, an MSI
// recorder and the transport's logged errors.
type rngRig struct {
	mem  *fakeMem
	msi  *msiRecorder
	log  errLog
	tr   *Transport
	mach *machine
	slot int
}

// newRNGRig builds a rig on mem (a new mapped fakeMem if nil).
func newRNGRig(t testing.TB, mem *fakeMem) *rngRig {
	t.Helper()
	return newRNGRigDev(t, mem, NewRNG())
}

// newRNGRigDev is newRNGRig with a given device (one whose entropy
// source a test controls, say).
func newRNGRigDev(t testing.TB, mem *fakeMem, dev *RNG) *rngRig {
	t.Helper()
	if mem == nil {
		mem = newMappedMem(t, testBase, testSize)
	}
	r := &rngRig{mem: mem, msi: &msiRecorder{}, log: newErrLog(), mach: newMachine(t)}
	tr, err := NewTransport(dev, TransportConfig{
		Memory: mem, Dirty: mem.Dirty, MSI: r.msi, Logger: slog.New(r.log),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.Close)
	r.tr = tr
	if r.slot, err = r.mach.bus.Add("virtio-rng", tr); err != nil {
		t.Fatal(err)
	}
	return r
}

// linuxDriver is the guest's driver for one virtio PCI function with one
// queue.
type linuxDriver struct {
	t    testing.TB
	mmio *devices.Bus
	slot int
	m    *fakeMem

	// noMaster: probe leaves Bus Master Enable clear, as a driver that
	// forgets pci_set_master would.
	noMaster bool

	// Found by probe.
	bar                  uint64 // BAR 4's address
	common, isr, notify  uint64 // structure offsets in BAR 4
	notifyLen, notifyMul uint32
	pciCfgCap, msixCap   int
	vectors              []msiMsg // MSI-X entries as programmed

	features uint64 // negotiated

	// Queue 0, as vring_create_virtqueue_split and setup_vq left it.
	num                         uint16
	desc, avail, used           uint64
	notifyAt                    uint64 // BAR offset of its doorbell
	availIdx, numAdded, lastUse uint16
	posted                      map[uint16]Buffer // descriptor → buffer, until used
}

func newLinuxDriver(t testing.TB, r *rngRig) *linuxDriver {
	return &linuxDriver{t: t, mmio: &r.mach.mmio, slot: r.slot, m: r.mem}
}

// Configuration space through ECAM (pci_mmcfg_read/write).

func (d *linuxDriver) cfgAddr(reg int) uint64 {
	return pci.DefaultLayout().ECAMBase + uint64(d.slot)<<15 + uint64(reg)
}

func (d *linuxDriver) cfgRead(reg, n int) uint32 {
	data := make([]byte, n)
	d.mmio.Read(d.cfgAddr(reg), data)
	return uint32(leUint(data))
}

func (d *linuxDriver) cfgWrite(reg, n int, v uint32) {
	d.mmio.Write(d.cfgAddr(reg), binary.LittleEndian.AppendUint32(nil, v)[:n])
}

// BAR 4 through the MMIO bus (ioread*/iowrite*).

func (d *linuxDriver) barRead(off uint64, n int) uint64 {
	data := make([]byte, n)
	d.mmio.Read(d.bar+off, data)
	return leUint(data)
}

func (d *linuxDriver) barWrite(off uint64, n int, v uint64) {
	d.mmio.Write(d.bar+off, binary.LittleEndian.AppendUint64(nil, v)[:n])
}

func (d *linuxDriver) commonRead(off uint64, n int) uint64     { return d.barRead(d.common+off, n) }
func (d *linuxDriver) commonWrite(off uint64, n int, v uint64) { d.barWrite(d.common+off, n, v) }

// vp_iowrite64_twopart: low half, then high half.
func (d *linuxDriver) commonWrite64(lo uint64, v uint64) {
	d.commonWrite(lo, 4, v&0xffffffff)
	d.commonWrite(lo+4, 4, v>>32)
}

func (d *linuxDriver) status() uint8 { return uint8(d.commonRead(commonStatus, 1)) }

// addStatus is virtio_add_status: read, or in, write.
func (d *linuxDriver) addStatus(s uint8) {
	d.commonWrite(commonStatus, 1, uint64(d.status()|s))
}

// probe is the PCI part, done once: pci_enable_device with BAR sizing and
// assignment, the capability walk of virtio_pci_modern_probe, bus
// mastering, and MSI-X enabled with every vector programmed and unmasked
// (pci_alloc_irq_vectors, request_irq).
func (d *linuxDriver) probe() {
	t := d.t
	t.Helper()
	if id := d.cfgRead(pci.RegVendorID, 4); id != uint32(DeviceIDBase+TypeEntropy)<<16|VendorID {
		t.Fatalf("vendor/device = %#x", id)
	}
	if rev := d.cfgRead(pci.RegRevision, 1); rev < 1 {
		t.Fatalf("revision %d: not a modern device", rev)
	}
	if class := d.cfgRead(pci.RegRevision, 4) >> 8; class != rngClass {
		t.Fatalf("class = %#x", class)
	}

	// __pci_read_base: size BAR 4 with decoding off, then assign it.
	reg := pci.RegBAR0 + 4*BAR
	cmd := d.cfgRead(pci.RegCommand, 2)
	d.cfgWrite(pci.RegCommand, 2, cmd&^(pci.CommandMemory|pci.CommandIO))
	lo, hi := d.cfgRead(reg, 4), d.cfgRead(reg+4, 4)
	d.cfgWrite(reg, 4, 0xffffffff)
	d.cfgWrite(reg+4, 4, 0xffffffff)
	szLo, szHi := d.cfgRead(reg, 4), d.cfgRead(reg+4, 4)
	d.cfgWrite(reg, 4, lo)
	d.cfgWrite(reg+4, 4, hi)
	if lo&0xf != 0x4 { // memory, 64-bit, not prefetchable
		t.Fatalf("BAR 4 flags %#x, want a 64-bit non-prefetchable memory BAR", lo&0xf)
	}
	if size := ^(uint64(szHi)<<32 | uint64(szLo&^0xf)) + 1; size != BARSize {
		t.Fatalf("BAR 4 sizes as %#x, want %#x", size, BARSize)
	}
	d.cfgWrite(reg, 4, testBAR4)
	d.cfgWrite(reg+4, 4, 0)
	d.bar = testBAR4
	// pci_enable_device; virtio_pci_probe then calls pci_set_master
	// before the virtio driver's probe sets up MSI-X and the queues.
	d.cfgWrite(pci.RegCommand, 2, cmd|pci.CommandMemory)
	if !d.noMaster {
		d.setMaster(true)
	}

	// virtio_pci_find_capability for each structure; the MSI-X capability.
	if d.cfgRead(pci.RegStatus, 2)&pci.StatusCapList == 0 {
		t.Fatal("no capability list")
	}
	found := map[uint8]bool{}
	pos := int(d.cfgRead(pci.RegCapabilities, 1))
	for ttl := 48; ttl > 0 && pos >= 0x40; ttl-- {
		pos &^= 3
		ent := d.cfgRead(pos, 2)
		switch uint8(ent) {
		case pci.CapMSIX:
			d.msixCap = pos
		case capVendor:
			typ, bar := uint8(d.cfgRead(pos+3, 1)), d.cfgRead(pos+4, 1)
			if bar >= pci.NumBARs || found[typ] {
				break
			}
			found[typ] = true
			off, length := uint64(d.cfgRead(pos+capOffset, 4)), d.cfgRead(pos+capLength, 4)
			if typ != cfgPCI && bar != BAR {
				t.Fatalf("capability type %d in BAR %d", typ, bar)
			}
			switch typ {
			case cfgCommon:
				if length < commonCfgLen {
					t.Fatalf("common configuration of %d bytes", length)
				}
				d.common = off
			case cfgISR:
				d.isr = off
			case cfgNotify:
				d.notify, d.notifyLen = off, length
				d.notifyMul = d.cfgRead(pos+16, 4)
			case cfgDevice:
				t.Fatal("virtio-rng has no device configuration, but a DEVICE_CFG capability is there")
			case cfgPCI:
				d.pciCfgCap = pos
			}
		}
		pos = int(ent >> 8)
	}
	for _, typ := range []uint8{cfgCommon, cfgNotify, cfgISR, cfgPCI} {
		if !found[typ] {
			t.Fatalf("no virtio capability of type %d", typ)
		}
	}
	if d.msixCap == 0 {
		t.Fatal("no MSI-X capability")
	}

	// msix_capability_init: enable with all vectors masked, program the
	// table, lift the function mask, then request_irq unmasks each vector.
	ctl := d.cfgRead(d.msixCap+2, 2)
	n := int(ctl&0x7ff) + 1
	if n != 2 {
		t.Fatalf("%d MSI-X vectors, want 2 (configuration and one queue)", n)
	}
	table := d.cfgRead(d.msixCap+4, 4)
	if table&7 != BAR {
		t.Fatalf("MSI-X table in BAR %d", table&7)
	}
	tableOff := uint64(table &^ 7)
	d.cfgWrite(d.msixCap+2, 2, ctl|pci.MSIXControlEnable|pci.MSIXControlFuncMask)
	d.cfgWrite(pci.RegCommand, 2, d.cfgRead(pci.RegCommand, 2)|pci.CommandINTxDisable)
	d.vectors = nil
	for v := range n {
		e := tableOff + 16*uint64(v)
		msg := msiMsg{addr: 0xfee0_0000 | uint64(v+1)<<12, data: 0x4030 + uint32(v)}
		d.barWrite(e+12, 4, 1)
		d.barWrite(e, 4, msg.addr&0xffffffff)
		d.barWrite(e+4, 4, msg.addr>>32)
		d.barWrite(e+8, 4, uint64(msg.data))
		d.vectors = append(d.vectors, msg)
	}
	d.cfgWrite(d.msixCap+2, 2, (ctl|pci.MSIXControlEnable)&^pci.MSIXControlFuncMask)
	for v := range n {
		d.barWrite(tableOff+16*uint64(v)+12, 4, 0)
		_ = d.barRead(tableOff+16*uint64(v)+12, 4) // flush, as pci_msix_write_vector_ctrl
	}
}

// setMaster is pci_set_master (on) or pci_clear_master (off, as on
// shutdown or kexec): a read-modify-write of the command register, only
// if the bit changes.
func (d *linuxDriver) setMaster(on bool) {
	old := d.cfgRead(pci.RegCommand, 2)
	cmd := old &^ pci.CommandBusMaster
	if on {
		cmd |= pci.CommandBusMaster
	}
	if cmd != old {
		d.cfgWrite(pci.RegCommand, 2, cmd)
	}
}

// negotiate is virtio_dev_probe up to FEATURES_OK: reset (vp_reset waits
// for status to read 0), ACKNOWLEDGE, DRIVER, the feature words,
// FEATURES_OK and its readback. It returns whether FEATURES_OK stuck.
func (d *linuxDriver) negotiate(want uint64) bool {
	d.t.Helper()
	d.commonWrite(commonStatus, 1, 0)
	for i := 0; d.status() != 0; i++ {
		if i == 1000 {
			d.t.Fatal("status does not read 0 after a reset")
		}
	}
	d.addStatus(StatusAcknowledge)
	d.addStatus(StatusDriver)
	d.commonWrite(commonDFSelect, 4, 0)
	offered := d.commonRead(commonDF, 4)
	d.commonWrite(commonDFSelect, 4, 1)
	offered |= d.commonRead(commonDF, 4) << 32
	d.features = want
	d.commonWrite(commonGFSelect, 4, 0)
	d.commonWrite(commonGF, 4, want&0xffffffff)
	d.commonWrite(commonGFSelect, 4, 1)
	d.commonWrite(commonGF, 4, want>>32)
	d.addStatus(StatusFeaturesOK)
	ok := d.status()&StatusFeaturesOK != 0
	if ok && want&^offered != 0 {
		d.t.Errorf("FEATURES_OK accepted features %#x beyond the offered %#x", want, offered)
	}
	return ok
}

// setupQueue is vp_find_vqs_msix + setup_vq for queue 0 with num entries
// at ring (vring_init's layout: the available ring after the descriptors,
// the used ring 64-byte aligned after it), then queue_enable as
// vp_modern_find_vqs does.
func (d *linuxDriver) setupQueue(num uint16, ring uint64) {
	t := d.t
	t.Helper()
	d.commonWrite(commonMSIX, 2, 0)
	if v := d.commonRead(commonMSIX, 2); v != 0 {
		t.Fatalf("config_msix_vector reads %#x after writing 0", v)
	}
	d.commonWrite(commonQSelect, 2, 0)
	max := uint16(d.commonRead(commonQSize, 2))
	if max == 0 || d.commonRead(commonQEnable, 2) != 0 {
		t.Fatalf("queue 0: size %d, enable %d", max, d.commonRead(commonQEnable, 2))
	}
	if num > max {
		t.Fatalf("queue 0: asked for %d entries, device allows %d", num, max)
	}
	d.num = num
	d.desc = ring
	d.avail = ring + descSize*uint64(num)
	d.used = (d.avail + 6 + 2*uint64(num) + 63) &^ 63
	d.availIdx, d.numAdded, d.lastUse = 0, 0, 0
	d.posted = map[uint16]Buffer{}
	d.commonWrite(commonQSize, 2, uint64(num))
	d.commonWrite64(commonQDescLo, d.desc)
	d.commonWrite64(commonQAvailLo, d.avail)
	d.commonWrite64(commonQUsedLo, d.used)
	off := d.commonRead(commonQNotifyOf, 2)
	if off*uint64(d.notifyMul)+2 > uint64(d.notifyLen) {
		t.Fatalf("queue 0: notify offset %d outside the notify structure", off)
	}
	d.notifyAt = d.notify + off*uint64(d.notifyMul)
	d.commonWrite(commonQVector, 2, 1)
	if v := d.commonRead(commonQVector, 2); v != 1 {
		t.Fatalf("queue_msix_vector reads %#x after writing 1", v)
	}
	d.commonWrite(commonQEnable, 2, 1)
}

// init brings the device up: negotiate, setupQueue, DRIVER_OK.
func (d *linuxDriver) init(features uint64, num uint16, ring uint64) {
	d.t.Helper()
	if !d.negotiate(features) {
		d.t.Fatalf("FEATURES_OK refused for %#x", features)
	}
	d.setupQueue(num, ring)
	d.addStatus(StatusDriverOK)
	if s := d.status(); s != StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK {
		d.t.Fatalf("status %#x after DRIVER_OK", s)
	}
}

func (d *linuxDriver) usedRing() Buffer {
	return Buffer{GPA: d.used, Len: uint32(6 + usedElemSize*uint64(d.num))}
}

// post is virtqueue_add_inbuf of one device-writable buffer of n bytes
// (cleared first, so that the device's writes show) and returns its
// descriptor index; false when the ring is full.
func (d *linuxDriver) post(n uint32) (uint16, bool) {
	if d.availIdx-d.lastUse >= d.num {
		return 0, false
	}
	i := d.availIdx % d.num
	buf := Buffer{GPA: testBufGPA + 0x1000*uint64(i), Len: n}
	d.m.write(buf.GPA, make([]byte, n))
	e := d.desc + descSize*uint64(i)
	d.m.put64(e, buf.GPA)
	d.m.put32(e+8, n)
	d.m.put16(e+12, descFWrite)
	d.m.put16(e+14, 0)
	d.m.put16(d.avail+4+2*uint64(d.availIdx%d.num), i)
	d.availIdx++
	d.numAdded++
	// virtio_wmb, then avail.idx (with avail.flags, the driver's too).
	d.m.store32(d.avail, uint32(d.availIdx)<<16)
	d.posted[i] = buf
	return i, true
}

// kick is virtqueue_kick: notify unless the device's avail_event (or
// VRING_USED_F_NO_NOTIFY) says it needs none. It reports whether it
// notified.
func (d *linuxDriver) kick() bool {
	newIdx, old := d.availIdx, d.availIdx-d.numAdded
	d.numAdded = 0
	var need bool
	if d.features&FeatureEventIdx != 0 {
		event := d.m.load16(d.used + 4 + usedElemSize*uint64(d.num))
		need = newIdx-event-1 < newIdx-old // vring_need_event
	} else {
		need = d.m.load32(d.used)&1 == 0
	}
	if need {
		d.barWrite(d.notifyAt, 2, 0) // vp_notify: iowrite16(queue index)
	}
	return need
}

func (d *linuxDriver) usedIdx() uint16 { return uint16(d.m.load32(d.used) >> 16) }

// getBuf is virtqueue_get_buf: the next used element, and used_event
// moved past it (callbacks stay enabled).
func (d *linuxDriver) getBuf() (id uint16, n uint32, ok bool) {
	if d.lastUse == d.usedIdx() {
		return 0, 0, false
	}
	e := d.used + 4 + usedElemSize*uint64(d.lastUse%d.num)
	id32, n := d.m.get32(e), d.m.get32(e+4)
	if id32 >= uint32(d.num) {
		d.t.Fatalf("used element %d: id %d out of range", d.lastUse, id32)
	}
	d.lastUse++
	if d.features&FeatureEventIdx != 0 {
		d.m.store16(d.avail+4+2*uint64(d.num), d.lastUse)
	}
	return uint16(id32), n, true
}

// waitUsed waits until the device has used idx chains in all.
func (d *linuxDriver) waitUsed(idx uint16) {
	d.t.Helper()
	eventually(d.t, fmt.Sprintf("the used index to reach %d", idx), func() bool { return d.usedIdx() == idx })
}
