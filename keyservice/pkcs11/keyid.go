package pkcs11

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// maxIDBytes bounds CKA_ID so a key ID stays well under 1024 bytes.
const maxIDBytes = 64

const keyIDPrefix = "pkcs11:"

// keyIdentity is what names one key object for good: the token (label and
// serial; SoftHSM2 and real HSMs give a re-initialized token a new serial),
// the object's CKA_LABEL and CKA_ID, and what changes when a key is deleted
// and re-created under the same label and id: CKA_CHECK_VALUE (the token's
// key check value, derived from the key bytes) and CKA_UNIQUE_ID (PKCS#11
// 3.0) where the token has them. Object handles are not part of it: they
// are per-process and change on every C_Initialize.
type keyIdentity struct {
	TokenLabel  string
	TokenSerial string
	Label       string
	ID          []byte
	CheckValue  []byte
	UniqueID    []byte
}

// fingerprint is a short hash of the whole identity.
func (k keyIdentity) fingerprint() string {
	h := sha256.New()
	h.Write([]byte("kubekms pkcs11 key id v1"))
	for _, f := range [][]byte{[]byte(k.TokenLabel), []byte(k.TokenSerial), []byte(k.Label), k.ID, k.CheckValue, k.UniqueID} {
		_ = binary.Write(h, binary.BigEndian, uint32(len(f)))
		h.Write(f)
	}
	return hex.EncodeToString(h.Sum(nil)[:12])
}

// KeyID formats the identity as a readable, self-describing key ID:
//
//	pkcs11:token=kms;serial=e7098505643f8410;object=kek;id=%01;fp=<24 hex>
//
// Unwrap reads token, serial, object and id back to find the object, and
// fp to make sure it is the same key and not one re-created in its place.
func (k keyIdentity) KeyID() string {
	return keyIDPrefix + "token=" + escape(k.TokenLabel, pathChar) +
		";serial=" + escape(k.TokenSerial, pathChar) +
		";object=" + escape(k.Label, pathChar) +
		";id=" + escape(string(k.ID), pathChar) +
		";fp=" + k.fingerprint()
}

// keyRef is a parsed key ID.
type keyRef struct {
	TokenLabel, TokenSerial, Label string
	ID                             []byte
	Fingerprint                    string
}

func (r keyRef) matches(k keyIdentity) bool {
	return r.TokenLabel == k.TokenLabel && r.TokenSerial == k.TokenSerial && r.Label == k.Label &&
		bytes.Equal(r.ID, k.ID) && r.Fingerprint == k.fingerprint()
}

func parseKeyID(s string) (keyRef, error) {
	rest, ok := strings.CutPrefix(s, keyIDPrefix)
	if !ok {
		return keyRef{}, errors.New("key ID was not made by the pkcs11 backend")
	}
	var r keyRef
	want := []string{"token", "serial", "object", "id", "fp"}
	parts := strings.Split(rest, ";")
	if len(parts) != len(want) {
		return keyRef{}, errors.New("malformed pkcs11 key ID")
	}
	for i, p := range parts {
		name, enc, ok := strings.Cut(p, "=")
		if !ok || name != want[i] {
			return keyRef{}, errors.New("malformed pkcs11 key ID")
		}
		v, err := unescape(enc, pathChar)
		if err != nil {
			return keyRef{}, fmt.Errorf("malformed pkcs11 key ID: %s: %w", name, err)
		}
		switch name {
		case "token":
			r.TokenLabel = v
		case "serial":
			r.TokenSerial = v
		case "object":
			r.Label = v
		case "id":
			r.ID = []byte(v)
		case "fp":
			r.Fingerprint = v
		}
	}
	if len(r.Fingerprint) != 24 || len(r.ID) > maxIDBytes {
		return keyRef{}, errors.New("malformed pkcs11 key ID")
	}
	return r, nil
}

// compareID orders CKA_IDs as unsigned big-endian numbers (so 0x0a > 0x09
// and 0x0100 > 0xff), the order "the highest id is current" uses.
func compareID(a, b []byte) int {
	a, b = bytes.TrimLeft(a, "\x00"), bytes.TrimLeft(b, "\x00")
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	return bytes.Compare(a, b)
}
