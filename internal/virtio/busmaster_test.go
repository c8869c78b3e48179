package virtio

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// gatedSource is an entropy source that, once armed, holds the next
// Read (the worker inside a chain it popped) until released.
type gatedSource struct {
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newGatedSource() *gatedSource {
	return &gatedSource{entered: make(chan struct{}, 1), release: make(chan struct{})}
}

// free lets the held Read, and any later one, go.
func (g *gatedSource) free() { g.once.Do(func() { close(g.release) }) }

func (g *gatedSource) Read(p []byte) (int, error) {
	if g.armed.Swap(false) {
		g.entered <- struct{}{}
		<-g.release
	}
	for i := range p {
		p[i] = byte(i*13 + 7)
	}
	return len(p), nil
}

// busMastering reports whether the transport follows Bus Master Enable
// as set.
func (t *Transport) busMastering() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.busMaster
}

// dirtyCount is how many dirty reports the device has made.
func (m *fakeMem) dirtyCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.dirty)
}

// pba reads the MSI-X pending bits through BAR 4.
func (d *linuxDriver) pba() uint64 { return d.barRead(msixPBAOffset, 8) }

// expectIdle checks, after a while, that the device has used nothing
// beyond used, written nothing since dirty reports, and sent no MSI
// beyond msis.
func expectIdle(t *testing.T, r *rngRig, d *linuxDriver, used uint16, dirty, msis int) {
	t.Helper()
	time.Sleep(20 * time.Millisecond)
	if u := d.usedIdx(); u != used {
		t.Fatalf("used.idx = %d with Bus Master Enable clear, want %d", u, used)
	}
	if n := r.mem.dirtyCount(); n != dirty {
		t.Fatalf("%d dirty reports with Bus Master Enable clear, want %d", n, dirty)
	}
	if n := len(r.msi.all()); n != msis {
		t.Fatalf("%d MSIs with Bus Master Enable clear, want %d", n, msis)
	}
}

// TestBusMasterNeverSet: a driver that does everything but pci_set_master
// gets nothing processed and no interrupt (a configuration change is left
// pending), and the device touches no guest memory; once it sets Bus
// Master Enable, the doorbells it rang are processed and each pending
// interrupt is sent once.
func TestBusMasterNeverSet(t *testing.T) {
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	d.noMaster = true
	d.probe()
	if r.tr.Config().Command()&pci.CommandBusMaster != 0 {
		t.Fatal("Bus Master Enable set at probe")
	}
	d.init(linuxFeatures, 8, testRingGPA)
	var bufs []Buffer
	for range 3 {
		i, _ := d.post(64)
		bufs = append(bufs, d.posted[i])
	}
	if !d.kick() {
		t.Fatal("kick suppressed")
	}
	r.tr.ConfigChanged()
	expectIdle(t, r, d, 0, 0, 0)
	if got := r.mem.deviceWrites(); len(got) != 0 {
		t.Fatalf("the device wrote guest memory at %#x", got)
	}
	if pba := d.pba(); pba != 1<<0 {
		t.Fatalf("PBA = %#b, want the configuration vector pending", pba)
	}

	d.setMaster(true)
	d.waitUsed(3)
	queueMsg, configMsg := d.vectors[1], d.vectors[0]
	eventually(t, "the queue's MSI", func() bool { return msisFor(t, r.msi, d.vectors, queueMsg) > 0 })
	time.Sleep(10 * time.Millisecond)
	if n := msisFor(t, r.msi, d.vectors, configMsg); n != 1 {
		t.Fatalf("%d configuration MSIs, want the pending one once", n)
	}
	if n := msisFor(t, r.msi, d.vectors, queueMsg); n != 1 {
		t.Fatalf("%d queue MSIs for one batch", n)
	}
	if pba := d.pba(); pba != 0 {
		t.Fatalf("PBA = %#b after Bus Master Enable was set", pba)
	}
	r.tr.Pause()
	checkWrites(t, r.mem, append(bufs, d.usedRing())...)
	checkDirty(t, r.mem, append(bufs, d.usedRing())...)
}

// TestBusMasterClearMidStream: pci_clear_master while the worker holds a
// chain returns only once that chain is pushed; from then on nothing is
// processed, guest memory is not touched and no MSI is sent (the chain's
// interrupt is pending), though the driver goes on posting and kicking.
// pci_set_master sends the pending interrupt once and processes the
// remembered doorbells.
func TestBusMasterClearMidStream(t *testing.T) {
	src := newGatedSource()
	r := newRNGRigDev(t, nil, &RNG{source: src})
	t.Cleanup(src.free) // registered after the rig: runs before its Close
	d := newLinuxDriver(t, r)
	d.probe()
	d.init(linuxFeatures, 8, testRingGPA)
	queueMsg := d.vectors[1]

	// One buffer, its interrupt, and getBuf moves used_event to 1: the
	// next used buffer is owed an interrupt.
	d.post(64)
	d.kick()
	d.waitUsed(1)
	eventually(t, "the first MSI", func() bool { return msisFor(t, r.msi, d.vectors, queueMsg) == 1 })
	if _, _, ok := d.getBuf(); !ok {
		t.Fatal("no used buffer")
	}

	// Three more; the worker stops inside the first of them.
	src.armed.Store(true)
	for range 3 {
		d.post(64)
	}
	d.kick()
	<-src.entered
	cleared := make(chan struct{})
	go func() {
		d.setMaster(false)
		close(cleared)
	}()
	eventually(t, "the transport to see Bus Master Enable clear", func() bool { return !r.tr.busMastering() })
	select {
	case <-cleared:
		t.Fatal("clearing Bus Master Enable returned while the worker held a chain")
	case <-time.After(20 * time.Millisecond):
	}
	src.free()
	<-cleared

	// The held chain was pushed; its interrupt is pending, not sent.
	if u := d.usedIdx(); u != 2 {
		t.Fatalf("used.idx = %d after clearing Bus Master Enable, want 2 (the held chain only)", u)
	}
	if n := msisFor(t, r.msi, d.vectors, queueMsg); n != 1 {
		t.Fatalf("%d queue MSIs: one sent with Bus Master Enable clear", n)
	}
	if pba := d.pba(); pba != 1<<1 {
		t.Fatalf("PBA = %#b, want the queue's vector pending", pba)
	}
	dirty := r.mem.dirtyCount()
	for range 2 {
		d.post(64)
		d.kick()                     // avail_event may say no need
		d.barWrite(d.notifyAt, 2, 0) // a doorbell all the same
	}
	if r.tr.notified[0].Load()&1 == 0 {
		t.Fatal("the doorbell rung with Bus Master Enable clear was not kept")
	}
	expectIdle(t, r, d, 2, dirty, 1)

	// pci_set_master: the pending interrupt goes, once; the two chains
	// left from before and the two posted since are used. used_event is
	// still 1, so they are owed no further interrupt.
	d.setMaster(true)
	d.waitUsed(6)
	eventually(t, "the pending MSI", func() bool { return msisFor(t, r.msi, d.vectors, queueMsg) >= 2 })
	time.Sleep(10 * time.Millisecond)
	if n := msisFor(t, r.msi, d.vectors, queueMsg); n != 2 {
		t.Fatalf("%d queue MSIs, want 2 (the first, and the pending one once)", n)
	}
	if pba := d.pba(); pba != 0 {
		t.Fatalf("PBA = %#b after Bus Master Enable was set", pba)
	}
	for k := uint16(1); k < 6; k++ {
		id, n, ok := d.getBuf()
		if !ok || id != k%8 || n != 64 {
			t.Fatalf("used element %d = (%d, %d, %v)", k, id, n, ok)
		}
	}
	if errs := r.log.logged(); len(errs) != 0 {
		t.Fatalf("errors logged: %v", errs)
	}
}

// TestBusMasterReset: a device reset with Bus Master Enable clear works
// as ever, and leaves the transport off the bus until the driver sets it.
func TestBusMasterReset(t *testing.T) {
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	d.probe()
	d.init(linuxFeatures, 8, testRingGPA)
	d.setMaster(false)
	d.commonWrite(commonStatus, 1, 0)
	if s := d.status(); s != 0 {
		t.Fatalf("status %#x after a reset", s)
	}
	d.init(linuxFeatures, 8, testRingGPA)
	d.post(64)
	d.kick()
	expectIdle(t, r, d, 0, 0, 0)
	d.setMaster(true)
	d.waitUsed(1)
}
