package migration

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
)

// Benchmarks of real migrations (KVM, loopback TCP, a link capped at
// 1 Gbit/s unless said otherwise). Run them one at a time:
//
//	go test -run XXX -bench . -benchtime 1x ./internal/migration
//
// Each prints its numbers and, with FERRY_BENCH_OUT=DIR, writes DIR/NAME.json.

const benchLink = 125_000_000 // 1 Gbit/s in bytes/s

// benchResult is one migration's numbers.
type benchResult struct {
	Name       string  `json:"name"`
	Bytes      uint64  `json:"bytes_on_wire"`
	TotalS     float64 `json:"total_s"`
	TransferS  float64 `json:"transfer_s"`
	DowntimeMS float64 `json:"downtime_ms"`
	Passes     int     `json:"passes"`
	Chosen     Mode    `json:"chosen,omitempty"`
	// Predicted (after the first pass), and the relative errors.
	PredTransferS  float64       `json:"predicted_transfer_s,omitempty"`
	PredDowntimeMS float64       `json:"predicted_downtime_ms,omitempty"`
	PredBytes      uint64        `json:"predicted_bytes,omitempty"`
	ErrTransfer    float64       `json:"error_transfer,omitempty"`
	ErrBytes       float64       `json:"error_bytes,omitempty"`
	Transfer       TransferStats `json:"transfer"`
}

func writeBench(b *testing.B, name string, v any) {
	dir := os.Getenv("FERRY_BENCH_OUT")
	if dir == "" {
		return
	}
	os.MkdirAll(dir, 0o755)
	data, _ := json.MarshalIndent(v, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, name+".json"), data, 0o644); err != nil {
		b.Error(err)
	}
}

func resultOf(name string, rep *Report) benchResult {
	r := benchResult{Name: name, Bytes: rep.BytesTotal, TotalS: rep.TotalTime.Seconds(), TransferS: rep.TransferTime().Seconds(),
		DowntimeMS: float64(rep.Downtime) / 1e6, Passes: len(rep.Iterations), Chosen: rep.Chosen, Transfer: rep.Transfer}
	if p := rep.Predicted; p != nil {
		r.PredTransferS, r.PredDowntimeMS, r.PredBytes = p.TotalTime.Seconds(), float64(p.Downtime)/1e6, p.Bytes
		r.ErrTransfer = (r.PredTransferS - r.TransferS) / r.TransferS
		r.ErrBytes = (float64(p.Bytes) - float64(rep.BytesTotal)) / float64(rep.BytesTotal)
	}
	return r
}

// BenchmarkEncodings: bytes on the wire and time, each optimization on
// and off, on a guest whose memory holds 192 MiB of realistic content
// (text, repeated pages, random, zero) besides a 16 MiB verify working
// set.
func BenchmarkEncodings(b *testing.B) {
	var out []benchResult
	for _, c := range []struct {
		name  string
		codec string
		dedup bool
		delta bool
	}{
		{"none", "none", false, false},
		{"zstd", "zstd", false, false},
		{"zstd-3", "zstd:3", false, false},
		{"lz4", "lz4", false, false},
		{"dedup", "none", true, false},
		{"delta", "none", false, true},
		{"all", "zstd", true, true},
	} {
		b.Run(c.name, func(b *testing.B) {
			codec, level, err := state.ParseCodec(c.codec)
			if err != nil {
				b.Fatal(err)
			}
			for range b.N {
				g := bootGuest(b, 512<<20, 2, "workload=verify size=16M fill=192M content=mixed")
				g.beats(b, 3)
				res := migrate(b, g, Options{Mode: ModePreCopy, Codec: codec, CodecLevel: level, Dedup: c.dedup, Delta: c.delta,
					Bandwidth: benchLink, DowntimeLimit: 50 * time.Millisecond}, nil, nil)
				if res.err != nil || res.dstErr != nil {
					b.Fatalf("source %v, destination %v", res.err, res.dstErr)
				}
				res.dst.beats(b, 3)
				res.dst.clean(b, "destination")
				r := resultOf(c.name, res.rep)
				b.ReportMetric(float64(r.Bytes)/(1<<20), "MiB_wire")
				b.ReportMetric(r.TotalS, "s_total")
				b.ReportMetric(r.DowntimeMS, "ms_downtime")
				b.Logf("%-7s %7.1f MiB on the wire, %.2f s, downtime %.1f ms, %d dup / %d delta pages, %d/%d chunks compressed, %d plain (CPU-bound)",
					c.name, float64(r.Bytes)/(1<<20), r.TotalS, r.DowntimeMS, r.Transfer.DupPages, r.Transfer.DeltaPages,
					r.Transfer.CompressedChunks, r.Transfer.Chunks, r.Transfer.PlainUnderLoad)
				out = append(out, r)
				res.dst.vm.Close()
			}
		})
	}
	writeBench(b, "encodings", out)
}

// BenchmarkPrediction: the automatic mode's prediction (made after the
// first pass) against what happened, on three guests.
func BenchmarkPrediction(b *testing.B) {
	var out []benchResult
	for _, c := range []struct {
		name, cmdline string
		mem           uint64
		link          int64
		warm          int // heartbeats per CPU before the migration (the guest reaches its steady state)
	}{
		{"verify-1gbit", "workload=verify size=64M", 256 << 20, benchLink, 3},
		{"dirty100M-1gbit", "workload=dirty size=256M rate=100M pattern=random", 1 << 30, benchLink, 30},
		{"dirtyfull-40MiB", "workload=dirty size=64M pattern=random", 256 << 20, 40 << 20, 3},
	} {
		b.Run(c.name, func(b *testing.B) {
			for range b.N {
				g := bootGuest(b, c.mem, 2, c.cmdline)
				g.beats(b, c.warm)
				res := migrate(b, g, Options{Mode: ModeAuto, Bandwidth: c.link}, nil, nil)
				if res.err != nil || res.dstErr != nil || res.dstEnd != nil {
					b.Fatalf("source %v, destination %v / %v", res.err, res.dstErr, res.dstEnd)
				}
				res.dst.beats(b, 3)
				res.dst.clean(b, "destination")
				r := resultOf(c.name, res.rep)
				b.ReportMetric(100*math.Abs(r.ErrTransfer), "%err_time")
				b.ReportMetric(100*math.Abs(r.ErrBytes), "%err_bytes")
				b.Logf("%-16s auto chose %-8s transfer %.2f s (predicted %.2f s, %+.0f%%), bytes %.0f MiB (predicted %.0f MiB, %+.0f%%), downtime %.1f ms (predicted %.1f ms)",
					c.name, r.Chosen, r.TransferS, r.PredTransferS, 100*r.ErrTransfer, float64(r.Bytes)/(1<<20), float64(r.PredBytes)/(1<<20),
					100*r.ErrBytes, r.DowntimeMS, r.PredDowntimeMS)
				out = append(out, r)
				res.dst.vm.Close()
			}
		})
	}
	writeBench(b, "prediction", out)
}
