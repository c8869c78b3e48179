package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

// Client talks to one host's agent.
type Client struct {
	base  string // http://127.0.0.1:PORT
	token string
	http  *http.Client
}

// NewClient returns a client for the agent at addr (host:port).
func NewClient(addr, token string) *Client {
	return &Client{base: "http://" + addr, token: token, http: &http.Client{}}
}

func (c *Client) request(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("lab agent: %s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(msg))
	}
	return resp, nil
}

// Ping asks the agent whether it is there.
func (c *Client) Ping(ctx context.Context) error {
	resp, err := c.request(ctx, http.MethodGet, "/ping", nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Exec runs req in the host, copying its output to stdout and stderr as
// it comes (either may be nil), and returns how it ended. An error means
// the outcome is unknown (request refused, agent or link gone); a command
// that ran and failed is a result with a non-zero Code and a nil error.
func (c *Client) Exec(ctx context.Context, req ExecRequest, stdout, stderr io.Writer) (ExecResult, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return ExecResult{}, err
	}
	resp, err := c.request(ctx, http.MethodPost, "/exec", bytes.NewReader(body))
	if err != nil {
		return ExecResult{}, err
	}
	defer resp.Body.Close()
	var buf []byte
	for {
		kind, p, err := readFrame(resp.Body, buf)
		if err != nil {
			return ExecResult{}, fmt.Errorf("lab: %v: %w", req.Argv, err)
		}
		buf = p[:0]
		switch kind {
		case frameStdout:
			if stdout != nil {
				stdout.Write(p)
			}
		case frameStderr:
			if stderr != nil {
				stderr.Write(p)
			}
		case frameExit:
			var res ExecResult
			if err := json.Unmarshal(p, &res); err != nil {
				return ExecResult{}, fmt.Errorf("lab: bad end of %v: %w", req.Argv, err)
			}
			return res, nil
		}
	}
}

// Put writes data to path in the host with mode.
func (c *Client) Put(ctx context.Context, path string, data io.Reader, mode os.FileMode) error {
	q := url.Values{"path": {path}, "mode": {strconv.FormatUint(uint64(mode.Perm()), 8)}}
	resp, err := c.request(ctx, http.MethodPut, "/file?"+q.Encode(), data)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// PutFile copies the local file src to path in the host, keeping its mode.
func (c *Client) PutFile(ctx context.Context, src, path string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	return c.Put(ctx, path, f, st.Mode())
}

// Get reads path from the host, at most limit bytes.
func (c *Client) Get(ctx context.Context, path string, limit int64) ([]byte, error) {
	resp, err := c.request(ctx, http.MethodGet, "/file?"+url.Values{"path": {path}}.Encode(), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = fmt.Errorf("lab: %s is larger than %d bytes", path, limit)
	}
	return b, err
}

// WaitReady pings until the agent answers or ctx ends.
func (c *Client) WaitReady(ctx context.Context) error {
	var last error
	for {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		last = c.Ping(pctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab agent not answering: %v (%w)", last, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
