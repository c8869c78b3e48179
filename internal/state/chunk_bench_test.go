package state

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// Benchmarks of the memory chunk codecs on page content of several kinds,
// for picking the migration engine's defaults. Each reports the
// throughput in page bytes (4096 per record, zero pages included) and
// "ratio": stored bytes (framing included) per page byte. Run them with
//
//	go test ./internal/state -run '^$' -bench 'Chunk' -benchtime 1s

// benchCodecs are the codecs and levels the benchmarks compare.
var benchCodecs = []string{"none", "zstd:1", "zstd:3", "zstd:7", "zstd:11", "lz4", "lz4:1", "lz4:4", "lz4:9"}

// benchPage returns a page of the given kind:
//
//	zero    all zeros
//	text    English-like text
//	repeat  a 24-byte pattern repeated (page-cache of a sparse file, fill patterns)
//	heap    64-bit words: kernel pointers, small integers, zeros, a few random words
//	random  random bytes (compressed or encrypted data)
func benchPage(rng *rand.Rand, kind string) []byte {
	switch kind {
	case "zero":
		return make([]byte, PageSize)
	case "text":
		return textPage(rng)
	case "repeat":
		pat := randBytes(rng, 24)
		return bytes.Repeat(pat, PageSize/24+1)[:PageSize]
	case "heap":
		p := make([]byte, PageSize)
		base := 0xffff888000000000 | uint64(rng.IntN(1<<20))<<12
		for i := 0; i < PageSize; i += 8 {
			var w uint64
			switch r := rng.IntN(10); {
			case r < 3:
				w = base + uint64(rng.IntN(1<<16))*8 // a pointer near the others
			case r < 6:
				w = uint64(rng.IntN(256)) // a small integer or flag word
			case r < 9:
				w = 0
			default:
				w = rng.Uint64()
			}
			binary.LittleEndian.PutUint64(p[i:], w)
		}
		return p
	case "random":
		return randBytes(rng, PageSize)
	}
	panic("unknown page kind " + kind)
}

// benchContent returns ChunkPages pages of one kind, or for "mix" a
// plausible guest: 35% zero, 20% text, 25% heap, 10% repeat, 10% random.
func benchContent(kind string) [][]byte {
	rng := rand.New(rand.NewPCG(200, uint64(len(kind))))
	pages := make([][]byte, ChunkPages)
	for i := range pages {
		k := kind
		if kind == "mix" {
			switch r := rng.IntN(100); {
			case r < 35:
				k = "zero"
			case r < 55:
				k = "text"
			case r < 80:
				k = "heap"
			case r < 90:
				k = "repeat"
			default:
				k = "random"
			}
		}
		pages[i] = benchPage(rng, k)
	}
	return pages
}

var benchKinds = []string{"mix", "text", "heap", "repeat", "random", "zero"}

// BenchmarkChunkEncode builds and compresses full chunks of raw and zero
// records.
func BenchmarkChunkEncode(b *testing.B) {
	for _, kind := range benchKinds {
		pages := benchContent(kind)
		for _, name := range benchCodecs {
			b.Run(kind+"/"+name, func(b *testing.B) {
				codec, level, err := ParseCodec(name)
				if err != nil {
					b.Fatal(err)
				}
				e, err := NewChunkEncoder(codec, level)
				if err != nil {
					b.Fatal(err)
				}
				defer e.Close()
				b.SetBytes(ChunkPages * PageSize)
				b.ReportAllocs()
				encodeLoop(b, e, pages, nil)
			})
		}
	}
}

// BenchmarkChunkEncodeDelta resends pages the receiver holds an older
// version of (a few small writes each, as pre-copy rounds see them): Page
// encodes deltas; "raw" sends the same pages whole for comparison.
func BenchmarkChunkEncodeDelta(b *testing.B) {
	rng := rand.New(rand.NewPCG(201, 202))
	old := benchContent("mix")
	pages := make([][]byte, len(old))
	for i, p := range old {
		pages[i] = bytes.Clone(p)
		for range 1 + rng.IntN(4) {
			at := rng.IntN(PageSize - 64)
			copy(pages[i][at:], randBytes(rng, 1+rng.IntN(64)))
		}
	}
	for _, mode := range []string{"delta", "raw"} {
		for _, name := range []string{"none", "zstd:1", "lz4"} {
			b.Run(mode+"/"+name, func(b *testing.B) {
				codec, level, _ := ParseCodec(name)
				e, err := NewChunkEncoder(codec, level)
				if err != nil {
					b.Fatal(err)
				}
				defer e.Close()
				b.SetBytes(ChunkPages * PageSize)
				b.ReportAllocs()
				base := old
				if mode != "delta" {
					base = nil
				}
				encodeLoop(b, e, pages, base)
			})
		}
	}
}

// BenchmarkChunkApply decompresses and applies full chunks of the mixed
// content to a memory image.
func BenchmarkChunkApply(b *testing.B) {
	regions := testLayout()
	mem := make([]byte, 2<<20)
	pages := benchContent("mix")
	for _, name := range benchCodecs {
		b.Run(name, func(b *testing.B) {
			codec, level, _ := ParseCodec(name)
			e, err := NewChunkEncoder(codec, level)
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			for i, p := range pages {
				e.Raw(uint64(i), p)
			}
			chunk, err := e.Finish()
			if err != nil {
				b.Fatal(err)
			}
			dec := NewChunkDecoder()
			defer dec.Close()
			b.SetBytes(ChunkPages * PageSize)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ApplyPageChunk(chunk, regions, mem, dec); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// encodeLoop encodes pages into one chunk per iteration, as deltas
// against old when given, and reports the stored size per page byte.
func encodeLoop(b *testing.B, e *ChunkEncoder, pages, old [][]byte) {
	var stored int
	for b.Loop() {
		e.Reset()
		for i, p := range pages {
			if old != nil {
				e.Page(uint64(i), old[i], p)
			} else {
				e.Raw(uint64(i), p)
			}
		}
		out, err := e.Finish()
		if err != nil {
			b.Fatal(err)
		}
		stored = len(out)
	}
	b.ReportMetric(float64(stored)/(ChunkPages*PageSize), "ratio")
}
