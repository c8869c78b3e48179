package migration

import (
	"context"
	"testing"
	"time"
)

func TestLimiterPaces(t *testing.T) {
	l := newLimiter(10 << 20) // 10 MiB/s
	start := time.Now()
	for i := 0; i < 40; i++ {
		if err := l.Wait(context.Background(), 64<<10); err != nil {
			t.Fatal(err)
		}
	}
	// 2.5 MiB at 10 MiB/s: about 250 ms (minus the initial burst allowance).
	if d := time.Since(start); d < 150*time.Millisecond || d > 600*time.Millisecond {
		t.Fatalf("2.5 MiB took %s at 10 MiB/s", d)
	}
	l.SetRate(0)
	start = time.Now()
	for i := 0; i < 1000; i++ {
		l.Wait(context.Background(), 1<<20)
	}
	if time.Since(start) > 50*time.Millisecond {
		t.Fatal("unlimited limiter waited")
	}
}

func TestLimiterCancel(t *testing.T) {
	l := newLimiter(1000)
	l.Wait(context.Background(), 1000)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := l.Wait(ctx, 100000); err == nil {
		t.Fatal("Wait ignored cancellation")
	}
}
