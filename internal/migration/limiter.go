package migration

import (
	"context"
	"sync"
	"time"
)

// limiter paces a byte stream to a rate that may change while it runs
// (`ferry migrate --set NAME --bandwidth ...`). A token bucket with a
// burst of 50 ms worth of bytes: smooth enough that the measured
// throughput matches the setting, coarse enough to cost nothing per page.
type limiter struct {
	mu     sync.Mutex
	rate   float64 // bytes per second; 0 = unlimited
	tokens float64
	last   time.Time
}

func newLimiter(bytesPerSec int64) *limiter {
	return &limiter{rate: float64(bytesPerSec), last: time.Now()}
}

// SetRate changes the rate; 0 removes the limit.
func (l *limiter) SetRate(bytesPerSec int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.rate = float64(bytesPerSec)
}

// Rate is the current limit in bytes per second (0 = none).
func (l *limiter) Rate() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int64(l.rate)
}

// Wait blocks until n bytes may be sent.
func (l *limiter) Wait(ctx context.Context, n int) error {
	for {
		l.mu.Lock()
		if l.rate <= 0 {
			l.mu.Unlock()
			return nil
		}
		now := time.Now()
		burst := l.rate * 0.05
		l.tokens += now.Sub(l.last).Seconds() * l.rate
		if l.tokens > burst {
			l.tokens = burst
		}
		l.last = now
		if l.tokens >= float64(n) || (l.tokens >= 0 && float64(n) > burst) {
			// Large writes may borrow: the debt is paid before the next one.
			l.tokens -= float64(n)
			l.mu.Unlock()
			return nil
		}
		need := (float64(n) - l.tokens) / l.rate
		if l.tokens < 0 {
			need = -l.tokens / l.rate
		}
		l.mu.Unlock()
		t := time.NewTimer(time.Duration(need * float64(time.Second)))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Take debits n bytes without waiting: traffic that must not wait (answers
// to post-copy page requests) still uses the link, and what it takes
// slows what may wait.
func (l *limiter) Take(n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rate > 0 {
		l.tokens -= float64(n)
	}
}
