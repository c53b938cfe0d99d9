package main

import (
	"fmt"
	"os"
	"path/filepath"
)

// defaultStateDir is where kubekms keeps its keyring (softkey) and local KEK
// state: /var/lib/kubekms for root, else the user's state folder.
func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/kubekms"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "kubekms")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "kubekms")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("kubekms-%d", os.Getuid()), "state")
}

// defaultListen is the socket: /var/run/kubekms/kms.sock for root, else a
// private folder under $XDG_RUNTIME_DIR or the temp folder.
func defaultListen() string {
	if os.Geteuid() == 0 {
		return "unix:///var/run/kubekms/kms.sock"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return "unix://" + filepath.Join(d, "kubekms", "kms.sock")
	}
	return "unix://" + filepath.Join(os.TempDir(), fmt.Sprintf("kubekms-%d", os.Getuid()), "kms.sock")
}

func defaultKeyURI() string {
	return "softkey://" + filepath.Join(defaultStateDir(), "keyring.json")
}
