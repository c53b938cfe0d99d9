package pkcs11

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const mod = "module-path=/usr/lib/softhsm/libsofthsm2.so"

func TestParseURIGood(t *testing.T) {
	for _, c := range []struct {
		uri  string
		want URI
	}{
		{
			"pkcs11:token=kms;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kubekms/pin",
			URI{ModulePath: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "kms", ObjectLabel: "kek",
				PIN: PINSource{File: "/etc/kubekms/pin"}, MaxSessions: DefaultMaxSessions},
		},
		{
			"PKCS11:serial=e709;id=%01%FF;type=secret-key?" + mod + "&pin-source=env:HSM_PIN&max-sessions=8",
			URI{ModulePath: "/usr/lib/softhsm/libsofthsm2.so", TokenSerial: "e709", ID: []byte{1, 0xff}, HasID: true,
				PIN: PINSource{Env: "HSM_PIN"}, MaxSessions: 8},
		},
		{
			"pkcs11:slot-id=7;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;object=my%20key%3Bv2?" + mod + "&pin-source=file:///run/pin",
			URI{ModulePath: "/usr/lib/softhsm/libsofthsm2.so", SlotID: 7, HasSlotID: true, TokenManufacturer: "SoftHSM project",
				TokenModel: "SoftHSM v2", ObjectLabel: "my key;v2", PIN: PINSource{File: "/run/pin"}, MaxSessions: DefaultMaxSessions},
		},
		{
			// Query attributes in any order; reserved characters allowed by RFC 7512.
			"pkcs11:token=a:b@c(d)!;object=k?pin-source=env:P&" + mod,
			URI{ModulePath: "/usr/lib/softhsm/libsofthsm2.so", TokenLabel: "a:b@c(d)!", ObjectLabel: "k",
				PIN: PINSource{Env: "P"}, MaxSessions: DefaultMaxSessions},
		},
	} {
		got, err := ParseURI(c.uri)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", c.uri, err)
			continue
		}
		if !reflect.DeepEqual(*got, c.want) {
			t.Errorf("ParseURI(%q) = %+v, want %+v", c.uri, *got, c.want)
		}
		again, err := ParseURI(got.String())
		if err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("String() %q does not parse back: %+v, %v", got.String(), again, err)
		}
	}
}

func TestParseURIBad(t *testing.T) {
	const ok = "pkcs11:token=kms;object=kek?" + mod + "&pin-source=env:PIN"
	if _, err := ParseURI(ok); err != nil {
		t.Fatalf("base URI: %v", err)
	}
	for _, c := range []struct{ uri, want string }{
		{"softkey:token=kms", `must start with "pkcs11:"`},
		{"pkcs11", `must start with "pkcs11:"`},
		{ok + "#frag", "fragment"},
		{"pkcs11:token=kms;object=kek?pin-source=env:PIN", "needs module-path"},
		{"pkcs11:token=kms;object=kek?" + mod, "needs pin-source"},
		{"pkcs11:object=kek?" + mod + "&pin-source=env:PIN", "select a token"},
		{"pkcs11:token=kms?" + mod + "&pin-source=env:PIN", "name the key"},
		{"pkcs11:token=kms;token=x;object=kek?" + mod + "&pin-source=env:PIN", `"token" appears twice`},
		{ok + "&pin-source=env:OTHER", `"pin-source" appears twice`},
		{"pkcs11:token=kms;object=kek;color=red?" + mod + "&pin-source=env:PIN", `unknown path attribute "color"`},
		{ok + "&x-foo=1", `unknown query attribute "x-foo"`},
		{"pkcs11:token=;object=kek?" + mod + "&pin-source=env:PIN", "empty value"},
		{"pkcs11:token;object=kek?" + mod + "&pin-source=env:PIN", "want name=value"},
		{"pkcs11:=kms;object=kek?" + mod + "&pin-source=env:PIN", "want name=value"},
		{"pkcs11:Token=kms;object=kek?" + mod + "&pin-source=env:PIN", "invalid character"},
		{"pkcs11:token=k%4;object=kek?" + mod + "&pin-source=env:PIN", "bad percent-escape"},
		{"pkcs11:token=k%zz;object=kek?" + mod + "&pin-source=env:PIN", "bad percent-escape"},
		{"pkcs11:token=a/b;object=kek?" + mod + "&pin-source=env:PIN", `'/' at offset 1 must be percent-encoded`},
		{"pkcs11:token=a b;object=kek?" + mod + "&pin-source=env:PIN", "must be percent-encoded"},
		{"pkcs11:token=kms;object=kek?module-path=lib.so&pin-source=env:PIN", "absolute path"},
		{"pkcs11:token=kms;object=kek?" + mod + "&pin-source=file:pin", "absolute path"},
		{"pkcs11:token=kms;object=kek?" + mod + "&pin-source=env:1X", "variable name"},
		{"pkcs11:token=kms;object=kek?" + mod + "&pin-source=env:A-B", "variable name"},
		{"pkcs11:token=kms;object=kek?" + mod + "&pin-source=|cat%20/pin", "must be file:/abs/path or env:NAME"},
		{"pkcs11:token=kms;object=kek?" + mod + "&pin-value=1234", "pin-value"},
		{"pkcs11:token=kms;object=kek?module-name=softhsm2&pin-source=env:PIN", "use module-path"},
		{"pkcs11:token=kms;object=kek;type=private?" + mod + "&pin-source=env:PIN", "secret-key"},
		{"pkcs11:token=kms;object=kek;slot-id=-1?" + mod + "&pin-source=env:PIN", "decimal number"},
		{"pkcs11:token=kms;object=kek;slot-description=x?" + mod + "&pin-source=env:PIN", "not supported"},
		{"pkcs11:token=kms;id=" + strings.Repeat("%01", maxIDBytes+1) + "?" + mod + "&pin-source=env:PIN", "longer than"},
		{ok + "&max-sessions=0", "1 to 64"},
		{ok + "&max-sessions=65", "1 to 64"},
		{ok + "&max-sessions=two", "1 to 64"},
	} {
		_, err := ParseURI(c.uri)
		if err == nil {
			t.Errorf("ParseURI(%q) succeeded, want error containing %q", c.uri, c.want)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseURI(%q) = %v, want error containing %q", c.uri, err, c.want)
		}
	}
}

// Errors never quote attribute values: a PIN pasted anywhere stays out of logs.
func TestParseURIErrorsHideValues(t *testing.T) {
	const secret = "S3cretPin99"
	for _, uri := range []string{
		"pkcs11:token=kms;object=kek?" + mod + "&pin-value=" + secret,
		"pkcs11:token=kms;object=kek?" + mod + "&pin-source=" + secret,
		"pkcs11:token=kms;object=kek;" + secret + "?" + mod + "&pin-source=env:PIN",
		"pkcs11:token=kms;object=kek;slot-id=" + secret + "?" + mod + "&pin-source=env:PIN",
		"pkcs11:token=kms;object=kek?" + mod + "&pin-source=env:PIN&max-sessions=" + secret,
		"pkcs11:token=kms;object=kek?" + mod + "&pin-source=file:" + secret,
	} {
		_, err := ParseURI(uri)
		if err == nil || strings.Contains(err.Error(), secret) {
			t.Errorf("ParseURI(%q) = %v: want an error without the value", uri, err)
		}
	}
}

func TestPINSourceRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	writeMode := func(name, content string, mode os.FileMode) string {
		p := write(name, content)
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		src     PINSource
		want    string
		wantErr string
	}{
		{PINSource{File: write("nl", "1234\n")}, "1234", ""},
		{PINSource{File: write("crlf", "1234\r\n")}, "1234", ""},
		{PINSource{File: write("plain", "12 34")}, "12 34", ""},
		{PINSource{File: write("empty", "\n")}, "", "is empty"},
		{PINSource{File: write("long", strings.Repeat("x", maxPINBytes+1))}, "", "longer than"},
		{PINSource{File: filepath.Join(dir, "missing")}, "", "read PIN file"},
		{PINSource{Env: "KUBEKMS_TEST_UNSET_PIN"}, "", "is empty"},
		{PINSource{File: writeMode("group", "1234\n", 0o640)}, "1234", ""},
		{PINSource{File: writeMode("world", "1234\n", 0o644)}, "", "other users can read it"},
		{PINSource{File: writeMode("writable", "1234\n", 0o622)}, "", "other users can change it"},
		{PINSource{File: dir}, "", "not a regular file"},
	} {
		got, err := c.src.Read()
		if c.wantErr == "" && (err != nil || got != c.want) {
			t.Errorf("%v: got %q, %v; want %q", c.src, got, err, c.want)
		}
		if c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)) {
			t.Errorf("%v: got %v, want error containing %q", c.src, err, c.wantErr)
		}
	}
}

func TestKeyIDRoundTrip(t *testing.T) {
	k := keyIdentity{TokenLabel: "k m;s", TokenSerial: "e709", Label: "kek/1", ID: []byte{0, 1, ';'}, CheckValue: []byte{1, 2, 3}}
	id := k.KeyID()
	ref, err := parseKeyID(id)
	if err != nil {
		t.Fatalf("parseKeyID(%q): %v", id, err)
	}
	if !ref.matches(k) {
		t.Fatalf("parsed %+v does not match %+v", ref, k)
	}
	other := k
	other.CheckValue = []byte{1, 2, 4}
	if ref.matches(other) || other.KeyID() == id {
		t.Fatal("a different check value gives the same key ID")
	}
	longest := keyIdentity{TokenLabel: strings.Repeat("\xff", 32), TokenSerial: strings.Repeat("\xff", 16),
		Label: strings.Repeat("\xff", maxLabelBytes), ID: bytes.Repeat([]byte{0xff}, maxIDBytes)}
	if n := len(longest.KeyID()); n > 1024 {
		t.Fatalf("longest key ID is %d bytes, want <= 1024", n)
	}
	for _, bad := range []string{
		"", "local:x", "pkcs11:", "pkcs11:token=a;serial=b;object=c;id=d",
		"pkcs11:token=a;serial=b;object=c;id=d;fp=short",
		"pkcs11:serial=b;token=a;object=c;id=d;fp=000000000000000000000000",
		"pkcs11:token=a%;serial=b;object=c;id=d;fp=000000000000000000000000",
		"pkcs11:token=a;serial=b;object=c;id=d;fp=000000000000000000000000;x=y",
	} {
		if _, err := parseKeyID(bad); err == nil {
			t.Errorf("parseKeyID(%q) succeeded", bad)
		}
	}
}

func TestCompareID(t *testing.T) {
	for _, c := range []struct {
		a, b []byte
		sign int
	}{
		{[]byte{2}, []byte{1}, 1},
		{[]byte{1, 0}, []byte{0xff}, 1},
		{[]byte{0, 5}, []byte{5}, 0},
		{nil, []byte{1}, -1},
		{[]byte{0x0a}, []byte{0x09}, 1},
	} {
		got := compareID(c.a, c.b)
		if got > 0 {
			got = 1
		} else if got < 0 {
			got = -1
		}
		if got != c.sign {
			t.Errorf("compareID(%x, %x) = %d, want sign %d", c.a, c.b, got, c.sign)
		}
	}
}

// FuzzParseURI: ParseURI never panics, and whatever it accepts formats back
// (String) to a URI that parses to the same value.
func FuzzParseURI(f *testing.F) {
	f.Add("pkcs11:token=kms;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kubekms/pin")
	f.Add("pkcs11:serial=1;id=%01?module-path=/m.so&pin-source=env:P&max-sessions=3")
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := ParseURI(raw)
		if err != nil {
			return
		}
		s := u.String()
		again, err := ParseURI(s)
		if err != nil {
			t.Fatalf("String() %q of an accepted URI does not parse: %v", s, err)
		}
		if !reflect.DeepEqual(again, u) {
			t.Fatalf("round trip changed the URI: %+v -> %q -> %+v", u, s, again)
		}
	})
}
