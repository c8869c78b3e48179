package testguest

import (
	"bytes"
	"strings"
	"sync"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// Console collects a guest's serial output written from vCPU threads and
// parses the test guest's protocol from it.
type Console struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends guest output.
func (c *Console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.Write(p)
}

// String is everything written so far.
func (c *Console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.String()
}

// Lines parses the complete protocol lines written so far.
func (c *Console) Lines() []guestlog.Line {
	text := c.String()
	text = text[:strings.LastIndex(text, "\n")+1]
	lines, _ := guestlog.ParseAll(strings.NewReader(text))
	return lines
}

// Summary folds the complete lines into a guestlog.Summary.
func (c *Console) Summary() guestlog.Summary { return guestlog.Summarize(c.Lines()) }
