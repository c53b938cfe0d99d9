package softkey

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/fsnotify/fsnotify"

	"github.com/kubekms/kubekms/keyservice"
)

// Scheme is the key-URI scheme: softkey:///absolute/path/keyring.json.
const Scheme = "softkey"

// wrapAAD binds a wrapped value to its purpose and key ID.
const wrapAAD = "kubekms softkey wrap v1\x00"

// ParseURI returns the keyring path of a softkey URI.
func ParseURI(uri string) (string, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", fmt.Errorf("parse key URI: %w", err)
	}
	if u.Scheme != Scheme {
		return "", fmt.Errorf("key URI scheme %q, want %q", u.Scheme, Scheme)
	}
	if u.Host != "" || u.Opaque != "" {
		return "", fmt.Errorf("softkey URI must be softkey:///absolute/path (got host %q)", u.Host+u.Opaque)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", errors.New("softkey URI takes no query or fragment")
	}
	if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path || strings.HasSuffix(u.Path, "/") {
		return "", fmt.Errorf("softkey URI path %q must be a clean absolute file path", u.Path)
	}
	return u.Path, nil
}

// Service is a keyservice.Service over a keyring file. It re-reads the file
// when it changes, so `kubekms softkey rotate` reaches a running plugin, and
// watches the keyring's folder to say so at once (keyservice.Notifier).
//
// A changed file is checked like the first one (owner, mode, folder) and
// must hold the same ring: a file that fails is not adopted, so no
// stranger's key is ever used and nothing answered becomes undecryptable.
// The service keeps the last good keyring for Wrap and Unwrap, and Probe
// reports the refused file as an invalid-class error: Status shows it, and
// the hierarchy stops sealing (fail closed) until the file is fixed, which
// the folder watch reports at once.
type Service struct {
	path string
	log  *slog.Logger

	mu      sync.Mutex
	ring    *Keyring
	stamp   stamp // of the file and folder the last check looked at
	refused error // why the keyring on disk is not adopted; nil when it is

	watchOnce sync.Once
	changed   chan struct{}
	watcher   *fsnotify.Watcher
	done      chan struct{} // closed when the watch goroutine ends (or never ran)
}

var (
	_ keyservice.Service        = (*Service)(nil)
	_ keyservice.VersionChecker = (*Service)(nil)
	_ keyservice.Notifier       = (*Service)(nil)
)

// Open opens the keyring that uri names, creating it if it is missing and
// opts.PriorKeyID gives no proof that one existed (see keyservice.Options).
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	path, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	log := opts.LoggerOrDiscard()
	prior, priorVersion, _ := parseKeyID(opts.PriorKeyID)
	ring, st, created, err := loadOrCreate(ctx, path, func() error {
		if prior == "" || opts.NewKey {
			return nil
		}
		return fmt.Errorf("keyring %s is missing, but %s names key %s of keyring %s (version %d): "+
			"everything encrypted since then needs that keyring. Restore the keyring file from a backup "+
			"(on several control-plane nodes: copy it from another node), or check --key-uri and the volume it is on. "+
			"To start a NEW keyring on purpose (data under keyring %s becomes unreadable), pass --new-keyring",
			path, opts.PriorKeyIDSource(), opts.PriorKeyID, prior, priorVersion, prior)
	})
	if err != nil {
		return nil, err
	}
	switch {
	case created && prior != "":
		log.Warn("created a NEW softkey keyring although the saved state names another (--new-keyring): data under the old keyring is unreadable",
			"path", path, "key_id", ring.KeyID(ring.Primary), "old_key_id", opts.PriorKeyID)
	case created:
		log.Warn("created a new softkey keyring: back it up; every node of the cluster needs this same file",
			"path", path, "key_id", ring.KeyID(ring.Primary))
	case prior != "" && prior != ring.RingID && !opts.NewKey:
		return nil, fmt.Errorf("keyring %s is keyring %s, but %s names key %s of keyring %s: "+
			"data encrypted under %s cannot be decrypted with this file. Restore keyring %s, or check --key-uri. "+
			"To go on with keyring %s on purpose, pass --new-keyring",
			path, ring.RingID, opts.PriorKeyIDSource(), opts.PriorKeyID, prior, prior, prior, ring.RingID)
	}
	dst, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("keyring folder: %w", err)
	}
	return &Service{path: path, log: log, ring: ring, stamp: stampOf(st, dst), changed: make(chan struct{}, 1), done: make(chan struct{})}, nil
}

// stamp identifies one version of the keyring file and its folder: any
// rename, write, chmod or chown changes it.
type stamp struct {
	dev, ino, size          uint64
	mtime, ctime            syscall.Timespec
	mode, uid, gid          uint32
	dirIno                  uint64
	dirMode, dirUID, dirGID uint32
}

func stampOf(file, dir os.FileInfo) stamp {
	var s stamp
	if st, ok := file.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino, s.size = st.Dev, st.Ino, uint64(st.Size)
		s.mtime, s.ctime, s.mode, s.uid, s.gid = st.Mtim, st.Ctim, st.Mode, st.Uid, st.Gid
	}
	if st, ok := dir.Sys().(*syscall.Stat_t); ok {
		s.dirIno, s.dirMode, s.dirUID, s.dirGID = st.Ino, st.Mode, st.Uid, st.Gid
	}
	return s
}

// current returns the keyring to use and, when the file on disk is refused,
// why. A missing or unreadable file is an outage (transient error).
func (s *Service) current() (ring *Keyring, refused, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := os.Stat(s.path)
	if err != nil {
		return nil, nil, keyservice.Transient("read keyring", err)
	}
	dst, err := os.Stat(filepath.Dir(s.path))
	if err != nil {
		return nil, nil, keyservice.Transient("read keyring", err)
	}
	if stampOf(st, dst) == s.stamp {
		return s.ring, s.refused, nil
	}
	ring, fst, err := load(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil, keyservice.Transient("read keyring", err)
	case err == nil && ring.RingID != s.ring.RingID:
		err = fmt.Errorf("%s now holds keyring %s, not %s: data encrypted under %s would become unreadable; "+
			"restore keyring %s (restart kubekms serve to use another keyring on purpose)",
			s.path, ring.RingID, s.ring.RingID, s.ring.RingID, s.ring.RingID)
	}
	if err != nil {
		// Refuse it, but look again only when the file or folder changes.
		s.stamp = stampOf(st, dst)
		s.refused = fmt.Errorf("keyring file refused, last good keyring kept: %w", err)
		s.log.Error("softkey keyring changed on disk and was REFUSED; keeping the last good keyring", "path", s.path, "error", err)
		return s.ring, s.refused, nil
	}
	if s.refused != nil {
		s.log.Info("softkey keyring accepted again", "path", s.path, "key_id", ring.KeyID(ring.Primary))
	}
	s.ring, s.stamp, s.refused = ring, stampOf(fst, dst), nil
	return ring, nil, nil
}

// Changed fires when the keyring file or its folder changes. The first call
// starts the watch; Close stops it.
func (s *Service) Changed() <-chan struct{} {
	s.watchOnce.Do(s.watch)
	return s.changed
}

// watch starts watching the keyring's folder: `softkey rotate` replaces the
// file by a rename, which a watch on the file itself would miss. Without
// inotify (or over its limit) changes are still seen at the next probe.
func (s *Service) watch() {
	w, err := fsnotify.NewWatcher()
	if err == nil {
		err = w.Add(filepath.Dir(s.path))
		if err != nil {
			w.Close()
		}
	}
	if err != nil {
		s.log.Warn("cannot watch the softkey keyring's folder; changes are seen at the next probe", "path", s.path, "error", err)
		close(s.done)
		return
	}
	s.watcher = w
	dir, base := filepath.Dir(s.path), filepath.Base(s.path)
	go func() {
		defer close(s.done)
		for {
			select {
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				// The keyring itself, or the folder's own mode or owner.
				if filepath.Base(ev.Name) != base && filepath.Clean(ev.Name) != dir {
					continue
				}
				select {
				case s.changed <- struct{}{}:
				default: // one pending signal is enough
				}
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				s.log.Warn("softkey keyring watch", "error", err)
			}
		}
	}()
}

func gcm(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Wrap seals plaintext with the primary version.
func (s *Service) Wrap(_ context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	ring, _, err := s.current()
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	v := ring.Find(ring.Primary)
	keyID := ring.KeyID(v.Version)
	if v.Disabled {
		return keyservice.WrapResult{}, keyservice.Revoked("wrap", fmt.Errorf("key %s is disabled", keyID))
	}
	aead, err := gcm(v.Key)
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("wrap: %w", err)
	}
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plaintext)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("wrap: nonce: %w", err)
	}
	out := aead.Seal(nonce, nonce, plaintext, []byte(wrapAAD+keyID))
	return keyservice.WrapResult{Wrapped: out, KeyID: keyID}, nil
}

// Unwrap opens a value that Wrap made with the version keyID names.
func (s *Service) Unwrap(_ context.Context, keyID string, wrapped []byte) ([]byte, error) {
	ring, _, err := s.current()
	if err != nil {
		return nil, err
	}
	ringID, version, err := parseKeyID(keyID)
	if err != nil {
		return nil, keyservice.Invalid("unwrap", err)
	}
	if ringID != ring.RingID {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key %s belongs to another keyring (this is %s)", keyID, ring.RingID))
	}
	v := ring.Find(version)
	if v == nil {
		// Versions are only ever added, so a version below the newest that is
		// missing was destroyed (revoked); one above it never existed (bad input).
		if version < ring.newest() {
			return nil, keyservice.Revoked("unwrap", fmt.Errorf("key version %d was removed from the keyring", version))
		}
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key version %d does not exist in the keyring", version))
	}
	if v.Disabled {
		return nil, keyservice.Revoked("unwrap", fmt.Errorf("key %s is disabled", keyID))
	}
	aead, err := gcm(v.Key)
	if err != nil {
		return nil, fmt.Errorf("unwrap: %w", err)
	}
	if len(wrapped) < aead.NonceSize()+aead.Overhead() {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped value is %d bytes, too short", len(wrapped)))
	}
	nonce, sealed := wrapped[:aead.NonceSize()], wrapped[aead.NonceSize():]
	out, err := aead.Open(nil, nonce, sealed, []byte(wrapAAD+keyID))
	if err != nil {
		return nil, keyservice.Invalid("unwrap", errors.New("wrapped value failed authentication"))
	}
	return out, nil
}

// Probe re-reads the keyring if it changed and returns the primary's key ID.
// It makes no cryptographic call. A refused keyring file is an invalid-class
// error: not an outage the grace period would hide, not a revocation that
// would drop the cache.
func (s *Service) Probe(context.Context) (string, error) {
	ring, refused, err := s.current()
	if err != nil {
		return "", err
	}
	if refused != nil {
		return "", keyservice.Invalid("probe", refused)
	}
	v := ring.Find(ring.Primary)
	keyID := ring.KeyID(v.Version)
	if v.Disabled {
		return "", keyservice.Revoked("probe", fmt.Errorf("primary key %s is disabled", keyID))
	}
	return keyID, nil
}

// Close stops watching the keyring.
func (s *Service) Close() error {
	s.watchOnce.Do(func() { close(s.done) }) // never watched: nothing to stop
	if s.watcher != nil {
		s.watcher.Close()
	}
	<-s.done
	return nil
}

func parseKeyID(keyID string) (ring string, version int, err error) {
	rest, ok := strings.CutPrefix(keyID, Scheme+":")
	if !ok {
		return "", 0, fmt.Errorf("key ID %q is not a softkey key ID", keyID)
	}
	ring, v, ok := strings.Cut(rest, ":v")
	if !ok || ring == "" {
		return "", 0, fmt.Errorf("key ID %q is malformed", keyID)
	}
	version, err = strconv.Atoi(v)
	if err != nil || version < 1 || strconv.Itoa(version) != v {
		return "", 0, fmt.Errorf("key ID %q has a bad version", keyID)
	}
	return ring, version, nil
}

// CheckKeyID reports whether keyID's version is still usable: a disabled or
// removed version is revoked. No cryptographic call.
func (s *Service) CheckKeyID(_ context.Context, keyID string) error {
	ring, _, err := s.current()
	if err != nil {
		return err
	}
	ringID, version, err := parseKeyID(keyID)
	if err != nil || ringID != ring.RingID {
		return keyservice.Invalid("check", fmt.Errorf("key ID %q is not in this keyring", keyID))
	}
	v := ring.Find(version)
	switch {
	case v == nil && version < ring.newest():
		return keyservice.Revoked("check", fmt.Errorf("key version %d was removed from the keyring", version))
	case v == nil:
		return keyservice.Invalid("check", fmt.Errorf("key version %d does not exist in the keyring", version))
	case v.Disabled:
		return keyservice.Revoked("check", fmt.Errorf("key %s is disabled", keyID))
	}
	return nil
}
