package main

import "testing"

func TestDefaultsByUser(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		euid                  int
		env                   map[string]string
		stateDir, listen, key string
		stateFileForRemote    string // --state-file default with a remote --key-uri
	}{
		{"root", 0, map[string]string{"HOME": "/root"},
			"/var/lib/kubekms", "unix:///var/run/kubekms/kms.sock", "softkey:///var/lib/kubekms/keyring.json", "/var/lib/kubekms/local-kek-state.json"},
		{"user", 1000, map[string]string{"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"},
			"/home/u/.local/state/kubekms", "unix:///run/user/1000/kubekms/kms.sock", "softkey:///home/u/.local/state/kubekms/keyring.json", "/home/u/.local/state/kubekms/local-kek-state.json"},
		{"XDG_STATE_HOME", 1000, map[string]string{"HOME": "/home/u", "XDG_STATE_HOME": "/srv/state"},
			"/srv/state/kubekms", "unix:///tmp/kubekms-1000/kms.sock", "softkey:///srv/state/kubekms/keyring.json", "/srv/state/kubekms/local-kek-state.json"},
		{"relative XDG_STATE_HOME is ignored", 1000, map[string]string{"HOME": "/home/u", "XDG_STATE_HOME": "state", "XDG_RUNTIME_DIR": "run", "TMPDIR": "/var/tmp"},
			"/home/u/.local/state/kubekms", "unix:///var/tmp/kubekms-1000/kms.sock", "softkey:///home/u/.local/state/kubekms/keyring.json", "/home/u/.local/state/kubekms/local-kek-state.json"},
		// A container's uid without a passwd entry: nothing may go to /.local.
		{"HOME is /", 10001, map[string]string{"HOME": "/"}, "", "unix:///tmp/kubekms-10001/kms.sock", "", ""},
		{"HOME is //", 10001, map[string]string{"HOME": "//"}, "", "unix:///tmp/kubekms-10001/kms.sock", "", ""},
		{"no HOME", 10001, map[string]string{}, "", "unix:///tmp/kubekms-10001/kms.sock", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := userEnv{euid: tc.euid, getenv: func(k string) string { return tc.env[k] }}
			if got := u.stateDir(); got != tc.stateDir {
				t.Errorf("stateDir = %q, want %q", got, tc.stateDir)
			}
			if got := u.listen(); got != tc.listen {
				t.Errorf("listen = %q, want %q", got, tc.listen)
			}
			if got := u.keyURI(); got != tc.key {
				t.Errorf("keyURI = %q, want %q", got, tc.key)
			}
			if got := u.stateFile("awskms:///arn:aws:kms:eu-west-2:111122223333:alias/k"); got != tc.stateFileForRemote {
				t.Errorf("stateFile(remote key) = %q, want %q", got, tc.stateFileForRemote)
			}
			// With a softkey keyring the state goes beside it, whoever runs it.
			if got := u.stateFile("softkey:///var/lib/kubekms/keyring.json"); got != "/var/lib/kubekms/local-kek-state.json" {
				t.Errorf("stateFile(softkey) = %q, want it beside the keyring", got)
			}
		})
	}
}
