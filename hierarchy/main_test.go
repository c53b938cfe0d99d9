package hierarchy_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any test leaves a goroutine behind (a
// background loop not stopped by Close, a server not shut down).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
