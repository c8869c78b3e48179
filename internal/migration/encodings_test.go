package migration

import (
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
)

// TestEncodings moves a verify guest whose memory also holds 64 MiB of
// realistic content it never touches (text, repeated and random pages,
// zeros) with every codec and with dedup and delta records. The guest
// checks its working set as it runs and, at exit, the untouched content
// byte for byte: exit status 0 means every page arrived intact.
func TestEncodings(t *testing.T) {
	for _, c := range []struct {
		name    string
		codec   state.Codec
		level   int
		dedup   bool
		delta   bool
		streams int
	}{
		{"none", state.CodecNone, 0, false, false, 1},
		{"zstd", state.CodecZstd, state.ZstdFastest, false, false, 1},
		{"lz4", state.CodecLZ4, state.LZ4Fast, false, false, 1},
		{"dedup", state.CodecNone, 0, true, false, 1},
		{"delta", state.CodecNone, 0, false, true, 1},
		{"all", state.CodecZstd, state.ZstdDefault, true, true, 1},
		{"streams", state.CodecNone, 0, false, false, 3},
		{"all-streams", state.CodecLZ4, state.LZ4Fast, true, true, 4},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := bootGuest(t, 256<<20, 2, "workload=verify size=16M fill=64M content=mixed fill_check=1 exit_after=9s")
			g.beats(t, 3)
			// A few passes, so that deltas have previous versions.
			opts := Options{Mode: ModePreCopy, Codec: c.codec, CodecLevel: c.level, Dedup: c.dedup, Delta: c.delta, Streams: c.streams,
				Bandwidth: 100 << 20, DowntimeLimit: time.Millisecond, MaxIterations: 4}
			res := migrate(t, g, opts, nil, nil)
			if res.err != nil || res.dstErr != nil {
				t.Fatalf("source %v, destination %v", res.err, res.dstErr)
			}
			logReport(t, res.rep)
			exit, err := res.dst.vm.Wait()
			if err != nil || exit.Status != 0 {
				t.Fatalf("guest ended with %v, status %d\n%s", err, exit.Status, res.dst.raw.String())
			}
			res.dst.clean(t, "destination")
			tr := res.rep.Transfer
			t.Logf("%s: %d MiB on the wire, page data %d MiB in %d MiB of chunks, %d dup and %d delta pages",
				c.name, res.rep.BytesTotal>>20, tr.PageBytes>>20, tr.ChunkBytes>>20, tr.DupPages, tr.DeltaPages)
			if (c.dedup && tr.DupPages == 0) || (c.delta && tr.DeltaPages == 0) || (c.codec != state.CodecNone && tr.CompressedChunks == 0) {
				t.Fatalf("the encoding was not used: %+v", tr)
			}
		})
	}
}

// TestHybridWithStreamsAndDedup: pre-copy on several streams with dup
// records, then post-copy. The destination must drop stale pages only
// after every stream delivered its last chunk (a late dup record copies
// from a page that is about to be dropped); the guest checks every byte.
func TestHybridWithStreamsAndDedup(t *testing.T) {
	g := bootGuest(t, 256<<20, 2, "workload=verify size=16M fill=64M content=mixed fill_check=1 exit_after=9s")
	g.beats(t, 3)
	res := migrate(t, g, Options{Mode: ModeHybrid, PrecopyPasses: 2, Streams: 3, Dedup: true, Delta: true,
		Codec: state.CodecLZ4, Bandwidth: 100 << 20, DowntimeLimit: time.Millisecond}, nil, nil)
	if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
		t.Fatalf("source %v, destination %v / %v", res.err, res.dstErr, res.dstEnd)
	}
	logReport(t, res.rep)
	if res.rep.Postcopy == nil || res.rep.Transfer.DupPages == 0 {
		t.Fatalf("no post-copy or no dup records: %+v", res.rep.Transfer)
	}
	exit, err := res.dst.vm.Wait()
	if err != nil || exit.Status != 0 {
		t.Fatalf("guest ended with %v, status %d\n%s", err, exit.Status, res.dst.raw.String())
	}
	res.dst.clean(t, "destination")
}
