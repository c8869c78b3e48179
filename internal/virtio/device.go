package virtio

// DeviceType is a virtio device ID (virtio 1.2 §5).
type DeviceType uint16

// Device types ferry implements or plans to.
const (
	TypeNet     DeviceType = 1
	TypeBlock   DeviceType = 2
	TypeEntropy DeviceType = 4
)

// Feature bits the transport and the queues own (virtio 1.2 §6). Bits 0-23
// and 50-63 are the device's.
const (
	FeatureIndirectDesc = 1 << 28 // VIRTIO_F_INDIRECT_DESC
	FeatureEventIdx     = 1 << 29 // VIRTIO_F_EVENT_IDX
	FeatureVersion1     = 1 << 32 // VIRTIO_F_VERSION_1

	// transportFeatures are offered by every device on this transport.
	transportFeatures = FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx
	// reservedFeatures (24-49) are for the transport and future use; a
	// Device must not offer them.
	reservedFeatures = (1<<50 - 1) &^ (1<<24 - 1)
)

// Device status bits (virtio 1.2 §2.1).
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusNeedsReset  = 0x40
	StatusFailed      = 0x80

	statusKnown = StatusAcknowledge | StatusDriver | StatusDriverOK | StatusFeaturesOK | StatusNeedsReset | StatusFailed
)

// Device is a virtio device type (entropy, block, network ...) as the
// transport drives it. The transport owns feature negotiation, the queues'
// configuration, interrupts, pause and reset; the device owns its
// configuration space and what its queues carry.
//
// Threading: Process runs only on the transport's worker goroutine, and
// never at the same time as Activate, Reset, SaveState or RestoreState
// (the transport calls those with the worker idle). ReadConfig and
// WriteConfig come from vCPU threads at any time and must synchronize with
// the rest themselves.
type Device interface {
	// Type is the virtio device ID; the PCI device ID is 0x1040 + Type.
	Type() DeviceType
	// Class is the PCI class code: base<<16 | subclass<<8 | prog-if.
	Class() uint32
	// Features are the device-specific feature bits offered (0-23 and
	// 50-63); the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX.
	Features() uint64
	// QueueSizes gives the maximum size of each virtqueue (powers of two,
	// at most MaxQueueSize); its length is the number of queues (1..MaxQueues).
	QueueSizes() []uint16
	// ConfigSize is the length of the device-specific configuration
	// (0..4096; 0: none).
	ConfigSize() int
	// ReadConfig and WriteConfig serve the driver's accesses to the
	// device-specific configuration; off+len(data) <= ConfigSize.
	ReadConfig(off int, data []byte)
	WriteConfig(off int, data []byte)
	// Activate starts the device when the driver sets DRIVER_OK (or when a
	// running device is restored). An error marks the device NEEDS_RESET.
	Activate(a Activation) error
	// Process handles queue's available chains after a notification (or
	// a Wake): Pop until nil, Push each chain, then interrupt as the
	// queue's NeedsInterrupt says. It must not leave a chain popped but
	// not pushed when it returns, unless the device keeps it in its saved
	// state. An error (a driver's protocol violation, or a failure the
	// device cannot report to the driver) marks the device NEEDS_RESET.
	Process(queue int) error
	// Reset returns the device to its state before the driver found it;
	// the transport resets the queues.
	Reset()
	// SaveState returns the device-specific state (nil if none); the
	// transport is paused.
	SaveState() ([]byte, error)
	// RestoreState loads what SaveState returned into a freshly reset
	// device, refusing garbage with an error (leaving the device reset).
	// Activate follows if the driver had set DRIVER_OK.
	RestoreState(b []byte) error
}

// Activation is what a device gets when it starts.
type Activation struct {
	// Features are the feature bits the driver accepted.
	Features uint64
	// Queues are the device's virtqueues, by index; one the driver did not
	// enable is not Ready (its Pop returns nil).
	Queues []*Queue
	// Interrupt sends queue's used-buffer notification (its MSI-X vector;
	// the ISR's queue bit). Call it when NeedsInterrupt says so.
	Interrupt func(queue int)
	// ConfigChanged tells the driver the device-specific configuration
	// changed (config_generation, configuration interrupt).
	ConfigChanged func()
	// Wake schedules Process(queue) on the worker, for work that does not
	// come from a driver notification (a backend became ready).
	Wake func(queue int)
}
