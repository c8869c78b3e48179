package trust

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode"
)

// Files of the trust pool, relative to the data directory.
const (
	PoolDir      = "trust"
	PoolFile     = "trust/pool.json" // mode 0600, replaced atomically
	poolLockFile = "trust/pool.lock" // flock(2) held while writing
	poolVersion  = 1
)

// ErrNotFound is returned (wrapped) by Remove when nothing matches.
var ErrNotFound = errors.New("no such trusted peer")

// Entry is one trusted peer host.
type Entry struct {
	// Fingerprint identifies the peer (see CertFingerprint). Required.
	Fingerprint string `json:"fingerprint"`
	// Name is an optional, unique label (for example the peer
	// certificate's common name). It never authenticates anything.
	Name string `json:"name,omitempty"`
	// Address is the peer's address as given to `ferry nodes trust`; empty
	// for a peer that is only accepted, never dialed.
	Address string `json:"address,omitempty"`
	// Added is when the peer was first trusted.
	Added time.Time `json:"added"`
}

// poolFile is the JSON document in trust/pool.json.
type poolFile struct {
	Version int     `json:"version"`
	Peers   []Entry `json:"peers"`
}

// fileStamp identifies one version of the pool file: writers replace the
// file by rename, so the inode changes with every write; mtime and size
// catch editors that write in place, and the mode a chmod. The zero stamp is "no file"; a stamp
// with exists set and a nil info is "unknown" and equals nothing.
type fileStamp struct {
	exists bool
	info   os.FileInfo
}

var unknownStamp = fileStamp{exists: true}

func (s fileStamp) same(t fileStamp) bool {
	if !s.exists || !t.exists {
		return s.exists == t.exists
	}
	if s.info == nil || t.info == nil {
		return false
	}
	return os.SameFile(s.info, t.info) && s.info.ModTime().Equal(t.info.ModTime()) &&
		s.info.Size() == t.info.Size() && s.info.Mode() == t.info.Mode()
}

// Pool is the set of trusted peers, persisted in dataDir/trust/pool.json.
// It is safe for concurrent use, and other processes may change the file
// while it is open (the CLI editing the pool of a running daemon): every
// lookup stats the file and re-reads it if it changed.
type Pool struct {
	path     string
	lockPath string

	mu      sync.Mutex
	entries []Entry
	stamp   fileStamp
	loadErr error // last reload failed: the pool trusts no one
}

// OpenPool opens the pool kept under dataDir, creating the trust directory
// if needed. A missing pool file is an empty pool; an unreadable or invalid
// one is an error.
func OpenPool(dataDir string) (*Pool, error) {
	if err := os.MkdirAll(filepath.Join(dataDir, PoolDir), 0o700); err != nil {
		return nil, fmt.Errorf("trust: %w", err)
	}
	p := &Pool{
		path:     filepath.Join(dataDir, PoolFile),
		lockPath: filepath.Join(dataDir, poolLockFile),
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.loadLocked(); err != nil {
		return nil, err
	}
	return p, nil
}

// Path returns the pool file's path.
func (p *Pool) Path() string { return p.path }

// Reload re-reads the pool file if it changed and returns the error that
// makes the pool unusable, if any. While the file is invalid the pool
// trusts no one (it fails closed) and List returns nothing.
func (p *Pool) Reload() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refreshLocked()
	return p.loadErr
}

// List returns the trusted peers in the order they were added.
func (p *Pool) List() []Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refreshLocked()
	return append([]Entry(nil), p.entries...)
}

// Trusted looks fingerprint up in the pool.
func (p *Pool) Trusted(fingerprint string) (Entry, bool) {
	e, ok, _ := p.lookup(fingerprint)
	return e, ok
}

// lookup is Trusted that also returns why the pool is unusable, for logs.
func (p *Pool) lookup(fingerprint string) (Entry, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refreshLocked()
	for _, e := range p.entries {
		if e.Fingerprint == fingerprint {
			return e, true, nil
		}
	}
	return Entry{}, false, p.loadErr
}

// Add trusts a peer. If the fingerprint is already trusted, its Name and
// Address are updated (Added is kept), so adding twice is harmless. Added
// defaults to now. The fingerprint must be valid (ParseFingerprint), and a
// non-empty Name must not be used by another peer.
func (p *Pool) Add(e Entry) error {
	fp, err := ParseFingerprint(e.Fingerprint)
	if err != nil {
		return err
	}
	e.Fingerprint = fp
	e.Name = strings.TrimSpace(e.Name)
	e.Address = strings.TrimSpace(e.Address)
	if err := checkLabel("name", e.Name); err != nil {
		return err
	}
	if strings.HasPrefix(e.Name, FingerprintPrefix) {
		return fmt.Errorf("trust: name %q must not start with %q", e.Name, FingerprintPrefix)
	}
	if err := checkLabel("address", e.Address); err != nil {
		return err
	}
	if e.Added.IsZero() {
		e.Added = time.Now().UTC().Truncate(time.Second)
	}
	return p.modify(func(entries []Entry) ([]Entry, error) {
		idx := -1
		for i, old := range entries {
			if old.Fingerprint == e.Fingerprint {
				idx = i
			} else if e.Name != "" && old.Name == e.Name {
				return nil, fmt.Errorf("trust: name %q is already used by peer %s", e.Name, old.Fingerprint)
			}
		}
		if idx < 0 {
			return append(entries, e), nil
		}
		e.Added = entries[idx].Added
		entries[idx] = e
		return entries, nil
	})
}

// Remove stops trusting the peer that key designates: a fingerprint, else a
// name, else an address. It returns the removed entry, an error wrapping
// ErrNotFound if nothing matches, or an error if an address matches several
// peers (remove them by fingerprint).
func (p *Pool) Remove(key string) (Entry, error) {
	key = strings.TrimSpace(key)
	var removed Entry
	err := p.modify(func(entries []Entry) ([]Entry, error) {
		idx, err := match(entries, key)
		if err != nil {
			return nil, err
		}
		removed = entries[idx]
		return append(entries[:idx:idx], entries[idx+1:]...), nil
	})
	if err != nil {
		return Entry{}, err
	}
	return removed, nil
}

func match(entries []Entry, key string) (int, error) {
	if key == "" {
		return -1, errors.New("trust: empty fingerprint, name or address")
	}
	if fp, err := ParseFingerprint(key); err == nil {
		for i, e := range entries {
			if e.Fingerprint == fp {
				return i, nil
			}
		}
		return -1, fmt.Errorf("trust: fingerprint %s: %w", fp, ErrNotFound)
	}
	for i, e := range entries {
		if e.Name == key {
			return i, nil
		}
	}
	var found []int
	for i, e := range entries {
		if e.Address == key {
			found = append(found, i)
		}
	}
	switch len(found) {
	case 0:
		return -1, fmt.Errorf("trust: %q matches no fingerprint, name or address: %w", key, ErrNotFound)
	case 1:
		return found[0], nil
	}
	fps := make([]string, len(found))
	for i, j := range found {
		fps[i] = entries[j].Fingerprint
	}
	return -1, fmt.Errorf("trust: address %q matches %d peers (%s); remove one by fingerprint", key, len(found), strings.Join(fps, ", "))
}

func checkLabel(what, s string) error {
	if len(s) > 255 {
		return fmt.Errorf("trust: %s is longer than 255 bytes", what)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("trust: %s %q contains white space or a non-printable character", what, s)
		}
	}
	return nil
}

// modify runs a read-modify-write cycle on the pool file under the
// cross-process lock: it re-reads the file, applies f to a copy of the
// entries and writes the result atomically.
func (p *Pool) modify(f func([]Entry) ([]Entry, error)) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	unlock, err := lockFile(p.lockPath)
	if err != nil {
		return err
	}
	defer unlock()
	if err := p.loadLocked(); err != nil {
		return err // do not overwrite a file we cannot read
	}
	entries, err := f(append([]Entry(nil), p.entries...))
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(poolFile{Version: poolVersion, Peers: nonNil(entries)}, "", "  ")
	if err != nil {
		return fmt.Errorf("trust: %w", err)
	}
	data = append(data, '\n')
	if err := writeFileAtomic(p.path, data, 0o600, true); err != nil {
		return err
	}
	p.entries = entries
	p.stamp = unknownStamp // reload next time if the stat fails
	if fi, err := os.Stat(p.path); err == nil {
		p.stamp = fileStamp{exists: true, info: fi}
	}
	return nil
}

func nonNil(e []Entry) []Entry {
	if e == nil {
		return []Entry{}
	}
	return e
}

// refreshLocked reloads the file if it changed since the last load. A
// failed reload empties the pool and records the error.
func (p *Pool) refreshLocked() {
	var cur fileStamp
	fi, err := os.Stat(p.path)
	switch {
	case err == nil:
		cur = fileStamp{exists: true, info: fi}
	case errors.Is(err, fs.ErrNotExist):
	default:
		p.entries, p.loadErr, p.stamp = nil, fmt.Errorf("trust: %w", err), unknownStamp
		return
	}
	if p.loadErr == nil && cur.same(p.stamp) {
		return
	}
	p.loadLocked()
}

// loadLocked reads the pool file. On error the pool is emptied (it fails
// closed) and the error is kept in loadErr and returned.
func (p *Pool) loadLocked() error {
	entries, stamp, err := readPool(p.path)
	if err != nil {
		p.entries, p.loadErr, p.stamp = nil, err, unknownStamp
		return err
	}
	p.entries, p.stamp, p.loadErr = entries, stamp, nil
	return nil
}

func readPool(path string) ([]Entry, fileStamp, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fileStamp{}, nil
	}
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("trust: %w", err)
	}
	defer f.Close()
	// Stat the open file, so that the stamp describes what is read even if
	// the file is replaced meanwhile.
	fi, err := f.Stat()
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("trust: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return nil, fileStamp{}, fmt.Errorf("trust: %s has mode %04o; the trust pool must not be writable by group or others (chmod 600 it)", path, perm)
	}
	data, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("trust: %w", err)
	}
	stamp := fileStamp{exists: true, info: fi}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, stamp, nil
	}
	var pf poolFile
	if err := json.Unmarshal(data, &pf); err != nil {
		return nil, fileStamp{}, fmt.Errorf("trust: %s: %w", path, err)
	}
	if pf.Version != poolVersion {
		return nil, fileStamp{}, fmt.Errorf("trust: %s: version %d not supported (want %d)", path, pf.Version, poolVersion)
	}
	seenFP := make(map[string]bool)
	seenName := make(map[string]bool)
	for i, e := range pf.Peers {
		fp, err := ParseFingerprint(e.Fingerprint)
		if err != nil || fp != e.Fingerprint {
			if err == nil {
				err = errors.New("surrounding white space")
			}
			return nil, fileStamp{}, fmt.Errorf("trust: %s: peer %d: %w", path, i, err)
		}
		if seenFP[fp] {
			return nil, fileStamp{}, fmt.Errorf("trust: %s: fingerprint %s listed twice", path, fp)
		}
		seenFP[fp] = true
		if e.Name != "" {
			if seenName[e.Name] {
				return nil, fileStamp{}, fmt.Errorf("trust: %s: name %q listed twice", path, e.Name)
			}
			seenName[e.Name] = true
		}
	}
	return pf.Peers, stamp, nil
}
