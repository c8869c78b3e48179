package virtio

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestAvailEventNotTorn: the driver reads avail_event while the device
// writes it (virtqueue_kick_prepare against a device running dry), so the
// device must store it in one piece. A torn value makes vring_need_event
// answer wrongly: a missed notification leaves the device asleep with
// buffers available.
func TestAvailEventNotTorn(t *testing.T) {
	m := newMappedMem(t, testBase, testSize)
	r := newRing(m, 8)
	q, err := NewQueue(0, 8, m, m.Dirty)
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(8, r.addrs(), testFeatures|FeatureEventIdx); err != nil {
		t.Fatal(err)
	}
	at := r.used + 4 + usedElemSize*8
	var stop atomic.Bool
	var torn atomic.Uint32
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			if v := m.load16(at); v != 0x00ff && v != 0x0100 && v != 0 {
				torn.Store(uint32(v) | 1<<16)
			}
		}
	}()
	deadline := time.Now().Add(time.Second)
	for i := 0; time.Now().Before(deadline) && torn.Load() == 0; i++ {
		for range 1000 {
			if err := q.setAvailEvent(0x00ff); err != nil {
				t.Fatal(err)
			}
			if err := q.setAvailEvent(0x0100); err != nil {
				t.Fatal(err)
			}
		}
		m.clearDirty()
	}
	stop.Store(true)
	<-done
	if v := torn.Load(); v != 0 {
		t.Fatalf("the driver read avail_event %#04x, half of 0x00ff and half of 0x0100", uint16(v))
	}
}
