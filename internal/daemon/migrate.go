package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/control"
	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/trust"
)

// incoming starts a VMM process that waits for the migration stream of
// req.Name on an ephemeral port of the address the peer reached us on.
func (d *Daemon) incoming(req Request, c net.Conn) Response {
	host, _, err := net.SplitHostPort(c.LocalAddr().String())
	if err != nil {
		return fail("%v", err)
	}
	args := []string{"--incoming", "--listen", net.JoinHostPort(host, "0")}
	if req.RecoveryTimeout > 0 {
		args = append(args, "--recovery-timeout", req.RecoveryTimeout.String())
	}
	p, out, err := d.spawn(req.Name, VMInfo{State: "incoming", Mem: req.Mem, CPUs: req.CPUs}, args)
	if err != nil {
		return fail("%v", err)
	}
	line, err := readReady(p, out)
	if err != nil {
		return fail("incoming VM %s: %v", req.Name, err)
	}
	addr, ok := strings.CutPrefix(line, "LISTEN ")
	if !ok {
		return fail("incoming VM %s: unexpected start-up line %q", req.Name, line)
	}
	return Response{OK: true, Addr: addr}
}

// dialPeer opens a trusted connection to another daemon.
func (d *Daemon) dialPeer(ctx context.Context, addr string) (net.Conn, error) {
	c, err := trust.Dial(ctx, "tcp", addr, d.id, d.pool, d.log)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// migrate sends a VM to the daemon at req.To: that daemon starts an
// incoming VMM process, and our VMM process streams the VM to it
// directly (TLS, mutually authenticated with the hosts' identities).
func (d *Daemon) migrate(req Request, send func(Response)) Response {
	p, err := d.find(req.Name)
	if err != nil {
		return fail("%v", err)
	}
	if req.DryRun {
		return d.predict(p, req)
	}
	d.mu.Lock()
	if p.info.State != "running" {
		d.mu.Unlock()
		return fail("VM %s is %s, not running", req.Name, p.info.State)
	}
	p.info.State = "migrating"
	info := p.info
	d.mu.Unlock()
	restore := func() {
		d.mu.Lock()
		if p.info.State == "migrating" {
			p.info.State = "running"
		}
		d.mu.Unlock()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pc, err := d.dialPeer(ctx, req.To)
	if err != nil {
		restore()
		return fail("connecting to the destination daemon %s: %v", req.To, err)
	}
	inc := Request{Op: "incoming", Name: req.Name, Mem: info.Mem, CPUs: info.CPUs}
	inc.RecoveryTimeout = req.RecoveryTimeout // the destination waits for a broken post-copy link as long
	resp, err := Call(pc, inc, nil)
	pc.Close()
	if err != nil {
		restore()
		if trust.RefusedByPeer(err) {
			return fail("the destination %s does not trust this host: run `ferry nodes trust` for this host there", req.To)
		}
		return fail("destination %s: %v", req.To, err)
	}
	creq := control.Request{Op: "migrate", To: resp.Addr, ResolveAddr: req.To, Params: req.Params}
	cr, err := control.CallStream(p.control, creq, 0, func(r control.Response) {
		send(Response{OK: true, More: true, Progress: r.Progress})
	})
	if err != nil {
		restore()
		select {
		case <-p.done:
			err = fmt.Errorf("the VMM process of %s died during the migration (%s); a guest already running at the destination in post-copy cannot get the rest of its memory", req.Name, p.info.Exit)
		case <-time.After(500 * time.Millisecond):
		}
		out := fail("migration of %s: %v", req.Name, err)
		if cr != nil {
			out.Migration = cr.Migration
		}
		return out
	}
	cr.Migration.Destination = req.To
	if cr.Status != nil && cr.Status.LastBeatUnixNano != 0 {
		cr.Migration.GuestDowntime = d.guestDowntime(req.To, req.Name, cr.Status.LastBeatUnixNano)
	}
	d.postcopyDegradation(req.To, req.Name, cr.Migration)
	d.mu.Lock()
	p.info.State = "migrated" // its VMM process exits now that the guest left
	d.mu.Unlock()
	return Response{OK: true, Migration: cr.Migration}
}

// resolveWith asks the destination daemon whether it runs migration id.
func resolveWith(ctx context.Context, dial func(context.Context, string) (net.Conn, error), addr, id string) (bool, error) {
	c, err := dial(ctx, addr)
	if err != nil {
		return false, err
	}
	defer c.Close()
	r, err := Call(c, Request{Op: "resolve", ID: id}, nil)
	if err != nil {
		return false, fmt.Errorf("asking %s about migration %s: %w", addr, id, err)
	}
	return r.Running, nil
}

// Resolve asks the daemon at addr, over a trusted connection made with
// id and pool, whether it runs migration mid (used by a source VMM process
// when its connection failed after the last byte and before the
// destination's confirmation). The answer is final: a daemon that says no
// will never start that migration's guest.
func Resolve(ctx context.Context, id *trust.Identity, pool *trust.Pool, addr, mid string) (bool, error) {
	return resolveWith(ctx, func(ctx context.Context, a string) (net.Conn, error) {
		return trust.Dial(ctx, "tcp", a, id, pool, nil)
	}, addr, mid)
}

// guestDowntime asks the destination daemon when the migrated guest's
// first heartbeat arrived there (waiting up to 3 s for it) and returns the
// gap since its last heartbeat here: the interruption as an observer of
// the guest's output sees it. It assumes the two hosts' clocks agree (they
// do on one machine; across hosts, to NTP's accuracy). Zero if unknown.
func (d *Daemon) guestDowntime(addr, name string, lastBeat int64) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		c, err := d.dialPeer(ctx, addr)
		if err != nil {
			return 0
		}
		r, err := Call(c, Request{Op: "vm-status", Name: name}, nil)
		c.Close()
		if err == nil && r.Beat > lastBeat {
			return time.Duration(r.Beat - lastBeat)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return 0
}

// postcopyDegradation asks the destination how fast the guest's workload
// ran during post-copy and compares it with its pace before the
// migration (the application's view of post-copy's remote faults).
func (d *Daemon) postcopyDegradation(addr, name string, rep *migration.Report) {
	p := rep.Postcopy
	if p == nil || rep.GuestWorkBefore <= 0 || rep.SwitchUnixNano == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.dialPeer(ctx, addr)
	if err != nil {
		return
	}
	defer c.Close()
	from := rep.SwitchUnixNano
	r, err := Call(c, Request{Op: "vm-status", Name: name, WindowFrom: from, WindowTo: from + int64(p.Duration)}, nil)
	if err != nil || r.WorkRate <= 0 {
		return
	}
	p.GuestWorkDuring = r.WorkRate
	p.Degradation = max(0, 1-r.WorkRate/rep.GuestWorkBefore)
}

// predict answers `ferry migrate --dry-run`: the link's bandwidth (the
// cap, or a probe of the path to the destination daemon), then the VM's
// own prediction from a sample of its writes. Nothing moves.
func (d *Daemon) predict(p *vmProc, req Request) Response {
	bw := req.Bandwidth
	if bw <= 0 {
		measured, err := d.probeLink(req.To)
		if err != nil {
			return fail("measuring the link to %s: %v", req.To, err)
		}
		bw = measured
	}
	creq := control.Request{Op: "predict", Params: req.Params}
	creq.Bandwidth = bw
	cr, err := control.Call(p.control, creq, time.Minute)
	if err != nil {
		return fail("predicting the migration of %s: %v", req.Name, err)
	}
	return Response{OK: true, Prediction: cr.Prediction}
}

// probeSize is what a link probe moves: enough to leave TCP slow start.
const probeSize = 64 << 20

// probeLink measures the path to the daemon at addr: that daemon sends
// probeSize raw bytes back over the same mutually authenticated TLS
// connection a migration's would use (between its header line and its
// final answer).
func (d *Daemon) probeLink(addr string) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.dialPeer(ctx, addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	b, _ := json.Marshal(Request{Op: "probe", ProbeBytes: probeSize})
	if _, err := c.Write(append(b, '\n')); err != nil {
		return 0, err
	}
	r := bufio.NewReaderSize(c, 64<<10)
	var head Response
	line, err := r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &head)
	}
	if err != nil || !head.OK {
		return 0, fmt.Errorf("probe: %v %s", err, head.Error)
	}
	// Time from the first byte: the round trip is not bandwidth.
	if _, err := r.Peek(1); err != nil {
		return 0, fmt.Errorf("probe: %w", err)
	}
	start := time.Now()
	n, err := io.CopyN(io.Discard, r, head.ProbeBytes)
	el := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("probe: after %d bytes: %w", n, err)
	}
	if n == 0 || el <= 0 {
		return 0, errors.New("the probe moved nothing")
	}
	return int64(float64(n) / el.Seconds()), nil
}

// probe answers a peer's link probe: a header line saying how many raw
// bytes follow, then the bytes (the final answer comes after them).
func probe(req Request, c net.Conn) Response {
	n := min(max(req.ProbeBytes, 0), probeSize)
	b, _ := json.Marshal(Response{OK: true, More: true, ProbeBytes: n})
	if _, err := c.Write(append(b, '\n')); err != nil {
		return fail("probe: %v", err)
	}
	pad := make([]byte, 1<<20)
	for left := n; left > 0; left -= int64(len(pad)) {
		if _, err := c.Write(pad[:min(left, int64(len(pad)))]); err != nil {
			return fail("probe: %v", err)
		}
	}
	return Response{OK: true}
}
