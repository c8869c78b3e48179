package virtio

import (
	"errors"
	"fmt"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// State is a transport's state for save/restore and migration, taken while
// paused: no chain is half-processed, so the queues are fully described by
// their configuration and their indices.
type State struct {
	Status              uint8  // device_status
	OfferedFeatures     uint64 // what the device offered (informational)
	DriverFeatures      uint64 // what the driver accepted (or has written so far)
	DeviceFeatureSelect uint32
	DriverFeatureSelect uint32
	QueueSelect         uint16
	MSIXConfig          uint16 // config_msix_vector
	ConfigGeneration    uint8
	ConfigChanged       bool // config_generation moves at the next device-config read
	ISR                 uint8
	Queues              []QueueState
	Config              pci.ConfigState // configuration space (BAR, MSI-X control, PCI_CFG window)
	MSIX                pci.MSIXState   // MSI-X table and pending bits
	Device              []byte          // Device.SaveState
}

// QueueState is one virtqueue's configuration and position.
type QueueState struct {
	Size           uint16
	Enabled        bool
	Vector         uint16 // queue_msix_vector
	Desc           uint64
	Driver         uint64
	Device         uint64
	NextAvail      uint16 // next available-ring slot the device pops
	NextUsed       uint16 // used.idx
	SignalledUsed  uint16 // event-idx state: used index at the last interrupt decision
	SignalledValid bool
}

// ErrNotPaused: State and SetState need a paused transport.
var ErrNotPaused = errors.New("transport is not paused")

// State returns the transport's state, the device's included. The
// transport must be paused.
func (t *Transport) State() (State, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.paused {
		return State{}, ErrNotPaused
	}
	dev, err := t.dev.SaveState()
	if err != nil {
		return State{}, fmt.Errorf("virtio %s: saving the device: %w", typeName(t.dev.Type()), err)
	}
	s := State{
		Status:              t.status,
		OfferedFeatures:     t.offered,
		DriverFeatures:      t.driverFeatures,
		DeviceFeatureSelect: t.deviceFeatureSelect,
		DriverFeatureSelect: t.driverFeatureSelect,
		QueueSelect:         t.queueSelect,
		MSIXConfig:          uint16(t.msixConfig.Load()),
		ConfigGeneration:    uint8(t.configGen.Load()),
		ConfigChanged:       t.configChanged.Load(),
		ISR:                 uint8(t.isr.Load()),
		Config:              t.cfg.State(),
		MSIX:                t.msix.State(),
		Device:              dev,
	}
	for i, q := range t.queues {
		s.Queues = append(s.Queues, t.queueState(i, q))
	}
	return s, nil
}

func (t *Transport) queueState(i int, q *Queue) QueueState {
	r := &t.qregs[i]
	return QueueState{
		Size: r.size, Enabled: r.enabled, Vector: uint16(r.vector.Load()),
		Desc: r.addrs.Desc, Driver: r.addrs.Driver, Device: r.addrs.Device,
		NextAvail: q.nextAvail, NextUsed: q.nextUsed,
		SignalledUsed: q.signalledUsed, SignalledValid: q.signalledValid,
	}
}

// SetState makes the transport continue where the one that saved s
// stopped. The transport must be paused; Resume continues, looking at
// every queue once. s is validated first: an invalid one is refused with
// the transport unchanged. If the device refuses its part, the transport
// and the device are left reset (device_status 0) and the MSI-X table as
// it was.
func (t *Transport) SetState(s State) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.paused {
		return ErrNotPaused
	}
	if err := t.checkState(s); err != nil {
		return fmt.Errorf("virtio %s state: %w", typeName(t.dev.Type()), err)
	}
	if err := t.loadState(s); err != nil {
		return fmt.Errorf("virtio %s state: %w", typeName(t.dev.Type()), err)
	}
	return nil
}

// live reports whether a state's device runs: the driver set DRIVER_OK
// and nothing has failed since.
func live(status uint8) bool {
	return status&StatusDriverOK != 0 && status&StatusNeedsReset == 0
}

// checkState validates everything SetState would load, changing nothing.
func (t *Transport) checkState(s State) error {
	if s.Status&^statusKnown != 0 {
		return fmt.Errorf("device status %#x has unknown bits", s.Status)
	}
	acceptable := s.DriverFeatures&^t.offered == 0 && s.DriverFeatures&FeatureVersion1 != 0
	if s.Status&StatusFeaturesOK != 0 && !acceptable {
		return fmt.Errorf("driver features %#x with FEATURES_OK, but this device offers %#x", s.DriverFeatures, t.offered)
	}
	if live(s.Status) && s.Status&StatusFeaturesOK == 0 {
		return fmt.Errorf("device status %#x: DRIVER_OK without FEATURES_OK", s.Status)
	}
	if s.MSIXConfig != 0xffff && int(s.MSIXConfig) >= t.msix.Vectors() {
		return fmt.Errorf("config_msix_vector %d out of %d vectors", s.MSIXConfig, t.msix.Vectors())
	}
	if s.ISR&^(isrQueue|isrConfig) != 0 {
		return fmt.Errorf("ISR %#x has unknown bits", s.ISR)
	}
	if len(s.Queues) != len(t.queues) {
		return fmt.Errorf("%d queues, this device has %d", len(s.Queues), len(t.queues))
	}
	for i, qs := range s.Queues {
		if err := t.checkQueueState(i, qs, s); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return t.cfg.CheckState(s.Config)
}

func (t *Transport) checkQueueState(i int, qs QueueState, s State) error {
	q := t.queues[i]
	if !validSize(qs.Size, uint32(q.MaxSize())) {
		return fmt.Errorf("size %d (maximum %d): %w", qs.Size, q.MaxSize(), ErrQueueSize)
	}
	if qs.Vector != 0xffff && int(qs.Vector) >= t.msix.Vectors() {
		return fmt.Errorf("vector %d out of %d", qs.Vector, t.msix.Vectors())
	}
	if !qs.Enabled && (qs.NextAvail|qs.NextUsed|qs.SignalledUsed != 0 || qs.SignalledValid) {
		return errors.New("a queue that is not enabled has indices")
	}
	if qs.NextAvail-qs.NextUsed > qs.Size {
		return fmt.Errorf("%d chains in flight (next avail %d, next used %d) exceed the size %d",
			qs.NextAvail-qs.NextUsed, qs.NextAvail, qs.NextUsed, qs.Size)
	}
	if qs.Enabled && s.Status&StatusNeedsReset == 0 {
		scratch := Queue{index: i, maxSize: q.MaxSize(), g: q.g}
		if err := scratch.check(qs.Size, qs.rings()); err != nil {
			return err
		}
	}
	return nil
}

func (qs QueueState) rings() RingAddrs {
	return RingAddrs{Desc: qs.Desc, Driver: qs.Driver, Device: qs.Device}
}

// loadState applies a checked state.
func (t *Transport) loadState(s State) error {
	oldMSIX := t.msix.State()
	if err := t.msix.SetState(s.MSIX); err != nil {
		return err
	}
	t.resetLocked()
	if err := t.dev.RestoreState(s.Device); err != nil {
		t.dev.Reset()
		_ = t.msix.SetState(oldMSIX) // it was this function's own state
		return fmt.Errorf("device: %w", err)
	}
	if err := t.cfg.SetState(s.Config); err != nil {
		return err // CheckState accepted it: not reached
	}
	t.syncBusMasterLocked() // paused: the worker is idle
	t.status = s.Status
	t.driverFeatures = s.DriverFeatures
	t.deviceFeatureSelect, t.driverFeatureSelect = s.DeviceFeatureSelect, s.DriverFeatureSelect
	t.queueSelect = s.QueueSelect
	t.msixConfig.Store(uint32(s.MSIXConfig))
	t.configGen.Store(uint32(s.ConfigGeneration))
	t.configChanged.Store(s.ConfigChanged)
	t.isr.Store(uint32(s.ISR))
	for i, qs := range s.Queues {
		if err := t.loadQueue(i, qs, s); err != nil {
			return err // checkQueueState accepted it: not reached
		}
	}
	if !live(s.Status) {
		return nil
	}
	if err := t.dev.Activate(t.activation()); err != nil {
		t.failLocked(fmt.Errorf("activating the restored device: %w", err))
		return err
	}
	t.active = true
	t.notifyAll()
	return nil
}

func (t *Transport) loadQueue(i int, qs QueueState, s State) error {
	r := &t.qregs[i]
	r.size, r.enabled, r.addrs = qs.Size, qs.Enabled, qs.rings()
	r.vector.Store(uint32(qs.Vector))
	q := t.queues[i]
	if qs.Enabled && s.Status&StatusNeedsReset == 0 {
		if err := q.Start(qs.Size, qs.rings(), s.DriverFeatures); err != nil {
			return err
		}
	}
	q.nextAvail, q.nextUsed = qs.NextAvail, qs.NextUsed
	q.signalledUsed, q.signalledValid = qs.SignalledUsed, qs.SignalledValid
	return nil
}
