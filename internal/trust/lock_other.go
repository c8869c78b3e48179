//go:build !unix

package trust

// lockFile is a no-op where flock(2) is not available: only writers in one
// process are then serialized (by Pool's mutex).
func lockFile(string) (func(), error) { return func() {}, nil }
