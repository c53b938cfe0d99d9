package decrypt

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/kubekms/kubekms/inventory"
)

// clusterScopedDir holds cluster-scoped objects in a DirSink (no namespace
// can be named so: namespace names may not contain '_').
const clusterScopedDir = "_cluster"

// checkSafe refuses names that would escape or confuse the output layout.
func checkSafe(obj inventory.Object) error {
	for _, part := range []string{obj.Resource, obj.Namespace, obj.Name} {
		if strings.ContainsAny(part, "/\\\x00") || part == "." || part == ".." {
			return fmt.Errorf("%q cannot be used as a file name", part)
		}
	}
	if obj.Resource == "" || obj.Name == "" {
		return fmt.Errorf("object key has no resource or name")
	}
	return nil
}

// DirSink writes <dir>/<resource>/<namespace or _cluster>/<name>.yaml,
// folders 0700 and files 0600.
type DirSink struct {
	dir string
}

// NewDirSink creates dir (0700) or accepts an existing one only if no other
// user can read it, since the manifests hold decrypted secrets.
func NewDirSink(dir string) (*DirSink, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("output directory: %w", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("output directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("output directory %s is not a directory", dir)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("output directory %s has mode %v: others could read decrypted objects; use a new directory or chmod 700 it", dir, st.Mode().Perm())
	}
	return &DirSink{dir: dir}, nil
}

// Write writes one manifest, replacing an earlier file of the same object.
func (s *DirSink) Write(obj inventory.Object, manifest []byte) error {
	if err := checkSafe(obj); err != nil {
		return err
	}
	ns := obj.Namespace
	if ns == "" {
		ns = clusterScopedDir
	}
	rel := filepath.Join(obj.Resource, ns, obj.Name+".yaml")
	if !filepath.IsLocal(rel) {
		return fmt.Errorf("unsafe path %q", rel)
	}
	path := filepath.Join(s.dir, rel)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil { // an existing file may have had wider permissions
		f.Close()
		return err
	}
	if _, err := f.Write(manifest); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// StreamSink writes all manifests to one stream as a multi-document YAML.
type StreamSink struct {
	W io.Writer
}

// Write writes one "---"-separated document.
func (s StreamSink) Write(_ inventory.Object, manifest []byte) error {
	if _, err := io.WriteString(s.W, "---\n"); err != nil {
		return err
	}
	_, err := s.W.Write(manifest)
	return err
}
