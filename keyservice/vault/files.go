package vault

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
)

// fileKind says how private a credential file must be.
type fileKind int

const (
	// secretFile: a token, secret ID or private key. Readable by its owner
	// (and group: Vault Agent's file sink writes 0640), never by everyone.
	secretFile fileKind = iota
	// publicFile: a role ID, certificate, CA bundle or short-lived JWT
	// (kubelet writes projected service-account tokens 0644 inside the
	// pod). Anyone may read it; only its owner may change it.
	publicFile
)

// checkFile refuses a credential file that someone other than this
// process's user or root could replace, or (secretFile) that every user can
// read. It follows symlinks (kubelet's ..data links) and checks the folder
// of the path as given and of the file it resolves to.
func checkFile(what, path string, kind fileKind) error {
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fmt.Errorf("vault %s: %w", what, err)
	}
	st, err := os.Stat(resolved)
	if err != nil {
		return fmt.Errorf("vault %s: %w", what, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("vault %s %s is not a regular file (%v)", what, path, st.Mode().Type())
	}
	if err := checkOwner(what, path, st); err != nil {
		return err
	}
	perm := st.Mode().Perm()
	if perm&0o022 != 0 {
		return fmt.Errorf("vault %s %s has mode %04o: other users can change it; chmod go-w it", what, path, perm)
	}
	if kind == secretFile && perm&0o004 != 0 {
		return fmt.Errorf("vault %s %s has mode %04o: every user can read it; chmod 600 it (or 640 to share it with a group)", what, path, perm)
	}
	dirs := []string{filepath.Dir(path)}
	if d := filepath.Dir(resolved); d != dirs[0] {
		dirs = append(dirs, d)
	}
	for _, dir := range dirs {
		st, err := os.Stat(dir)
		if err != nil {
			return fmt.Errorf("vault %s: folder: %w", what, err)
		}
		if err := checkOwner(what+" folder", dir, st); err != nil {
			return err
		}
		// A sticky world-writable folder (/tmp) lets others add files but
		// not replace ours.
		if st.Mode().Perm()&0o002 != 0 && st.Mode()&os.ModeSticky == 0 {
			return fmt.Errorf("vault %s folder %s has mode %04o: every user can replace %s; use a private folder", what, dir, st.Mode().Perm(), filepath.Base(path))
		}
	}
	return nil
}

func checkOwner(what, path string, st os.FileInfo) error {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if uid := os.Getuid(); sys.Uid != 0 && int(sys.Uid) != uid {
		return fmt.Errorf("vault %s %s is owned by uid %d, not by this process's user (uid %d) or root: that user could replace it", what, path, sys.Uid, uid)
	}
	return nil
}

// readFile checks a credential file and returns its content without
// surrounding white space; an empty file is an error.
func readFile(what, path string, kind fileKind) (string, error) {
	if err := checkFile(what, path, kind); err != nil {
		return "", err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("vault %s: %w", what, err)
	}
	v := string(bytes.TrimSpace(b))
	if v == "" {
		return "", fmt.Errorf("vault %s %s: %w", what, path, errEmptyFile)
	}
	return v, nil
}

// clientCert is the TLS client certificate of auth=cert, loaded from its
// files at every login and presented at every handshake after that.
type clientCert struct {
	certFile, keyFile string
	cur               atomic.Pointer[tls.Certificate]
}

// load checks and reads the certificate and key files.
func (c *clientCert) load() error {
	if err := checkFile("cert-file", c.certFile, publicFile); err != nil {
		return err
	}
	if err := checkFile("key-file", c.keyFile, secretFile); err != nil {
		return err
	}
	pair, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		// The tls error names the files' problem, never their content.
		return fmt.Errorf("vault cert-file %s / key-file %s: %w", c.certFile, c.keyFile, err)
	}
	c.cur.Store(&pair)
	return nil
}

func (c *clientCert) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	if p := c.cur.Load(); p != nil {
		return p, nil
	}
	return &tls.Certificate{}, nil // none: the server decides
}
