package plugin

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/kms/pkg/util"
)

// SocketOptions control how the unix socket is created.
type SocketOptions struct {
	// Mode of the socket file (default 0600).
	Mode os.FileMode
	// Group, if set, owns the socket file (a name or a numeric gid), so a
	// kube-apiserver in that group can connect with Mode 0660.
	Group string
	// AllowInsecureDir starts even if the socket's folder is writable by
	// other users (who could then replace the socket).
	AllowInsecureDir bool
}

// CheckEndpoint checks a listen endpoint (unix:///path or unix:///@abstract)
// and, if the socket's folder exists, the folder, without creating anything:
// so a command can refuse a bad endpoint before it does anything else.
func CheckEndpoint(endpoint string, opts SocketOptions) error {
	addr, err := util.ParseEndpoint(endpoint)
	if err != nil {
		return fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	if strings.HasPrefix(addr, "@") {
		return nil
	}
	if _, err := os.Stat(filepath.Dir(addr)); err != nil {
		return nil // Listen creates it
	}
	if err := prepareDir(filepath.Dir(addr), opts.AllowInsecureDir); err != nil {
		return err
	}
	if st, err := os.Lstat(addr); err == nil && st.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; refusing to remove it", addr)
	}
	return nil
}

// Listen creates the unix socket that endpoint names (unix:///path or
// unix:///@abstract). A stale socket file is removed only if it is a socket
// and nothing answers on it. Closing the listener removes the socket file
// only if it is still the one this listener created (same device and inode):
// a newer instance's socket on the same path survives an older instance's
// shutdown.
func Listen(endpoint string, opts SocketOptions) (net.Listener, error) {
	addr, err := util.ParseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("listen endpoint %q: %w", endpoint, err)
	}
	if strings.HasPrefix(addr, "@") {
		l, err := net.Listen("unix", addr)
		if err != nil {
			return nil, fmt.Errorf("listen on abstract socket %s: %w", addr, err)
		}
		return l, nil
	}
	if opts.Mode == 0 {
		opts.Mode = 0o600
	}
	if err := prepareDir(filepath.Dir(addr), opts.AllowInsecureDir); err != nil {
		return nil, err
	}
	if err := removeStale(addr); err != nil {
		return nil, err
	}
	// The umask closes the window between bind and chmod in which the socket
	// would have the default mode.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", addr)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	st, err := os.Lstat(addr)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("socket: %w", err)
	}
	own := &ownedSocket{UnixListener: ul, path: addr, st: st}
	l = own
	if err := os.Chmod(addr, opts.Mode); err != nil {
		own.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if opts.Group != "" {
		gid, err := lookupGroup(opts.Group)
		if err == nil {
			err = os.Chown(addr, -1, gid)
		}
		if err != nil {
			own.Close()
			return nil, fmt.Errorf("socket group %q: %w", opts.Group, err)
		}
	}
	return l, nil
}

// ownedSocket is a listener that, on Close, removes its socket file only if
// the path still names the socket it bound.
type ownedSocket struct {
	*net.UnixListener
	path string
	st   os.FileInfo
	once sync.Once
	err  error
}

func (l *ownedSocket) Close() error {
	l.once.Do(func() {
		// Remove first, while this listener still answers: a new instance
		// that finds it answering leaves the path alone.
		if st, err := os.Lstat(l.path); err == nil && os.SameFile(st, l.st) {
			if err := os.Remove(l.path); err != nil && !errors.Is(err, os.ErrNotExist) {
				l.err = fmt.Errorf("remove socket: %w", err)
			}
		}
		l.err = errors.Join(l.err, l.UnixListener.Close())
	})
	return l.err
}

// prepareDir creates the socket's folder (0700) or checks an existing one.
func prepareDir(dir string, allowInsecure bool) error {
	st, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create socket folder: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket folder: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("socket folder %s is not a folder", dir)
	}
	if allowInsecure {
		return nil
	}
	if st.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("socket folder %s is writable by every user (mode %04o): another user could replace the socket; "+
			"use a private folder or pass --allow-insecure-socket-dir", dir, st.Mode().Perm())
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 && int(sys.Uid) != os.Getuid() {
		return fmt.Errorf("socket folder %s belongs to uid %d, not to this user or root", dir, sys.Uid)
	}
	return nil
}

func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check socket path: %w", err)
	}
	if st.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; refusing to remove it", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("another process is serving on %s", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

func lookupGroup(name string) (int, error) {
	if gid, err := strconv.Atoi(name); err == nil {
		return gid, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}
