package virtio

import (
	"encoding/binary"
	"fmt"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// Virtio PCI capabilities (virtio 1.2 §4.1.4): vendor-specific
// capabilities whose cfg_type says which structure they locate.
const (
	capVendor = 0x09

	cfgCommon = 1
	cfgNotify = 2
	cfgISR    = 3
	cfgDevice = 4
	cfgPCI    = 5

	// virtioCapLen is sizeof(struct virtio_pci_cap); the notify and
	// PCI_CFG capabilities carry 4 more bytes.
	virtioCapLen = 16
	// Offsets inside struct virtio_pci_cap, from cap_vndr.
	capBar    = 4
	capOffset = 8
	capLength = 12
	capData   = 16 // pci_cfg_data of the PCI_CFG capability
)

// buildPCI creates configuration space: the header, BAR 4, the virtio
// capabilities and MSI-X (one vector per queue and one for configuration
// changes).
func (t *Transport) buildPCI(msi pci.MSISender) error {
	t.cfg = pci.NewConfigSpace(pci.Header{
		VendorID:          VendorID,
		DeviceID:          DeviceIDBase + uint16(t.dev.Type()),
		SubsystemVendorID: VendorID,
		SubsystemID:       uint16(t.dev.Type()),
		ClassCode:         t.dev.Class(),
		Revision:          revision,
	})
	if err := t.cfg.DefineBAR(BAR, BARSize, pci.BARMem64, false); err != nil {
		return err
	}
	if err := t.addVirtioCaps(); err != nil {
		return err
	}
	m, err := pci.NewMSIX(t.cfg, len(t.queues)+1, BAR, msixTableOffset, msixPBAOffset, msi)
	if err != nil {
		return err
	}
	m.SetLogger(t.log)
	t.msix = m
	// After MSI-X's own watch: on the way up, pending messages go before
	// the worker starts again.
	t.cfg.Intercept(pci.RegCommand, 2, commandWatch{t})
	return nil
}

// commandWatch follows the guest's writes to the command register.
type commandWatch struct{ t *Transport }

func (w commandWatch) Read(int, []byte) {}

func (w commandWatch) Write(int, []byte) {
	w.t.mu.Lock()
	defer w.t.mu.Unlock()
	w.t.syncBusMasterLocked()
}

func (t *Transport) addVirtioCaps() error {
	var multiplier [4]byte
	binary.LittleEndian.PutUint32(multiplier[:], notifyMultiplier)
	caps := []struct {
		typ         uint8
		off, length uint32
		extra       []byte
	}{
		{cfgCommon, commonOffset, commonCfgLen, nil},
		{cfgNotify, notifyOffset, notifyMultiplier * uint32(len(t.queues)), multiplier[:]},
		{cfgISR, isrOffset, 1, nil},
		{cfgDevice, deviceCfgOffset, uint32(t.configSize), nil},
	}
	for _, c := range caps {
		if c.length == 0 {
			continue // no device-specific configuration
		}
		if _, err := t.cfg.AddCapability(capVendor, virtioCap(c.typ, c.off, c.length, c.extra), nil); err != nil {
			return fmt.Errorf("virtio capability %d: %w", c.typ, err)
		}
	}
	return t.addPCICfgCap()
}

// virtioCap is the body (after cap_vndr and cap_next) of a struct
// virtio_pci_cap for BAR 4, followed by extra.
func virtioCap(typ uint8, off, length uint32, extra []byte) []byte {
	body := make([]byte, virtioCapLen-2+len(extra))
	body[0] = byte(virtioCapLen + len(extra)) // cap_len
	body[1] = typ
	body[capBar-2] = BAR
	binary.LittleEndian.PutUint32(body[capOffset-2:], off)
	binary.LittleEndian.PutUint32(body[capLength-2:], length)
	copy(body[virtioCapLen-2:], extra)
	return body
}

// addPCICfgCap adds VIRTIO_PCI_CAP_PCI_CFG: a window onto the BAR through
// configuration space (bar, offset, length and pci_cfg_data are the
// driver's to write). Accesses to pci_cfg_data are intercepted.
func (t *Transport) addPCICfgCap() error {
	body := virtioCap(cfgPCI, 0, 0, make([]byte, 4))
	body[capBar-2] = 0
	writable := make([]byte, len(body))
	writable[capBar-2] = 0xff
	for i := capOffset - 2; i < len(body); i++ { // offset, length, pci_cfg_data
		writable[i] = 0xff
	}
	off, err := t.cfg.AddCapability(capVendor, body, writable)
	if err != nil {
		return fmt.Errorf("virtio PCI_CFG capability: %w", err)
	}
	t.pciCfgCap = off
	t.cfg.Intercept(off+capData, 4, pciCfgWindow{t})
	return nil
}

// pciCfgWindow serves pci_cfg_data: each driver access performs one
// access of cap.length bytes at cap.offset in cap.bar (virtio 1.2
// §4.1.4.9). A window that is not BAR 4, not 1, 2 or 4 bytes, misaligned,
// or outside the BAR does nothing.
type pciCfgWindow struct{ t *Transport }

func (w pciCfgWindow) target() (offset uint64, n int, ok bool) {
	b := w.t.cfg.Bytes(w.t.pciCfgCap+capBar, capData-capBar)
	bar := b[0]
	off := binary.LittleEndian.Uint32(b[capOffset-capBar:])
	length := binary.LittleEndian.Uint32(b[capLength-capBar:])
	if bar != BAR || (length != 1 && length != 2 && length != 4) || off%length != 0 || uint64(off)+uint64(length) > BARSize {
		return 0, 0, false
	}
	return uint64(off), int(length), true
}

// Read presents the BAR's bytes in the first cap.length bytes of
// pci_cfg_data (the rest read as stored).
func (w pciCfgWindow) Read(off int, data []byte) {
	at, n, ok := w.target()
	if !ok {
		return
	}
	var buf [4]byte
	w.t.BARRead(BAR, at, buf[:n])
	for k := range data {
		if off+k < n {
			data[k] = buf[off+k]
		}
	}
}

// Write sends the first cap.length bytes of pci_cfg_data (already stored
// by configuration space) to the BAR.
func (w pciCfgWindow) Write(int, []byte) {
	at, n, ok := w.target()
	if !ok {
		return
	}
	w.t.BARWrite(BAR, at, w.t.cfg.Bytes(w.t.pciCfgCap+capData, n))
}
