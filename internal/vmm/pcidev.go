package vmm

import (
	"errors"
	"fmt"

	"github.com/ferry-vmm/ferry/internal/boot"
	"github.com/ferry-vmm/ferry/internal/pci"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/virtio"
)

// PCI devices of a VM: bus 0 (internal/pci) on the VM's port and MMIO
// buses, and the virtio functions on it (internal/virtio). A VM has a bus
// only when it has a PCI device, so that a VM without one looks exactly as
// before (no DSDT host bridge, no MCFG, no section in its state).
//
//	vCPU thread ── MMIO/port exit ──▶ devices.Bus ──▶ pci.Bus ──▶ Transport (BAR 4)
//	                                                        doorbell: set a bit, wake
//	Transport worker goroutine ──▶ devMem (gate, dirty) ──▶ guest RAM
//	                           ──▶ KVM_SIGNAL_MSI (MSI-X vector)
//
// Pausing the VM parks the vCPUs first (no new doorbell or configuration
// access), then every transport (the chain in hand finishes); resuming
// goes the other way. Capture and Restore need both paused.
type pciDevices struct {
	bus    *pci.Bus
	virtio []*virtioFunc
}

type virtioFunc struct {
	slot int
	typ  virtio.DeviceType
	t    *virtio.Transport
}

// pciLayout is where the bus lives in guest-physical space: in the MMIO
// hole below 4 GiB, clear of the IOAPIC and the local APIC.
func pciLayout() pci.Layout { return pci.DefaultLayout() }

// bootPCI describes the layout to the guest's firmware tables.
func bootPCI(l pci.Layout) boot.PCIConfig {
	return boot.PCIConfig{ECAMBase: l.ECAMBase, MemBase: l.MemBase, MemEnd: l.MemEnd, IOBase: l.IOBase, IOEnd: l.IOEnd}
}

// wantsPCI reports whether the configuration asks for any PCI device.
func (c Config) wantsPCI() bool { return c.RNG }

// setupPCI creates the bus and the configured devices.
func (v *VM) setupPCI() error {
	if err := v.newPCIBus(); err != nil {
		return err
	}
	if v.cfg.RNG {
		if _, err := v.addVirtio(virtio.TypeEntropy); err != nil {
			return err
		}
	}
	return nil
}

func (v *VM) newPCIBus() error {
	bus, err := pci.NewBus(pciLayout(), &v.MMIO, &v.PIO, v.log)
	if err != nil {
		return err
	}
	v.pci = &pciDevices{bus: bus}
	return nil
}

// virtioNames name the slots of virtio functions (state, logs, inspect).
var virtioNames = map[virtio.DeviceType]string{virtio.TypeEntropy: "rng", virtio.TypeNet: "net", virtio.TypeBlock: "blk"}

// newVirtioDevice makes the device of a virtio type ferry offers.
func newVirtioDevice(typ virtio.DeviceType) (virtio.Device, error) {
	switch typ {
	case virtio.TypeEntropy:
		return virtio.NewRNG(), nil
	}
	return nil, fmt.Errorf("virtio device type %d is not one ferry provides", typ)
}

// addVirtio puts a virtio device of type typ on the bus, at the lowest
// free slot.
func (v *VM) addVirtio(typ virtio.DeviceType) (*virtioFunc, error) {
	dev, err := newVirtioDevice(typ)
	if err != nil {
		return nil, err
	}
	t, err := virtio.NewTransport(dev, virtio.TransportConfig{
		Memory: v.devMem, Dirty: v.devMem.Dirty, MSI: v.kvm, Logger: v.log,
	})
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("virtio-%s-%d", virtioNames[typ], len(v.pci.virtio))
	slot, err := v.pci.bus.Add(name, t)
	if err != nil {
		t.Close()
		return nil, err
	}
	f := &virtioFunc{slot: slot, typ: typ, t: t}
	v.pci.virtio = append(v.pci.virtio, f)
	return f, nil
}

// pauseDevices parks every transport; resumeDevices lets them go on.
func (v *VM) pauseDevices() {
	if v.pci == nil {
		return
	}
	for _, f := range v.pci.virtio {
		f.t.Pause()
	}
}

func (v *VM) resumeDevices() {
	if v.pci == nil {
		return
	}
	for _, f := range v.pci.virtio {
		if f.t.Paused() {
			f.t.Resume()
		}
	}
}

func (v *VM) closeDevices() {
	if v.pci == nil {
		return
	}
	for _, f := range v.pci.virtio {
		f.t.Close()
	}
}

// capturePCI records the bus and its functions; the transports must be
// paused.
func (v *VM) capturePCI(m *state.Machine) error {
	if v.pci == nil {
		m.PCI = nil
		return nil
	}
	p := &state.PCI{Bus: v.pci.bus.State()}
	for _, f := range v.pci.virtio {
		if !f.t.Paused() { // a VM that has not started: its devices idle
			f.t.Pause()
			defer f.t.Resume()
		}
		st, err := f.t.State()
		if err != nil {
			return fmt.Errorf("virtio function at slot %d: %w", f.slot, err)
		}
		p.Virtio = append(p.Virtio, state.VirtioFunction{Slot: f.slot, Type: uint16(f.typ), State: st})
	}
	m.PCI = p
	return nil
}

// restorePCI recreates the saved bus and functions on a VM made for
// restore (which has none: its devices come from the state) and applies
// their state. The transports stay paused until the VM starts.
func (v *VM) restorePCI(m *state.Machine) error {
	if m.PCI == nil {
		if v.pci != nil {
			return errors.New("the saved machine has no PCI bus, this VM has one")
		}
		return nil
	}
	if v.pci != nil {
		return errors.New("PCI devices are created from the saved state; this VM already has a bus")
	}
	if err := v.newPCIBus(); err != nil {
		return err
	}
	for _, sf := range m.PCI.Virtio {
		f, err := v.addVirtio(virtio.DeviceType(sf.Type))
		if err != nil {
			return fmt.Errorf("PCI slot %d: %w", sf.Slot, err)
		}
		if f.slot != sf.Slot {
			return fmt.Errorf("virtio type %d landed at slot %d, saved at slot %d", sf.Type, f.slot, sf.Slot)
		}
		f.t.Pause()
	}
	if err := v.pci.bus.SetState(m.PCI.Bus); err != nil {
		return err
	}
	for i, sf := range m.PCI.Virtio {
		if err := v.pci.virtio[i].t.SetState(sf.State); err != nil {
			return fmt.Errorf("virtio function at slot %d: %w", sf.Slot, err)
		}
	}
	return nil
}
