package convergence

import (
	"errors"
	"fmt"

	"github.com/kubekms/kubekms/hierarchy"
)

// StoppedKeyID is the key_id kubekms's Status reports while it refuses to
// seal (its key is revoked, or its key service unreachable past the outage
// grace). It names no key: an apiserver whose last Status returned it keeps
// writing under its previous seed until that seed's write lifetime ends,
// then refuses writes. It never counts as agreement on a key.
const StoppedKeyID = hierarchy.StoppedKeyID

// StoppedKeyIDHash is StoppedKeyID as the apiserver's metrics label it.
var StoppedKeyIDHash = HashKeyID(StoppedKeyID)

// ErrWritesStopped is returned (wrapped) for a plugin that reports
// StoppedKeyID where a real key_id is needed.
var ErrWritesStopped = errors.New("writes stopped")

// CheckPluginKeyID returns a plugin's Status key_id, or an error wrapping
// ErrWritesStopped when the plugin reports StoppedKeyID.
func CheckPluginKeyID(endpoint, keyID string) (string, error) {
	if keyID == StoppedKeyID {
		return "", fmt.Errorf("plugin %s reports %s: %w (its key is revoked, or its key service unreachable past the outage grace; "+
			"kubekms status says why): there is no key_id to write under until it recovers", endpoint, StoppedKeyID, ErrWritesStopped)
	}
	return keyID, nil
}

// describeStopped explains an apiserver whose plugin reports StoppedKeyID.
func describeStopped(previous string) string {
	msg := "writes stopped: its plugin's last Status reported " + StoppedKeyID +
		" (the key is revoked, or the key service unreachable past the outage grace)"
	if previous != "" {
		msg += "; it writes under its previous seed (" + short(previous) + ") until that seed's write lifetime ends (3 minutes), then refuses writes"
	}
	return msg
}
