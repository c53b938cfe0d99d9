// Package safefile reads the files kubekms trusts with its keys (the softkey
// keyring, a PKCS#11 PIN file and module), refusing one that another
// user could have written or read: it must be a regular file owned by this
// user or root, not writable by anyone else, in a folder nobody else can
// write. Files are opened without blocking (a FIFO never hangs a reader) and
// checked on the open descriptor, so a swap between check and read is caught.
package safefile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// Rules say what a file may allow besides its owner. Write access for group
// or others is never allowed, nor another owner than this user or root.
type Rules struct {
	// What names the file in messages ("keyring", "PIN file").
	What string
	// GroupRead lets the file's group read it (a Kubernetes volume with an
	// fsGroup makes secrets 0440 or 0640).
	GroupRead bool
	// OtherRead lets everyone read it: for code and public data, not secrets.
	OtherRead bool
	// GroupWritableDir accepts a folder its group can write (again fsGroup
	// volumes). Folders writable by others are refused unless sticky.
	GroupWritableDir bool
	// MaxSize bounds what Read reads (default 1 MiB).
	MaxSize int64
}

// Error is a refused file: it exists but must not be trusted.
type Error struct {
	Path   string
	Reason string
}

func (e *Error) Error() string { return e.Path + ": " + e.Reason }

// IsRefused reports whether err is a refused file (not an I/O error or a
// missing file).
func IsRefused(err error) bool {
	var e *Error
	return errors.As(err, &e)
}

func (r Rules) what() string {
	if r.What == "" {
		return "file"
	}
	return r.What
}

// Read opens path without blocking, checks the open file and its folder
// against r, and returns the content and the open file's FileInfo.
func Read(path string, r Rules) ([]byte, os.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", r.what(), err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", r.what(), err)
	}
	// The folder first: a folder others can write is the cause of whatever
	// is wrong with the file.
	if err := r.checkDirs(path); err != nil {
		return nil, nil, err
	}
	if err := r.checkFile(path, st); err != nil {
		return nil, nil, err
	}
	limit := r.MaxSize
	if limit <= 0 {
		limit = 1 << 20
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, nil, fmt.Errorf("read %s %s: %w", r.what(), path, err)
	}
	if int64(len(data)) > limit {
		return nil, nil, &Error{Path: path, Reason: fmt.Sprintf("%s is larger than %d bytes", r.what(), limit)}
	}
	return data, st, nil
}

// Check checks path (following symbolic links) and its folder against r
// without reading it.
func Check(path string, r Rules) (os.FileInfo, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", r.what(), err)
	}
	if err := r.checkDirs(path); err != nil {
		return nil, err
	}
	return st, r.checkFile(path, st)
}

// CheckDir checks that dir is a folder only this user or root can write.
func CheckDir(dir string, r Rules) error {
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%s folder: %w", r.what(), err)
	}
	return r.checkDir(dir, st)
}

func (r Rules) checkFile(path string, st os.FileInfo) error {
	refuse := func(format string, args ...any) error {
		return &Error{Path: path, Reason: fmt.Sprintf(format, args...)}
	}
	if !st.Mode().IsRegular() {
		return refuse("%s is %s, not a regular file", r.what(), DescribeMode(st.Mode()))
	}
	perm := st.Mode().Perm()
	if perm&0o022 != 0 {
		return refuse("%s has mode %04o: other users can change it; chmod go-w %s (and check its content)", r.what(), perm, path)
	}
	readable := os.FileMode(0o044)
	if r.GroupRead {
		readable &^= 0o040
	}
	if r.OtherRead {
		readable &^= 0o004
	}
	if perm&readable != 0 {
		want := "600"
		if r.GroupRead {
			want = "640"
		}
		return refuse("%s has mode %04o: other users can read it; chmod %s %s", r.what(), perm, want, path)
	}
	if uid, ok := owner(st); ok && !trustedOwner(uid) {
		return refuse("%s belongs to uid %d, not to this user (uid %d) or root: another user could have written it; "+
			"check its content and chown it", r.what(), uid, os.Geteuid())
	}
	if r.MaxSize > 0 && st.Size() > r.MaxSize {
		return refuse("%s is larger than %d bytes", r.what(), r.MaxSize)
	}
	return nil
}

// checkDirs checks the folder of path and, when path is a symbolic link,
// the folder of the file it resolves to.
func (r Rules) checkDirs(path string) error {
	dirs := []string{filepath.Dir(path)}
	if real, err := filepath.EvalSymlinks(path); err == nil && filepath.Dir(real) != dirs[0] {
		dirs = append(dirs, filepath.Dir(real))
	}
	for _, d := range dirs {
		if err := CheckDir(d, r); err != nil {
			return err
		}
	}
	return nil
}

func (r Rules) checkDir(dir string, st os.FileInfo) error {
	refuse := func(format string, args ...any) error {
		return &Error{Path: dir, Reason: fmt.Sprintf(format, args...)}
	}
	if !st.IsDir() {
		return refuse("%s folder is %s, not a folder", r.what(), DescribeMode(st.Mode()))
	}
	perm := st.Mode().Perm()
	sticky := st.Mode()&os.ModeSticky != 0
	if perm&0o002 != 0 && !sticky {
		return refuse("%s folder is writable by every user (mode %04o): another user could replace the %s; chmod o-w %s",
			r.what(), perm, r.what(), dir)
	}
	if perm&0o020 != 0 && !sticky && !r.GroupWritableDir {
		return refuse("%s folder is writable by its group (mode %04o): another user could replace the %s; chmod g-w %s",
			r.what(), perm, r.what(), dir)
	}
	if uid, ok := owner(st); ok && !trustedOwner(uid) {
		return refuse("%s folder belongs to uid %d, not to this user (uid %d) or root: its owner could replace the %s",
			r.what(), uid, os.Geteuid(), r.what())
	}
	return nil
}

func owner(st os.FileInfo) (uint32, bool) {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return sys.Uid, true
}

func trustedOwner(uid uint32) bool { return uid == 0 || int(uid) == os.Geteuid() }

// DescribeMode names the kind of file m is, for messages that refuse one
// that is not a regular file: "a folder", "a FIFO (named pipe)", ...
func DescribeMode(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a folder"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO (named pipe)"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	default:
		return fmt.Sprintf("of type %v", m.Type())
	}
}
