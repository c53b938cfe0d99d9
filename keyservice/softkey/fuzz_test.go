package softkey_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/keyservice/softkey"
)

// FuzzParseURI: any string either parses to a clean absolute path or is
// refused, never a panic.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"softkey:///var/lib/kubekms/keyring.json", "softkey://h/x", "softkey:///a/../b", "softkey:x", "%", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		p, err := softkey.ParseURI(uri)
		if err != nil {
			return
		}
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.HasSuffix(p, "/") {
			t.Fatalf("ParseURI(%q) = %q: not a clean absolute path", uri, p)
		}
	})
}
