package virtio

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/pci"
)

const linuxFeatures = FeatureVersion1 | FeatureEventIdx

// checkDirty fails t unless the dirty hook heard of every byte the device
// changed, and of nothing outside allowed (the used ring, avail_event
// included, and the buffers the driver posted).
func checkDirty(t *testing.T, m *fakeMem, allowed ...Buffer) {
	t.Helper()
	m.checkDirtyCovers(t)
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.dirty {
		ok := false
		for _, a := range allowed {
			if s.gpa >= a.GPA && s.n <= uint64(a.Len) && s.gpa-a.GPA <= uint64(a.Len)-s.n {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("dirty report [%#x, +%#x) outside the used ring and the posted buffers", s.gpa, s.n)
		}
	}
}

// checkWrites fails t if the device changed a byte outside allowed.
func checkWrites(t *testing.T, m *fakeMem, allowed ...Buffer) {
	t.Helper()
	for _, gpa := range m.deviceWrites() {
		ok := false
		for _, a := range allowed {
			if gpa >= a.GPA && gpa-a.GPA < uint64(a.Len) {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("the device wrote guest memory at %#x", gpa)
		}
	}
}

// msisFor counts the recorded messages equal to want, and fails t if any
// recorded message is not one of the programmed vectors.
func msisFor(t *testing.T, r *msiRecorder, vectors []msiMsg, want msiMsg) int {
	t.Helper()
	n := 0
	for _, got := range r.all() {
		known := false
		for _, v := range vectors {
			known = known || got == v
		}
		if !known {
			t.Fatalf("MSI %#x:%#x matches no programmed MSI-X entry", got.addr, got.data)
		}
		if got == want {
			n++
		}
	}
	return n
}

// TestLinuxDriverRNG drives virtio-rng as Linux does, from the PCI probe
// to used buffers and their interrupt.
func TestLinuxDriverRNG(t *testing.T) {
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	oldBAR := r.tr.Config().BARAddress(BAR)
	d.probe()
	if oldBAR == testBAR4 || r.tr.Config().BARAddress(BAR) != testBAR4 {
		t.Fatalf("BAR 4 at %#x, then %#x; want it moved to %#x", oldBAR, r.tr.Config().BARAddress(BAR), testBAR4)
	}
	if r.tr.Config().Command()&(pci.CommandMemory|pci.CommandBusMaster) != pci.CommandMemory|pci.CommandBusMaster {
		t.Fatalf("command register %#x after the probe: memory decode and bus mastering not both set", r.tr.Config().Command())
	}
	if d.common != commonOffset || d.isr != isrOffset || d.notify != notifyOffset || d.notifyMul != notifyMultiplier {
		t.Fatalf("capabilities: common %#x isr %#x notify %#x ×%d", d.common, d.isr, d.notify, d.notifyMul)
	}
	// The old address no longer decodes; the new one does.
	before := r.mach.mmio.UnclaimedAccesses()
	r.mach.mmio.Read(oldBAR+commonNumQ, make([]byte, 2))
	if r.mach.mmio.UnclaimedAccesses() != before+1 {
		t.Fatal("BAR 4's old address still decodes")
	}
	if n := d.commonRead(commonNumQ, 2); n != 1 {
		t.Fatalf("num_queues = %d", n)
	}

	// avail_event starts as garbage, so that the device's first run (at
	// DRIVER_OK, with nothing available) shows: it runs dry and writes it.
	if !d.negotiate(linuxFeatures) {
		t.Fatal("FEATURES_OK refused")
	}
	d.setupQueue(RNGQueueSize, testRingGPA)
	d.m.store16(d.used+4+usedElemSize*RNGQueueSize, 0xdead)
	d.addStatus(StatusDriverOK)
	eventually(t, "the device to run dry", func() bool { return d.m.load16(d.used+4+usedElemSize*RNGQueueSize) == 0 })
	r.tr.Pause() // waits for that run to end
	queueMsg, configMsg := d.vectors[1], d.vectors[0]
	if msgs := r.msi.all(); len(msgs) != 0 {
		t.Fatalf("interrupts before any buffer was used: %x", msgs)
	}

	// Fill the available ring with writable buffers, then kick. (The
	// device stays paused until the kick, so that it is known to be idle
	// with avail_event 0 when the driver decides.)
	lens := []uint32{16, 64, 100, 4096, 17, 512, 4000, 33}
	var bufs []Buffer
	for _, n := range lens {
		i, ok := d.post(n)
		if !ok {
			t.Fatal("ring full")
		}
		bufs = append(bufs, d.posted[i])
	}
	if !d.kick() {
		t.Fatal("the first kick was suppressed")
	}
	r.tr.Resume()
	d.waitUsed(uint16(len(lens)))
	eventually(t, "the queue's MSI", func() bool { return r.msi.count(queueMsg.data) > 0 })
	for k, buf := range bufs {
		id, n, ok := d.getBuf()
		if !ok || id != uint16(k) || n != buf.Len {
			t.Fatalf("used element %d = (%d, %d, %v), want (%d, %d)", k, id, n, ok, k, buf.Len)
		}
		got := d.m.at(buf.GPA, uint64(buf.Len))
		if bytes.Equal(got, make([]byte, len(got))) {
			t.Fatalf("buffer %d is still zero", k)
		}
		for j := range k {
			if other := d.m.at(bufs[j].GPA, uint64(bufs[j].Len)); bytes.Equal(got[:16], other[:16]) {
				t.Fatalf("buffers %d and %d start alike: not random", j, k)
			}
		}
	}
	// The ISR says "queue"; reading it cleared it.
	if isr := d.barRead(d.isr, 1); isr != isrQueue {
		t.Fatalf("ISR = %#x, want %#x", isr, isrQueue)
	}
	if isr := d.barRead(d.isr, 1); isr != 0 {
		t.Fatalf("ISR after a read = %#x, want 0", isr)
	}

	// A second batch: the device ran dry, so avail_event asks for a kick,
	// and used_event (moved by getBuf) asks for an interrupt.
	for _, n := range lens[:3] {
		i, _ := d.post(n)
		bufs = append(bufs, d.posted[i])
	}
	d.kick() // the device may have seen them already (a late wake-up), and then says so
	d.waitUsed(uint16(len(lens) + 3))
	eventually(t, "a second MSI", func() bool { return msisFor(t, r.msi, d.vectors, queueMsg) >= 2 })
	if n := msisFor(t, r.msi, d.vectors, configMsg); n != 0 {
		t.Fatalf("%d configuration interrupts", n)
	}
	r.tr.Pause() // the worker is idle: its writes are all in
	checkWrites(t, r.mem, append(bufs, d.usedRing())...)
	checkDirty(t, r.mem, append(bufs, d.usedRing())...)
	if errs := r.log.logged(); len(errs) != 0 {
		t.Fatalf("errors logged: %v", errs)
	}
}

// hostileRing is a transport-level hostile case: queue 0 of size 8 at the
// rings malformedCases use, set up as Linux would (Start refuses with want
// if the rings are bad).
type hostileRing struct {
	name  string
	addrs RingAddrs
	want  error
}

var hostileRings = []hostileRing{
	{"descriptor table misaligned", RingAddrs{descGPA + 8, availGPA, usedGPA}, ErrRingAlign},
	{"available ring misaligned", RingAddrs{descGPA, availGPA + 1, usedGPA}, ErrRingAlign},
	{"used ring misaligned", RingAddrs{descGPA, availGPA, usedGPA + 2}, ErrRingAlign},
	{"descriptor table outside RAM", RingAddrs{0x1000, availGPA, usedGPA}, ErrRingNotRAM},
	{"used ring across the end of RAM", RingAddrs{descGPA, availGPA, testBase + testSize - 32}, ErrRingNotRAM},
	{"available ring wraps", RingAddrs{descGPA, 0xffff_ffff_ffff_fffe, usedGPA}, ErrRingNotRAM},
}

// setupRings is setupQueue with the rings at addrs instead of vring_init's
// layout (queue of 8, no buffers posted through d).
func (d *linuxDriver) setupRings(addrs RingAddrs) {
	d.commonWrite(commonMSIX, 2, 0)
	d.commonWrite(commonQSelect, 2, 0)
	d.commonWrite(commonQSize, 2, 8)
	d.commonWrite64(commonQDescLo, addrs.Desc)
	d.commonWrite64(commonQAvailLo, addrs.Driver)
	d.commonWrite64(commonQUsedLo, addrs.Device)
	d.commonWrite(commonQVector, 2, 1)
	d.commonWrite(commonQEnable, 2, 1)
	d.num, d.desc, d.avail, d.used = 8, addrs.Desc, addrs.Driver, addrs.Device
	d.notifyAt = d.notify
}

// expectNeedsReset waits for DEVICE_NEEDS_RESET and the configuration
// interrupt, and checks the logged reason.
func expectNeedsReset(t *testing.T, r *rngRig, d *linuxDriver, want error) {
	t.Helper()
	eventually(t, "DEVICE_NEEDS_RESET", func() bool { return d.status()&StatusNeedsReset != 0 })
	eventually(t, "the configuration interrupt", func() bool { return msisFor(t, r.msi, d.vectors, d.vectors[0]) == 1 })
	if isr := d.barRead(d.isr, 1); isr&isrConfig == 0 {
		t.Fatalf("ISR = %#x, want the configuration bit", isr)
	}
	errs := r.log.logged()
	if len(errs) != 1 || !errors.Is(errs[0], want) {
		t.Fatalf("logged %v, want one error that is %v", errs, want)
	}
	t.Logf("logged: %v", errs[0])
}

// TestHostileDriverTransport runs every refused chain and ring through the
// transport: DEVICE_NEEDS_RESET with the configuration interrupt, the
// reason logged, no guest memory written but the used ring, nothing
// processed until a reset, and a working device after the reset.
func TestHostileDriverTransport(t *testing.T) {
	type tcase struct {
		name     string
		features uint64
		addrs    RingAddrs
		chain    func(r *ring)
		want     error
	}
	var cases []tcase
	for _, c := range append(append([]malformedCase(nil), malformedCases...), extraMalformedCases...) {
		cases = append(cases, tcase{"chain/" + c.name, c.negotiated(), RingAddrs{descGPA, availGPA, usedGPA}, c.setup, c.want})
	}
	for _, c := range hostileRings {
		cases = append(cases, tcase{"ring/" + c.name, testFeatures, c.addrs, nil, c.want})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRNGRig(t, nil)
			d := newLinuxDriver(t, r)
			d.probe()
			for _, eventIdx := range []uint64{0, FeatureEventIdx} {
				features := tc.features | eventIdx
				if !d.negotiate(features) {
					t.Fatalf("FEATURES_OK refused for %#x", features)
				}
				d.setupRings(tc.addrs)
				allowed := []Buffer{{GPA: tc.addrs.Device, Len: 6 + usedElemSize*8}}
				if tc.chain == nil {
					expectNeedsReset(t, r, d, tc.want)
					d.addStatus(StatusDriverOK) // too late: nothing starts
				} else {
					d.addStatus(StatusDriverOK)
					rg := &ring{m: r.mem, size: 8, desc: tc.addrs.Desc, avail: tc.addrs.Driver, used: tc.addrs.Device}
					tc.chain(rg)
					d.barWrite(d.notifyAt, 2, 0)
					expectNeedsReset(t, r, d, tc.want)
					// Good chains before the bad one were used (their
					// single descriptors may be written).
					done := rg.usedIdx()
					for k := range done {
						id, _ := rg.usedElem(k)
						e := tc.addrs.Desc + descSize*uint64(id)
						allowed = append(allowed, Buffer{GPA: r.mem.get64(e), Len: r.mem.get32(e + 8)})
					}
					// Nothing more is processed: a good chain and a kick.
					rg.setDesc(7, bufGPA+0x800, 64, descFWrite, 0)
					rg.publish(7)
					d.barWrite(d.notifyAt, 2, 0)
					time.Sleep(5 * time.Millisecond)
					if u := rg.usedIdx(); u != done {
						t.Fatalf("used.idx = %d after the device failed at %d", u, done)
					}
				}
				r.tr.Pause()
				checkWrites(t, r.mem, allowed...)
				checkDirty(t, r.mem, allowed...)
				r.tr.Resume()

				// The driver resets and starts over, properly.
				d.commonWrite(commonStatus, 1, 0)
				if s := d.status(); s != 0 {
					t.Fatalf("status %#x after a reset", s)
				}
				clear(r.mem.data)
				clear(r.mem.shadow)
				r.mem.clearDirty()
				d.init(features, 8, testRingGPA)
				i, _ := d.post(64)
				d.kick()
				d.waitUsed(1)
				// The interrupt, then virtqueue_get_buf in its handler
				// (which moves used_event past the buffer).
				eventually(t, "the queue's MSI", func() bool { return msisFor(t, r.msi, d.vectors, d.vectors[1]) >= 1 })
				if id, n, _ := d.getBuf(); id != i || n != 64 {
					t.Fatalf("after the reset: used (%d, %d), want (%d, 64)", id, n, i)
				}
				time.Sleep(time.Millisecond)
				if n := msisFor(t, r.msi, d.vectors, d.vectors[1]); n != 1 {
					t.Fatalf("%d queue interrupts for one buffer", n)
				}
				// Back to a clean slate for the next round.
				d.commonWrite(commonStatus, 1, 0)
				r.tr.Pause()
				clear(r.mem.data)
				clear(r.mem.shadow)
				r.mem.clearDirty()
				r.msi.mu.Lock()
				r.msi.msgs = nil
				r.msi.mu.Unlock()
				r.log.mu.Lock()
				*r.log.errs = nil
				r.log.mu.Unlock()
				r.tr.Resume()
			}
		})
	}
}

// TestFeaturesWithoutVersion1: a legacy-minded driver (or one asking for
// bits not offered) never sees FEATURES_OK, and DRIVER_OK without it is a
// device error.
func TestFeaturesWithoutVersion1(t *testing.T) {
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	d.probe()
	for _, f := range []uint64{
		0,
		FeatureEventIdx | FeatureIndirectDesc,
		FeatureVersion1 | 1<<34, // RING_PACKED: not offered
		FeatureVersion1 | 1<<0,  // a device bit virtio-rng does not have
		FeatureVersion1 | 1<<63, // likewise
		FeatureVersion1 | 1<<24, // reserved
		FeatureVersion1 | 1<<38, // NOTIFICATION_DATA: not offered
	} {
		if d.negotiate(f) {
			t.Errorf("FEATURES_OK accepted for %#x", f)
		}
	}
	if !d.negotiate(FeatureVersion1) {
		t.Fatal("FEATURES_OK refused for VERSION_1 alone")
	}
	// Features are fixed once FEATURES_OK is set.
	d.commonWrite(commonGFSelect, 4, 1)
	d.commonWrite(commonGF, 4, 0)
	if got := d.commonRead(commonGF, 4); got != 1 {
		t.Fatalf("driver_feature[1] = %#x after FEATURES_OK, want 1", got)
	}
	d.negotiate(0)
	d.setupQueue(8, testRingGPA)
	d.addStatus(StatusDriverOK)
	if s := d.status(); s&StatusNeedsReset == 0 {
		t.Fatalf("status %#x: DRIVER_OK without FEATURES_OK was accepted", s)
	}
}

// TestPCICfgWindow reads and writes common configuration through the
// VIRTIO_PCI_CAP_PCI_CFG window, as firmware does.
func TestPCICfgWindow(t *testing.T) {
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	d.probe()
	window := func(off uint32, n int) {
		d.cfgWrite(d.pciCfgCap+capBar, 1, BAR)
		d.cfgWrite(d.pciCfgCap+capOffset, 4, off)
		d.cfgWrite(d.pciCfgCap+capLength, 4, uint32(n))
	}
	window(commonNumQ, 2)
	if got := d.cfgRead(d.pciCfgCap+capData, 2); got != 1 {
		t.Fatalf("num_queues through the window = %d", got)
	}
	window(commonStatus, 1)
	d.cfgWrite(d.pciCfgCap+capData, 1, StatusAcknowledge)
	if s := d.status(); s != StatusAcknowledge {
		t.Fatalf("status %#x after a write through the window", s)
	}
	d.commonWrite(commonDFSelect, 4, 1)
	window(commonDF, 4)
	if got := d.cfgRead(d.pciCfgCap+capData, 4); got != uint32(FeatureVersion1>>32) {
		t.Fatalf("device_feature[1] through the window = %#x", got)
	}
	// A window that is not 1, 2 or 4 bytes, misaligned or off the BAR
	// does nothing.
	for _, w := range []struct {
		off uint32
		n   int
	}{{commonStatus, 3}, {commonStatus - 1, 2}, {BARSize, 4}, {0xffff_fffc, 4}} {
		window(w.off, w.n)
		d.cfgWrite(d.pciCfgCap+capData, 4, 0)
	}
	if s := d.status(); s != StatusAcknowledge {
		t.Fatalf("status %#x after writes through bad windows", s)
	}
}

// TestPauseStateRestore: the transport is paused while the driver keeps
// posting buffers; no chain is left half processed, the state taken then
// loads into a fresh Transport (and its bus) on the same RAM, and that
// one continues exactly: the next available buffer is the next used one,
// at the next used index, with its interrupt.
func TestPauseStateRestore(t *testing.T) {
	const num = 64
	r := newRNGRig(t, nil)
	d := newLinuxDriver(t, r)
	d.probe()
	d.init(linuxFeatures, num, testRingGPA)

	// The driver: take used buffers (checking them), post one, kick.
	stop, done := make(chan struct{}), make(chan error)
	var posts atomic.Int64
	lenOf := func(k uint16) uint32 { return 16 + uint32(k)%200 }
	go func() {
		var err error
		for running := true; running; {
			select {
			case <-stop:
				running = false
			default:
			}
			for {
				id, n, ok := d.getBuf()
				if !ok {
					break
				}
				if want := lenOf(d.lastUse - 1); (id != (d.lastUse-1)%num || n != want) && err == nil {
					err = fmt.Errorf("used element %d = (%d, %d), want (%d, %d)", d.lastUse-1, id, n, (d.lastUse-1)%num, want)
				}
			}
			if _, ok := d.post(lenOf(d.availIdx)); ok {
				posts.Add(1)
				d.kick()
			}
			time.Sleep(20 * time.Microsecond)
		}
		done <- err
	}()
	eventually(t, "some buffers used", func() bool { return d.usedIdx() > 3*num })
	r.tr.Pause()
	// The driver goes on posting (nothing is used now).
	paused := posts.Load()
	eventually(t, "buffers posted while paused", func() bool { return posts.Load() >= paused+2 })
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for {
		if _, _, ok := d.getBuf(); !ok {
			break
		}
	}
	s, err := r.tr.State()
	if err != nil {
		t.Fatal(err)
	}
	bs := r.mach.bus.State()
	qs := s.Queues[0]
	if qs.NextAvail != qs.NextUsed || qs.NextUsed != d.usedIdx() {
		t.Fatalf("paused with next avail %d, next used %d, used.idx %d: a chain in flight", qs.NextAvail, qs.NextUsed, d.usedIdx())
	}
	if d.availIdx == qs.NextAvail {
		t.Fatal("the driver posted nothing while the device was paused")
	}
	for k := qs.NextAvail; k != d.availIdx; k++ {
		buf := d.posted[k%num]
		if b := d.m.at(buf.GPA, uint64(buf.Len)); !bytes.Equal(b, make([]byte, len(b))) {
			t.Fatalf("available buffer %d was written while the device was paused", k)
		}
	}
	all := []Buffer{d.usedRing(), {GPA: testBufGPA, Len: num * 0x1000}}
	checkWrites(t, r.mem, all...)
	checkDirty(t, r.mem, all...)
	t.Logf("paused at used index %d with %d buffers available", qs.NextUsed, d.availIdx-qs.NextAvail)

	// A fresh transport on the same RAM and a fresh bus: the destination.
	r2 := newRNGRig(t, r.mem)
	if r2.slot != r.slot {
		t.Fatalf("slot %d, then %d", r.slot, r2.slot)
	}
	if err := r2.tr.SetState(s); !errors.Is(err, ErrNotPaused) {
		t.Fatalf("SetState on a running transport = %v", err)
	}
	r2.tr.Pause()
	if err := r2.tr.SetState(s); err != nil {
		t.Fatal(err)
	}
	if err := r2.mach.bus.SetState(bs); err != nil {
		t.Fatal(err)
	}
	if s2, err := r2.tr.State(); err != nil || !reflect.DeepEqual(s2, s) {
		t.Fatalf("state after SetState differs:\n%+v\n%+v (%v)", s2, s, err)
	}
	if !r2.tr.busMastering() || r2.tr.Config().Command()&pci.CommandBusMaster == 0 {
		t.Fatal("the restored transport does not follow the saved Bus Master Enable")
	}
	d.mmio = &r2.mach.mmio
	r2.tr.Resume()
	d.waitUsed(d.availIdx)
	eventually(t, "the queue's MSI from the new transport", func() bool { return msisFor(t, r2.msi, d.vectors, d.vectors[1]) > 0 })
	for k := qs.NextUsed; k != d.availIdx; k++ {
		id, n, ok := d.getBuf()
		if !ok || id != k%num || n != lenOf(k) {
			t.Fatalf("used element %d = (%d, %d, %v), want (%d, %d)", k, id, n, ok, k%num, lenOf(k))
		}
		if b := d.m.at(d.posted[id].GPA, uint64(n)); bytes.Equal(b, make([]byte, n)) {
			t.Fatalf("buffer %d is still zero", k)
		}
	}
	// And it goes on: one more buffer, a kick.
	next := d.availIdx
	d.post(lenOf(next))
	d.kick()
	d.waitUsed(next + 1)
	if id, n, _ := d.getBuf(); id != next%num || n != lenOf(next) {
		t.Fatalf("used element %d = (%d, %d)", next, id, n)
	}
	if len(r.msi.all()) == 0 {
		t.Fatal("the source transport sent no interrupt at all")
	}

	// Bus Master Enable travels in configuration space: saved clear (as
	// after pci_clear_master, with a buffer posted and its doorbell rung),
	// the destination processes nothing until the driver sets it.
	d.setMaster(false)
	next = d.availIdx
	d.post(lenOf(next))
	d.barWrite(d.notifyAt, 2, 0)
	r2.tr.Pause()
	s, err = r2.tr.State()
	if err != nil {
		t.Fatal(err)
	}
	bs = r2.mach.bus.State()
	r3 := newRNGRig(t, r.mem)
	r3.tr.Pause()
	if err := r3.tr.SetState(s); err != nil {
		t.Fatal(err)
	}
	if err := r3.mach.bus.SetState(bs); err != nil {
		t.Fatal(err)
	}
	d.mmio = &r3.mach.mmio
	r.mem.clearDirty()
	r3.tr.Resume()
	if r3.tr.busMastering() {
		t.Fatal("the restored transport has Bus Master Enable on; it was saved clear")
	}
	expectIdle(t, r3, d, next, 0, 0)
	d.setMaster(true)
	d.waitUsed(next + 1)
	if id, n, _ := d.getBuf(); id != next%num || n != lenOf(next) {
		t.Fatalf("used element %d = (%d, %d)", next, id, n)
	}
	eventually(t, "the queue's MSI from the third transport", func() bool { return msisFor(t, r3.msi, d.vectors, d.vectors[1]) == 1 })
	if errs := append(append(r.log.logged(), r2.log.logged()...), r3.log.logged()...); len(errs) != 0 {
		t.Fatalf("errors logged: %v", errs)
	}
}
