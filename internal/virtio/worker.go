package virtio

import (
	"context"
	"fmt"
	"log/slog"
	"math/bits"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// The worker goroutine runs Device.Process for the queues the driver
// notified. The transport's mutex and busy flag make Process exclusive
// with everything that changes the device underneath it (reset,
// activation, state, Bus Master Enable), and the halt counter, which
// every Queue's Pop watches, makes a busy worker let go after the chain
// it holds.

func (t *Transport) run() {
	defer close(t.exited)
	for {
		select {
		case <-t.quit:
			return
		case <-t.wake:
		}
		if !t.begin() {
			continue
		}
		t.end(t.processNotified())
	}
}

// begin marks the worker busy if the device may process now.
func (t *Transport) begin() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || t.paused || !t.busMaster || !t.active || t.status&(StatusNeedsReset|StatusFailed) != 0 {
		return false
	}
	t.busy = true
	return true
}

// end clears busy, and turns a processing error into NEEDS_RESET.
func (t *Transport) end(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.busy = false
	if err != nil {
		t.failLocked(err)
	}
	t.idle.Broadcast()
}

// processNotified calls Process for each notified queue, until no
// notification is left or a pause or reset begins (the notifications not
// yet handled then stay recorded).
func (t *Transport) processNotified() error {
	for {
		found := false
		for w := range t.notified {
			pending := t.notified[w].Swap(0)
			for pending != 0 {
				if t.halt.Load() > 0 {
					t.notified[w].Or(pending)
					return nil
				}
				bit := bits.TrailingZeros64(pending)
				pending &^= 1 << bit
				found = true
				if err := t.dev.Process(w*64 + bit); err != nil {
					return err
				}
			}
		}
		if !found {
			return nil
		}
	}
}

// Wake schedules Process(queue) on the worker, as a notification would.
func (t *Transport) Wake(queue int) {
	if queue >= 0 && queue < len(t.queues) {
		t.notify(queue)
	}
}

func (t *Transport) notifyAll() {
	for q := range t.queues {
		t.notified[q/64].Or(1 << (q % 64))
	}
	t.kick()
}

// Pause returns once the worker holds no chain: it finishes the chain it
// is processing, then Pop hands out nothing, until Resume. Notifications
// that arrive meanwhile are kept.
func (t *Transport) Pause() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.paused {
		return
	}
	t.paused = true
	t.halt.Add(1)
	for t.busy {
		t.idle.Wait()
	}
}

// Resume undoes Pause. Every queue is then looked at, as if notified, so
// that nothing made available while paused (or before a restore) waits for
// the driver's next notification. The transport follows Bus Master Enable
// as configuration space holds it then (Bus.SetState may have changed it).
func (t *Transport) Resume() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.paused {
		return
	}
	t.paused = false
	t.halt.Add(-1)
	t.syncBusMasterLocked()
	t.notifyAll()
}

// syncBusMasterLocked makes the transport follow the command register's
// Bus Master Enable bit (PCI: no DMA, no MSI while it is clear). Cleared,
// it waits for the worker to push the chain it holds, as Pause does, and
// the worker then processes nothing: doorbells are kept, and interrupts
// are left pending by MSI-X. Set, every queue is looked at, as on Resume:
// that covers the doorbells rung meanwhile and the chains the worker let
// go of (for which the driver, seeing avail_event, may not ring again).
// Reset and status are unaffected.
func (t *Transport) syncBusMasterLocked() {
	on := t.cfg.Command()&pci.CommandBusMaster != 0
	if on == t.busMaster {
		return
	}
	t.busMaster = on
	if !on {
		t.halt.Add(1)
		for t.busy {
			t.idle.Wait()
		}
		return
	}
	t.halt.Add(-1)
	t.notifyAll()
}

// Paused reports whether the transport is paused.
func (t *Transport) Paused() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.paused
}

// resetLocked is the device reset the driver asks for by writing 0 to
// device_status: it waits for the worker to let go of its chain, then
// resets the device, every queue and every register; device_status then
// reads 0. The MSI-X table is PCI state and stays.
func (t *Transport) resetLocked() {
	t.halt.Add(1)
	for t.busy {
		t.idle.Wait()
	}
	t.halt.Add(-1)
	t.dev.Reset()
	for i, q := range t.queues {
		q.stop()
		t.qregs[i].reset(q.MaxSize())
	}
	for w := range t.notified {
		t.notified[w].Store(0)
	}
	t.status, t.active = 0, false
	t.deviceFeatureSelect, t.driverFeatureSelect, t.driverFeatures = 0, 0, 0
	t.queueSelect = 0
	t.msixConfig.Store(0xffff)
	t.isr.Store(0)
}

// activateLocked starts the device at DRIVER_OK.
func (t *Transport) activateLocked() error {
	if t.status&StatusFeaturesOK == 0 {
		return fmt.Errorf("driver set DRIVER_OK without FEATURES_OK (status %#x)", t.status)
	}
	if err := t.dev.Activate(t.activation()); err != nil {
		return fmt.Errorf("activating the device: %w", err)
	}
	t.active = true
	t.notifyAll() // chains made available before DRIVER_OK
	return nil
}

func (t *Transport) activation() Activation {
	return Activation{
		Features:      t.driverFeatures,
		Queues:        append([]*Queue(nil), t.queues...),
		Interrupt:     t.queueInterrupt,
		ConfigChanged: t.ConfigChanged,
		Wake:          t.Wake,
	}
}

// failLocked is a device error (virtio 1.2 §2.1.2): DEVICE_NEEDS_RESET,
// a configuration interrupt, and nothing processed until the driver resets
// the device. The first error of a transport is logged as an error, later
// ones (a guest that breaks its device over and over) at debug level.
func (t *Transport) failLocked(err error) {
	if t.status&StatusNeedsReset != 0 {
		return
	}
	t.status |= StatusNeedsReset
	t.failures++
	level := slog.LevelError
	if t.failures > 1 {
		level = slog.LevelDebug
	}
	t.log.Log(context.Background(), level, "virtio: device error, the driver must reset the device",
		"err", err, "errors", t.failures)
	t.configInterrupt()
}
