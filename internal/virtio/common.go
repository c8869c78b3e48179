package virtio

import (
	"encoding/binary"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// The common configuration structure (virtio 1.2 §4.1.4.3) is served as a
// register file: a read renders it and copies the bytes asked for; a write
// renders it, merges the bytes written, and hands each field the write
// touched its new value. Any access width works, and a 32-bit write to
// half of a 64-bit address keeps the other half.

// commonField is one field of struct virtio_pci_common_cfg.
type commonField struct {
	off, size int
	set       func(t *Transport, v uint64) // nil: read-only for the driver
}

var commonFields = []commonField{
	{0x00, 4, (*Transport).setDeviceFeatureSelect},
	{0x04, 4, nil}, // device_feature
	{0x08, 4, (*Transport).setDriverFeatureSelect},
	{0x0c, 4, (*Transport).setDriverFeature},
	{0x10, 2, (*Transport).setMSIXConfig},
	{0x12, 2, nil}, // num_queues
	{0x14, 1, (*Transport).setStatus},
	{0x15, 1, nil}, // config_generation
	{0x16, 2, (*Transport).setQueueSelect},
	{0x18, 2, (*Transport).setQueueSize},
	{0x1a, 2, (*Transport).setQueueVector},
	{0x1c, 2, (*Transport).setQueueEnable},
	{0x1e, 2, nil}, // queue_notify_off
	{0x20, 8, (*Transport).setQueueDesc},
	{0x28, 8, (*Transport).setQueueDriver},
	{0x30, 8, (*Transport).setQueueDevice},
}

func (t *Transport) readCommon(off int, data []byte) {
	var regs [commonCfgLen]byte
	t.mu.Lock()
	t.renderCommonLocked(regs[:])
	t.mu.Unlock()
	clear(data)
	if off < commonCfgLen {
		copy(data, regs[off:])
	}
}

func (t *Transport) writeCommon(off int, data []byte) {
	end := min(off+len(data), commonCfgLen)
	if off >= end {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var regs [commonCfgLen]byte
	t.renderCommonLocked(regs[:])
	copy(regs[off:end], data)
	for _, f := range commonFields {
		if f.set != nil && f.off < end && off < f.off+f.size {
			f.set(t, leUint(regs[f.off:f.off+f.size]))
		}
	}
}

func leUint(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func (t *Transport) renderCommonLocked(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0x00:], t.deviceFeatureSelect)
	le.PutUint32(b[0x04:], featureWord(t.offered, t.deviceFeatureSelect))
	le.PutUint32(b[0x08:], t.driverFeatureSelect)
	le.PutUint32(b[0x0c:], featureWord(t.driverFeatures, t.driverFeatureSelect))
	le.PutUint16(b[0x10:], uint16(t.msixConfig.Load()))
	le.PutUint16(b[0x12:], uint16(len(t.queues)))
	b[0x14] = t.status
	b[0x15] = uint8(t.configGen.Load())
	le.PutUint16(b[0x16:], t.queueSelect)
	r := t.selectedLocked()
	if r == nil {
		return // queue_size 0: no such queue; the rest reads 0
	}
	le.PutUint16(b[0x18:], r.size)
	le.PutUint16(b[0x1a:], uint16(r.vector.Load()))
	if r.enabled {
		le.PutUint16(b[0x1c:], 1)
	}
	le.PutUint16(b[0x1e:], t.queueSelect) // queue_notify_off: doorbell i at 4·i
	le.PutUint64(b[0x20:], r.addrs.Desc)
	le.PutUint64(b[0x28:], r.addrs.Driver)
	le.PutUint64(b[0x30:], r.addrs.Device)
}

// featureWord is the 32 feature bits a select register picks (0 beyond 1).
func featureWord(f uint64, sel uint32) uint32 {
	if sel > 1 {
		return 0
	}
	return uint32(f >> (32 * sel))
}

func (t *Transport) selectedLocked() *queueRegs {
	if int(t.queueSelect) >= len(t.qregs) {
		return nil
	}
	return &t.qregs[t.queueSelect]
}

func (t *Transport) setDeviceFeatureSelect(v uint64) { t.deviceFeatureSelect = uint32(v) }
func (t *Transport) setDriverFeatureSelect(v uint64) { t.driverFeatureSelect = uint32(v) }
func (t *Transport) setQueueSelect(v uint64)         { t.queueSelect = uint16(v) }

// setDriverFeature stores the driver's feature word as written (checked
// when it sets FEATURES_OK); after FEATURES_OK the features are fixed.
func (t *Transport) setDriverFeature(v uint64) {
	if t.status&StatusFeaturesOK != 0 || t.driverFeatureSelect > 1 {
		return
	}
	shift := 32 * t.driverFeatureSelect
	t.driverFeatures = t.driverFeatures&^(0xffffffff<<shift) | v<<shift
}

// vectorOrNone is v if it names an MSI-X vector, else NO_VECTOR: the
// driver reads back NO_VECTOR when a mapping fails (virtio 1.2 §4.1.5.1.2).
func (t *Transport) vectorOrNone(v uint64) uint32 {
	if v < uint64(t.msix.Vectors()) {
		return uint32(v)
	}
	return pci.NoVector
}

func (t *Transport) setMSIXConfig(v uint64) { t.msixConfig.Store(t.vectorOrNone(v)) }

func (t *Transport) setQueueVector(v uint64) {
	if r := t.selectedLocked(); r != nil {
		r.vector.Store(t.vectorOrNone(v))
	}
}

// configurableLocked returns the selected queue's registers if the driver
// may still change them: the queue exists, is not enabled, and the device
// is not live.
func (t *Transport) configurableLocked() *queueRegs {
	r := t.selectedLocked()
	if r == nil || r.enabled || t.status&StatusDriverOK != 0 {
		return nil
	}
	return r
}

// setQueueSize accepts a power of two up to the queue's maximum; anything
// else is ignored, and the driver reads back the size in force.
func (t *Transport) setQueueSize(v uint64) {
	r := t.configurableLocked()
	if r == nil {
		return
	}
	if limit := t.queues[t.queueSelect].MaxSize(); v > 0xffff || !validSize(uint16(v), uint32(limit)) {
		t.log.Debug("virtio: ignoring invalid queue size", "queue", t.queueSelect, "size", v, "max", limit)
		return
	}
	r.size = uint16(v)
}

func (t *Transport) setQueueDesc(v uint64) {
	if r := t.configurableLocked(); r != nil {
		r.addrs.Desc = v
	}
}

func (t *Transport) setQueueDriver(v uint64) {
	if r := t.configurableLocked(); r != nil {
		r.addrs.Driver = v
	}
}

func (t *Transport) setQueueDevice(v uint64) {
	if r := t.configurableLocked(); r != nil {
		r.addrs.Device = v
	}
}

// setQueueEnable starts the selected queue when the driver writes 1 (0 is
// not allowed to drivers and is ignored). Rings that fail validation make
// the device NEEDS_RESET.
func (t *Transport) setQueueEnable(v uint64) {
	r := t.configurableLocked()
	if r == nil || v != 1 {
		return
	}
	r.enabled = true
	q := t.queues[t.queueSelect]
	if err := q.Start(r.size, r.addrs, t.driverFeatures); err != nil {
		t.failLocked(err)
	}
}

// setStatus implements device_status (virtio 1.2 §2.1, §3.1): 0 resets;
// otherwise bits accumulate (the driver never clears one), FEATURES_OK
// sticks only if the driver's features are acceptable, and DRIVER_OK
// starts the device.
func (t *Transport) setStatus(v uint64) {
	if v == 0 {
		t.resetLocked()
		return
	}
	old := t.status
	s := old | uint8(v)&statusKnown&^StatusNeedsReset
	if s&^old&StatusFeaturesOK != 0 && !t.featuresAcceptable() {
		t.log.Debug("virtio: refusing FEATURES_OK", "offered", t.offered, "driver", t.driverFeatures)
		s &^= StatusFeaturesOK
	}
	t.status = s
	if s&^old&StatusDriverOK != 0 && s&StatusNeedsReset == 0 {
		if err := t.activateLocked(); err != nil {
			t.failLocked(err)
		}
	}
}

// featuresAcceptable: only offered bits, and VIRTIO_F_VERSION_1 (this is a
// modern-only device).
func (t *Transport) featuresAcceptable() bool {
	return t.driverFeatures&^t.offered == 0 && t.driverFeatures&FeatureVersion1 != 0
}
