package trust

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func fp(s string) string { return FingerprintSPKI([]byte(s)) }

func openPool(t *testing.T, dir string) *Pool {
	t.Helper()
	p, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPoolAddListRemovePersist(t *testing.T) {
	dir := t.TempDir()
	p := openPool(t, dir)
	if n := len(p.List()); n != 0 {
		t.Fatalf("new pool has %d entries", n)
	}
	if _, err := os.Stat(p.Path()); !os.IsNotExist(err) {
		t.Errorf("pool file exists before the first Add: %v", err)
	}

	a := Entry{Fingerprint: fp("a"), Name: "alpha", Address: "10.0.0.1:7700"}
	b := Entry{Fingerprint: fp("b"), Address: "10.0.0.2:7700"}
	for _, e := range []Entry{a, b} {
		if err := p.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	list := p.List()
	if len(list) != 2 || list[0].Fingerprint != a.Fingerprint || list[1].Fingerprint != b.Fingerprint {
		t.Fatalf("List = %+v", list)
	}
	if list[0].Added.IsZero() || time.Since(list[0].Added) > time.Minute {
		t.Errorf("Added = %v, want about now", list[0].Added)
	}
	if e, ok := p.Trusted(a.Fingerprint); !ok || e.Name != "alpha" || e.Address != a.Address {
		t.Errorf("Trusted(a) = %+v, %v", e, ok)
	}
	if _, ok := p.Trusted(fp("c")); ok {
		t.Error("Trusted(c) = true")
	}

	fi, err := os.Stat(p.Path())
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("pool.json mode %04o, want 0600", perm)
	}
	if p.Path() != filepath.Join(dir, "trust", "pool.json") {
		t.Errorf("Path = %s", p.Path())
	}

	// Adding again updates name and address, keeps Added and position.
	added := list[0].Added
	if err := p.Add(Entry{Fingerprint: a.Fingerprint, Name: "alpha2", Address: "10.0.0.9:7700", Added: added.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	list = p.List()
	if len(list) != 2 || list[0].Name != "alpha2" || list[0].Address != "10.0.0.9:7700" || !list[0].Added.Equal(added) {
		t.Fatalf("after update: %+v", list)
	}

	// Persisted: a fresh Pool sees the same.
	q := openPool(t, dir)
	if got := q.List(); fmt.Sprint(got) != fmt.Sprint(list) {
		t.Errorf("reopened: %+v, want %+v", got, list)
	}

	// Remove by name, address and fingerprint.
	removed, err := p.Remove("alpha2")
	if err != nil || removed.Fingerprint != a.Fingerprint {
		t.Fatalf("Remove(name) = %+v, %v", removed, err)
	}
	if _, err := p.Remove("alpha2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Remove(removed name): %v, want ErrNotFound", err)
	}
	if err := p.Add(a); err != nil {
		t.Fatal(err)
	}
	if removed, err := p.Remove(a.Address); err != nil || removed.Fingerprint != a.Fingerprint {
		t.Fatalf("Remove(address) = %+v, %v", removed, err)
	}
	if removed, err := p.Remove(" " + b.Fingerprint + " "); err != nil || removed.Fingerprint != b.Fingerprint {
		t.Fatalf("Remove(fingerprint) = %+v, %v", removed, err)
	}
	if _, err := p.Remove(b.Fingerprint); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), b.Fingerprint) {
		t.Errorf("Remove(unknown fingerprint): %v", err)
	}
	if _, err := p.Remove("nobody"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "matches no fingerprint, name or address") {
		t.Errorf("Remove(unknown): %v", err)
	}
	if _, err := p.Remove(""); err == nil {
		t.Error("Remove(\"\") succeeded")
	}
	if n := len(openPool(t, dir).List()); n != 0 {
		t.Errorf("reopened after removing all: %d entries", n)
	}
}

func TestPoolValidation(t *testing.T) {
	p := openPool(t, t.TempDir())
	if err := p.Add(Entry{Fingerprint: "SHA256:nope"}); err == nil {
		t.Error("Add with a bad fingerprint succeeded")
	}
	if err := p.Add(Entry{Fingerprint: fp("a"), Name: "has space"}); err == nil {
		t.Error("Add with a name containing a space succeeded")
	}
	if err := p.Add(Entry{Fingerprint: fp("a"), Name: fp("x")}); err == nil {
		t.Error("Add with a fingerprint as name succeeded")
	}
	if err := p.Add(Entry{Fingerprint: fp("a"), Name: "n"}); err != nil {
		t.Fatal(err)
	}
	if err := p.Add(Entry{Fingerprint: fp("b"), Name: "n"}); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Errorf("duplicate name: %v", err)
	}
	// Two peers at one address (a re-installed host): removing by address
	// is ambiguous.
	for _, e := range []Entry{{Fingerprint: fp("c"), Address: "h:1"}, {Fingerprint: fp("d"), Address: "h:1"}} {
		if err := p.Add(e); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Remove("h:1"); err == nil || !strings.Contains(err.Error(), "matches 2 peers") {
		t.Errorf("ambiguous Remove: %v", err)
	}
}

func TestPoolSeesExternalChanges(t *testing.T) {
	dir := t.TempDir()
	daemon := openPool(t, dir)
	cli := openPool(t, dir)

	if err := cli.Add(Entry{Fingerprint: fp("a"), Name: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := daemon.Trusted(fp("a")); !ok {
		t.Fatal("daemon does not see a peer added by another Pool")
	}
	if _, err := cli.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if _, ok := daemon.Trusted(fp("a")); ok {
		t.Fatal("daemon still trusts a peer removed by another Pool")
	}

	// A hand edit in place (same inode).
	doc := fmt.Sprintf(`{"version":1,"peers":[{"fingerprint":%q,"name":"hand","added":"2024-01-02T03:04:05Z"}]}`, fp("h"))
	if err := os.WriteFile(daemon.Path(), []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	if e, ok := daemon.Trusted(fp("h")); !ok || e.Name != "hand" || e.Added.Year() != 2024 {
		t.Fatalf("hand-edited entry: %+v, %v", e, ok)
	}

	// A broken file makes the pool trust no one, and a repaired one
	// restores it.
	if err := os.WriteFile(daemon.Path(), []byte(`{"version":1,"peers":[{`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, ok := daemon.Trusted(fp("h")); ok {
		t.Error("a broken pool file still trusts")
	}
	if err := daemon.Reload(); err == nil {
		t.Error("Reload of a broken file: no error")
	}
	if err := daemon.Add(Entry{Fingerprint: fp("z")}); err == nil {
		t.Error("Add over a broken file succeeded")
	}
	if _, err := OpenPool(dir); err == nil {
		t.Error("OpenPool of a broken file: no error")
	}
	if err := os.WriteFile(daemon.Path(), []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, ok := daemon.Trusted(fp("h")); !ok {
		t.Error("repaired file: not trusted")
	}

	// Deleting the file empties the pool.
	if err := os.Remove(daemon.Path()); err != nil {
		t.Fatal(err)
	}
	if _, ok := daemon.Trusted(fp("h")); ok {
		t.Error("deleted file: still trusted")
	}
}

func TestPoolRejectsBadFiles(t *testing.T) {
	for name, doc := range map[string]string{
		"version":         `{"version":2,"peers":[]}`,
		"bad fingerprint": `{"version":1,"peers":[{"fingerprint":"SHA256:x"}]}`,
		"duplicate":       fmt.Sprintf(`{"version":1,"peers":[{"fingerprint":%q},{"fingerprint":%[1]q}]}`, fp("a")),
		"duplicate name":  fmt.Sprintf(`{"version":1,"peers":[{"fingerprint":%q,"name":"n"},{"fingerprint":%q,"name":"n"}]}`, fp("a"), fp("b")),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.MkdirAll(filepath.Join(dir, PoolDir), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, PoolFile), []byte(doc), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := OpenPool(dir); err == nil {
				t.Fatal("no error")
			}
		})
	}
	t.Run("writable by others", func(t *testing.T) {
		dir := t.TempDir()
		p := openPool(t, dir)
		if err := p.Add(Entry{Fingerprint: fp("a")}); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p.Path(), 0o666); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenPool(dir); err == nil || !strings.Contains(err.Error(), "must not be writable") {
			t.Fatalf("err = %v", err)
		}
		if _, ok := p.Trusted(fp("a")); ok {
			t.Error("a group/world-writable pool still trusts")
		}
	})
}

func TestPoolConcurrentWriters(t *testing.T) {
	dir := t.TempDir()
	pools := []*Pool{openPool(t, dir), openPool(t, dir), openPool(t, dir)}
	const per = 10
	var wg sync.WaitGroup
	for i, p := range pools {
		wg.Go(func() {
			for j := range per {
				if err := p.Add(Entry{Fingerprint: fp(fmt.Sprint(i, j))}); err != nil {
					t.Error(err)
				}
				p.Trusted(fp("x"))
				p.List()
			}
		})
	}
	wg.Wait()
	if n := len(openPool(t, dir).List()); n != len(pools)*per {
		t.Errorf("%d entries, want %d (lost updates)", n, len(pools)*per)
	}
}
