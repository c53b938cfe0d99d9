package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// userEnv is what the per-user defaults depend on: the effective uid and the
// environment.
type userEnv struct {
	euid   int
	getenv func(string) string
}

func currentUser() userEnv { return userEnv{euid: os.Geteuid(), getenv: os.Getenv} }

// stateDir is where kubekms keeps its keyring (softkey) and local KEK state
// by default: /var/lib/kubekms for root, else $XDG_STATE_HOME/kubekms or
// ~/.local/state/kubekms. It is "" when there is no such folder of the
// user's own: in a container a uid without a passwd entry gets HOME=/, and
// "/.local/state" is neither the user's nor, with a read-only root, writable.
func (u userEnv) stateDir() string {
	if u.euid == 0 {
		return "/var/lib/kubekms"
	}
	if d := u.getenv("XDG_STATE_HOME"); filepath.IsAbs(d) { // the XDG spec ignores relative paths
		return filepath.Join(d, "kubekms")
	}
	if home := filepath.Clean(u.getenv("HOME")); filepath.IsAbs(home) && home != "/" {
		return filepath.Join(home, ".local", "state", "kubekms")
	}
	return ""
}

// listen is the socket: /var/run/kubekms/kms.sock for root, else a private
// folder under $XDG_RUNTIME_DIR or the temp folder (nothing in it outlives a
// reboot, so the temp folder is fine for it).
func (u userEnv) listen() string {
	if u.euid == 0 {
		return "unix:///var/run/kubekms/kms.sock"
	}
	if d := u.getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(d) {
		return "unix://" + filepath.Join(d, "kubekms", "kms.sock")
	}
	tmp := u.getenv("TMPDIR")
	if !filepath.IsAbs(tmp) {
		tmp = "/tmp"
	}
	return "unix://" + filepath.Join(tmp, fmt.Sprintf("kubekms-%d", u.euid), "kms.sock")
}

// keyURI is the default keyring, or "" without a state folder.
func (u userEnv) keyURI() string {
	if d := u.stateDir(); d != "" {
		return "softkey://" + filepath.Join(d, "keyring.json")
	}
	return ""
}

// stateFile is where the local KEK state goes when --state-file is not
// given: next to a softkey keyring (a folder the operator chose, and one
// kubekms must be able to write anyway), else in the state folder, else
// nowhere ("": kubekms then keeps no state, which costs one remote wrap per
// restart and loses nothing).
func (u userEnv) stateFile(keyURI string) string {
	if p, ok := strings.CutPrefix(keyURI, "softkey://"); ok && filepath.IsAbs(p) {
		return filepath.Join(filepath.Dir(p), "local-kek-state.json")
	}
	if d := u.stateDir(); d != "" {
		return filepath.Join(d, "local-kek-state.json")
	}
	return ""
}

// errNoKeyURI is returned when --key-uri is needed but has no default.
var errNoKeyURI = errors.New("--key-uri is required: there is no folder for the default keyring " +
	"(not root, HOME is / or unset, no XDG_STATE_HOME; in a container, mount a folder and name a keyring in it)")

func defaultListen() string { return currentUser().listen() }
func defaultKeyURI() string { return currentUser().keyURI() }

// defaultStateDir is the user's state folder, or "" without one (then files
// named relative to it, such as rotate's progress, go to the current folder).
func defaultStateDir() string { return currentUser().stateDir() }
