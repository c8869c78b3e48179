package lab

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startAgent serves a real agent on loopback for the test.
func startAgent(t *testing.T) *Client {
	t.Helper()
	tok := Token()
	a, err := NewAgent(tok, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Serve(ctx, l); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return NewClient(l.Addr().String(), tok)
}

func TestAgentExec(t *testing.T) {
	c := startAgent(t)
	ctx := context.Background()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	res, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "echo out; echo err >&2; cat; exit 3"}, Stdin: []byte("in\n")}, &out, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if res.Code != 3 || out.String() != "out\nin\n" || errb.String() != "err\n" {
		t.Fatalf("got code %d out %q err %q", res.Code, out.String(), errb.String())
	}
	// Large output arrives whole, in order, across many frames.
	out.Reset()
	res, err = c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"}}, &out, nil)
	if err != nil || res.Code != 0 || out.Len() != 3000000 || strings.Trim(out.String(), "x") != "" {
		t.Fatalf("large output: %v %+v %d bytes", err, res, out.Len())
	}
	// A command that does not exist is a result, not a lost answer.
	res, err = c.Exec(ctx, ExecRequest{Argv: []string{"/nonexistent/cmd"}}, nil, nil)
	if err != nil || res.Code != -1 || res.Error == "" {
		t.Fatalf("missing command: %v %+v", err, res)
	}
}

func TestAgentTimeoutKillsGroup(t *testing.T) {
	c := startAgent(t)
	ctx := context.Background()
	dir := t.TempDir()
	pidf := filepath.Join(dir, "pid")
	t0 := time.Now()
	// The child in the background must die with its parent's group.
	res, err := c.Exec(ctx, ExecRequest{Argv: []string{"sh", "-c", "sleep 30 & echo $! >" + pidf + "; wait"}, Timeout: Duration(500 * time.Millisecond)}, nil, nil)
	if err != nil || res.Code != -1 || !strings.Contains(res.Error, "killed") {
		t.Fatalf("timeout: %v %+v", err, res)
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Fatalf("timeout took %v", d)
	}
	b, _ := os.ReadFile(pidf)
	pid := strings.TrimSpace(string(b))
	if pid == "" {
		t.Fatal("the command never started its background child")
	}
	// SIGKILL is delivered asynchronously: give it a moment.
	for i := 0; ; i++ {
		st, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			break // gone, or dead and waiting to be reaped
		}
		if i == 100 {
			t.Fatalf("background child %s still alive 5 s after the kill", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestAgentFilesAndAuth(t *testing.T) {
	c := startAgent(t)
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "sub", "f.bin")
	data := bytes.Repeat([]byte("ferry"), 100000)
	if err := c.Put(ctx, p, bytes.NewReader(data), 0o751); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o751 {
		t.Fatalf("put: %v %v", err, st)
	}
	got, err := c.Get(ctx, p, 1<<20)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("get: %v, %d bytes", err, len(got))
	}
	if _, err := c.Get(ctx, p, 100); err == nil {
		t.Fatal("get beyond the limit succeeded")
	}
	if err := c.Put(ctx, "relative/path", strings.NewReader("x"), 0o644); err == nil {
		t.Fatal("relative path accepted")
	}
	bad := NewClient(strings.TrimPrefix(c.base, "http://"), "wrong-token-wrong-token")
	if err := bad.Ping(ctx); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("wrong token: %v", err)
	}
	if _, err := bad.Exec(ctx, ExecRequest{Argv: []string{"true"}}, nil, nil); err == nil {
		t.Fatal("exec with a wrong token ran")
	}
	if _, err := NewAgent("short", nil); err == nil {
		t.Fatal("short token accepted")
	}
}

func TestFrames(t *testing.T) {
	var b bytes.Buffer
	writeFrame(&b, frameStdout, []byte("hello"))
	writeFrame(&b, frameExit, []byte(`{"code":0}`))
	k, p, err := readFrame(&b, nil)
	if err != nil || k != frameStdout || string(p) != "hello" {
		t.Fatalf("%v %d %q", err, k, p)
	}
	k, p, err = readFrame(&b, nil)
	if err != nil || k != frameExit || string(p) != `{"code":0}` {
		t.Fatalf("%v %d %q", err, k, p)
	}
	if _, _, err := readFrame(&b, nil); err != errNoEnd {
		t.Fatalf("end of stream: %v", err)
	}
	if _, _, err := readFrame(bytes.NewReader([]byte{9, 0, 0, 0, 0}), nil); err == nil {
		t.Fatal("unknown kind accepted")
	}
	if _, _, err := readFrame(bytes.NewReader([]byte{1, 0xff, 0xff, 0xff, 0xff}), nil); err == nil {
		t.Fatal("huge frame accepted")
	}
	if err := writeFrame(io.Discard, frameStdout, make([]byte, maxFrame+1)); err == nil {
		t.Fatal("oversized frame written")
	}
}

// FuzzReadFrame: any bytes give frames within bounds or an error, never a
// panic or an allocation beyond maxFrame.
func FuzzReadFrame(f *testing.F) {
	var b bytes.Buffer
	writeFrame(&b, frameStderr, []byte("x"))
	f.Add(b.Bytes())
	f.Add([]byte{3, 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{1, 0, 16, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		for {
			k, p, err := readFrame(r, nil)
			if err != nil {
				return
			}
			if k < frameStdout || k > frameExit || len(p) > maxFrame {
				t.Fatalf("bad frame %d len %d", k, len(p))
			}
		}
	})
}
