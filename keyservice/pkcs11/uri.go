package pkcs11

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kubekms/kubekms/internal/safefile"
)

// DefaultMaxSessions bounds the session pool when the URI has no
// max-sessions attribute.
const DefaultMaxSessions = 4

// maxPINBytes bounds what is read from a PIN file or variable.
const maxPINBytes = 256

// URI is a parsed PKCS#11 key URI (RFC 7512) naming one AES key on one token.
//
//	pkcs11:token=kms;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kubekms/pin
//
// Path attributes select the token (token, serial, manufacturer, model,
// slot-id; at least one of token, serial or slot-id) and the key (object
// and/or id; type, if given, must be secret-key). Query attributes:
// module-path (required), pin-source (required: file:/abs/path or env:NAME)
// and max-sessions (optional, 1..64). A PIN in the URI (pin-value) is
// refused so it never reaches a command line or a log.
type URI struct {
	ModulePath string

	TokenLabel        string
	TokenSerial       string
	TokenManufacturer string
	TokenModel        string
	SlotID            uint
	HasSlotID         bool

	// ObjectLabel is CKA_LABEL; ID is CKA_ID (raw bytes, percent-encoded in
	// the URI). When the URI names no id, the key with the highest CKA_ID
	// among those labelled ObjectLabel is current.
	ObjectLabel string
	ID          []byte
	HasID       bool

	PIN PINSource

	MaxSessions int
}

// PINSource says where the user PIN is read from: exactly one of File (an
// absolute path) or Env (a variable name) is set.
type PINSource struct {
	File string
	Env  string
}

func (p PINSource) String() string {
	if p.File != "" {
		return "file:" + p.File
	}
	return "env:" + p.Env
}

// pinFileRules: a PIN file is readable by its owner (this user or root) and
// at most its group (a Kubernetes secret volume with an fsGroup), writable
// by nobody else, in a folder nobody else can replace it in.
var pinFileRules = safefile.Rules{What: "PIN file", GroupRead: true, GroupWritableDir: true, MaxSize: maxPINBytes + 2}

// Read returns the PIN. A trailing newline in a PIN file is dropped. Errors
// name the source, never its content.
func (p PINSource) Read() (string, error) {
	var pin string
	switch {
	case p.File != "":
		b, _, err := safefile.Read(p.File, pinFileRules)
		if err != nil {
			return "", fmt.Errorf("read PIN file: %w", err)
		}
		pin = strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	case p.Env != "":
		pin = os.Getenv(p.Env)
	default:
		return "", errors.New("no PIN source")
	}
	if pin == "" {
		return "", fmt.Errorf("PIN from %s is empty", p)
	}
	if len(pin) > maxPINBytes {
		return "", fmt.Errorf("PIN from %s is longer than %d bytes", p, maxPINBytes)
	}
	return pin, nil
}

// ParseURI parses a pkcs11: key URI strictly: unknown, repeated or empty
// attributes, characters RFC 7512 requires to be percent-encoded, and bad
// percent-escapes are all errors. Errors never quote attribute values, so a
// PIN pasted into the wrong place does not end up in a log.
func ParseURI(raw string) (*URI, error) {
	scheme, rest, ok := strings.Cut(raw, ":")
	if !ok || !strings.EqualFold(scheme, "pkcs11") {
		return nil, errors.New(`PKCS#11 key URI must start with "pkcs11:"`)
	}
	if strings.Contains(rest, "#") {
		return nil, errors.New("PKCS#11 key URI must not have a fragment (#)")
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{MaxSessions: DefaultMaxSessions}
	seen := map[string]bool{}
	if path != "" {
		for attr := range strings.SplitSeq(path, ";") {
			name, value, err := splitAttr(attr, "path", pathChar)
			if err != nil {
				return nil, err
			}
			if seen[name] {
				return nil, fmt.Errorf("path attribute %q appears twice", name)
			}
			seen[name] = true
			if err := u.setPath(name, value); err != nil {
				return nil, err
			}
		}
	}
	if query != "" {
		for attr := range strings.SplitSeq(query, "&") {
			name, value, err := splitAttr(attr, "query", queryChar)
			if err != nil {
				return nil, err
			}
			if seen["?"+name] {
				return nil, fmt.Errorf("query attribute %q appears twice", name)
			}
			seen["?"+name] = true
			if err := u.setQuery(name, value); err != nil {
				return nil, err
			}
		}
	}
	if u.ModulePath == "" {
		return nil, errors.New("PKCS#11 key URI needs module-path=/abs/path/to/module.so in its query")
	}
	if u.PIN == (PINSource{}) {
		return nil, errors.New("PKCS#11 key URI needs pin-source=file:/abs/path or pin-source=env:NAME in its query")
	}
	if u.TokenLabel == "" && u.TokenSerial == "" && !u.HasSlotID {
		return nil, errors.New("PKCS#11 key URI must select a token with token=, serial= or slot-id=")
	}
	if u.ObjectLabel == "" && !u.HasID {
		return nil, errors.New("PKCS#11 key URI must name the key with object= (CKA_LABEL) and/or id= (CKA_ID)")
	}
	return u, nil
}

func splitAttr(attr, part string, allowed func(byte) bool) (name, value string, err error) {
	name, enc, ok := strings.Cut(attr, "=")
	if !ok || name == "" {
		return "", "", fmt.Errorf("%s attribute without a name or '=' (want name=value)", part)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return "", "", fmt.Errorf("%s attribute name has invalid character %q", part, c)
		}
	}
	if enc == "" {
		return "", "", fmt.Errorf("%s attribute %q has an empty value", part, name)
	}
	value, err = unescape(enc, allowed)
	if err != nil {
		return "", "", fmt.Errorf("%s attribute %q: %w", part, name, err)
	}
	return name, value, nil
}

// unescape decodes RFC 3986 percent-escapes and refuses characters that
// must be escaped in this part of the URI.
func unescape(s string, allowed func(byte) bool) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '%' {
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return "", fmt.Errorf("bad percent-escape at offset %d", i)
			}
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		if !allowed(c) {
			return "", fmt.Errorf("character %q at offset %d must be percent-encoded", c, i)
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c >= '0' && c <= '9':
		return c - '0'
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// RFC 7512: pk11-pchar and pk11-qchar.
func unreserved(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~", c) >= 0
}

func resAvail(c byte) bool { return strings.IndexByte(":[]@!$'()*+,=", c) >= 0 }

func pathChar(c byte) bool  { return unreserved(c) || resAvail(c) || c == '&' }
func queryChar(c byte) bool { return unreserved(c) || resAvail(c) || strings.IndexByte("/?|;", c) >= 0 }

func (u *URI) setPath(name, value string) error {
	switch name {
	case "token":
		u.TokenLabel = value
	case "serial":
		u.TokenSerial = value
	case "manufacturer":
		u.TokenManufacturer = value
	case "model":
		u.TokenModel = value
	case "slot-id":
		n, err := strconv.ParseUint(value, 10, 32)
		if err != nil {
			return errors.New(`path attribute "slot-id" must be a decimal number`)
		}
		u.SlotID, u.HasSlotID = uint(n), true
	case "object":
		u.ObjectLabel = value
	case "id":
		if len(value) > maxIDBytes {
			return fmt.Errorf(`path attribute "id" is longer than %d bytes`, maxIDBytes)
		}
		u.ID, u.HasID = []byte(value), true
	case "type":
		if value != "secret-key" {
			return errors.New(`path attribute "type" must be secret-key (the key is an AES secret key)`)
		}
	case "library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer":
		return fmt.Errorf("path attribute %q is not supported; select the token with token=, serial= or slot-id=", name)
	default:
		return fmt.Errorf("unknown path attribute %q", name)
	}
	return nil
}

func (u *URI) setQuery(name, value string) error {
	switch name {
	case "module-path":
		if !filepath.IsAbs(value) {
			return errors.New(`query attribute "module-path" must be an absolute path`)
		}
		u.ModulePath = filepath.Clean(value)
	case "pin-source":
		src, err := parsePINSource(value)
		if err != nil {
			return err
		}
		u.PIN = src
	case "max-sessions":
		n, err := strconv.Atoi(value)
		if err != nil || n < 1 || n > 64 {
			return errors.New(`query attribute "max-sessions" must be a number from 1 to 64`)
		}
		u.MaxSessions = n
	case "pin-value":
		return errors.New("a PIN in the key URI (pin-value) is refused: it would end up in command lines and logs; use pin-source=file:/abs/path or pin-source=env:NAME")
	case "module-name":
		return errors.New(`query attribute "module-name" is not supported; use module-path=/abs/path/to/module.so`)
	default:
		return fmt.Errorf("unknown query attribute %q", name)
	}
	return nil
}

func parsePINSource(v string) (PINSource, error) {
	switch {
	case strings.HasPrefix(v, "file:"):
		p := strings.TrimPrefix(v, "file:")
		p = strings.TrimPrefix(p, "//") // file:///abs/path
		if !filepath.IsAbs(p) {
			return PINSource{}, errors.New("pin-source=file: needs an absolute path (file:/etc/kubekms/pin)")
		}
		return PINSource{File: filepath.Clean(p)}, nil
	case strings.HasPrefix(v, "env:"):
		name := strings.TrimPrefix(v, "env:")
		if !validEnvName(name) {
			return PINSource{}, errors.New("pin-source=env: needs a variable name of letters, digits and _ (env:KUBEKMS_PKCS11_PIN)")
		}
		return PINSource{Env: name}, nil
	default:
		return PINSource{}, errors.New("pin-source must be file:/abs/path or env:NAME")
	}
}

func validEnvName(s string) bool {
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// String formats u as a canonical pkcs11: URI. It holds no secret (the PIN is
// only ever referenced by its source), so it is safe to log.
func (u *URI) String() string {
	var path []string
	add := func(name, v string) { path = append(path, name+"="+escape(v, pathChar)) }
	if u.TokenLabel != "" {
		add("token", u.TokenLabel)
	}
	if u.TokenSerial != "" {
		add("serial", u.TokenSerial)
	}
	if u.TokenManufacturer != "" {
		add("manufacturer", u.TokenManufacturer)
	}
	if u.TokenModel != "" {
		add("model", u.TokenModel)
	}
	if u.HasSlotID {
		add("slot-id", strconv.FormatUint(uint64(u.SlotID), 10))
	}
	if u.ObjectLabel != "" {
		add("object", u.ObjectLabel)
	}
	if u.HasID {
		add("id", string(u.ID))
	}
	q := []string{
		"module-path=" + escape(u.ModulePath, queryChar),
		"pin-source=" + escape(u.PIN.String(), queryChar),
	}
	if u.MaxSessions != DefaultMaxSessions {
		q = append(q, "max-sessions="+strconv.Itoa(u.MaxSessions))
	}
	return "pkcs11:" + strings.Join(path, ";") + "?" + strings.Join(q, "&")
}

// escape percent-encodes every byte not allowed, and always '%', ';', '&'
// and '?' that would end the attribute.
func escape(s string, allowed func(byte) bool) string {
	const digits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if allowed(c) && c != '%' && c != ';' && c != '&' && c != '?' && c != '=' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(digits[c>>4])
		b.WriteByte(digits[c&15])
	}
	return b.String()
}
