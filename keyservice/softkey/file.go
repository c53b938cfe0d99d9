package softkey

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kubekms/kubekms/internal/flock"
	"github.com/kubekms/kubekms/internal/safefile"
)

// keyringRules: the keyring is this user's alone (0600), in a folder only
// this user or root can write (kubekms makes it 0700).
var keyringRules = safefile.Rules{What: "keyring", MaxSize: 4 << 20}

// lockWait bounds how long a process waits for another's keyring lock.
const lockWait = 30 * time.Second

// Load reads and validates a keyring file. It refuses a file another user
// could have written or read, or one in a folder another user can write.
func Load(path string) (*Keyring, error) {
	r, _, err := load(path)
	return r, err
}

// load is Load, also returning the FileInfo of the file it read.
func load(path string) (*Keyring, os.FileInfo, error) {
	data, st, err := safefile.Read(path, keyringRules)
	if err != nil {
		return nil, nil, err
	}
	var r Keyring
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, nil, fmt.Errorf("parse keyring %s: %w", path, err)
	}
	if err := r.validate(); err != nil {
		return nil, nil, fmt.Errorf("keyring %s: %w", path, err)
	}
	return &r, st, nil
}

// locked runs fn holding the keyring's lock (an flock on path+".lock",
// beside it). Every creation and change of the keyring takes it, so two
// processes never interleave: no rotation is lost, and of several processes
// starting at once on a missing keyring exactly one creates it.
//
// Waiting for another process's lock ends after lockWait, or when ctx ends.
func locked(ctx context.Context, path string, fn func() error) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create keyring folder: %w", err)
	}
	if err := safefile.CheckDir(dir, keyringRules); err != nil {
		return err
	}
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("open keyring lock: %w", err)
	}
	defer lock.Close() // closing releases the lock
	switch err := flock.Wait(ctx, lock, syscall.LOCK_EX, lockWait); {
	case errors.Is(err, flock.ErrHeld):
		return fmt.Errorf("lock keyring: %s has been held by another process for %s (a stopped `kubekms softkey` command?)", lock.Name(), lockWait)
	case err != nil && ctx.Err() != nil:
		return fmt.Errorf("waiting for the keyring lock %s: %w", lock.Name(), ctx.Err())
	case err != nil:
		return fmt.Errorf("lock keyring: %w", err)
	}
	return fn()
}

// update runs fn on the keyring under the lock and saves the result.
func update(path string, fn func(*Keyring) error) (*Keyring, error) {
	var out *Keyring
	err := locked(context.Background(), path, func() error {
		r, err := Load(path)
		if err != nil {
			return err
		}
		if err := fn(r); err != nil {
			return err
		}
		if err := r.validate(); err != nil {
			return err
		}
		if err := replace(path, r); err != nil {
			return err
		}
		out = r
		return nil
	})
	return out, err
}

// errExists: the keyring was there already.
var errExists = errors.New("keyring already exists")

// Create makes a new keyring file with one primary version. It fails if the
// file exists, also when another process creates it at the same moment.
func Create(path string) (*Keyring, error) {
	var r *Keyring
	err := locked(context.Background(), path, func() (err error) {
		r, err = create(path)
		return err
	})
	return r, err
}

// LoadOrCreate loads path, creating it with one version if it does not
// exist. Of several processes doing this at once, one creates the keyring
// and the others load that one.
func LoadOrCreate(path string) (r *Keyring, created bool, err error) {
	r, _, created, err = loadOrCreate(context.Background(), path, nil)
	return r, created, err
}

// loadOrCreate is LoadOrCreate; when the keyring is missing, mayCreate (if
// set) is asked first and its error returned instead of creating one.
func loadOrCreate(ctx context.Context, path string, mayCreate func() error) (r *Keyring, st os.FileInfo, created bool, err error) {
	r, st, err = load(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return r, st, false, err
	}
	err = locked(ctx, path, func() error {
		r, st, err = load(path) // created by another process while we waited
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if mayCreate != nil {
			if err := mayCreate(); err != nil {
				return err
			}
		}
		if _, err := create(path); err != nil {
			return err
		}
		created = true
		r, st, err = load(path)
		return err
	})
	return r, st, created, err
}

// create writes a new keyring at path under the lock. The new file appears
// with link(2) (or renameat2 RENAME_NOREPLACE), which fails rather than
// replace a keyring some other writer made meanwhile.
func create(path string) (*Keyring, error) {
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("generate ring id: %w", err)
	}
	v, err := newVersion(1)
	if err != nil {
		return nil, err
	}
	r := &Keyring{Format: Format, RingID: hex.EncodeToString(id), Primary: 1, Versions: []Version{v}}
	return r, createFrom(path, r)
}

// createFrom writes r as the new keyring file at path, under the lock. The
// file appears with link(2) (or renameat2 RENAME_NOREPLACE) of a complete,
// fsynced temp file, which fails rather than replace a keyring some other
// writer made meanwhile; then the folder is fsynced.
func createFrom(path string, r *Keyring) error {
	tmp, err := writeTemp(path, r)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	err = os.Link(tmp, path)
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
		// No hard links on this file system.
		err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE)
	}
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s: %w", path, errExists)
	}
	if err != nil {
		return fmt.Errorf("create keyring: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// replace writes r over path atomically: a temp file (0600, fsynced) renamed
// over it, then the folder fsynced so the rename survives a power loss.
func replace(path string, r *Keyring) error {
	tmp, err := writeTemp(path, r)
	if err != nil {
		return err
	}
	defer os.Remove(tmp) // no-op after a successful rename
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace keyring: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// writeTemp writes r to a new fsynced 0600 temp file beside path.
func writeTemp(path string, r *Keyring) (string, error) {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", fmt.Errorf("encode keyring: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("create temp keyring: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return "", fmt.Errorf("chmod temp keyring: %w", err)
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		return "", fmt.Errorf("write temp keyring: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return "", fmt.Errorf("sync temp keyring: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("close temp keyring: %w", err)
	}
	ok = true
	return tmp.Name(), nil
}

// syncDir fsyncs a folder, making a rename or link in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync keyring folder: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync keyring folder: %w", err)
	}
	return nil
}

// Rotate adds a new version and makes it primary.
func Rotate(path string) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		v, err := newVersion(r.newest() + 1)
		if err != nil {
			return err
		}
		r.Versions = append(r.Versions, v)
		r.Primary = v.Version
		return nil
	})
}

// SetDisabled disables or re-enables one version. A disabled version can
// neither wrap nor unwrap: this is how an operator revokes it (the plugin
// then drops the local KEKs it protected). The primary cannot be disabled
// while another version is enabled: every Encrypt would fail while older
// data still decrypts. Rotate first, or disable all versions (SetAllDisabled)
// to revoke the whole key.
func SetDisabled(path string, version int, disabled bool) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		v := r.Find(version)
		if v == nil {
			return fmt.Errorf("version %d does not exist (the keyring has versions %s)", version, r.versionList())
		}
		if disabled && version == r.Primary {
			for _, o := range r.Versions {
				if o.Version != version && !o.Disabled {
					return fmt.Errorf("version %d is the primary: disabling it alone would make every Encrypt fail; "+
						"rotate first (kubekms softkey rotate) and then disable version %d, or disable every version (--all) to revoke the whole key",
						version, version)
				}
			}
		}
		v.Disabled = disabled
		return nil
	})
}

// SetAllDisabled disables (revokes the whole key) or re-enables every version.
func SetAllDisabled(path string, disabled bool) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		for i := range r.Versions {
			r.Versions[i].Disabled = disabled
		}
		return nil
	})
}

func (r *Keyring) versionList() string {
	s := ""
	for i, v := range r.Versions {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(v.Version)
	}
	return s
}
